"""Frozen-backbone inference engines: ONNX Runtime on CPU (exported once, cached, checked against torch) and
torch on CUDA. Both take a float32 NCHW batch and return pooled features as float32 [N, D]."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from headstart.backbones import BackboneSpec
from headstart.paths import cache_root, temp_path_beside

log = logging.getLogger(__name__)

EXPORT_VERSION = 3  # bump when the export recipe changes, so stale exports are not reused
PARITY_ATOL = 1e-3


class Engine(Protocol):
    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def cpu_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class OnnxEngine:
    def __init__(self, onnx_path: Path, threads: int | None = None, spinning: bool = True) -> None:
        import onnxruntime as ort

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
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(batch).to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        bf16 = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.model(x).float().cpu().numpy()


def onnx_path_for(spec: BackboneSpec, weights_id: str) -> Path:
    size = spec.preprocess.input_size
    return cache_root() / "onnx" / f"{spec.timm_name}-{weights_id}-{size}px-v{EXPORT_VERSION}.onnx"


def any_size_path(fixed: Path) -> Path:
    """Where the any-size twin of a fixed-size export lives."""
    return fixed.with_name(fixed.stem + "-any.onnx")


class ViewsEngine:
    """For a standard and a native view: the standard view through its fixed-size graph, which ONNX Runtime
    plans fastest (7% faster here than the same graph with symbolic sizes), other sizes through the any-size
    graph. Their thread pools take turns, so neither may spin while idle: two spinning pools stole a fifth of the
    cores from each other and from the decoders (a flowers pass took 44 s instead of 37 s)."""

    def __init__(self, fixed: Path, size: int) -> None:
        self.fixed = OnnxEngine(fixed, spinning=False)
        self.any_size = OnnxEngine(any_size_path(fixed), spinning=False)
        self.size = size

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        engine = self.fixed if batch.shape[-2:] == (self.size, self.size) else self.any_size
        return engine(batch)


def export_onnx(
    model, input_size: int, target: Path, output_names: tuple[str, ...] = ("features",),
    other_sizes: tuple[int, ...] = (),
) -> Path:
    """Export a model with a dynamic batch, and refuse an export whose outputs disagree with torch.

    With `other_sizes`, a twin graph that takes other square inputs (for native views) is written beside it
    (`any_size_path`): its height and width are symbolic, and it must agree with torch at each of those sizes."""
    model = model.eval()
    tmp = temp_path_beside(target)
    try:
        _export_program(model, input_size, output_names, tmp)
        err = _parity_error(model, OnnxEngine(tmp), input_size)
        if err > PARITY_ATOL:
            raise RuntimeError(f"ONNX export differs from torch by {err:.2e} (> {PARITY_ATOL})")
        if other_sizes:
            _write_any_size_twin(model, tmp, any_size_path(target), input_size, other_sizes, output_names)
        os.replace(tmp, target)  # after the twin: the fixed graph marks both done
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported backbone to %s (max abs diff vs torch %.1e)", target, err)
    return target


def _export_program(model, size: int, output_names: tuple[str, ...], path: Path) -> None:
    import torch

    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    # The exporter prints its own progress; the library never prints.
    with contextlib.redirect_stdout(io.StringIO()), _quiet_loggers("onnx_ir", "onnxscript", "torch.onnx"):
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["pixels"], output_names=list(output_names),
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
    program.save(str(path))


def _write_any_size_twin(model, fixed: Path, target: Path, input_size: int, other_sizes: tuple[int, ...],
                         output_names: tuple[str, ...]) -> None:
    """The twin that serves `other_sizes`: the fixed graph with symbolic height and width when it agrees with
    torch at each, else a graph traced at one of them.

    TensorFlow-style 'same' pads are traced as constants, right only for sizes with the traced size's remainder
    modulo each stride: lite1's 240 px and lite2's 260 px are not multiples of the network's stride of 32, so
    their traced pads were wrong at every native size (fresh installs failed to export them at all)."""
    tmp = temp_path_beside(target)
    try:
        tmp.write_bytes(fixed.read_bytes())
        failure = _symbolic_size_failure(model, tmp, other_sizes)
        if failure and other_sizes[-1] != input_size:
            _export_program(model, other_sizes[-1], output_names, tmp)
            failure = _symbolic_size_failure(model, tmp, other_sizes)
        if failure:
            raise failure
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _symbolic_size_failure(model, path: Path, sizes: tuple[int, ...]) -> RuntimeError | None:
    """Make the graph at `path` take any size; the reason it disagrees with torch at one of `sizes`, if it does."""
    _make_spatial_dims_symbolic(path)
    engine = OnnxEngine(path)
    try:
        err = max(_parity_error(model, engine, size) for size in sizes)
    except RuntimeError as exc:  # the graph cannot take one of the sizes
        return exc
    if err > PARITY_ATOL:
        return RuntimeError(f"ONNX export for other input sizes differs from torch by {err:.2e} (> {PARITY_ATOL})")
    return None


def _parity_error(model, engine: OnnxEngine, size: int) -> float:
    import torch

    check = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            expected = model(check)
        got = engine.run_all(check.numpy())
    except Exception as exc:  # torch's or onnxruntime's own types: this network or graph cannot take the size
        raise RuntimeError(f"the exported graph cannot take {size} px inputs: {exc}") from None
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    if [g.shape for g in got] != [e.shape for e in expected]:
        raise RuntimeError(f"the exported graph cannot take {size} px inputs: its outputs have other shapes")
    return max(float(np.abs(g - e).max()) if e.size else 0.0 for g, e in zip(got, expected))


def _make_spatial_dims_symbolic(path: Path) -> None:
    """Let an exported convolutional network take any input height and width. The exporter traced one size;
    a fully convolutional network computes the same at sizes that divide evenly through its strides (the pads
    of TensorFlow-style 'same' convolutions depend only on that), which the caller's parity checks confirm."""
    import onnx

    graph = onnx.load(str(path))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    for axis, name in ((2, "height"), (3, "width")):
        dims[axis].ClearField("dim_value")
        dims[axis].dim_param = name
    del graph.graph.value_info[:]  # shapes inferred at the traced size would contradict other sizes
    onnx.save(graph, str(path))


def pick_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if "torch" not in sys.modules:
        # Importing torch only to learn there is no GPU costs seconds; CUDA setups set this variable anyway.
        if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
            return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
