"""k-fold cross-validation, the math: stratified folds, the summary of out-of-fold hits and an honest interval.
The fits themselves (each fold's head, trained as `train` trains it) are `train.crossval`'s.

The 95 % interval is the wider of two: Student's t over the fold accuracies (how much the estimate moves from
one split of the data to another) and the Wilson score interval of the pooled out-of-fold hits (how much a
sample of n photos can say at all). The t interval alone is degenerate when every fold scores the same (all
at 100 %, say); the Wilson one alone ignores the spread between folds.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from headstart.errors import DataError
from headstart.records import CrossValidation

log = logging.getLogger(__name__)

FOLDS = 5
CONFIDENCE = 0.95


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0, groups: np.ndarray | None = None) -> np.ndarray:
    """Each row's fold, 0..folds-1: every class dealt round-robin over the folds after a seeded shuffle, so
    each fold holds each class's share to within one image. With `groups` (a group id per row, `data.groups`),
    the rows of a group share a fold, as they share a side of the validation split (issue 26: a near-duplicate in
    another fold scores the copy, not the model), the folds stratified as well as whole groups allow
    (scikit-learn's `StratifiedGroupKFold`); with fewer groups than folds, or no group of two, as without."""
    n_groups = len(np.unique(groups)) if groups is not None else 0
    if groups is not None and folds <= n_groups < len(labels):
        return _group_folds(labels, folds, seed, groups)
    if groups is not None and n_groups < folds:
        log.info("cross-validation: %d groups of photos for %d folds; the folds do not keep groups together",
                 n_groups, folds)
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), np.int64)
    offset = 0
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        # Start each class where the previous one stopped: small classes do not all land in fold 0.
        out[rows] = (np.arange(len(rows)) + offset) % folds
        offset += len(rows)
    return out


def _group_folds(labels: np.ndarray, folds: int, seed: int, groups: np.ndarray) -> np.ndarray:
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    out = np.empty(len(labels), np.int64)
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has fewer members than folds": as without groups
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            out[test] = fold
    return out


def kept_groups(groups: np.ndarray | None, fold_of: np.ndarray) -> int:
    """How many groups of two or more rows lie whole in one fold."""
    if groups is None:
        return 0
    ids, counts = np.unique(groups, return_counts=True)
    return sum(len(np.unique(fold_of[groups == g])) == 1 for g in ids[counts > 1])


def fold_count(labels: np.ndarray, folds: int = FOLDS) -> int:
    """`folds`, or fewer when there are too few images: at least two per fold (one to train on, one to test)."""
    k = min(folds, len(labels) // 2)
    if k < 2:
        raise DataError(f"cross-validation needs at least 4 images; found {len(labels)}")
    return k


def summarise(hits: np.ndarray, fold_of: np.ndarray) -> CrossValidation:
    """The accuracy and interval of out-of-fold hits (booleans) given each row's fold."""
    k = int(fold_of.max()) + 1
    per_fold = tuple(float(hits[fold_of == f].mean()) for f in range(k))
    acc = float(hits.mean())
    t_low, t_high = t_interval(per_fold)
    w_low, w_high = wilson_interval(int(hits.sum()), len(hits))
    low, high = max(0.0, min(t_low, w_low)), min(1.0, max(t_high, w_high))
    log.info("%d-fold accuracy %.4f [%.4f, %.4f] (folds %s)", k, acc, low, high, [round(a, 3) for a in per_fold])
    return CrossValidation(k, len(hits), per_fold, acc, low, high)


def t_interval(values: tuple[float, ...] | list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student's t interval of the mean of `values`."""
    from scipy import stats  # scikit-learn's (and so cleanlab's) dependency

    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean - half, mean + half


def wilson_interval(hits: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion hits/n."""
    # The standard library's normal quantile, not scipy.stats': importing that took ~1 s of train's ~20 s on
    # flowers (the report train writes shows two of these intervals).
    from statistics import NormalDist

    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half
