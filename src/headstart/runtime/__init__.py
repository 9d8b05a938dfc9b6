"""Running a frozen backbone: engines (ONNX Runtime float32 and int8, torch), the ONNX export and its parity
checks, int8 quantization (`quantize`), the device and thread settings, and `FrozenBackbone`, which picks the
engine for a backbone with definite weights."""

from headstart.runtime.device import cpu_threads, pick_device
from headstart.runtime.engines import Engine, OnnxEngine, TorchEngine, ViewsEngine
from headstart.runtime.frozen import FrozenBackbone

__all__ = ["Engine", "FrozenBackbone", "OnnxEngine", "TorchEngine", "ViewsEngine", "cpu_threads", "pick_device"]
