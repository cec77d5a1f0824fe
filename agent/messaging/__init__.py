"""MQTT: the broker link, topics and payloads, the prediction publisher, and the durable outbox behind QoS 1."""
