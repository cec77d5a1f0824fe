"""edge-agent: camera inference daemon with MQTT and hot-swapped models."""

__version__ = "0.1.0"
