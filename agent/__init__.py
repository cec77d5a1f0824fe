"""edge-agent: camera inference daemon with MQTT and hot-swapped models."""

__version__ = "0.1.0"

# OpenCV's own bound on a decoded image's pixels (its default is 2**30: 3 GB for one posted picture).
# Read once, when cv2 loads, so it is set here, before any of the agent imports cv2. The HTTP API
# checks a posted image's header against a tighter bound first (agent/web/media.py); this is the
# decoder's backstop for whatever that parse does not see.
import os as _os

_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2**27))
