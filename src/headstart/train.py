"""How the head is trained: one loop, read top to bottom, on cached features.

AdamW, a schedule (reduce-on-plateau or warmup + cosine), early stopping on validation loss with the best weights
restored at the end (fastai/Keras `restore_best_weights`), optional class weights.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from headstart.head import HeadConfig
from headstart.model import Head
from headstart.progress import NoProgress, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    schedule: str = "cosine"  # "cosine" (warmup then cosine) or "plateau" (reduce on plateau)
    patience: int = 10  # epochs without a better validation loss before stopping
    balance: bool = False  # weight the loss by inverse class frequency
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "plateau"):
            raise ValueError(f"schedule must be 'cosine' or 'plateau', not {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _one_intra_op_thread(fn):
    """Run `fn` with one torch intra-op thread. The head's matrices are tiny, so a second thread only adds
    synchronisation; and while another process holds a core, OpenMP's waiting makes every step tens of times
    slower (60 epochs on 300 x 1500 features, 2 cores, one busy: 30 s with 2 threads, 0.5 s with 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@_one_intra_op_thread
def fit_head(
    head_cfg: HeadConfig, cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray,
    x_val: np.ndarray | None = None, y_val: np.ndarray | None = None, progress: Progress | None = None,
) -> tuple[Head, History]:
    """Train a fresh head on features. Without validation data, trains for all epochs and keeps the last."""
    progress = progress or NoProgress()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    head = Head(head_cfg)
    head.set_standardization(x_train)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x_train, np.float32)), torch.from_numpy(y_train.astype(np.int64))
    has_val = x_val is not None and len(x_val) > 0
    if has_val:
        xv, yv = torch.from_numpy(np.ascontiguousarray(x_val, np.float32)), torch.from_numpy(y_val.astype(np.int64))

    weight = class_weights(y_train, head_cfg.n_classes) if cfg.balance else None
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(xt) / cfg.batch_size)
    scheduler = _scheduler(opt, cfg, steps_per_epoch)
    history = History()
    best_loss, best_state, bad_epochs = math.inf, copy.deepcopy(head.state_dict()), 0

    progress.start("training head", cfg.epochs)
    for epoch in range(cfg.epochs):
        head.train()
        order = torch.from_numpy(rng.permutation(len(xt)))
        total = 0.0
        for start in range(0, len(xt), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            loss = F.cross_entropy(head(xt[idx]), yt[idx], weight=weight, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.schedule == "cosine":
                scheduler.step()
            total += loss.item() * len(idx)
        history.train_loss.append(total / len(xt))
        progress.advance(1)
        if not has_val:
            continue

        head.eval()
        with torch.no_grad():
            logits = head(xv)
            val_loss = F.cross_entropy(logits, yv).item()
            history.val_loss.append(val_loss)
            history.val_accuracy.append((logits.argmax(1) == yv).float().mean().item())
        if cfg.schedule == "plateau":
            scheduler.step(val_loss)
        if val_loss < best_loss - 1e-4:
            best_loss, best_state, bad_epochs = val_loss, copy.deepcopy(head.state_dict()), 0
            history.best_epoch = epoch
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                history.stopped_early = True
                break
    progress.finish()

    if has_val:
        head.load_state_dict(best_state)
    else:
        history.best_epoch = cfg.epochs - 1
    log.info("head trained: best epoch %d of %d", history.best_epoch + 1, len(history.train_loss))
    return head.eval(), history


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=max(1, cfg.patience // 3))
    total = cfg.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, max(1, int(0.05 * total))))


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Learning-rate factor per step: linear warmup, then cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return factor
