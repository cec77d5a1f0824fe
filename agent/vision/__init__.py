"""From a frame to a tensor and from a tensor to results: preprocessing, geometry, NMS, and the task decoders."""
