"""Classification metrics computed from integer labels and predicted probabilities.

Pure numpy on purpose: evaluating an exported model must not pull in torch or scikit-learn.
Every ratio that can be 0/0 (a class never predicted, a class absent from the labels) is
defined as 0 rather than NaN, so results serialise to JSON and never emit RuntimeWarnings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from headstart.records import Evaluation

__all__ = [
    "Evaluation",
    "accuracy",
    "balanced_accuracy",
    "confusion_matrix",
    "evaluate",
    "expected_calibration_error",
    "log_loss",
    "per_class_scores",
    "top_k_accuracy",
]


# --------------------------------------------------------------------------- validation


def _as_labels(y: npt.ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.size == 0:
        # np.asarray([]) is float64; an empty label vector is still a valid (empty) label vector.
        arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        # Silently truncating float labels would hide a caller passing probabilities or scores.
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_range(y: np.ndarray, n_classes: int, name: str) -> None:
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name} has labels outside [0, {n_classes}): min {y.min()}, max {y.max()}")


def _labels_pair(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    if n_classes is not None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        _check_range(t, n_classes, "y_true")
        _check_range(p, n_classes, "y_pred")
    return t, p


def _labels_proba(y_true: npt.ArrayLike, proba: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t = _as_labels(y_true, "y_true")
    pr = np.asarray(proba, dtype=np.float64)
    if pr.ndim != 2:
        raise ValueError(f"proba must be 2-D [n_samples, n_classes], got shape {pr.shape}")
    if pr.shape[0] != t.shape[0]:
        raise ValueError(f"y_true and proba differ in length: {t.shape[0]} vs {pr.shape[0]}")
    if t.size == 0:
        raise ValueError("cannot score an empty set of samples")
    if pr.shape[1] == 0:
        raise ValueError("proba has no class columns")
    if not np.isfinite(pr).all():
        # NaN would make argmax and the calibration binning silently meaningless.
        raise ValueError("proba contains NaN or infinite values")
    _check_range(t, pr.shape[1], "y_true")
    return t, pr


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Element-wise num/den with 0 where den == 0 (no warnings, no NaN)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


# --------------------------------------------------------------------------- label metrics


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int) -> np.ndarray:
    """int64 [n_classes, n_classes] counts; rows are true classes, columns predicted classes."""
    t, p = _labels_pair(y_true, y_pred, n_classes)
    # One bincount over flattened (true, pred) pairs is much faster than np.add.at for large sets.
    counts = np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).astype(np.int64, copy=False)


def accuracy(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Fraction of samples whose predicted label equals the true label."""
    t, p = _labels_pair(y_true, y_pred)
    if t.size == 0:
        raise ValueError("accuracy is undefined for an empty set of samples")
    return float(np.mean(t == p))


def balanced_accuracy(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int) -> float:
    """Mean recall over the classes that occur in y_true.

    Classes with no true samples are left out rather than counted as recall 0: their recall is
    undefined, and counting them would penalise a model for the composition of the test set.
    """
    cm = confusion_matrix(y_true, y_pred, n_classes)
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        raise ValueError("balanced accuracy is undefined for an empty set of samples")
    recall = np.diag(cm)[present] / support[present]
    return float(recall.mean())


def _scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2.0 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def per_class_scores(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 (float64) and support (int64), each of length n_classes.

    Precision is 0 for a class that is never predicted, recall 0 for a class with no true
    samples, and F1 0 whenever precision + recall is 0 (scikit-learn's zero_division=0).
    """
    return _scores_from_confusion(confusion_matrix(y_true, y_pred, n_classes))


# --------------------------------------------------------------------------- probability metrics


def top_k_accuracy(y_true: npt.ArrayLike, proba: npt.ArrayLike, k: int) -> float:
    """Fraction of samples whose true class is among the k highest-probability classes.

    Ties are broken towards the lower class index, the same rule np.argmax uses, so
    top_k_accuracy(y, proba, 1) always equals accuracy(y, proba.argmax(1)).
    """
    t, pr = _labels_proba(y_true, proba)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    p_true = pr[np.arange(t.size), t][:, None]
    # Rank of the true class under a stable descending sort, without sorting: classes that
    # beat it outright, plus tied classes that come before it.
    lower_index = np.arange(pr.shape[1])[None, :] < t[:, None]
    rank = np.sum((pr > p_true) | ((pr == p_true) & lower_index), axis=1)
    return float(np.mean(rank < k))


def log_loss(y_true: npt.ArrayLike, proba: npt.ArrayLike, eps: float = 1e-7) -> float:
    """Mean negative log-likelihood of the true class, natural log.

    The true-class probability is clipped to [eps, 1] so a confident miss costs -log(eps)
    instead of infinity. Rows are not renormalised: proba is expected to be a softmax output.
    """
    t, pr = _labels_proba(y_true, proba)
    p_true = np.clip(pr[np.arange(t.size), t], eps, 1.0)
    return float(-np.mean(np.log(p_true)))


def expected_calibration_error(y_true: npt.ArrayLike, proba: npt.ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al., 2017) with n_bins equal-width confidence bins.

    Confidence is the max probability and the prediction its argmax. Bins are right-closed,
    (i/n_bins, (i+1)/n_bins], and ECE = sum_b |acc_b - conf_b| * n_b / n.
    """
    t, pr = _labels_proba(y_true, proba)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    pred = pr.argmax(axis=1)
    conf = pr[np.arange(t.size), pred]
    correct = (pred == t).astype(np.float64)
    # ceil(...) - 1 gives right-closed bins; clip keeps conf == 0 in the first bin and
    # conf slightly above 1 (unnormalised float noise) in the last.
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    # Per bin, n_b * |acc_b - conf_b| == |sum(correct) - sum(conf)|, which avoids a division.
    correct_per_bin = np.bincount(bins, weights=correct, minlength=n_bins)
    conf_per_bin = np.bincount(bins, weights=conf, minlength=n_bins)
    gap = np.abs(correct_per_bin - conf_per_bin)
    return float(gap.sum() / t.size)


# --------------------------------------------------------------------------- evaluation bundle


def evaluate(y_true: npt.ArrayLike, proba: npt.ArrayLike, classes: Sequence[str]) -> Evaluation:
    """Score predicted probabilities [n_samples, n_classes] against integer labels.

    The predicted label is proba.argmax(1). Raises ValueError on an empty set, on a column
    count that does not match classes, and on duplicate class names (they would collide in
    to_dict's per_class mapping).
    """
    classes = tuple(str(c) for c in classes)
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be unique, got {list(classes)}")
    t, pr = _labels_proba(y_true, proba)
    if pr.shape[1] != len(classes):
        raise ValueError(f"proba has {pr.shape[1]} columns but {len(classes)} classes were given")
    n_classes = len(classes)
    pred = pr.argmax(axis=1)
    cm = confusion_matrix(t, pred, n_classes)
    scores = _scores_from_confusion(cm)
    present = scores["support"] > 0
    return Evaluation(
        classes=classes,
        accuracy=float(np.trace(cm) / t.size),
        balanced_accuracy=float(scores["recall"][present].mean()),
        log_loss=log_loss(t, pr),
        ece=expected_calibration_error(t, pr),
        confusion=cm,
        precision=scores["precision"],
        recall=scores["recall"],
        f1=scores["f1"],
        support=scores["support"],
        n=int(t.size),
    )
