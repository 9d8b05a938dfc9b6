"""Stage 2 end to end: the boundary store filled, the top of the backbone fine-tuned from the stage-1 head, the
tuned weights saved like any weights file, and a head refitted on the tuned backbone's features. Whether it runs
and which result is kept are `policy`'s rules; `pipeline` strings the stages together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from headstart.cache.boundary import BoundaryStore, bottom_engine
from headstart.cache.dataset import DatasetFeatures, path_features
from headstart.cache.features import content_key
from headstart.cache.oriented import reread_features
from headstart.evaluate.metrics import evaluate
from headstart.heads.config import HeadConfig, head_proba
from headstart.numeric import mean_features
from headstart.paths import cache_root
from headstart.progress import NoProgress, Progress
from headstart.records import Evaluation, FinetuneConfig, HeadCandidate, History, TrainConfig
from headstart.runtime import distributed
from headstart.runtime.frozen import FrozenBackbone

if TYPE_CHECKING:
    from headstart.train.finetune import StoredViews


@dataclass
class FinetuneResult:
    frozen: FrozenBackbone  # the fine-tuned backbone, as a weights file (so engines and saving work as usual)
    config: FinetuneConfig  # as run (its epochs those that fit `time_budget_s`, when it had one)
    head_state: dict[str, np.ndarray]
    history: History
    val_proba: np.ndarray
    val_labels: np.ndarray  # of the validation photos the boundary store could read


def run_finetune(
    frozen: FrozenBackbone, head_cfg: HeadConfig, head_state: dict[str, np.ndarray], cfg: FinetuneConfig,
    train_paths: list[Path], train_labels: np.ndarray, val_paths: list[Path], val_labels: np.ndarray,
    checkpoint_dir: Path | None, resume: bool, progress: Progress | None = None, start_loss: float | None = None,
) -> FinetuneResult:
    """`start_loss`: the stage-1 model's validation loss (`finetune.finetune`). With `cfg.time_budget_s`, the
    store and the epochs together take about that many seconds."""
    import torch

    from headstart.heads.module import Head
    from headstart.train.finetune import boundary_for, finetune, top_features

    progress = progress or NoProgress()
    deadline = time.perf_counter() + cfg.time_budget_s
    pre = frozen.spec.preprocess
    net = frozen.build_torch()
    boundary = boundary_for(net, cfg.unfreeze)
    store = BoundaryStore(dict(
        weights=frozen.weights_id, boundary=boundary, views=cfg.views, augment=_augment_key(cfg.augment), seed=cfg.seed,
        pre=pre.to_dict(), train=[content_key(p).hex() for p in train_paths],
        val=[content_key(p).hex() for p in val_paths],
    ))
    with distributed.main_first():  # one rank exports the bottom, the others open its file
        engine = bottom_engine(net, boundary, frozen.weights_id, pre)
    progress.start("caching frozen layers", len(train_paths) + len(val_paths))
    store.fill("train", train_paths, cfg.views, cfg.augment, cfg.seed, pre, engine, progress.advance)
    store.fill("val", val_paths, 1, "none", cfg.seed, pre, engine, progress.advance)
    progress.finish()
    train = _split_arrays(store, "train", train_labels, pre)
    val = _split_arrays(store, "val", val_labels, pre)

    head = Head(head_cfg)
    head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in _std_floored(head_state).items()})
    run = finetune(net, head, cfg, train, val, checkpoint_dir, resume, progress, start_loss, deadline)
    for module in (net, head):  # bit for bit rank 0's (BatchNorm statistics train apart): one weights file
        distributed.broadcast_state(module)

    logits = run.val_logits  # the kept epoch's; another rank's differ from rank 0's, as its weights did
    if logits is None or distributed.joined().world_size > 1:
        with torch.no_grad():
            logits = head(top_features(net, boundary, val.acts, val.taps)).numpy()
    val_proba = torch.softmax(torch.from_numpy(logits), 1).numpy()
    history = run.history
    tuned = _save_backbone(frozen, net.backbone.state_dict())
    return FinetuneResult(tuned, run.config, {k: v.numpy() for k, v in head.state_dict().items()}, history, val_proba,
                          val.labels)


@dataclass
class Refit:
    head_cfg: HeadConfig
    head_state: dict[str, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]  # validation probabilities and labels (of the photos still readable)
    test: tuple[np.ndarray, np.ndarray]  # the test split's features and labels, for whichever head is kept
    candidates: tuple[HeadCandidate, ...]


def refit_head(
    frozen: FrozenBackbone, shape: HeadConfig, hidden: tuple[int, ...] | str, dropout: float, train_cfg: TrainConfig,
    paths: list[Path],
    labels: np.ndarray, splits: np.ndarray, device: str, progress: Progress | None = None,
) -> Refit:
    """A new head on the fine-tuned backbone's features of the photos as predicting sees them (whole, unaugmented),
    chosen like stage 1's (`--hidden auto`), for the caller to keep if it validates better than stage 2's head.

    Stage 2 trains its head on augmented crops, beside a backbone that is still moving; a head fitted afterwards
    on the final features can do better. On flowers, all stages fine-tuned at 160 px: 0.773 with stage 2's head,
    0.780 with a refitted linear head, 0.792 with the hidden layer `auto` picks. At 128 px (the default there)
    the refit wins on validation log loss (0.49 against 0.52) at the same accuracy. It costs one extraction pass."""
    from headstart.train.fit_head import fit_best_head
    from headstart.train.policy import head_candidates

    got = path_features(paths, labels, splits, frozen, device, progress or NoProgress(),
                        "features of the fine-tuned backbone")
    (x_tr, y_tr), (x_va, y_va) = got.part("train"), got.part("val")
    candidates = head_candidates(hidden, dropout, shape, train_cfg, len(y_tr), len(y_va) > 0)
    fitted = fit_best_head(candidates, x_tr, y_tr, x_va, y_va, progress)
    state = fitted.state
    return Refit(fitted.head.cfg, state, (head_proba(fitted.head.cfg, state, x_va), y_va), got.part("test"),
                 fitted.candidates)


def kept_features(frozen: FrozenBackbone, paths: list[Path], labels: np.ndarray, splits: np.ndarray, device: str,
                  progress: Progress | None = None) -> DatasetFeatures:
    """The features of `paths` as a fine-tuned `frozen` predicts them: upright, or averaged with their mirror
    images' when it was kept so (`mirrored_features`)."""
    if frozen.spec.preprocess.orientations == 2:
        return mirrored_features(frozen.upright(), paths, labels, splits, device, progress)
    return path_features(paths, labels, splits, frozen, device, progress or NoProgress(),
                         "features of the fine-tuned backbone")


