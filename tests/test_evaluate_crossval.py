"""k-fold cross-validation of the head: folds, intervals, and accuracy that tracks how separable the data is."""

from __future__ import annotations

import numpy as np
import pytest

from helpers_models import blobs
from headstart.errors import DataError
from headstart.evaluate.crossval import fold_count, stratified_folds, summarise, t_interval, wilson_interval
from headstart.train.crossval import cross_validate, out_of_fold_proba
from headstart.records import TrainConfig


def test_stratified_folds_deal_every_class_evenly() -> None:
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    folds = stratified_folds(labels, 5, seed=1)
    assert set(folds.tolist()) == set(range(5))
    for cls in range(3):
        sizes = np.bincount(folds[labels == cls], minlength=5)
        assert sizes.max() - sizes.min() <= 1


def test_fold_count_shrinks_for_tiny_sets_and_refuses_too_few() -> None:
    assert fold_count(np.zeros(100, int)) == 5
    assert fold_count(np.zeros(6, int)) == 3
    with pytest.raises(DataError, match="at least 4"):
        fold_count(np.zeros(3, int))


def test_intervals_are_known_values() -> None:
    low, high = wilson_interval(90, 100)  # textbook: 0.826 to 0.945
    assert low == pytest.approx(0.8256, abs=1e-3) and high == pytest.approx(0.9448, abs=1e-3)
    low, high = t_interval([0.8, 0.9, 1.0, 0.9, 0.9])  # mean 0.9, sd 0.0707, t(4) = 2.776
    assert low == pytest.approx(0.9 - 2.776 * 0.0707 / 5 ** 0.5, abs=1e-3)


def test_summarise_never_collapses_to_a_point_when_every_fold_is_perfect() -> None:
    cv = summarise(np.ones(50, bool), np.arange(50) % 5)
    assert cv.accuracy == 1.0 and cv.high == 1.0 and cv.low < 0.95  # Wilson: 50 photos cannot prove 100 %


def test_out_of_fold_rows_come_from_heads_that_never_saw_them() -> None:
    # Random labels on random features: a head that had seen a row would fit it; out of fold it is chance.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 16)).astype(np.float32)
    y = rng.integers(0, 2, 80)
    proba, fold_of = out_of_fold_proba(x, y, 2, folds=4)
    assert proba.shape == (80, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert set(fold_of.tolist()) == {0, 1, 2, 3}
    assert 0.25 < (proba.argmax(1) == y).mean() < 0.75


def test_accuracy_tracks_separability_and_its_interval_holds_it() -> None:
    # Batches of 16: with the default 64, a fold's 57 rows take one step an epoch, and whether 60 steps reach the
    # blobs depends on the initial draw (seeds 1, 3 and 7 of 8 stayed under 0.85 that way).
    cfg = TrainConfig(batch_size=16)
    x, y = blobs(30, spread=0.5)
    easy = cross_validate(x, y, 3, train_config=cfg)
    x, y = blobs(30, spread=6.0)
    hard = cross_validate(x, y, 3, train_config=cfg)
    assert easy.accuracy > 0.85 and easy.folds == 5 and easy.n == 90
    assert hard.accuracy < easy.accuracy
    for cv in (easy, hard):
        assert cv.low <= cv.accuracy <= cv.high and cv.contains(cv.accuracy)
        assert len(cv.fold_accuracies) == 5


def test_cross_validating_fixed_settings_scores_each_fold_by_a_head_that_never_saw_it():
    from helpers_models import blobs
    from headstart.evaluate.crossval import stratified_folds
    from headstart.train.crossval import cross_validate_settings
    from headstart.records import CrossValidation
    from headstart.heads.config import HeadConfig, head_proba
    from headstart.records import TrainConfig
    from headstart.train.fit_head import refit_full

    x, y = blobs(12, seed=4, spread=2.5)
    cfg = TrainConfig(epochs=6, seed=1)
    cv = cross_validate_settings(x, y, HeadConfig(x.shape[1], 3), cfg, epochs=4, folds=3, seed=2)
    assert cv.folds == 3 and cv.n == len(y) and cv.rows == "train+val" and cv.low <= cv.accuracy <= cv.high
    # Fold 0 by hand: the head refitted on the other folds (its seed offset by the fold), scored on fold 0.
    fold_of = stratified_folds(y, 3, 2)
    head, _ = refit_full(HeadConfig(x.shape[1], 3), cfg, x[fold_of != 0], y[fold_of != 0], 4)
    state = head.state_dict()
    hits = head_proba(HeadConfig(x.shape[1], 3), state, x[fold_of == 0]).argmax(1) == y[fold_of == 0]
    assert cv.fold_accuracies[0] == pytest.approx(hits.mean())
    assert CrossValidation.from_dict(cv.to_dict()) == cv


def test_a_group_shares_one_fold_and_the_folds_stay_stratified() -> None:
    from headstart.evaluate.crossval import kept_groups

    labels = np.repeat([0, 1, 2], [40, 24, 12])
    groups = np.arange(len(labels)) // 4  # parts of four photos of one class
    folds = stratified_folds(labels, 5, seed=3, groups=groups)
    assert all(len(set(folds[groups == g])) == 1 for g in np.unique(groups))
    assert kept_groups(groups, folds) == len(np.unique(groups))
    for cls in range(3):
        sizes = np.bincount(folds[labels == cls], minlength=5)
        assert sizes.max() - sizes.min() <= 4  # one group's size
    # photos each alone: the folds are those without groups
    assert np.array_equal(stratified_folds(labels, 5, 3, np.arange(len(labels))), stratified_folds(labels, 5, 3))
    assert kept_groups(None, folds) == 0


def test_grouped_folds_score_the_model_not_its_copies() -> None:
    """Random labels, each photo stored twice: folds that split a pair score the copy (near 100 %), folds that keep
    it together score what the features say of the label (chance)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 256)).astype(np.float32)  # as many features as photos: any labels can be learnt
    y = rng.integers(0, 2, 60)
    x2, y2 = np.concatenate([x, x + 0.01 * rng.normal(size=x.shape).astype(np.float32)]), np.concatenate([y, y])
    pairs = np.concatenate([np.arange(60), np.arange(60)])
    cfg = TrainConfig(epochs=40, seed=0, weight_decay=0.0)
    leaky = cross_validate(x2, y2, 2, hidden=(), train_config=cfg)
    honest = cross_validate(x2, y2, 2, hidden=(), train_config=cfg, groups=pairs)
    assert leaky.accuracy > 0.75 and honest.accuracy < 0.65  # measured: 0.82 and 0.48
    assert honest.groups == 60 and leaky.groups == 0
