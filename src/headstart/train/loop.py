"""Pieces every training loop shares: the best-weights tracker and the schedules (torch-free). The head's
optimizer is `head_step.AdamW`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


class BestTracker:
    """fastai's `TrackerCallback` for both stages' loops: the lowest validation loss so far (an improvement must
    beat it by `min_delta`), what `snapshot()` returned when it was reached, and `patience`: after that many
    epochs without an improvement, `should_stop`."""

    def __init__(self, patience: int | None = None, best: float = math.inf, state: Any = None,
                 min_delta: float = 1e-4) -> None:
        self.patience, self.best, self.state, self.min_delta = patience, best, state, min_delta
        self.bad_epochs = 0

    def update(self, value: float, snapshot: Callable[[], Any] | None = None) -> bool:
        """Record one epoch's value; True when it improved (and `state` is now `snapshot()`)."""
        if value < self.best - self.min_delta:
            self.best, self.bad_epochs = value, 0
            if snapshot is not None:
                self.state = snapshot()
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience


class Plateau:
    """Reduce-on-plateau (torch's ReduceLROnPlateau in 'min' mode, relative threshold 1e-4): multiply the rate
    by `factor` after more than `patience` epochs without a better validation loss."""

    def __init__(self, lr: float, factor: float, patience: int) -> None:
        self.lr, self.factor, self.patience = lr, factor, patience
        self.best, self.bad_epochs = math.inf, 0

    def step(self, val_loss: float) -> None:
        if val_loss < self.best * (1 - 1e-4):
            self.best, self.bad_epochs = val_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.lr *= self.factor
            self.bad_epochs = 0


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Learning-rate factor per step: linear warmup, then cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return factor
