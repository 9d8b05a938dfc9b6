"""The backbone as what is trained and exported: its pooled multi-scale features, split at a stage boundary."""

from __future__ import annotations

import torch
from torch import nn

TAPPED_STAGES = 3  # pool the outputs of the last three stages besides the final features


class PooledFeatures(nn.Module):
    """Global-average-pooled outputs of the last stages plus the final feature map, concatenated.

    The last stages of an ImageNet network are the most specialised to ImageNet; on photos far from it (blurred,
    small, unusual) the mid-level stages carry what the top lost, and pooling them costs nothing extra. Models
    without timm's EfficientNet/MobileNet layout fall back to their own pooled features.

    For fine-tuning the network splits at a stage boundary: `forward_bottom` runs the stem and the frozen stages
    below it once (its output is cached), `forward_top` runs the trainable stages above it every epoch."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.multi_scale = all(hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"))

    @property
    def n_stages(self) -> int:
        return len(self.backbone.blocks)

    def _first_tap(self) -> int:
        return self.n_stages - TAPPED_STAGES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.multi_scale:
            return self.backbone(x)
        h, taps = self.forward_bottom(x, 0)
        return self.forward_top(h, taps, 0)

    def forward_bottom(self, x: torch.Tensor, boundary: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stem and stages [0, boundary): the activation at the boundary, and pooled taps of stages below it."""
        b = self.backbone
        h = b.bn1(b.conv_stem(x))
        taps = []
        for i in range(boundary):
            h = b.blocks[i](h)
            if i >= self._first_tap():
                taps.append(h.mean((2, 3)))
        return h, torch.cat(taps, 1) if taps else h.new_zeros(h.shape[0], 0)

    def forward_top(self, h: torch.Tensor, taps: torch.Tensor, boundary: int) -> torch.Tensor:
        """Stages [boundary, end) and the final conv, continuing from `forward_bottom`'s outputs."""
        b = self.backbone
        pooled = [taps]
        for i in range(boundary, self.n_stages):
            h = b.blocks[i](h)
            if i >= self._first_tap():
                pooled.append(h.mean((2, 3)))
        pooled.append(b.bn2(b.conv_head(h)).mean((2, 3)))
        return torch.cat(pooled, dim=1)

    def trainable_units(self, boundary: int) -> list[nn.Module]:
        """Whole modules above the boundary, bottom to top: stages, then the final conv and its BatchNorm. At
        boundary 0 the stem (conv and BatchNorm) too: once every stage trains, the stem is what is left of the
        frozen bottom, and on blurred flowers training it lowered validation loss (0.47 against 0.51)."""
        b = self.backbone
        stem = [nn.ModuleList([b.conv_stem, b.bn1])] if boundary == 0 else []
        stages = [b.blocks[i] for i in range(boundary, self.n_stages)]
        return stem + stages + [nn.ModuleList([b.conv_head, b.bn2])]


class StackedFeatures(PooledFeatures):
    """A backbone's pooled features and then a companion backbone's, of the same input (`FrozenBackbone.companion`):
    the torch twin of the engines `runtime.engines.StackedEngine` joins. It is the first backbone as far as
    Grad-CAM's taps go; it is never fine-tuned (`forward_top` is the first backbone's alone)."""

    def __init__(self, backbone: nn.Module, companion: PooledFeatures) -> None:
        super().__init__(backbone)
        self.companion = companion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().forward(x), self.companion(x)], dim=1)


class FrozenBottom(nn.Module):
    """The stem and stages below the boundary as a module of their own, for export to ONNX Runtime."""

    def __init__(self, features: PooledFeatures, boundary: int) -> None:
        super().__init__()
        self.features = features
        self.boundary = boundary

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features.forward_bottom(x, self.boundary)
