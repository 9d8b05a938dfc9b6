"""Stage 2, fastai-style: unfreeze the top stages and train them with the head at a lower, layer-wise rate.

Only whole stages train (timm's stages; the final 1x1 conv always trains with them). The frozen bottom never
runs here: its outputs come from the boundary cache (`boundary.py`), one stored augmented view per image per
epoch. BatchNorm keeps its running statistics (inference mode) unless `train_bn`, the Keras guide's rule, so a
small batch never overwrites ImageNet statistics. Each epoch ends with an atomic checkpoint; `resume` continues
from the last one with the same RNG state, so an interrupted run finishes as an uninterrupted one would.

Divergence: an epoch whose training or validation loss is not finite stops stage 2 with a warning, before any
checkpoint of it; the weights kept are the best finite epoch's, or the stage-1 model's when none beat it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from headstart.backbones.pooled import PooledFeatures
from headstart.cache.boundary import read_view, release, stores_pixels
from headstart.errors import CheckpointError, FinetuneError
from headstart.heads.module import Head
from headstart.progress import NoProgress, Progress
from headstart.records import FinetuneConfig, History
from headstart.runtime import distributed
from headstart.train import checkpoint
from headstart.train.head_step import class_weights
from headstart.train.loop import BestTracker, warmup_cosine

log = logging.getLogger(__name__)

# A batch's gradient is computed this many images at a time: the activations autograd keeps for the backward
# pass are what fine-tuning's memory is made of (every stage of lite0 at 128 px: ~1 GB for 32 images, half that
# for 16), and on this 2-core CPU two passes of 16 took no longer than one of 32 (980-1030 ms against 1060-1110
# for a forward and backward of 32 images). The optimiser still steps once per batch, on the same mean loss.
MICRO_BATCH = 16
VAL_LOGITS = "val.logits"  # beside the kept weights in the tracker's state (and so in checkpoints)


def boundary_for(net: PooledFeatures, unfreeze: int | str) -> int:
    """Index of the first trainable stage."""
    if not net.multi_scale:
        raise FinetuneError("fine-tuning needs a backbone with timm's EfficientNet/MobileNet layout (stem, blocks, "
                            "conv_head); use --strategy head for this backbone")
    if unfreeze == "all":
        return 0
    try:
        n = int(unfreeze)
    except (TypeError, ValueError):
        n = 0
    if not 1 <= n <= net.n_stages:
        raise FinetuneError(f"--unfreeze must be 1..{net.n_stages} stages or 'all', not {unfreeze}")
    return net.n_stages - n


def layer_decay(cfg: FinetuneConfig, n_units: int) -> float:
    """The factor between the rates of neighbouring trained units, from `lr` at the top down to `lr * lowest_rate`.

    A fixed ratio from top to bottom rather than a fixed factor per stage: measured on flowers, the top two stages
    did best with 0.6 per stage and all seven with 0.85, both about a third of the top rate at the bottom (with 0.6,
    the bottom of seven stages barely moves)."""
    return cfg.lowest_rate ** (1 / (n_units - 1)) if n_units > 1 else 1.0


def set_trainable(net: PooledFeatures, boundary: int) -> list[nn.Module]:
    """Freeze everything, then unfreeze whole units above the boundary; returns them bottom to top."""
    for p in net.parameters():
        p.requires_grad_(False)
    units = net.trainable_units(boundary)
    for unit in units:
        for p in unit.parameters():
            p.requires_grad_(True)
    return units


class _Placement:
    """Where the top trains: tensors onto the device in channels_last, and the autocast.

    channels_last turns the many 1x1 convolutions into plain matrix products: measured here, it trains the top
    of lite0 1.6x faster on the CPU in float32 (126 vs 77 images/s). bfloat16 pays on CUDA but not on this CPU."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.device = torch.device(cfg.device)
        self.bf16 = cfg.use_bf16
        self.memory_format = torch.channels_last

    def module(self, m: nn.Module) -> nn.Module:
        return m.to(self.device, memory_format=self.memory_format)

    def tensor(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(arr, dtype=np.float32)).to(self.device)  # a copy: memmaps are read-only
        return t.contiguous(memory_format=self.memory_format) if t.dim() == 4 else t

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def set_modes(net: PooledFeatures, head: Head, units: list[nn.Module], train_bn: bool) -> None:
    """Frozen layers and (by default) every BatchNorm run in inference mode; the head's dropout trains."""
    net.eval()
    head.train()
    if train_bn:
        for unit in units:
            for m in unit.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()


