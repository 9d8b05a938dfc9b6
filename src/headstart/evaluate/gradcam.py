"""Where the model looks: Grad-CAM (Selvaraju et al., 2017) for a few images, with torch hooks.

A few lines of hooks rather than the `grad-cam` package: that package pulls in OpenCV, scikit-learn and ttach
for what is here ~30 lines, and its one-target-layer-per-forward model does not fit ours as it is. Our features
are *several* stages pooled and concatenated (`PooledFeatures`), and a native-view model runs the backbone twice
per image; the class score's gradient reaches every tapped stage, so the map here is the mean of each tapped
stage's Grad-CAM on the standard view, each normalised to [0, 1] and upsampled to the input crop.

torch is imported inside the functions: a report without heat maps, and predicting, never pay for it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from headstart.heads.config import HeadConfig
from headstart.vision.preprocess import PreprocessConfig, load_views

if TYPE_CHECKING:  # onnxruntime and timm stay unloaded until a heat map is made
    from headstart.runtime.frozen import FrozenBackbone

log = logging.getLogger(__name__)

__all__ = ["HeatMap", "heat_maps", "overlay"]


@dataclass(frozen=True, eq=False)
class HeatMap:
    """One image's Grad-CAM for one class: `heat` [input_size, input_size] in [0, 1] over the model's centre
    crop, and the class score (logit) it explains."""

    path: Path
    target: int
    heat: np.ndarray
    logit: float


def _model(frozen: FrozenBackbone, head_cfg: HeadConfig, head_state: Mapping[str, np.ndarray]
           ) -> tuple[Any, Any, list[Any]]:
    """(features network, head, layers whose outputs are tapped) as torch modules in eval mode, on the CPU."""
    import torch

    from headstart.heads.module import Head

    feats = frozen.build_torch()
    head = Head(head_cfg)
    head.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in head_state.items()})
    head.eval()
    if feats.multi_scale:
        b = feats.backbone
        layers = [b.blocks[i] for i in range(feats._first_tap(), feats.n_stages)] + [b.bn2]
    else:  # a backbone without EfficientNet's layout: its last module with a 4-D output is found by the hook
        layers = [m for m in feats.backbone.modules() if isinstance(m, torch.nn.Conv2d)][-1:]
    return feats, head, layers


def heat_maps(frozen: FrozenBackbone, head_cfg: HeadConfig, head_state: Mapping[str, np.ndarray], paths: list[Path],
              targets: list[int] | None = None) -> list[HeatMap]:
    """Grad-CAM of each path for its target class (by default, the predicted class), for the model made of the
    backbone and the head (a fitted classifier's `frozen_`, `head_config_`, `head_state_`); a few images, one at
    a time."""
    import torch

    feats, head, layers = _model(frozen, head_cfg, head_state)
    cfg = frozen.spec.preprocess
    for p in list(feats.parameters()) + list(head.parameters()):
        p.requires_grad_(False)  # gradients are needed for the activations only
    out: list[HeatMap] = []
    for n, path in enumerate(paths):
        views = [torch.from_numpy(v)[None] for v in load_views(path, cfg)]
        captured: list[torch.Tensor] = []

        hooks = [layer.register_forward_hook(_keeper(captured, len(layers))) for layer in layers]
        try:
            with torch.enable_grad():
                x = views[0].requires_grad_(True)  # makes every activation part of the graph
                pooled = torch.cat([feats(x)] + [feats(v) for v in views[1:]], 1)
                logits = head(pooled)[0]
                target = int(logits.argmax()) if targets is None else int(targets[n])
                logits[target].backward()
        finally:
            for h in hooks:
                h.remove()
        out.append(HeatMap(Path(path), target, _combine(captured, cfg.input_size), float(logits[target].detach())))
    return out


def _keeper(captured: list[Any], n: int) -> Any:
    """A forward hook keeping the first `n` 4-D outputs: the standard view's pass (a native view's second pass
    comes after it), over whose crop the map is drawn."""

    def keep(_module: Any, _inputs: Any, output: Any) -> None:
        if len(captured) < n and output.ndim == 4:
            output.retain_grad()
            captured.append(output)

    return keep


def _combine(acts: list[Any], size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    maps = []
    for a in acts:
        weights = a.grad.mean((2, 3), keepdim=True)  # the class score's sensitivity to each channel
        cam = F.relu((weights * a).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        top = cam.max()
        maps.append(cam / top if top > 0 else cam)  # a stage with no positive evidence adds nothing
    heat = torch.stack(maps).mean(0) if maps else torch.zeros(size, size)
    top = heat.max()
    return (heat / top if top > 0 else heat).detach().numpy().astype(np.float32)


# matplotlib's 'jet' as its segment data defines it: (position, value) knots per channel, linear between them.
# matplotlib (~78 MB with its dependencies) was imported for this one map; `jet` computes what it did, its
# 256 colours, exactly (tests/test_evaluate_gradcam_colours.py holds values read off matplotlib).
_JET = {
    "red": ((0.0, 0.35, 0.66, 0.89, 1.0), (0.0, 0.0, 1.0, 1.0, 0.5)),
    "green": ((0.0, 0.125, 0.375, 0.64, 0.91, 1.0), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0)),
    "blue": ((0.0, 0.11, 0.34, 0.65, 1.0), (0.5, 1.0, 1.0, 0.0, 0.0)),
}


def jet(x: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] of the 'jet' colour map at `x` (clipped to [0, 1]); shape `x.shape + (3,)`. As matplotlib
    draws it: 256 colours, the knots interpolated at i / 255, `x` taking colour min(floor(256 x), 255)."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
    level = np.minimum(np.floor(x * 256), 255) / 255
    return np.stack([np.interp(level, *_JET[c]) for c in ("red", "green", "blue")], -1)


def overlay(path: Path, heat: np.ndarray, cfg: PreprocessConfig, alpha: float = 0.45) -> Image.Image:
    """The model's centre crop of `path` with the heat map blended over it ('jet'), as a PIL image."""
    from headstart.data.imageio import load_rgb
    from headstart.vision.preprocess import resize_and_crop

    crop = np.asarray(resize_and_crop(load_rgb(path, cfg.resize_size), cfg), dtype=np.float32) / 255.0
    colour = jet(heat)
    return Image.fromarray(np.uint8(255 * ((1 - alpha) * crop + alpha * colour)))
