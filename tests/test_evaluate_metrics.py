"""Tests for headstart.evaluate.metrics.

Expected values are worked out by hand in the comments, so the tests do not depend on
scikit-learn; an optional cross-check against it runs only when it is installed (it is in the dev extra).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from headstart.evaluate.metrics import accuracy, balanced_accuracy, confusion_matrix, evaluate, expected_calibration_error, log_loss, per_class_scores, top_k_accuracy
from headstart.records import Evaluation

# A 3-class example worked out by hand.
#   true:  0 0 0 1 1 2 2 2
#   pred:  0 1 0 1 2 2 2 1
# Confusion (rows true, cols pred):
#   [[2, 1, 0],
#    [0, 1, 1],
#    [0, 1, 2]]
# accuracy  = 5/8
# recall    = 2/3, 1/2, 2/3           -> balanced accuracy = (2/3 + 1/2 + 2/3) / 3 = 11/18
# precision = 2/2, 1/3, 2/3
# f1        = 2*1*(2/3)/(5/3) = 4/5, 2*(1/3)(1/2)/(5/6) = 2/5, 2/3


Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2])


Y_PRED = np.array([0, 1, 0, 1, 2, 2, 2, 1])


CM = np.array([[2, 1, 0], [0, 1, 1], [0, 1, 2]])


def test_confusion_matrix_hand_example():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, CM)


def test_confusion_matrix_accepts_lists_and_pads_unseen_classes():
    cm = confusion_matrix([0, 1], [1, 1], 4)
    assert cm.shape == (4, 4)
    assert cm.sum() == 2 and cm[0, 1] == 1 and cm[1, 1] == 1


def test_confusion_matrix_empty():
    cm = confusion_matrix([], [], 3)
    np.testing.assert_array_equal(cm, np.zeros((3, 3), dtype=np.int64))


def test_accuracy_and_balanced_accuracy_hand_example():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(5 / 8)
    assert balanced_accuracy(Y_TRUE, Y_PRED, 3) == pytest.approx(11 / 18)


def test_per_class_scores_hand_example():
    s = per_class_scores(Y_TRUE, Y_PRED, 3)
    np.testing.assert_allclose(s["precision"], [1.0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(s["recall"], [2 / 3, 1 / 2, 2 / 3])
    np.testing.assert_allclose(s["f1"], [4 / 5, 2 / 5, 2 / 3])
    np.testing.assert_array_equal(s["support"], [3, 2, 3])
    assert s["support"].dtype == np.int64


def test_never_predicted_class_has_zero_precision_without_warnings(no_warnings):
    # Class 2 occurs in y_true but is never predicted: precision 0/0 -> 0, recall 0, f1 0.
    s = per_class_scores([0, 1, 2, 2], [0, 1, 0, 1], 3)
    np.testing.assert_allclose(s["precision"], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(s["recall"], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(s["f1"], [2 / 3, 2 / 3, 0.0])
    assert all(np.isfinite(s[k]).all() for k in ("precision", "recall", "f1"))


def test_class_absent_everywhere_is_all_zeros(no_warnings):
    s = per_class_scores([0, 1], [0, 1], 3)
    assert s["precision"][2] == 0 and s["recall"][2] == 0 and s["f1"][2] == 0 and s["support"][2] == 0


def test_balanced_accuracy_ignores_classes_absent_from_y_true(no_warnings):
    # Class 2 never occurs in y_true (but is predicted once): mean of recall(0)=1/2, recall(1)=1.
    y_true = [0, 0, 1, 1]
    y_pred = [0, 2, 1, 1]
    assert balanced_accuracy(y_true, y_pred, 3) == pytest.approx(0.75)


def test_perfect_predictions():
    y = np.array([0, 1, 2, 2, 1])
    assert accuracy(y, y) == 1.0
    assert balanced_accuracy(y, y, 3) == 1.0
    s = per_class_scores(y, y, 3)
    np.testing.assert_array_equal(s["f1"], [1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    ("y_true", "y_pred", "n_classes"),
    [
        ([0, 1], [0], 2),  # length mismatch
        ([0, 3], [0, 1], 3),  # true label out of range
        ([0, 1], [0, -1], 3),  # negative predicted label
        ([0.0, 1.0], [0, 1], 2),  # float labels
        ([[0, 1]], [[0, 1]], 2),  # 2-D labels
    ],
)
def test_invalid_labels_raise(y_true, y_pred, n_classes):
    with pytest.raises(ValueError):
        confusion_matrix(y_true, y_pred, n_classes)


def test_empty_inputs_raise_for_scalar_metrics():
    with pytest.raises(ValueError):
        accuracy([], [])
    with pytest.raises(ValueError):
        balanced_accuracy([], [], 3)


def test_top_k_accuracy_hand_example():
    proba = np.array(
        [
            [0.5, 0.3, 0.2],  # true 1: ranked 2nd
            [0.1, 0.6, 0.3],  # true 2: ranked 2nd
            [0.2, 0.3, 0.5],  # true 0: ranked 3rd
        ]
    )
    y = np.array([1, 2, 0])
    assert top_k_accuracy(y, proba, 1) == 0.0
    assert top_k_accuracy(y, proba, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(y, proba, 3) == 1.0
    assert top_k_accuracy(y, proba, 10) == 1.0  # k beyond the class count


def test_top_1_matches_argmax_accuracy_including_ties():
    # Ties go to the lower class index, as with argmax.
    proba = np.array([[0.5, 0.5], [0.5, 0.5], [0.2, 0.8]])
    y = np.array([0, 1, 1])
    assert top_k_accuracy(y, proba, 1) == pytest.approx(2 / 3)
    assert top_k_accuracy(y, proba, 1) == accuracy(y, proba.argmax(axis=1))
    rng = np.random.default_rng(0)
    proba = rng.integers(0, 3, size=(200, 5)).astype(float)  # coarse values -> many ties
    y = rng.integers(0, 5, size=200)
    assert top_k_accuracy(y, proba, 1) == accuracy(y, proba.argmax(axis=1))


def test_top_k_rejects_bad_k():
    with pytest.raises(ValueError):
        top_k_accuracy([0], [[1.0, 0.0]], 0)


def test_log_loss_hand_example():
    proba = np.array([[0.8, 0.2], [0.4, 0.6]])
    assert log_loss([0, 1], proba) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)


def test_log_loss_clips_zero_probability():
    assert log_loss([1], [[1.0, 0.0]], eps=1e-7) == pytest.approx(-math.log(1e-7))
    assert log_loss([0], [[1.0, 0.0]]) == 0.0


def test_ece_hand_example():
    # 5 bins of width 0.2, right-closed.
    #   bin (0.8, 1.0]: conf 0.9 correct, conf 0.9 wrong   -> acc 0.5, conf 0.9,   |gap| 0.4
    #   bin (0.6, 0.8]: conf 0.7 correct, conf 0.65 wrong  -> acc 0.5, conf 0.675, |gap| 0.175
    # ECE = 2/4 * 0.4 + 2/4 * 0.175 = 0.2875
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.65, 0.35]])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(y, proba, n_bins=5) == pytest.approx(0.2875)


def test_ece_perfect_predictions_equals_one_minus_mean_confidence():
    # All correct, so every bin's gap is (1 - mean bin confidence) with the same sign and the
    # weighted sum collapses to 1 - mean confidence = 1 - (0.7 + 0.8 + 0.9) / 3 = 0.2.
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.05, 0.05, 0.9]])
    y = np.array([0, 1, 2])
    assert expected_calibration_error(y, proba) == pytest.approx(0.2)
    assert expected_calibration_error(y, proba, n_bins=1) == pytest.approx(0.2)


def test_ece_single_bin_is_abs_accuracy_minus_mean_confidence():
    # One bin: |acc - mean conf| = |1/2 - (0.9 + 0.6) / 2| = 0.25.
    proba = np.array([[0.9, 0.1], [0.4, 0.6]])
    assert expected_calibration_error([0, 0], proba, n_bins=1) == pytest.approx(0.25)


def test_ece_confident_and_right_is_zero():
    proba = np.eye(3)
    assert expected_calibration_error([0, 1, 2], proba) == 0.0


@pytest.mark.parametrize(
    ("y_true", "proba"),
    [
        ([0, 1], [[0.5, 0.5]]),  # length mismatch
        ([0], [0.5, 0.5]),  # 1-D proba
        ([2], [[0.5, 0.5]]),  # label beyond the proba columns
        ([0], [[np.nan, 0.5]]),  # non-finite
        ([], np.zeros((0, 2))),  # empty
    ],
)
def test_invalid_proba_inputs_raise(y_true, proba):
    for fn in (log_loss, expected_calibration_error):
        with pytest.raises(ValueError):
            fn(y_true, proba)
    with pytest.raises(ValueError):
        top_k_accuracy(y_true, proba, 1)


def _hand_proba() -> np.ndarray:
    """Probabilities whose argmax is Y_PRED, with the chosen class at 0.6 and the rest 0.2."""
    proba = np.full((len(Y_PRED), 3), 0.2)
    proba[np.arange(len(Y_PRED)), Y_PRED] = 0.6
    return proba


def test_evaluate_hand_example():
    ev = evaluate(Y_TRUE, _hand_proba(), ["cat", "dog", "fox"])
    assert isinstance(ev, Evaluation)
    assert ev.classes == ("cat", "dog", "fox")
    assert ev.n == 8
    assert ev.accuracy == pytest.approx(5 / 8)
    assert ev.balanced_accuracy == pytest.approx(11 / 18)
    np.testing.assert_array_equal(ev.confusion, CM)
    np.testing.assert_allclose(ev.precision, [1.0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(ev.recall, [2 / 3, 1 / 2, 2 / 3])
    np.testing.assert_allclose(ev.f1, [4 / 5, 2 / 5, 2 / 3])
    np.testing.assert_array_equal(ev.support, [3, 2, 3])
    # True-class probability is 0.6 on the 5 hits and 0.2 on the 3 misses.
    assert ev.log_loss == pytest.approx(-(5 * math.log(0.6) + 3 * math.log(0.2)) / 8)
    # Every confidence is 0.6 (one bin): |5/8 - 0.6| = 0.025.
    assert ev.ece == pytest.approx(0.025)


def test_evaluation_is_immutable():
    ev = evaluate(Y_TRUE, _hand_proba(), ["cat", "dog", "fox"])
    with pytest.raises(AttributeError):
        ev.accuracy = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        ev.confusion[0, 0] = 99


def test_evaluation_does_not_lock_callers_arrays():
    cm = CM.copy()
    ev = Evaluation(
        classes=("a", "b", "c"),
        accuracy=0.0,
        balanced_accuracy=0.0,
        log_loss=0.0,
        ece=0.0,
        confusion=cm,
        precision=np.zeros(3),
        recall=np.zeros(3),
        f1=np.zeros(3),
        support=np.zeros(3, dtype=int),
        n=0,
    )
    cm[0, 0] = 7  # the caller's array stays writable and the record keeps its own copy
    assert ev.confusion[0, 0] == 2


def test_to_dict_is_json_serialisable_and_complete():
    ev = evaluate(Y_TRUE, _hand_proba(), ["cat", "dog", "fox"])
    d = ev.to_dict()
    round_tripped = json.loads(json.dumps(d))
    assert round_tripped == d
    assert d["classes"] == ["cat", "dog", "fox"]
    assert d["n"] == 8
    assert d["confusion"] == CM.tolist()
    assert set(d["per_class"]) == {"cat", "dog", "fox"}
    assert d["per_class"]["dog"] == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2})
    assert isinstance(d["per_class"]["dog"]["support"], int)
    for key in ("accuracy", "balanced_accuracy", "log_loss", "ece"):
        assert type(d[key]) is float


def test_evaluate_validates_classes():
    proba = _hand_proba()
    with pytest.raises(ValueError):
        evaluate(Y_TRUE, proba, ["a", "b"])  # column count mismatch
    with pytest.raises(ValueError):
        evaluate(Y_TRUE, proba, ["a", "a", "b"])  # duplicate names collide in per_class


def test_evaluate_with_unpredicted_and_absent_classes_has_no_nan(no_warnings):
    # Class 2 is neither in y_true nor ever predicted.
    proba = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    ev = evaluate([0, 1, 1], proba, ["a", "b", "c"])
    assert ev.balanced_accuracy == pytest.approx((1.0 + 0.5) / 2)
    json.dumps(ev.to_dict(), allow_nan=False)


def test_matches_scikit_learn_on_random_data():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(42)
    n, c = 500, 6
    logits = rng.normal(size=(n, c)) * 2
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, c - 1, size=n)  # class c-1 absent from y_true
    pred = proba.argmax(axis=1)
    labels = list(range(c))
    np.testing.assert_array_equal(confusion_matrix(y, pred, c), skm.confusion_matrix(y, pred, labels=labels))
    assert accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    ours = per_class_scores(y, pred, c)
    np.testing.assert_allclose(ours["precision"], p)
    np.testing.assert_allclose(ours["recall"], r)
    np.testing.assert_allclose(ours["f1"], f)
    np.testing.assert_array_equal(ours["support"], s)
    for k in (1, 2, 3):
        assert top_k_accuracy(y, proba, k) == pytest.approx(skm.top_k_accuracy_score(y, proba, k=k, labels=labels))
    assert log_loss(y, proba) == pytest.approx(skm.log_loss(y, proba, labels=labels))
