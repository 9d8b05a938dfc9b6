"""Frozen-backbone inference engines: ONNX Runtime on CPU (see `export`) and torch on CUDA. Each takes a float32
NCHW batch and returns pooled features as float32 [N, D]."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from headstart.numeric import mean_features
from headstart.runtime.device import cpu_threads
from headstart.vision.preprocess import ORIENTATIONS, oriented


class Engine(Protocol):
    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


# What computed a batch's features, as feature caches are keyed by it (`FrozenBackbone.engine_kind`): engines
# agree only to rounding (CUDA's bfloat16 features are ~2% off the CPU's float32 ones), and one cache must hold
# features of one kind.
ONNX_CPU = "onnxruntime-cpu-fp32"


def torch_kind(device: str) -> str:
    """The kind of a `TorchEngine` on `device`: bfloat16 on CUDA, float32 elsewhere."""
    kind = device.split(":")[0]  # cuda:1 computes what cuda:0 does
    return f"torch-{kind}-{'bf16' if kind == 'cuda' else 'fp32'}"


class OnnxEngine:
    kind = ONNX_CPU

    def __init__(self, onnx_path: Path, threads: int | None = None, spinning: bool = True,
                 kind: str = ONNX_CPU) -> None:
        import onnxruntime as ort

        self.kind = kind  # an int8 graph (see `runtime.quantize`) names its calibration
        self.path = Path(onnx_path)  # the graph it runs (an export composes int8 graphs into model.onnx)

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or cpu_threads()
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def run_all(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output of a multi-output graph (the frozen bottom gives activations and pooled taps)."""
        return self.session.run(None, {self.input_name: batch})


class TorchEngine:
    """For CUDA: bf16 autocast and channels_last, where the GPU is fastest. On the CPU (a network ONNX Runtime
    cannot run), float32: bfloat16 was slower on this CPU and moved features by ~2%."""

    def __init__(self, model, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.kind = torch_kind(self.device.type)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(batch).to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        bf16 = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.model(x).float().cpu().numpy()


class OrientedEngine:
    """`inner`'s features of each batch averaged over its first `n` orientations (`vision.preprocess.ORIENTATIONS`):
    all eight, what a model trained on oriented features (`train.oriented`) sees; two, the photo and its mirror
    image (a fine-tuned model, `train.stage2.mirrored_features`). n times the work of `inner`."""

    def __init__(self, inner: Engine, n: int = 8) -> None:
        self.inner, self.names = inner, tuple(ORIENTATIONS)[:n]
        self.kind = getattr(inner, "kind", ONNX_CPU)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return mean_features(self.inner(oriented(batch, name)) for name in self.names)


def joined_kind(first: str, second: str) -> str:
    """The kind of two engines side by side: the one kind when both compute alike, else both joined."""
    return first if first == second else f"{first}+{second}"


class StackedEngine:
    """`first`'s features of each batch and then `second`'s, side by side: a backbone with a companion
    (`FrozenBackbone.companion`), of the kind `joined_kind` names."""

    def __init__(self, first: Engine, second: Engine) -> None:
        self.first, self.second = first, second
        self.kind = joined_kind(getattr(first, "kind", ONNX_CPU), getattr(second, "kind", ONNX_CPU))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate([self.first(batch), self.second(batch)], axis=1)


def any_size_path(fixed: Path) -> Path:
    """Where the any-size twin of a fixed-size export lives."""
    return fixed.with_name(fixed.stem + "-any.onnx")


class ViewsEngine:
    """For a standard and a native view: the standard view through its fixed-size graph, which ONNX Runtime
    plans fastest (7% faster here than the same graph with symbolic sizes), other sizes through the any-size
    graph. Their thread pools take turns, so neither may spin while idle: two spinning pools stole a fifth of the
    cores from each other and from the decoders (a flowers pass took 44 s instead of 37 s)."""

    kind = ONNX_CPU

    def __init__(self, fixed: Path, size: int, any_size: Path | None = None, kind: str = ONNX_CPU) -> None:
        self.kind = kind
        self.fixed = OnnxEngine(fixed, spinning=False, kind=kind)
        self.any_size = OnnxEngine(any_size or any_size_path(fixed), spinning=False, kind=kind)
        self.size = size

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        engine = self.fixed if batch.shape[-2:] == (self.size, self.size) else self.any_size
        return engine(batch)
