"""What is trained: the backbone's pooled multi-scale features, and a small head on top.

The head standardises its input with statistics fixed from the training features (stage outputs differ in scale
by orders of magnitude), then dropout -> optional hidden layers -> linear.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from headstart.head import HeadConfig

TAPPED_STAGES = 3  # pool the outputs of the last three stages besides the final features


class PooledFeatures(nn.Module):
    """Global-average-pooled outputs of the last stages plus the final feature map, concatenated.

    The last stages of an ImageNet network are the most specialised to ImageNet; on photos far from it (blurred,
    small, unusual) the mid-level stages carry what the top lost, and pooling them costs nothing extra. Models
    without timm's EfficientNet/MobileNet layout fall back to their own pooled features."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.multi_scale = all(hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        if not self.multi_scale:
            return b(x)
        x = b.bn1(b.conv_stem(x))
        pooled = []
        first_tap = len(b.blocks) - TAPPED_STAGES
        for i, stage in enumerate(b.blocks):
            x = stage(x)
            if i >= first_tap:
                pooled.append(x.mean((2, 3)))
        pooled.append(b.bn2(b.conv_head(x)).mean((2, 3)))
        return torch.cat(pooled, dim=1)


class Head(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(cfg.in_features))
        self.register_buffer("std", torch.ones(cfg.in_features))
        layers: list[nn.Module] = [nn.Dropout(cfg.dropout)]
        width = cfg.in_features
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        layers.append(nn.Linear(width, cfg.n_classes))
        self.layers = nn.Sequential(*layers)

    def set_standardization(self, features: np.ndarray) -> None:
        self.mean.copy_(torch.from_numpy(features.mean(0)))
        self.std.copy_(torch.from_numpy(features.std(0) + 1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers((features - self.mean) / self.std)