@dataclass(frozen=True)
class StoredViews:
    """One split of the boundary store as stage 2 reads it (rows of images it could read)."""

    acts: np.ndarray  # [n, views, C, H, W] float16, memory-mapped: activations at the boundary, or pixels
    taps: np.ndarray  # [n, views, T] pooled outputs of tapped stages below the boundary
    labels: np.ndarray  # [n]


@dataclass
class _Loop:
    """What a stage-2 run carries from epoch to epoch, and what its checkpoint saves and restores.

    Two trackers: the weights kept at the end must beat the stage-1 model (`keep` starts at its validation loss),
    but patience follows stage 2's own best. Its first epochs, at the highest rate, often score below the stage-1
    model; counting those as bad epochs stopped runs (training all stages at 128 px on flowers) before the rate
    came down and they overtook it."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    rng: np.random.Generator
    keep: BestTracker
    patience: BestTracker
    history: History = field(default_factory=History)
    epoch: int = 0  # the next epoch to run
    weight: torch.Tensor | None = None  # class weights of the training loss (`FinetuneConfig.balance`)


@dataclass(frozen=True)
class Finetuned:
    config: FinetuneConfig  # as run: its epochs those that fit the time budget, when it had one
    history: History
    # The kept weights' validation logits, from the epoch that chose them; None when they are the stage-1 model's
    # (their logits were not computed here when the caller gave `start_loss`) or came from before a resume.
    val_logits: np.ndarray | None


def finetune(
    net: PooledFeatures, head: Head, cfg: FinetuneConfig, train: StoredViews, val: StoredViews,
    checkpoint_dir: Path | None = None, resume: bool = False, progress: Progress | None = None,
    start_loss: float | None = None, deadline: float | None = None,
) -> Finetuned:
    """Train the top of `net` and `head` in place, from the boundary store's views; keep the best epoch's weights.
    `start_loss`: the stage-1 model's validation loss, when the caller knows it (a validation pass saved: ~4 s on
    flowers); it is what an epoch must beat for its weights to be kept. `deadline` (a `time.perf_counter()`
    value): with `cfg.time_budget_s`, no epoch starts that would end after it (`out_of_time`)."""
    progress = progress or NoProgress()
    place = _Placement(cfg)
    place.module(net)
    place.module(head)
    boundary = boundary_for(net, cfg.unfreeze)
    units = set_trainable(net, boundary)
    trained = _trained_state_names(net, units)
    torch.manual_seed(cfg.seed)
    val_weight = _class_weight(val.labels, head, place) if cfg.balance else None
    saved = checkpoint.load(checkpoint_dir) if resume and checkpoint_dir else None
    if saved:  # the epochs the interrupted run planned, whatever the time left now
        cfg = replace(cfg, epochs=int(saved[1]["config"]["epochs"]))
    if start_loss is None:
        start_loss, start_acc, _ = _validate(net, head, boundary, val, place, val_weight)
        log.info("before fine-tuning: val loss %.4f, val %s %.4f", start_loss, "balanced acc" if cfg.balance else
                 "acc", start_acc)
    loop = _Loop(*_optimizer(net, head, units, cfg, len(train.labels)), np.random.default_rng(cfg.seed),
                 keep=BestTracker(best=start_loss, state=_snapshot(net, head, trained)),
                 patience=BestTracker(patience=cfg.stop_after),
                 weight=_class_weight(train.labels, head, place, cfg.balance_power) if cfg.balance else None)
    if saved:
        _restore(loop, net, head, cfg, len(train.labels), *saved)
    top = distributed.ddp(_Top(net, head, boundary), broadcast_buffers=cfg.train_bn)  # itself in one process

    progress.start("fine-tuning", cfg.epochs)
    progress.advance(loop.epoch)
    epoch_s = 0.0  # the last epoch's seconds: the next one would take as long
    for epoch in range(loop.epoch, cfg.epochs):
        if loop.patience.should_stop:
            break
        if out_of_time(deadline if cfg.time_budget_s else None, epoch_s):
            log.warning("fine-tuning: the time limit ends it after %d of %d epochs (an epoch took %.0f s): on a "
                        "faster or quieter machine the same command runs them all", epoch, cfg.epochs, epoch_s)
            loop.history.stopped_early = True
            break
        started = time.perf_counter()
        set_modes(net, head, units, cfg.train_bn)
        train_loss = _train_epoch(net, head, boundary, cfg, train, epoch % train.acts.shape[1], loop, place, top)
        val_loss, val_acc, logits = _validate(net, head, boundary, val, place, val_weight)
        val_loss, val_acc = distributed.same(val_loss, val_acc)  # rank 0's decides
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            log.warning("fine-tuning diverged at epoch %d (training loss %s, validation loss %s) with learning rate "
                        "%g: stopped, keeping the best weights before it; lower --finetune-lr", epoch + 1, train_loss,
                        val_loss, cfg.lr)
            loop.history.stopped_early = True
            break
        loop.history.train_loss.append(train_loss)
        loop.history.val_loss.append(val_loss)
        loop.history.val_accuracy.append(val_acc)
        if loop.keep.update(val_loss, lambda: {**_snapshot(net, head, trained), VAL_LOGITS: logits}):
            loop.history.best_epoch = epoch
        if not loop.patience.update(val_loss):
            loop.history.stopped_early = loop.patience.should_stop
        log.info("epoch %d: train loss %.4f, val loss %.4f, val %s %.4f", epoch + 1, train_loss, val_loss,
                 "balanced acc" if cfg.balance else "acc", val_acc)
        loop.epoch = epoch + 1
        if checkpoint_dir:
            _save_checkpoint(checkpoint_dir, net, head, trained, loop, cfg, len(train.labels))
        progress.advance(1)
        epoch_s = time.perf_counter() - started
    progress.finish()

    _load_trained(net, head, loop.keep.state, "")  # the best epoch's weights, not the last
    net.cpu().to(memory_format=torch.contiguous_format).eval()
    head.cpu().eval()
    logits = loop.keep.state.get(VAL_LOGITS)
    return Finetuned(cfg, loop.history, None if logits is None else logits.cpu().numpy())


def _optimizer(net: PooledFeatures, head: Head, units: list[nn.Module], cfg: FinetuneConfig, n_train: int):
    """AdamW with the head at its own rate and the trained units at rates falling from the top (`layer_decay`),
    and the warmup + cosine schedule over the whole run."""
    groups = [{"params": list(head.parameters()), "lr": cfg.head_lr}]
    decay = layer_decay(cfg, len(units))
    for depth, unit in enumerate(reversed(units)):
        groups.append({"params": list(unit.parameters()), "lr": cfg.lr * decay ** depth})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)  # one kernel per step, CPU and CUDA
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.epochs * steps_per_epoch, warmup))


def _train_epoch(net: PooledFeatures, head: Head, boundary: int, cfg: FinetuneConfig, train: StoredViews,
                 view: int, loop: _Loop, place: _Placement, top: nn.Module | None = None) -> float:
    """One pass over the training images, each seen in stored view `view`; the mean training loss. Under
    torchrun each rank takes its share of every batch (`distributed.sampled`) and `top` is DDP's."""
    n_train = len(train.labels)
    top = top or _Top(net, head, boundary)
    order = distributed.sampled(loop.rng.permutation(n_train))
    batch = distributed.per_rank(cfg.batch_size)
    total = 0.0
    for start in range(0, len(order), batch):
        idx = np.sort(order[start:start + batch])  # sorted rows read the store sequentially
        loop.opt.zero_grad(set_to_none=True)
        for part in range(0, len(idx), MICRO_BATCH):  # the batch's gradient, a micro-batch at a time
            rows = idx[part:part + MICRO_BATCH]
            acts = place.tensor(read_view(train.acts, rows, view))
            taps = place.tensor(read_view(train.taps, rows, view))
            y = torch.from_numpy(train.labels[rows]).to(place.device)
            last = part + MICRO_BATCH >= len(idx)
            with contextlib.nullcontext() if last else _no_sync(top):  # ranks average once per batch
                with place.autocast():
                    logits = top(acts, taps)
                loss = F.cross_entropy(logits.float(), y, weight=loop.weight, label_smoothing=cfg.label_smoothing)
                (loss * (len(rows) / len(idx))).backward()  # the batch's mean loss, summed over its parts
            total += loss.item() * len(rows)
        loop.opt.step()
        loop.sched.step()
    release(train.acts)  # a no-op for reads by `read_view`; pages an older caller mapped leave the RSS
    return distributed.sum_over_ranks(total)[0] / n_train


