"""Stage 2 end to end (boundary cache -> fine-tune -> new backbone weights), and the `auto` decision.

fastai's `fine_tune` in spirit: stage 1 (the head on cached features) has already run; this adapts the top of
the backbone from there, and `decide_auto` says whether that is worth doing and which result to keep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.boundary import BoundaryStore, bottom_engine
from headstart.features import FrozenBackbone, content_key
from headstart.head import HeadConfig
from headstart.paths import cache_root
from headstart.progress import NoProgress, Progress
from headstart.train import History

log = logging.getLogger(__name__)

AUTO_MIN_TRAIN_IMAGES = 80  # below this, adapting millions of weights overfits more than it helps
AUTO_HEAD_GOOD_ENOUGH = 0.99  # validation accuracy at which stage 2 has nothing left to win


@dataclass
class FinetuneResult:
    frozen: FrozenBackbone  # the fine-tuned backbone, as a weights file (so engines and saving work as usual)
    head_state: dict[str, np.ndarray]
    history: History
    val_proba: np.ndarray


def run_finetune(
    frozen: FrozenBackbone, head_cfg: HeadConfig, head_state: dict[str, np.ndarray], cfg,
    train_paths: list[Path], train_labels: np.ndarray, val_paths: list[Path], val_labels: np.ndarray,
    checkpoint_dir: Path | None, resume: bool, progress: Progress | None = None,
) -> FinetuneResult:
    import torch

    from headstart.finetune import boundary_for, finetune, top_features
    from headstart.model import Head

    progress = progress or NoProgress()
    pre = frozen.spec.preprocess
    net = frozen.build_torch()
    boundary = boundary_for(net, cfg.unfreeze)
    store = BoundaryStore(dict(
        weights=frozen.weights_id, boundary=boundary, views=cfg.views, augment=cfg.augment, seed=cfg.seed,
        pre=pre.to_dict(), train=[content_key(p).hex() for p in train_paths],
        val=[content_key(p).hex() for p in val_paths],
    ))
    engine = bottom_engine(net, boundary, frozen.weights_id, pre)
    progress.start("caching frozen layers", len(train_paths) + len(val_paths))
    store.fill("train", train_paths, cfg.views, cfg.augment, cfg.seed, pre, engine, progress.advance)
    store.fill("val", val_paths, 1, "none", cfg.seed, pre, engine, progress.advance)
    progress.finish()
    train = _split_arrays(store, "train", train_labels)
    val = _split_arrays(store, "val", val_labels)

    head = Head(head_cfg)
    head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in head_state.items()})
    history = finetune(net, head, cfg, train, val, checkpoint_dir, resume, progress)

    with torch.no_grad():
        val_proba = torch.softmax(head(top_features(net, boundary, val["acts"], val["taps"])), 1).numpy()
    tuned = _save_backbone(frozen, net.backbone.state_dict())
    return FinetuneResult(tuned, {k: v.numpy() for k, v in head.state_dict().items()}, history, val_proba)


def decide_auto(n_train: int, has_val: bool, head_val_accuracy: float | None) -> tuple[bool, str]:
    """Whether stage 2 is worth running, and why."""
    if not has_val:
        return False, "no validation split to judge fine-tuning by"
    if n_train < AUTO_MIN_TRAIN_IMAGES:
        return False, f"only {n_train} training images (< {AUTO_MIN_TRAIN_IMAGES}): fine-tuning would overfit"
    if head_val_accuracy is not None and head_val_accuracy >= AUTO_HEAD_GOOD_ENOUGH:
        return False, f"the head alone validates at {head_val_accuracy:.3f}: nothing left for fine-tuning to win"
    return True, "the head leaves room on validation and there is enough data"


def _split_arrays(store: BoundaryStore, name: str, labels: np.ndarray) -> dict:
    acts, taps, ok = store.arrays(name)
    if ok.all():
        return dict(acts=acts, taps=taps, labels=labels)
    keep = np.flatnonzero(ok)
    return dict(acts=acts[keep], taps=taps[keep], labels=labels[keep])


def _save_backbone(frozen: FrozenBackbone, state: dict) -> FrozenBackbone:
    """Write fine-tuned backbone weights to the cache, named by their content, like any other weights file."""
    from headstart.backbones import save_state_dict

    target = cache_root() / "weights" / f"{frozen.spec.timm_name}-finetuned.safetensors"
    path, digest = save_state_dict(state, target, content_named=True)
    return FrozenBackbone(frozen.spec, path, digest[:16])
