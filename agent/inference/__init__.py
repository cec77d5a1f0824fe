"""A loaded model: its file and model.yaml, the session the probe picked, preprocessing, decoding, the frame loop."""
