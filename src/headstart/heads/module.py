"""The head as a torch module: standardise with statistics fixed from the training features (stage outputs
differ in scale by orders of magnitude), then dropout -> optional hidden layers -> linear."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from headstart.heads.config import CHUNK_ROWS, HeadConfig


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

    def set_standardization(self, features: np.ndarray, chunk: int = CHUNK_ROWS) -> None:
        """Per-feature mean and std, two passes over chunks in float64: the features may be memory-mapped and
        larger than memory."""
        n = len(features)
        mean = sum(features[i:i + chunk].sum(0, dtype=np.float64) for i in range(0, n, chunk)) / n
        var = sum(((features[i:i + chunk] - mean) ** 2).sum(0) for i in range(0, n, chunk)) / n
        self.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        self.std.copy_(torch.from_numpy((np.sqrt(var) + 1e-6).astype(np.float32)))

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(self.standardize(features))
