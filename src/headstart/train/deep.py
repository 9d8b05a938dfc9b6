"""What `--strategy auto` does when the head alone is weak (`policy.decide_auto`): the recipe an expert applies by
hand to inspection-like photos, each part decided by measurement on the run's own data.

- **The whole photo** (`policy.whole_view`): resized, not centre-cropped (a crop cuts off a defect at the edge),
  at a higher resolution than the standard view (a thin crack fades at 224 px).
- **Orientation** (`orientation_augment`): when the start head scores the validation photos flipped (or
  transposed) about as well as upright, that symmetry carries no label and fine-tuning augments with it.
- **Imbalance**: the loss weighted by inverse class frequency when the classes are skewed, and epochs judged by
  the class-balanced validation loss (`FinetuneConfig.balance`).
- **Deeper and longer, within a time limit**: the epochs are planned from the number of photos
  (`policy.deep_epochs`); `--time-limit` only caps them (no epoch starts that would end after it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from headstart.cache.dataset import DatasetFeatures, path_features
from headstart.data.imageio import load_rgb
from headstart.heads.config import HeadConfig, head_proba
from headstart.progress import Progress
from headstart.records import FinetuneConfig, TrainConfig
from headstart.runtime.frozen import FrozenBackbone
from headstart.train import policy
from headstart.vision.preprocess import eval_transform

log = logging.getLogger(__name__)

ORIENTATION_PHOTOS = 200  # validation photos the orientation test turns (at most): ~3 s of int8 inference here
# The flipped photos may score this much lower (accuracy: the balanced figure of a rare class's few photos is too
# noisy for the test) and orientation still count as free.
ORIENTATION_TOLERANCE = 0.03


@dataclass(frozen=True)
class Start:
    """What deep fine-tuning starts from: the backbone at the whole view, its features and a head fitted on them."""

    frozen: FrozenBackbone
    feats: DatasetFeatures
    head_cfg: HeadConfig
    head_state: dict[str, np.ndarray]
    seconds_per_image: float  # measured extraction speed at this view: what the refit after tuning will cost


def whole_view_start(frozen: FrozenBackbone, feats: DatasetFeatures, train_cfg: TrainConfig, side: int, device: str,
                     progress: Progress) -> Start:
    """The backbone at `policy.whole_view`, the features of every photo at it (cached like stage 1's) and a
    linear head fitted on them the way stage 1 fits one: the start stage 2 continues from."""
    from headstart.train.fit_head import fit_best_head

    pre = policy.whole_view(frozen.spec.preprocess, side)
    # float32: with int8 a new input size is calibrated in this run, and ONNX Runtime's calibrator kept so much
    # that elpv's run peaked at 3.2 GiB (1.8 GiB where the calibration was already cached). The tuned backbone
    # that follows runs in float32 anyway.
    whole = replace(frozen, spec=replace(frozen.spec, preprocess=pre)).with_engine("fp32", device=device)  # its own
    got = path_features(feats.paths, feats.labels, feats.splits, whole, device, progress, "features of the whole photo")
    batch = np.stack([eval_transform(load_rgb(p), pre) for p in got.paths[:16]])  # cached or not: a timed batch
    engine = whole.engine(device)
    engine(batch[:2])
    t0 = time.perf_counter()
    engine(batch)
    per_image = (time.perf_counter() - t0) / len(batch) * 1.5  # decoding, and a fine-tuned backbone's fp32 engine
    (x_tr, y_tr), (x_va, y_va) = got.part("train"), got.part("val")
    shape = HeadConfig(x_tr.shape[1], int(feats.labels.max()) + 1)
    fitted = fit_best_head(policy.head_candidates((), 0.2, shape, train_cfg, len(y_tr), True), x_tr, y_tr, x_va, y_va)
    return Start(whole, got, fitted.head.cfg, fitted.state, per_image)


def orientation_augment(start: Start, device: str) -> tuple[str, str]:
    """The augmentation orientation allows, by how the start head scores validation photos flipped top to bottom
    and transposed against the photos as they are: within `ORIENTATION_TOLERANCE`, nothing in the labels depends
    on it. "turns" when both are free, "flips" when only the flip is, else "light"; and the scores, to say why.

    The head was trained on upright photos, so the test is strict: on elpv the transposed cells (their busbars
    upright) scored 0.08 against 0.57 upright, the flipped ones 0.58 (flips both ways, no turns)."""
    rows = np.flatnonzero(start.feats.splits == "val")[:ORIENTATION_PHOTOS]
    if len(rows) < 20:
        return "light", "too few validation photos to test orientation"
    pre, engine, y = start.frozen.spec.preprocess, start.frozen.engine(device), start.feats.labels[rows]
    upright = _score(y, head_proba(start.head_cfg, start.head_state, start.feats.features[rows]))
    scores = {}
    for name, op in (("flipped", Image.Transpose.FLIP_TOP_BOTTOM), ("transposed", Image.Transpose.TRANSPOSE)):
        batch = np.stack([eval_transform(load_rgb(start.feats.paths[i]).transpose(op), pre) for i in rows])
        x = np.concatenate([engine(batch[b:b + 32]) for b in range(0, len(batch), 32)])
        scores[name] = _score(y, head_proba(start.head_cfg, start.head_state, x))
        if scores[name] < upright - ORIENTATION_TOLERANCE:
            break
    free = [name for name, value in scores.items() if value >= upright - ORIENTATION_TOLERANCE]
    level = {0: "light", 1: "flips", 2: "turns"}[len(free)]
    return level, f"validation {upright:.3f} upright, " + ", ".join(f"{v:.3f} {k}" for k, v in scores.items())


def _score(y: np.ndarray, proba: np.ndarray) -> float:
    return float(np.mean(proba.argmax(1) == y))


def deep_config(base: FinetuneConfig, augment: str, budget_s: float, n_train: int) -> FinetuneConfig:
    """Stage 2's settings for a weak head: `policy.DEEP_UNFREEZE` stages for the epochs `policy.deep_epochs`
    plans for `n_train` photos (fewer when validation stops improving, or when `budget_s` runs out first), with
    the augmentation orientation allows (`base` carries the class weighting)."""
    epochs = policy.deep_epochs(n_train)
    return replace(base, unfreeze=policy.DEEP_UNFREEZE, epochs=epochs, views=policy.DEEP_VIEWS, augment=augment,
                   time_budget_s=max(1.0, budget_s))
