"""k-fold cross-validation of the head on cached features: an accuracy with an honest interval, and each row's
out-of-fold probabilities (`labels` ranks label errors by cheaper ones of its own, on the same folds).

Each fold is trained the way `train` trains the head: `policy.head_candidates` and `fit_best_head`, with a
stratified 20 % of the fold's training rows held out for early stopping and the choice between candidates, so
the held-out fold chose nothing. On cached features a fold takes well under a second (hymenoptera, 244 photos)
to a few seconds (flowers, 4,317).

The 95 % interval is the wider of two: Student's t over the fold accuracies (how much the estimate moves from
one split of the data to another) and the Wilson score interval of the pooled out-of-fold hits (how much a
sample of n photos can say at all). The t interval alone is degenerate when every fold scores the same (all
at 100 %, say); the Wilson one alone ignores the spread between folds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np

from headstart.errors import DataError
from headstart.heads.config import HeadConfig, head_proba
from headstart.records import CrossValidation, TrainConfig

log = logging.getLogger(__name__)

FOLDS = 5
INNER_VAL = 0.2  # the share of each fold's training rows held out for early stopping, as `train`'s --val-split
CONFIDENCE = 0.95


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Each row's fold, 0..folds-1: every class dealt round-robin over the folds after a seeded shuffle, so
    each fold holds each class's share to within one image."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), np.int64)
    offset = 0
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        # Start each class where the previous one stopped: small classes do not all land in fold 0.
        out[rows] = (np.arange(len(rows)) + offset) % folds
        offset += len(rows)
    return out


def fold_count(labels: np.ndarray, folds: int = FOLDS) -> int:
    """`folds`, or fewer when there are too few images: at least two per fold (one to train on, one to test)."""
    k = min(folds, len(labels) // 2)
    if k < 2:
        raise DataError(f"cross-validation needs at least 4 images; found {len(labels)}")
    return k


def out_of_fold_proba(features: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = FOLDS,
                      seed: int = 0, hidden: tuple[int, ...] | str = "auto", dropout: float = 0.2,
                      train_config: TrainConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, fold of each row): every row's class probabilities from a head that never saw it."""
    k = fold_count(labels, folds)
    fold_of = stratified_folds(labels, k, seed)
    proba = np.zeros((len(labels), n_classes), np.float32)
    for fold in range(k):
        test = np.flatnonzero(fold_of == fold)
        train = np.flatnonzero(fold_of != fold)
        proba[test] = _fold_proba(features, labels, n_classes, train, test, hidden, dropout,
                                  train_config or TrainConfig(seed=seed), seed + fold)
    return proba, fold_of


def _fold_proba(features, labels, n_classes, train, test, hidden, dropout, cfg: TrainConfig, seed: int):
    """One fold: the head fitted as `train` fits it on the training rows, applied to the test rows."""
    from headstart.train import policy
    from headstart.train.fit_head import fit_best_head

    inner = stratified_folds(labels[train], max(2, round(1 / INNER_VAL)), seed) == 0
    fit_rows, val_rows = np.sort(train[~inner]), np.sort(train[inner])
    x_fit, y_fit = np.asarray(features[fit_rows], np.float32), labels[fit_rows]
    x_val, y_val = np.asarray(features[val_rows], np.float32), labels[val_rows]
    candidates = policy.head_candidates(hidden, dropout, HeadConfig(features.shape[1], n_classes), cfg,
                                        len(y_fit), len(y_val) > 0)
    fitted = fit_best_head(candidates, x_fit, y_fit, x_val, y_val)
    return head_proba(fitted.head.cfg, fitted.state, np.asarray(features[test], np.float32))  # `test` is sorted


def cross_validate(features: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = FOLDS, seed: int = 0,
                   hidden: tuple[int, ...] | str = "auto", dropout: float = 0.2,
                   train_config: TrainConfig | None = None) -> CrossValidation:
    """k-fold accuracy of the head on `features`, with its 95 % interval."""
    proba, fold_of = out_of_fold_proba(features, labels, n_classes, folds, seed, hidden, dropout, train_config)
    return summarise(proba.argmax(1) == labels, fold_of)


def cross_validate_settings(features: np.ndarray, labels: np.ndarray, head_cfg: HeadConfig, train_config: TrainConfig,
                            epochs: int, epoch_lrs: tuple[float, ...] = (), folds: int = FOLDS,
                            seed: int = 0) -> CrossValidation:
    """k-fold accuracy of one head at settings a validation split already chose (its config, its epoch count,
    its plateau rates): each fold a fresh head `refit_full` trains on the other folds with no early stopping,
    scored on its own fold. What `train` reports for the head it ships: the head is refitted the same way on all
    of these rows. The settings were chosen on part of these rows, so the figure leans optimistic by what that
    choice could overfit (two candidates and an epoch count); `cross_validate` re-chooses inside every fold
    instead, at about five times the cost. Folds train side by side, one thread each, like `fit_best_head`'s
    candidates."""
    from concurrent.futures import ThreadPoolExecutor

    from headstart.runtime.device import cpu_threads
    from headstart.train.fit_head import fresh_head, refit_full

    k = fold_count(labels, folds)
    fold_of = stratified_folds(labels, k, seed)
    untempered = replace(head_cfg, temperature=1.0)  # the argmax does not depend on it
    configs = [replace(train_config, seed=train_config.seed + fold) for fold in range(k)]
    drawn = [fresh_head(untempered, cfg.seed) for cfg in configs]

    def one(fold: int) -> np.ndarray:
        train, test = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
        head, _ = refit_full(untempered, configs[fold], np.asarray(features[train], np.float32), labels[train],
                             epochs, epoch_lrs, head=drawn[fold])
        state = head.state_dict()
        return head_proba(untempered, state, np.asarray(features[test], np.float32)).argmax(1) == labels[test]

    hits = np.zeros(len(labels), bool)
    with ThreadPoolExecutor(max_workers=min(k, cpu_threads())) as pool:
        for fold, fold_hits in enumerate(pool.map(one, range(k))):
            hits[fold_of == fold] = fold_hits
    return replace(summarise(hits, fold_of), rows="train+val")


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