def _no_sync(top: nn.Module):
    """DistributedDataParallel's way of accumulating a gradient without averaging it over ranks yet."""
    return top.no_sync() if hasattr(top, "no_sync") else contextlib.nullcontext()


def top_features(net: PooledFeatures, boundary: int, acts: np.ndarray, taps: np.ndarray,
                 place: _Placement | None = None, batch: int = MICRO_BATCH) -> torch.Tensor:
    """Pooled features from the boundary store's view 0, in eval mode, `batch` images at a time: at 128 px with
    every stage, batches of 16 ran faster than of 64 here (470-550 ms against 570-650 per 64 images) and kept
    ~220 MB less resident (a validation pass of 64 was the fine-tune's peak RSS, 1.84 GB on flowers)."""
    place = place or _Placement(FinetuneConfig())
    net.eval()
    out = []
    with torch.no_grad(), place.autocast():
        for s in range(0, len(acts), batch):
            rows = slice(s, s + batch)
            h, t = _from_store(net, boundary, place.tensor(read_view(acts, rows, 0)),
                               place.tensor(read_view(taps, rows, 0)))
            out.append(net.forward_top(h, t, boundary))
    return torch.cat(out).float()


class _Top(nn.Module):
    """What trains, from the store's arrays to the logits, as one module (so DistributedDataParallel can wrap
    it: the stem, when it trains, runs inside its forward)."""

    def __init__(self, net: PooledFeatures, head: Head, boundary: int) -> None:
        super().__init__()
        self.net, self.head, self.boundary = net, head, boundary

    def forward(self, acts: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        h, taps = _from_store(self.net, self.boundary, acts, taps)
        return self.head(self.net.forward_top(h, taps, self.boundary))


def _from_store(net: PooledFeatures, boundary: int, acts: torch.Tensor, taps: torch.Tensor):
    """What the trained top continues from: the stored activations, or, when the store holds pixels (every stage
    trains), the stem's output computed from them now (the stem trains too)."""
    if not stores_pixels(boundary):
        return acts, taps
    return net.forward_bottom(acts, 0)


def _class_weight(labels: np.ndarray, head: Head, place: _Placement, power: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(class_weights(labels, head.cfg.n_classes, power)).to(place.device)


def _validate(net, head, boundary: int, val: StoredViews, place: _Placement,
              weight: torch.Tensor | None = None) -> tuple[float, float, torch.Tensor]:
    """Validation loss (class-balanced with `weight`: each class's mean loss weighs the same), accuracy (balanced
    with `weight`: the mean recall) and logits."""
    head.eval()
    feats = top_features(net, boundary, val.acts, val.taps, place)
    with torch.no_grad():
        logits = head(feats)
        y = torch.from_numpy(val.labels).to(logits.device)
        hit = (logits.argmax(1) == y).float()
        acc = hit.mean().item() if weight is None else (weight[y] * hit).sum().item() / weight[y].sum().item()
        return F.cross_entropy(logits, y, weight=weight).item(), acc, logits


def _trained_state_names(net: PooledFeatures, units: list[nn.Module]) -> list[str]:
    """State entries that can change: parameters and buffers (BatchNorm statistics) of the unfrozen units."""
    inside = {id(t) for u in units for t in [*u.parameters(), *u.buffers()]}
    return [k for k, v in net.state_dict(keep_vars=True).items() if id(v) in inside]


def _snapshot(net: PooledFeatures, head: Head, trained: list[str]) -> dict[str, torch.Tensor]:
    sd = net.state_dict()
    state = {f"net.{k}": sd[k].clone() for k in trained}
    state.update({f"head.{k}": v.clone() for k, v in head.state_dict().items()})
    return state


def _load_trained(net: PooledFeatures, head: Head, tensors: dict, prefix: str) -> None:
    p_net, p_head = f"{prefix}net.", f"{prefix}head."
    net.load_state_dict({k[len(p_net):]: v for k, v in tensors.items() if k.startswith(p_net)}, strict=False)
    head.load_state_dict({k[len(p_head):]: v for k, v in tensors.items() if k.startswith(p_head)})


def _save_checkpoint(directory: Path, net: PooledFeatures, head: Head, trained: list[str], loop: _Loop,
                     cfg: FinetuneConfig, n_train: int) -> None:
    tensors = {f"model.{k}": v for k, v in _snapshot(net, head, trained).items()}
    tensors.update({f"best.{k}": v for k, v in loop.keep.state.items()})
    opt_tensors, opt_meta = checkpoint.optimizer_state(loop.opt)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    sched_state = {k: v for k, v in loop.sched.state_dict().items() if k != "lr_lambdas"}
    meta = dict(epoch=loop.epoch - 1, best_loss=loop.keep.best, stage2_best=loop.patience.best,
                bad_epochs=loop.patience.bad_epochs, n_train=n_train, config=cfg.to_dict(), optimizer=opt_meta,
                scheduler=sched_state, numpy_rng=loop.rng.bit_generator.state, history=loop.history.to_dict())
    checkpoint.save(directory, tensors, meta)


def _restore(loop: _Loop, net: PooledFeatures, head: Head, cfg: FinetuneConfig, n_train: int,
             tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Continue from a checkpoint `_save_checkpoint` wrote for these settings and data, exactly where it stopped."""
    if meta["config"] != cfg.to_dict() or meta["n_train"] != n_train:
        raise CheckpointError("the checkpoint was made with other settings or data; rerun without --resume, or "
                              "with the same flags and folder")
    _load_trained(net, head, tensors, "model.")
    loop.keep.state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    loop.keep.best = meta["best_loss"]
    loop.patience.best, loop.patience.bad_epochs = meta["stage2_best"], meta["bad_epochs"]
    checkpoint.restore_optimizer(loop.opt, tensors, meta["optimizer"])
    loop.sched.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(loop.opt.param_groups)})
    torch.set_rng_state(tensors["rng.torch"])
    loop.rng.bit_generator.state = meta["numpy_rng"]
    loop.history = History.from_dict(meta["history"])
    loop.epoch = meta["epoch"] + 1
    log.info("resuming fine-tuning at epoch %d", loop.epoch + 1)


def out_of_time(deadline: float | None, epoch_s: float) -> bool:
    """Whether another epoch of `epoch_s` seconds would end after `deadline` (a `time.perf_counter()` value).

    The limit only caps the run: the epochs are planned from the data (`policy.deep_epochs`), not from a timed
    step, because the step's time moved with the machine's load (a step timed under load planned one epoch of
    ~480 s where the epochs took ~30 s) and so did the model."""
    return deadline is not None and epoch_s > 0 and time.perf_counter() + epoch_s > deadline
