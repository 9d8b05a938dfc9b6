"""Multi-label metrics and per-label thresholds (the math only, in numpy: the tests check every figure against
scikit-learn, whose import alone cost ~1.5 s of a ~3 s warm multi-label train).

- mAP: the macro average precision over the labels that have a positive among the images scored (AP is undefined
  without one; scikit-learn would count such a label as 0). The same rule holds for macro F1, so a label absent
  from a small test set neither helps nor hurts.
- micro F1 over every (image, label) pair; subset accuracy: images whose whole label set is right; Hamming loss:
  the fraction of (image, label) pairs that are wrong.
- Thresholds: each label's probability at or above which it is on, chosen on the validation split to maximise that
  label's F1. A label with fewer than `MIN_POSITIVES` validation positives keeps 0.5: F1 over two or three images
  picks a threshold by chance. Above that floor the F1-maximising threshold t is still a noisy estimate (the F1
  curve of 20 positives is flat and jagged near its top), so it is shrunk towards 0.5 by its support n:
  0.5 + (t - 0.5) * n / (n + SHRINK_POSITIVES). On planet_sample (10 seeded 60/20/20 inner splits of the
  acceptance's training rows, 160 validation chips, the refitted head; docs/multilabel.md) micro F1 rose steadily
  with the shrinkage (square-root weights: 0.839 unshrunk, 0.846 at 20, 0.847 at 40 and 80, 0.849 at 0.5 itself)
  while macro F1 stayed within 0.483-0.490; with the shipped fourth-root weights 100 scored 0.851 against 0.847 at
  40. F1-tuned thresholds from 160 images bought little there. 100 keeps most of what a label backed by hundreds of
  validation positives says (187 positives: 65 % of the way) and leaves a label with 10 within 0.05 of 0.5.
"""

from __future__ import annotations

import numpy as np

from headstart.records import DEFAULT_THRESHOLD, MIN_POSITIVES, LabelScores, MultiLabelEvaluation

SHRINK_POSITIVES = 100  # the support at which a chosen threshold moves half-way from 0.5 (see above)


def decide(proba: np.ndarray, thresholds: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """0/1 decisions [n, labels]: a label is on at or above its threshold."""
    return (np.asarray(proba) >= np.asarray(thresholds, np.float32)[None, :]).astype(np.uint8)


def evaluate_multilabel(targets: np.ndarray, proba: np.ndarray, thresholds: tuple[float, ...] | np.ndarray,
                        classes: tuple[str, ...] | list[str]) -> MultiLabelEvaluation:
    """Every figure of a multi-label model's probabilities `proba` against 0/1 `targets` (both [n, labels])."""
    y = np.asarray(targets, np.uint8).astype(bool)
    pred = decide(proba, thresholds).astype(bool)
    present = y.any(0)
    tp, n_pred, support = (pred & y).sum(0), pred.sum(0), y.sum(0)
    precision, recall = _ratio(tp, n_pred), _ratio(tp, support)
    f1 = _ratio(2 * tp, n_pred + support)
    aps = [average_precision(y[:, j], proba[:, j]) if present[j] else None for j in range(y.shape[1])]
    per = tuple(LabelScores(str(c), float(precision[j]), float(recall[j]), float(f1[j]), aps[j], int(support[j]),
                            float(thresholds[j])) for j, c in enumerate(classes))
    return MultiLabelEvaluation(
        n=len(y), map=float(np.mean([a for a in aps if a is not None])) if present.any() else 0.0,
        micro_f1=float(_ratio(2 * tp.sum(), n_pred.sum() + support.sum())),
        macro_f1=float(np.mean(f1[present])) if present.any() else 0.0,
        subset_accuracy=float((pred == y).all(1).mean()) if len(y) else 0.0,
        hamming_loss=float((pred != y).mean()) if y.size else 0.0, per_label=per)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _pr_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One label's precision-recall curve at each distinct probability, highest first: (precision, recall, the
    probability, the next lower one or 0). scikit-learn's `precision_recall_curve`, without importing it (~1.5 s of
    a ~3 s warm multi-label train)."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order].astype(np.float64), p[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]  # the last row of each run of equal probabilities
    tps = np.cumsum(ys)[last]
    precision, recall = tps / (last + 1), tps / max(tps[-1], 1)
    below = np.r_[ps[last[:-1] + 1], 0.0]
    return precision, recall, ps[last], below


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """scikit-learn's `average_precision_score` for one label: the sum over thresholds of precision times the
    recall it adds (no interpolation)."""
    precision, recall, _, _ = _pr_points(np.asarray(y, bool), np.asarray(p))
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def choose_thresholds(targets: np.ndarray, proba: np.ndarray, min_positives: int = MIN_POSITIVES,
                      shrink: float = SHRINK_POSITIVES) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Each label's threshold maximising its F1 on (`targets`, `proba`), shrunk towards 0.5 by its support (see
    the module docstring; `shrink=0`: the argmax itself), and the labels left at 0.5 (fewer than `min_positives`
    positives). The argmax is the midpoint between the probability that reaches the best F1 and the next lower one,
    so that a label is not switched on or off by a hair's difference from a validation image."""
    thresholds, untuned = [], []
    for j in range(targets.shape[1]):
        y = np.asarray(targets[:, j], bool)
        if y.sum() < min_positives:
            thresholds.append(DEFAULT_THRESHOLD)
            untuned.append(j)
            continue
        precision, recall, cut, below = _pr_points(y, np.asarray(proba[:, j]))
        f1 = _ratio(2 * precision * recall, precision + recall)
        best = int(np.argmax(f1))
        t, n = float((cut[best] + below[best]) / 2), float(y.sum())
        thresholds.append(DEFAULT_THRESHOLD + (t - DEFAULT_THRESHOLD) * n / (n + shrink))
    return tuple(thresholds), tuple(untuned)
