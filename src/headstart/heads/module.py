"""The head as a torch module: standardise with statistics fixed from the training features (stage outputs
differ in scale by orders of magnitude), then dropout -> optional hidden layers -> linear. What fine-tuning,
Grad-CAM and export run; stage 1 fits the same head in numpy (`heads.params`) and its state dict loads here."""

from __future__ import annotations

import torch
from torch import nn

from headstart.heads.config import HeadConfig


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

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(self.standardize(features))
