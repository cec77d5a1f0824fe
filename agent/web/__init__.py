"""The HTTP server: the device page, the JSON and Open Inference Protocol APIs, MJPEG and Prometheus metrics."""
