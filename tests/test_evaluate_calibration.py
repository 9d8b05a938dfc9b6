"""Temperature scaling: the fitted temperature, ECE before and after, cross-fitting, reliability bins."""

from __future__ import annotations

import numpy as np
import pytest

from headstart.evaluate.calibration import (
    T_MAX,
    T_MIN,
    _nll,
    calibrate,
    fit_temperature,
    reliability_bins,
    scaled_proba,
)
from headstart.evaluate.metrics import expected_calibration_error


def _sampled(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution (perfectly calibrated), and labels drawn from it."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, k))
    p = scaled_proba(z)
    y = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)
    return z, np.minimum(y, k - 1).astype(np.int64)


@pytest.mark.parametrize("t_true", [0.5, 1.0, 3.0])
def test_recovers_the_temperature_that_distorted_calibrated_logits(t_true: float) -> None:
    z, y = _sampled(6000, 4, seed=1)
    # z is calibrated, so z * t_true (over-confident for t_true > 1, timid below 1) is best divided by t_true.
    t = fit_temperature(z * t_true, y)
    assert t == pytest.approx(t_true, rel=0.08)


def test_a_set_without_a_mistake_leaves_the_scores_alone() -> None:
    z, y = _sampled(300, 3, seed=8)
    y = z.argmax(1)  # every sample right: the NLL falls towards T -> 0, which would only overfit
    assert fit_temperature(z, y) == 1.0
    held_z, held_y = _sampled(300, 3, seed=9)
    cal = calibrate(held_z, held_y, fit_logits=z, fit_labels=y)
    assert cal.temperature == 1.0 and cal.ece_after == cal.ece_before


def test_the_search_finds_the_grid_minimum_of_the_nll() -> None:
    z, y = _sampled(500, 3, seed=2)
    z = z * 2.2
    grid = np.exp(np.linspace(np.log(T_MIN), np.log(T_MAX), 4001))
    best = grid[np.argmin([_nll(z, y, 1.0 / t) for t in grid])]
    t = fit_temperature(z, y)
    assert t == pytest.approx(best, rel=0.01)
    assert _nll(z, y, 1.0 / t) <= min(_nll(z, y, 1.0 / g) for g in grid) + 1e-9


def test_scaling_an_over_confident_model_lowers_its_ece_and_keeps_its_labels() -> None:
    z, y = _sampled(3000, 5, seed=3)
    fit_z, fit_y = _sampled(3000, 5, seed=4)
    cal = calibrate(z * 3.0, y, fit_logits=fit_z * 3.0, fit_labels=fit_y)
    assert cal.fitted_on == "validation" and cal.n == 3000
    assert cal.temperature == pytest.approx(3.0, rel=0.1)
    assert cal.ece_before > 0.1 and cal.ece_after < cal.ece_before / 3
    assert cal.nll_after < cal.nll_before
    assert cal.ece_before == pytest.approx(expected_calibration_error(y, scaled_proba(z * 3.0)))
    np.testing.assert_array_equal(scaled_proba(z * 3.0, cal.temperature).argmax(1), (z * 3.0).argmax(1))


def test_cross_fitting_scores_each_fold_with_a_temperature_fitted_on_the_other() -> None:
    z, y = _sampled(400, 3, seed=5)
    z = z * 2.0
    cal = calibrate(z, y, folds=2, seed=7)
    fold = np.random.default_rng(7).permutation(len(y)) % 2
    after = np.empty((len(y), 3))
    for k in (0, 1):
        after[fold == k] = scaled_proba(z[fold == k], fit_temperature(z[fold != k], y[fold != k]))
    assert cal.fitted_on == "cross-fitted"
    assert cal.ece_after == pytest.approx(expected_calibration_error(y, after))
    assert cal.temperature == pytest.approx(fit_temperature(z, y))


def test_reliability_bins_add_up_to_the_ece() -> None:
    z, y = _sampled(800, 3, seed=6)
    p = scaled_proba(z * 1.7)
    b = reliability_bins(y, p, 15)
    assert b.count.sum() == 800 and len(b.edges) == 16
    gap = (b.count * np.abs(b.accuracy - b.confidence)).sum() / 800
    assert gap == pytest.approx(expected_calibration_error(y, p, 15))


@pytest.mark.parametrize("logits, labels", [
    (np.zeros((0, 3)), np.zeros(0, np.int64)),  # nothing to fit
    (np.zeros((4, 1)), np.zeros(4, np.int64)),  # one class
    (np.zeros((4, 3)), np.array([0, 1, 2, 3])),  # a label out of range
    (np.zeros((4, 3)), np.array([0.0, 1.0, 2.0, 0.0])),  # float labels
    (np.full((2, 2), np.nan), np.array([0, 1])),
])
def test_bad_inputs_are_refused(logits, labels) -> None:
    with pytest.raises(ValueError):
        fit_temperature(logits, labels)


def test_cross_fitting_needs_enough_samples() -> None:
    with pytest.raises(ValueError, match="folds"):
        calibrate(np.zeros((1, 2)), np.array([0]), folds=2)
