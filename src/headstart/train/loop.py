"""Pieces every training loop shares: the best-weights tracker, the schedules and the head's optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

_FLOAT32_MAX = 3.4028234663852886e38
_FUSED = hasattr(torch, "_fused_adamw_")  # torch >= 2.4 on the CPU



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


class HeadAdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments) for the head's few tensors.

    Not torch.optim itself: its first step imports torch._dynamo, 2.8 s on this CPU, longer than training a
    head takes; and a warm-cache `train` is otherwise done in seconds."""

    def __init__(self, params, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        bias1, bias2 = 1 - beta1**self.steps, 1 - beta2**self.steps
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if _FUSED and live and all(self.params[i].device.type == "cpu" for i in live):
            # torch's fused kernel (what AdamW(fused=True) calls, without torch.optim's import): one pass over
            # each tensor instead of six, 0.15 ms against 0.5 for the hidden head's 64 x 3808 weight. The rate
            # is clamped so that lr / bias1 stays within float32, as below.
            pick = lambda ts: [ts[i] for i in live]  # noqa: E731
            torch._fused_adamw_(pick(self.params), [self.params[i].grad for i in live], pick(self.exp_avg),
                                pick(self.exp_avg_sq), [], [torch.tensor(float(self.steps))] * len(live),
                                lr=min(lr, _FLOAT32_MAX * bias1), beta1=beta1, beta2=beta2,
                                weight_decay=self.weight_decay, eps=self.eps, amsgrad=False, maximize=False)
            return
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            p.mul_(1 - lr * self.weight_decay)
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            # Clamped to float32's range: an absurd rate (1e38) must diverge, and be reported as such by the
            # loop, not overflow the scalar here.
            step = max(-_FLOAT32_MAX, min(_FLOAT32_MAX, -lr / bias1))
            p.addcdiv_(m, (v.sqrt() / math.sqrt(bias2)).add_(self.eps), value=step)


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