def try_mirror(frozen: FrozenBackbone, head_cfg: HeadConfig, head_state: dict[str, np.ndarray],
               classes: tuple[str, ...], feats: DatasetFeatures, device: str, progress: Progress | None = None
               ) -> Evaluation:
    """The fine-tuned model (`frozen`, the head) on the validation photos of `feats`, each photo's features
    averaged with its mirror image's (`mirrored_features`): what `policy.keep_mirrored` weighs."""
    rows = np.flatnonzero(feats.splits == "val")
    got = mirrored_features(frozen, [feats.paths[i] for i in rows], feats.labels[rows], feats.splits[rows], device,
                            progress)
    x, y = got.part("val")
    return evaluate(y, head_proba(head_cfg, head_state, x), classes)


def kept_test(frozen: FrozenBackbone, feats: DatasetFeatures, upright: tuple[np.ndarray, np.ndarray], device: str
              ) -> tuple[np.ndarray, np.ndarray]:
    """The test split's features and labels as the fine-tuned `frozen` predicts them (`upright`: the refit's)."""
    if frozen.spec.preprocess.orientations == 1 or not len(upright[1]):
        return upright
    rows = np.flatnonzero(feats.splits == "test")
    return kept_features(frozen, [feats.paths[i] for i in rows], feats.labels[rows], feats.splits[rows],
                         device).part("test")


def mirrored_features(frozen: FrozenBackbone, paths: list[Path], labels: np.ndarray, splits: np.ndarray, device: str,
                      progress: Progress | None = None) -> DatasetFeatures:
    """`frozen`'s features of `paths` averaged with those of their mirror images (left-right), each read from its
    cache or extracted into it: what `frozen.oriented(2)` computes when predicting (`OrientedEngine`).

    Stage 2 trains on mirrored crops, so the tuned backbone has seen both sides of each photo. On flowers (the
    finetune check's split) averaging the two scored 0.7965 held out against 0.786 upright, and 0.8263 against
    0.8249 on the run's own validation split (docs/domains.md). The frozen ImageNet backbone's head, trained on
    upright features, did not gain from its mirror images (`evaluate --tta`: 0.7651 against 0.7674 held out), so
    only a fine-tuned model tries it."""
    upright = path_features(paths, labels, splits, frozen, device, NoProgress(), "features of the fine-tuned backbone")
    mirror = reread_features(upright.paths, frozen, "hflip", device, progress or NoProgress(),
                             "features of the mirror images")
    return DatasetFeatures(upright.paths, mean_features([upright.features, mirror]), upright.labels,
                           upright.splits, upright.failures, upright.cached)


def _augment_key(level: str) -> str:
    """The augmentation as the store's key names it: flips and turns with their recipe's version."""
    from headstart.vision.augment import TURNED_RECIPE

    return f"{level}-{TURNED_RECIPE}" if level in ("flips", "turns") and TURNED_RECIPE > 1 else level


def _std_floored(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The head's standardisation with `heads.params.floored_std` (heads saved before it may lack the floor):
    once the backbone trains, a feature that was constant moves, and divided by ~1e-6 it threw the first epoch's
    training loss on elpv to 126."""
    from headstart.heads.params import floored_std

    return {**state, "std": floored_std(state["std"])}


def _split_arrays(store: BoundaryStore, name: str, labels: np.ndarray, pre) -> StoredViews:
    from headstart.train.finetune import StoredViews

    acts, taps, ok = store.arrays(name, pre)
    if ok.all():
        return StoredViews(acts, taps, labels)
    keep = np.flatnonzero(ok)  # the readable rows, still read from the store (not copied into memory)
    return StoredViews(acts.take(keep), taps.take(keep), labels[keep])


def _save_backbone(frozen: FrozenBackbone, state: dict) -> FrozenBackbone:
    """Write fine-tuned backbone weights to the cache, named by their content, like any other weights file."""
    from headstart.backbones.weights import save_state_dict

    target = cache_root() / "weights" / f"{frozen.spec.timm_name}-finetuned.safetensors"
    path, digest = save_state_dict(state, target, content_named=True)
    device = frozen.choice.device if frozen.choice else "auto"
    return FrozenBackbone(frozen.spec, path, digest[:16]).with_engine("fp32", device=device)  # a new backbone
