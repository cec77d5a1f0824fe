"""Runtime backends behind one session interface: a registry finds them, the probe picks one per model.

base: the Session and Backend interfaces; registry: the backends and their formats; choice: the
probe and the pure decision of which backend and accelerator; session: opening and warming up; one
file per backend (tflite, onnx).
"""

from agent.runtimes.base import (
    ModelLoadError,
    RuntimeChoice,
    RuntimeChoiceError,
    RuntimeUnavailable,
    Session,
    SessionInfo,
    TensorSpec,
)
from agent.runtimes.choice import choose_runtime, probe
from agent.runtimes.registry import detect_format
from agent.runtimes.session import inference_threads, open_session, warm_up

__all__ = ["ModelLoadError", "RuntimeChoice", "RuntimeChoiceError", "RuntimeUnavailable", "Session", "SessionInfo",
           "TensorSpec", "choose_runtime", "detect_format", "inference_threads", "open_session", "probe", "warm_up"]
