"""ONNX export of a backbone (or its frozen bottom), refused unless it agrees with torch, and where exports are
cached (named by `paths.store_key`, with the export version from `paths.VERSIONS`). The any-size twin serves
native views (see `vision.preprocess`).

A cached export ONNX Runtime cannot load (truncated or overwritten on disk) is dropped and exported again
(`open_cached`). An export that failed is remembered beside where it would have been (`remember_failure`), so
that the later engines of a run, and later runs with the same toolchain, do not spend the export's half a minute
to fail again; another version of torch, onnx or onnxruntime tries again.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from headstart.backbones.registry import BackboneSpec
from headstart.errors import UserError
from headstart.paths import atomic_path, atomic_write_bytes, store_path
from headstart.runtime.engines import OnnxEngine, any_size_path

log = logging.getLogger(__name__)

PARITY_ATOL = 1e-3
_TOOLCHAIN = ("torch", "onnx", "onnxscript", "onnxruntime")  # what an export's success depends on, beyond its key
E = TypeVar("E")


def onnx_path_for(spec: BackboneSpec, weights_id: str) -> Path:
    """Where the export of `spec` with these weights is cached (a bump of the export version moves it)."""
    size = spec.preprocess.input_size
    parts = dict(graph="backbone", timm=spec.timm_name, w=weights_id, size=size)
    return store_path("export", parts, label=f"{spec.timm_name}-{weights_id}-{size}px", suffix=".onnx")


def open_cached(path: Path, open_engine: Callable[[], E], export: Callable[[], object],
                twins: Sequence[Path] = ()) -> E:
    """The engine `open_engine()` makes on the export cached at `path` (and its `twins`), after `export()` wrote
    them when missing. A cached file ONNX Runtime cannot load is dropped with a warning and exported again."""
    if path.exists() and all(twin.exists() for twin in twins):
        try:
            return open_engine()
        except Exception as exc:  # onnxruntime's own types (InvalidProtobuf, Fail...) derive from Exception alone
            log.warning("%s: the cached ONNX export is damaged (%s); exporting it again", path,
                        " ".join(str(exc).split())[:200])
            for file in (path, *twins):
                file.unlink(missing_ok=True)
    export()
    return open_engine()


def failure_path(target: Path) -> Path:
    """Where a failed export to `target` is remembered."""
    return target.with_name(target.name + ".failed.json")


def _toolchain() -> dict[str, str]:
    from importlib import metadata  # versions without importing torch: a cached run never needs it

    versions = {}
    for name in _TOOLCHAIN:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


def remember_failure(target: Path, reason: str) -> None:
    """Remember that exporting to `target` failed, and why, for this toolchain."""
    try:
        atomic_write_bytes(failure_path(target), json.dumps(dict(reason=reason, toolchain=_toolchain())).encode())
    except (OSError, UserError) as exc:  # only a shortcut: a full disk must not hide why the export failed
        log.debug("could not remember the failed export of %s: %s", target, exc)


def known_failure(target: Path) -> str | None:
    """Why exporting to `target` failed before with this toolchain, or None when it was not tried (or a memo
    is unreadable, or another toolchain wrote it: then the export is tried again)."""
    memo = failure_path(target)
    try:
        record = json.loads(memo.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        memo.unlink(missing_ok=True)
        return None
    if not isinstance(record, dict) or record.get("toolchain") != _toolchain():
        return None
    return str(record.get("reason") or "the export failed")


def export_onnx(
    model, input_size: int, target: Path, output_names: tuple[str, ...] = ("features",),
    other_sizes: tuple[int, ...] = (), like: Sequence[Path] = (),
) -> Path:
    """Export a model with a dynamic batch, and refuse an export whose outputs disagree with torch.

    With `other_sizes`, a twin graph that takes other square inputs (for native views) is written beside it
    (`any_size_path`): its height and width are symbolic, and it must agree with torch at each of those sizes.
    `like`: any-size exports of the same network (other weights or sizes), tried first (`reweight`)."""
    model = model.eval()
    with atomic_path(target) as tmp:  # renamed after the twin is written: the fixed graph marks both done
        err = _derived_parity(model, like, input_size, output_names, tmp)
        if err is None:
            _export_program(model, input_size, output_names, tmp)
            err = _parity_error(model, OnnxEngine(tmp), input_size)
        if err > PARITY_ATOL:
            raise RuntimeError(f"ONNX export differs from torch by {err:.2e} (> {PARITY_ATOL})")
        if other_sizes:
            _write_any_size_twin(model, tmp, any_size_path(target), input_size, other_sizes, output_names)
    log.info("exported backbone to %s (max abs diff vs torch %.1e)", target, err)
    return target


def _derived_parity(model, like: Sequence[Path], input_size: int, output_names: tuple[str, ...],
                    path: Path) -> float | None:
    """The parity error of a graph `reweight` made at `path` from one of `like`; None when none agrees with torch
    (the caller exports afresh)."""
    from headstart.runtime.reweight import graph_values, reweighted

    values = graph_values(model, input_size) if like else {}  # once, whichever graph takes them
    for source in like:
        try:
            if reweighted(source, values, input_size, path, output_names):
                err = _parity_error(model, OnnxEngine(path), input_size)
                if err <= PARITY_ATOL:
                    return err
                log.info("%s with new weights differs from torch by %.2e: exporting afresh", source.name, err)
        except Exception as exc:  # onnx's or onnxruntime's own types: a graph this cannot reuse
            log.info("could not reuse %s (%s): exporting afresh", source.name, " ".join(str(exc).split())[:200])
    return None


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
    with atomic_path(target) as tmp:
        tmp.write_bytes(fixed.read_bytes())
        failure = _symbolic_size_failure(model, tmp, other_sizes)
        if failure and other_sizes[-1] != input_size:
            _export_program(model, other_sizes[-1], output_names, tmp)
            failure = _symbolic_size_failure(model, tmp, other_sizes)
        if failure:
            raise failure


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
