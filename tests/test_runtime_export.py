"""runtime.export: one graph for every view, the any-size twin matches torch at each size (also with
TensorFlow-style 'same' padding), and a graph that cannot take other sizes is refused leaving nothing behind.

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


def test_export_for_other_sizes_matches_torch_at_each(tiny_features, tmp_path: Path) -> None:
    import torch

    from headstart.runtime.engines import OnnxEngine, ViewsEngine
    from headstart.runtime.export import any_size_path, export_onnx

    path = export_onnx(tiny_features, 160, tmp_path / "fixed.onnx", other_sizes=(64, 96))
    assert any_size_path(path).exists()
    with pytest.raises(Exception):
        OnnxEngine(path)(np.zeros((1, 3, 64, 64), np.float32))  # the fixed graph stays fixed, the fastest
    engine = ViewsEngine(path, 160)
    for size in (160, 64, 128):  # 128 was not among the checked sizes: any multiple of the stride works
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected = tiny_features(x).numpy()
        np.testing.assert_allclose(engine(x.numpy()), expected, atol=1e-4)


def test_export_for_other_sizes_when_the_input_size_is_not_a_multiple_of_the_stride(tmp_path: Path) -> None:
    """TensorFlow-style 'same' pads (the tf_efficientnet_lite models) traced at 176 px, like lite1's 240, are
    wrong at 64 or 128 px: the twin for other sizes must be traced at one of them."""
    import timm
    import torch

    from headstart.runtime.engines import ViewsEngine
    from headstart.runtime.export import export_onnx
    from headstart.backbones.pooled import PooledFeatures

    torch.manual_seed(0)
    net = PooledFeatures(timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=0, pad_type="same")).eval()
    engine = ViewsEngine(export_onnx(net, 176, tmp_path / "fixed.onnx", other_sizes=(64, 96)), 176)
    for size in (176, 64, 128):
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected = net(x).numpy()
        np.testing.assert_allclose(engine(x.numpy()), expected, atol=1e-4)


def test_export_refuses_a_graph_that_cannot_take_other_sizes(tmp_path: Path) -> None:
    import torch

    from headstart.runtime.export import export_onnx

    # torch takes any size here; the traced graph pools with a kernel fixed for 32 px, and its Linear then fails.
    fixed = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 5)
    ).eval()
    with pytest.raises(RuntimeError, match="64 px"):  # traced again at 96 px, it still fails at 64
        export_onnx(fixed, 32, tmp_path / "fixed.onnx", other_sizes=(64, 96))
    assert list(tmp_path.iterdir()) == []  # neither graph, nor a temporary file, is left
