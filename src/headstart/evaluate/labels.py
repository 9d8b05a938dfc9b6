"""Likely label errors: out-of-fold head predictions on cached features, ranked by cleanlab's confident learning.

Each image is scored by a linear head that never saw it (`out_of_fold_linear`), so a mislabelled photo cannot
be memorised into looking right. `cleanlab.filter.find_label_issues` then flags the images whose given label
the out-of-fold probabilities contradict beyond each class's own confidence threshold, ranked by self-confidence
(the out-of-fold probability of the given label, lowest first).

The ranking needs honest out-of-fold probabilities, not `train`'s recipe, so each fold is an L2-regularised
multinomial logistic regression (scikit-learn's L-BFGS, already loaded with cleanlab) on the RANK leading
principal coordinates of the standardised features: on flowers (4,317 photos, 3,808 features) the five folds
take about 1 s of CPU, where five torch heads trained as `train` trains them took 7 s and loading torch 2 more.
Measured by bench/understand.py on copies with 10 % of labels flipped (top-10 % precision, top-15 % recall):
hymenoptera/train 0.875 and 0.917, flowers' 80 % split 0.659 and 0.757, against 0.792 / 0.917 and 0.618 / 0.717
with the torch heads. In a sweep of C from 0.0003 to 0.003 and RANK from 64 to 256 (before OVERSAMPLE was added)
flowers' two figures moved by at most 0.03.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.evaluate.crossval import FOLDS, fold_count, stratified_folds

log = logging.getLogger(__name__)

RANK = 128  # principal coordinates the out-of-fold heads are fitted on (see the module's doc)
OVERSAMPLE = 10  # extra random probes of the range finder, its usual margin: the last axes come out sharper
C = 1e-3  # scikit-learn's inverse L2 penalty, against the summed (not mean) log-loss: stronger on fewer images
MAX_ITER = 500  # L-BFGS iterations; flowers' folds converge in about 70


@dataclass(frozen=True)
class LabelIssue:
    """One image whose label the out-of-fold head contradicts."""

    path: Path
    given: str
    suggested: str
    given_probability: float  # out-of-fold probability of the given label
    suggested_probability: float


def principal_coordinates(features: np.ndarray, rank: int = RANK, seed: int = 0) -> np.ndarray:
    """Each row's coordinates on the `rank` leading principal axes of the standardised features (all of them
    when there are no more), by a seeded randomised range finder with one power iteration (Halko et al. 2011).
    From every row, labels unseen: no fold learns anything about its held-out rows' labels from it."""
    x = np.asarray(features, np.float32)
    std = x.std(0)
    x = (x - x.mean(0)) / np.where(std > 0, std, 1.0)
    if x.shape[1] <= rank:
        return x.astype(np.float64)
    rng = np.random.default_rng(seed)
    probes = min(rank + OVERSAMPLE, *x.shape)
    q = _orthonormal(x @ rng.standard_normal((x.shape[1], probes), dtype=np.float32))
    q = _orthonormal(x @ (x.T @ q))  # one power iteration, two products (0.1 s on flowers): sharper last axes
    b = (q.T @ x).astype(np.float64)  # the rows projected on that span: its right singular vectors are the axes
    w, u = np.linalg.eigh(b @ b.T)  # ascending
    w, u = w[::-1][:rank], u[:, ::-1][:, :rank]
    keep = w > w[0] * 1e-10
    axes = b.T @ (u[:, keep] / np.sqrt(w[keep]))
    return x.astype(np.float64) @ axes


def _orthonormal(q: np.ndarray) -> np.ndarray:
    """An orthonormal basis of q's columns, from the eigenvectors of its small Gram matrix (LAPACK's float32 QR
    of a tall matrix took seconds on two busy cores); directions q does not span are dropped."""
    w, v = np.linalg.eigh(q.T.astype(np.float64) @ q.astype(np.float64))
    keep = w > w.max() * 1e-10
    return q @ (v[:, keep] / np.sqrt(w[keep])).astype(np.float32)


def out_of_fold_linear(features: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = FOLDS,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, fold of each row): each row's class probabilities from a logistic regression fitted on
    the other folds (`crossval.stratified_folds`), on the rows' `principal_coordinates`."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    k = fold_count(labels, folds)
    fold_of = stratified_folds(labels, k, seed)
    proba = np.zeros((len(labels), n_classes), np.float64)
    # One BLAS thread: these products are small, and while another process holds a core OpenBLAS's waiting
    # threads made the fits 60 times slower (flowers: 7.7 s of CPU for a fold that takes 0.12 s on one thread).
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # an unconverged fit still ranks: 500 steps is plenty
        z = principal_coordinates(features, RANK, seed)
        for fold in range(k):
            train, test = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
            present = np.unique(labels[train])
            if len(present) < 2:  # one class left to learn from: it is all a head could say
                proba[np.ix_(test, present)] = 1.0
                continue
            head = LogisticRegression(C=C, max_iter=MAX_ITER).fit(z[train], labels[train])
            proba[np.ix_(test, head.classes_)] = head.predict_proba(z[test])
    return proba, fold_of


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
        # n_jobs=1: a pool of forked processes for five classes cost 0.1 s and changes nothing (cleanlab's doc)
        return np.asarray(find_label_issues(labels, proba, return_indices_ranked_by="self_confidence", n_jobs=1),
                          np.int64)
    except ValueError as exc:  # e.g. a class with a single image: nothing to estimate its noise from
        log.info("cleanlab found no label issues (%s)", exc)
        return np.empty(0, np.int64)


def find_label_errors(features: np.ndarray, labels: np.ndarray, paths: Sequence[Path], classes: Sequence[str],
                      folds: int = FOLDS, seed: int = 0) -> list[LabelIssue]:
    """The images cleanlab flags as likely mislabelled, most suspect first."""
    if len(labels) < 2 * len(classes) or len(np.unique(labels)) < 2:
        return []  # too few images per class to learn anything out of fold
    proba, _ = out_of_fold_linear(features, labels, len(classes), folds=folds, seed=seed)
    order, n_flagged = suspect_ranking(labels, proba)
    issues = []
    for i in order[:n_flagged]:
        best = int(proba[i].argmax())
        issues.append(LabelIssue(Path(paths[i]), classes[labels[i]], classes[best], float(proba[i, labels[i]]),
                                 float(proba[i, best])))
    log.info("%d likely label errors among %d images", len(issues), len(labels))
    return issues
