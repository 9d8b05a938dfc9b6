"""runtime.reweight through export_onnx's `like`: a graph made from a cached export of the same network with other
weights (BatchNorm statistics and affine included, as fine-tuning changes them) and another input size agrees with
torch at that size and, through its twin, at others, without the dynamo exporter; a graph of another network is
not reused, and the export falls back to the exporter.

Torch-free at import: the tests import torch when they run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers_models import TINY_BACKBONE


@pytest.fixture
def tiny_features(tiny_weights):
    from headstart.backbones.registry import resolve
    from headstart.runtime.frozen import FrozenBackbone

    return FrozenBackbone.pretrained(resolve(TINY_BACKBONE), tiny_weights).build_torch()


def _tuned(model, seed: int):
    """`model` with every floating tensor moved, as a fine-tuning run moves them (running variances kept > 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.mul_(1 + 0.2 * torch.rand(t.shape, generator=gen)) if name.endswith("running_var") else \
                    t.add_(0.05 * torch.randn(t.shape, generator=gen))
    return model


def _exports_counted(monkeypatch) -> list[int]:
    from headstart.runtime import export

    calls, real = [0], export._export_program

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "_export_program", counted)
    return calls


def _agrees(model, engine, size: int) -> None:
    import torch

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(engine(x.numpy()), expected, atol=1e-4)


def test_a_tuned_network_at_another_size_is_made_from_the_cached_graph(tiny_features, tiny_weights, tmp_path: Path,
                                                                      monkeypatch) -> None:
    from headstart.backbones.registry import resolve
    from headstart.runtime.engines import ViewsEngine, any_size_path
    from headstart.runtime.export import export_onnx
    from headstart.runtime.frozen import FrozenBackbone

    # Trained statistics, as pretrained weights have: freshly initialised ones fold to zero biases, which the
    # exporter drops from the graph (and then the graph cannot take a tuned network's)
    pretrained = _tuned(tiny_features, seed=1)
    first = export_onnx(pretrained, 160, tmp_path / "a.onnx", other_sizes=(64, 96))
    tuned = _tuned(FrozenBackbone.pretrained(resolve(TINY_BACKBONE), tiny_weights).build_torch(), seed=2)
    calls = _exports_counted(monkeypatch)
    path = export_onnx(tuned, 96, tmp_path / "b.onnx", other_sizes=(64, 160), like=[any_size_path(first)])
    assert calls[0] == 0  # no dynamo export: the weights were swapped into the cached graph
    engine = ViewsEngine(path, 96)
    for size in (96, 64, 128):
        _agrees(tuned, engine, size)
    with pytest.raises(AssertionError):
        _agrees(pretrained, engine, 96)  # the new weights are in it, not the old


def test_a_graph_of_another_network_is_not_reused(tiny_features, tmp_path: Path, monkeypatch) -> None:
    import torch

    from headstart.runtime.engines import OnnxEngine
    from headstart.runtime.export import export_onnx

    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    source = export_onnx(other, 64, tmp_path / "other.onnx")
    calls = _exports_counted(monkeypatch)
    path = export_onnx(tiny_features, 96, tmp_path / "b.onnx", like=[source, tmp_path / "missing-any.onnx"])
    assert calls[0] == 1  # exported afresh
    _agrees(tiny_features, OnnxEngine(path), 96)


def test_the_exports_tried_are_this_architectures_any_size_ones_newest_first(tmp_path: Path) -> None:
    import os

    from headstart.backbones.registry import resolve
    from headstart.runtime.frozen import FrozenBackbone

    spec = resolve(TINY_BACKBONE)
    name, size = spec.timm_name, spec.preprocess.input_size
    files = {f"{name}-aaa-{size}px-k1.onnx": 1, f"{name}-bbb-160px-k2-any.onnx": 2, f"{name}-ccc-96px-k3-any.onnx": 3,
             f"other_net-ddd-{size}px-k4-any.onnx": 4, f"{name}-eee-{size}px-k5.onnx.failed.json": 5,
             f"{name}-fff-{size}px-k6-any-int8-d1.onnx": 6, f"{name}-ggg-{size}px-k7.onnx": 7}  # int8, fixed: newest
    for file, mtime in files.items():
        (tmp_path / file).write_bytes(b"")
        os.utime(tmp_path / file, (mtime, mtime))
    frozen = FrozenBackbone(spec, tmp_path / "w.safetensors", "w")
    like = frozen._like(tmp_path / f"{name}-new-{size}px-k8.onnx")
    assert [p.name for p in like] == [f"{name}-ccc-96px-k3-any.onnx", f"{name}-bbb-160px-k2-any.onnx"]
