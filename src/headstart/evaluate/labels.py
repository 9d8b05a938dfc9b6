"""Likely label errors: out-of-fold head predictions on cached features, ranked by cleanlab's confident learning.

Each image is scored by a head that never saw it (`crossval.out_of_fold_proba`), so a mislabelled photo cannot
be memorised into looking right. `cleanlab.filter.find_label_issues` then flags the images whose given label
the out-of-fold probabilities contradict beyond each class's own confidence threshold, ranked by self-confidence
(the out-of-fold probability of the given label, lowest first).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.evaluate.crossval import FOLDS, out_of_fold_proba

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelIssue:
    """One image whose label the out-of-fold head contradicts."""

    path: Path
    given: str
    suggested: str
    given_probability: float  # out-of-fold probability of the given label
    suggested_probability: float


def suspect_ranking(labels: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, int]:
    """Every row ranked from most to least suspect, and how many of the first cleanlab flags: its flagged rows
    in its own order, then the rest by self-confidence (lowest first), so a top-k cut is defined for any k."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    proba = np.clip(np.asarray(proba, np.float64), 1e-12, None)
    proba /= proba.sum(1, keepdims=True)  # cleanlab insists on rows summing to 1 to within float error
    flagged = _flagged(labels, proba, find_label_issues)
    quality = get_label_quality_scores(labels, proba, method="self_confidence")
    rest = np.setdiff1d(np.arange(len(labels)), flagged)
    rest = rest[np.argsort(quality[rest], kind="stable")]
    return np.concatenate([flagged, rest]).astype(np.int64), len(flagged)


def _flagged(labels: np.ndarray, proba: np.ndarray, find_label_issues) -> np.ndarray:
    """cleanlab's flagged rows, ranked; none when a class is too small for its estimates (it raises then)."""
    if len(np.unique(labels)) < 2:
        return np.empty(0, np.int64)
    try:
        return np.asarray(find_label_issues(labels, proba, return_indices_ranked_by="self_confidence"), np.int64)
    except ValueError as exc:  # e.g. a class with a single image: nothing to estimate its noise from
        log.info("cleanlab found no label issues (%s)", exc)
        return np.empty(0, np.int64)


def find_label_errors(features: np.ndarray, labels: np.ndarray, paths: Sequence[Path], classes: Sequence[str],
                      folds: int = FOLDS, seed: int = 0) -> list[LabelIssue]:
    """The images cleanlab flags as likely mislabelled, most suspect first."""
    if len(labels) < 2 * len(classes) or len(np.unique(labels)) < 2:
        return []  # too few images per class to learn anything out of fold
    # A linear head: ranking needs honest out-of-fold probabilities, not the best head `train` could choose, and
    # a second (hidden-layer) candidate per fold doubles the work from 1,000 images on.
    proba, _ = out_of_fold_proba(features, labels, len(classes), folds=folds, seed=seed, hidden=())
    order, n_flagged = suspect_ranking(labels, proba)
    issues = []
    for i in order[:n_flagged]:
        best = int(proba[i].argmax())
        issues.append(LabelIssue(Path(paths[i]), classes[labels[i]], classes[best], float(proba[i, labels[i]]),
                                 float(proba[i, best])))
    log.info("%d likely label errors among %d images", len(issues), len(labels))
    return issues
