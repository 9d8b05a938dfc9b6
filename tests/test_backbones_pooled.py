"""backbones.pooled: multi-scale features are stage means plus the final features, other layouts fall back to
the model's own, and the forward split at a stage boundary is exact."""

from __future__ import annotations

import pytest
import timm
import torch

from helpers_models import N_STAGES, TINY_BACKBONE, TINY_DIM
from headstart.backbones.pooled import TAPPED_STAGES, PooledFeatures
from headstart.backbones.registry import resolve


def test_multi_scale_features_are_stage_means_plus_final_features(tiny_weights):
    from headstart.backbones.weights import create_model

    backbone = create_model(resolve(TINY_BACKBONE), tiny_weights)
    pooled = PooledFeatures(backbone).eval()
    assert pooled.multi_scale
    stage_chs = [info["num_chs"] for info in backbone.feature_info][-TAPPED_STAGES:]
    assert sum(stage_chs) + backbone.num_features == TINY_DIM

    stage_outputs = []
    hooks = [backbone.blocks[i].register_forward_hook(lambda m, i, o: stage_outputs.append(o))
             for i in range(len(backbone.blocks) - TAPPED_STAGES, len(backbone.blocks))]
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pooled(x)
        final = backbone(x)  # timm's own pooled features
    for h in hooks:
        h.remove()
    assert out.shape == (2, TINY_DIM)
    start = 0
    for o in stage_outputs[:TAPPED_STAGES]:
        torch.testing.assert_close(out[:, start:start + o.shape[1]], o.mean((2, 3)))
        start += o.shape[1]
    torch.testing.assert_close(out[:, start:], final)


def test_pooling_falls_back_to_model_features_for_other_layouts():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    pooled = PooledFeatures(model).eval()
    assert not pooled.multi_scale
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(pooled(x), model(x))


from helpers_finetune import _net  # noqa: E402


@pytest.mark.usefixtures("one_torch_thread")
def test_top_forward_from_the_boundary_equals_the_full_forward(tiny_weights):
    net = _net(tiny_weights).eval()
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = net(x)
        for b in range(N_STAGES + 1):
            h, taps = net.forward_bottom(x, b)
            assert (taps.shape[1] > 0) == (b > N_STAGES - 3)  # stages tapped for pooling below the boundary
            top = net.forward_top(h, taps, b)
            assert top.shape == full.shape
            assert torch.allclose(top, full, atol=1e-6, rtol=0), f"boundary {b}"
