"""Multi-label figures against scikit-learn, per-label thresholds, and their records' round trip."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (average_precision_score, f1_score, hamming_loss, precision_recall_fscore_support)

from headstart.evaluate.multilabel import choose_thresholds, decide, evaluate_multilabel
from headstart.records import MultiLabelEvaluation, MultiLabelReport


def _scored(seed: int = 0, n: int = 300, labels: int = 5):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < [0.5, 0.2, 0.1, 0.04, 0.6][:labels]).astype(np.uint8)
    proba = np.clip(0.35 * y + rng.random((n, labels)) * 0.65, 0, 1).astype(np.float32)
    return y, proba


def test_figures_match_scikit_learn() -> None:
    y, proba = _scored()
    y[:, 3] = 0  # a label with no positive: out of mAP and macro F1, as the acceptance check scores
    thresholds = (0.5, 0.4, 0.6, 0.5, 0.45)
    ev = evaluate_multilabel(y, proba, thresholds, list("abcde"))
    pred = decide(proba, thresholds)
    keep = y.any(0)
    assert ev.map == pytest.approx(average_precision_score(y[:, keep], proba[:, keep], average="macro"))
    assert ev.micro_f1 == pytest.approx(f1_score(y, pred, average="micro"))
    assert ev.macro_f1 == pytest.approx(f1_score(y[:, keep], pred[:, keep], average="macro", zero_division=0))
    assert ev.hamming_loss == pytest.approx(hamming_loss(y, pred))
    assert ev.subset_accuracy == pytest.approx(np.mean((pred == y).all(1)))
    p, r, f, s = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    for j, label in enumerate(ev.per_label):
        assert (label.precision, label.recall, label.f1, label.support) == pytest.approx((p[j], r[j], f[j], s[j]))
        assert label.threshold == thresholds[j]
    assert ev.per_label[3].ap is None
    assert ev.per_label[0].ap == pytest.approx(average_precision_score(y[:, 0], proba[:, 0]))


def test_unshrunk_thresholds_reach_each_labels_best_f1_and_rare_labels_keep_half() -> None:
    y, proba = _scored(1)
    thresholds, untuned = choose_thresholds(y, proba, min_positives=15, shrink=0)
    assert untuned == (3,) and thresholds[3] == 0.5
    for j in (0, 1, 2, 4):
        best = max(f1_score(y[:, j], proba[:, j] >= t) for t in np.unique(proba[:, j]))
        assert f1_score(y[:, j], proba[:, j] >= thresholds[j]) == pytest.approx(best)


def test_shrinking_moves_thresholds_towards_half_by_support() -> None:
    y, proba = _scored(2)
    raw, _ = choose_thresholds(y, proba, shrink=0)
    shrunk, _ = choose_thresholds(y, proba, shrink=40)
    for j, (t0, t1) in enumerate(zip(raw, shrunk)):
        n = y[:, j].sum()
        if n >= 5:
            assert t1 - 0.5 == pytest.approx((t0 - 0.5) * n / (n + 40))


def test_records_round_trip_whole() -> None:
    y, proba = _scored()
    ev = evaluate_multilabel(y, proba, (0.5,) * 5, list("abcde"))
    assert MultiLabelEvaluation.from_dict(ev.to_dict()) == ev
    report = MultiLabelReport(ev, None, ("d",), 5, 0.3, {"train": 10, "val": 3})
    assert MultiLabelReport.from_dict(report.to_dict()) == report


def test_head_configs_saved_before_multi_label_load_single_label_and_sigmoid_is_used_after() -> None:
    from headstart.heads.config import HeadConfig, head_proba

    old = {"in_features": 4, "n_classes": 3, "hidden": [], "dropout": 0.2, "temperature": 1.5}
    cfg = HeadConfig.from_dict(old)
    assert not cfg.multi_label and cfg.thresholds == ()
    ml = HeadConfig(4, 3, multi_label=True, thresholds=(0.2, 0.5, 0.7))
    assert HeadConfig.from_dict(ml.to_dict()) == ml
    rng = np.random.default_rng(0)
    state = {"mean": np.zeros(4, np.float32), "std": np.ones(4, np.float32),
             "layers.1.weight": rng.normal(size=(3, 4)).astype(np.float32), "layers.1.bias": np.zeros(3, np.float32)}
    x = rng.normal(size=(6, 4)).astype(np.float32)
    logits = x @ state["layers.1.weight"].T
    np.testing.assert_allclose(head_proba(ml, state, x), 1 / (1 + np.exp(-logits)), rtol=1e-5)
    np.testing.assert_allclose(head_proba(cfg, state, x).sum(1), 1.0, rtol=1e-5)
