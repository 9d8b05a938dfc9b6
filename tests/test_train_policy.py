"""train.policy: the auto rules on plain numbers, and the best-weights tracker both loops use."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from headstart.evaluate.metrics import evaluate
from headstart.train import policy
from headstart.train.policy import with_native_view
from headstart.vision.preprocess import PreprocessConfig, eval_views


def _eval(correct: int, confident: float = 0.9):
    """An evaluation of 4 photos, `correct` of them right, each with probability `confident` on its pick."""
    y = np.array([0, 1, 0, 1])
    picks = np.where(np.arange(4) < correct, y, 1 - y)
    proba = np.full((4, 2), 1 - confident)
    proba[np.arange(4), picks] = confident
    return evaluate(y, proba, ["a", "b"])


@pytest.mark.parametrize("strategy, n_train, has_val, acc, run", [
    ("head", 1000, True, 0.5, False), ("finetune", 5, False, 1.0, True),
    ("auto", 1000, True, 0.5, True), ("auto", 10, True, 0.5, False), ("auto", 1000, False, 0.5, False),
    ("auto", 1000, True, 0.995, False),
])
def test_stage2_runs_when_asked_for_by_name_or_when_auto_sees_room(strategy, n_train, has_val, acc, run):
    assert policy.run_stage2(strategy, n_train, has_val, acc)[0] is run


def test_unfreeze_auto_is_every_stage_at_the_photos_size_else_two():
    assert policy.unfreeze_stages("auto", at_photos_size=True) == "all"
    assert policy.unfreeze_stages("auto", at_photos_size=False) == 2
    assert policy.unfreeze_stages(3, at_photos_size=True) == 3


def test_finetune_by_name_is_kept_auto_keeps_what_validates_better():
    head, better, worse = _eval(3), _eval(4), _eval(2)
    assert policy.keep_finetuned("finetune", head, worse)
    assert policy.keep_finetuned("auto", head, better) and not policy.keep_finetuned("auto", head, worse)
    surer = _eval(3, confident=0.95)  # same accuracy, lower loss on the right ones... and higher on the wrong one
    assert policy.keep_finetuned("auto", head, surer) == (surer.log_loss < head.log_loss)


def test_the_refit_is_kept_only_at_a_lower_validation_loss():
    assert policy.keep_refit(_eval(4), _eval(3)) and not policy.keep_refit(_eval(2), _eval(3))


def test_best_tracker_keeps_the_best_state_and_counts_patience():
    from headstart.train.loop import BestTracker

    tracker = BestTracker(patience=2, best=1.0, state="stage 1")
    assert not tracker.update(1.0, lambda: "same") and tracker.state == "stage 1"  # must beat it by min_delta
    assert tracker.update(0.5, lambda: "epoch 2") and tracker.state == "epoch 2" and tracker.bad_epochs == 0
    assert not tracker.update(0.6, lambda: "epoch 3") and not tracker.should_stop
    assert not tracker.update(0.7, lambda: "epoch 4") and tracker.should_stop and tracker.state == "epoch 2"
    assert not BestTracker().should_stop  # no patience: never stops by itself


@pytest.mark.parametrize(
    "short_side, expected",
    [(128, 128), (134, 128), (100, 96), (20, 64), (135, 0), (300, 0), (2000, 0)],
)
def test_native_view_only_for_photos_much_smaller_than_the_input(short_side: int, expected: int) -> None:
    cfg = with_native_view(PreprocessConfig(224, 0.875), short_side)
    assert cfg.native_size == expected
    photo = Image.new("RGB", (short_side, short_side))
    assert len(eval_views(photo, cfg)) == (2 if expected else 1)
    assert dataclasses.replace(cfg, native_size=0) == PreprocessConfig(224, 0.875)  # nothing else changes


@pytest.mark.parametrize(
    "hidden, n_train, has_val, finetune_follows, expected",
    [
        ("auto", 2000, True, False, [(), (64,)]),
        ("auto", 999, True, False, [()]),  # too few photos to fit a hidden layer
        ("auto", 2000, False, False, [()]),  # nothing to choose by
        ("auto", 2000, True, True, [()]),  # stage 2 starts best from a linear head
        ((128,), 2000, True, True, [(128,)]),  # what the user asked for
        ((), 2000, True, False, [()]),
    ],
)
def test_head_candidates(hidden, n_train: int, has_val: bool, finetune_follows: bool, expected: list) -> None:
    from headstart.heads.config import HeadConfig
    from headstart.train.config import TrainConfig
    from headstart.train.policy import head_candidates

    cfg = TrainConfig(epochs=60, patience=10)
    candidates = head_candidates(hidden, 0.3, HeadConfig(100, 4), cfg, n_train, has_val, finetune_follows)
    assert all((c.in_features, c.n_classes) == (100, 4) for c, _ in candidates)
    assert [c.hidden for c, _ in candidates] == expected
    assert candidates[0][1] == cfg and candidates[0][0].dropout == 0.3
    if len(candidates) == 2:
        assert candidates[1][0].dropout == 0.6 and candidates[1][1].epochs == 20 and candidates[1][1].patience == 5
