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


def _eval_of(y, picks):
    proba = np.full((len(y), 2), 0.1)
    proba[np.arange(len(y)), picks] = 0.9
    return evaluate(np.array(y), proba, ["a", "b"])


STRONG = _eval_of([0, 1, 0, 1], [0, 1, 0, 1])  # accuracy 1, balanced 1
FAIR = _eval_of([0, 1, 0, 1, 0], [0, 1, 0, 0, 0])  # accuracy 0.8, balanced 0.75: flowers-like, kept
RARE_MISSED = _eval_of([0] * 8 + [1] * 2, [0] * 10)  # accuracy 0.8, balanced 0.5: elpv-like, fine-tuned
GAP = _eval_of([0] * 9 + [1] * 3, [0] * 9 + [1, 1, 0])  # accuracy 0.92, balanced 0.83: gap 0.08 < 0.1, kept


@pytest.mark.parametrize("strategy, n_train, has_val, head, run", [
    ("head", 1000, True, RARE_MISSED, False), ("finetune", 5, False, STRONG, True),
    ("auto", 1000, True, RARE_MISSED, True), ("auto", 10, True, RARE_MISSED, False),
    ("auto", 1000, False, RARE_MISSED, False), ("auto", 1000, True, None, False),
    ("auto", 1000, True, STRONG, False), ("auto", 1000, True, FAIR, False), ("auto", 1000, True, GAP, False),
    ("auto", 1000, True, _eval_of([0, 1, 0, 1, 0], [0, 0, 1, 0, 1]), True),  # balanced 0.42 < 0.6: poor
])
def test_stage2_runs_when_asked_for_by_name_or_when_auto_finds_the_head_weak(strategy, n_train, has_val, head, run):
    assert policy.run_stage2(strategy, n_train, has_val, head)[0] is run


def test_classes_are_weighted_when_skewed_or_asked_for():
    assert policy.skewed({"a": 300, "b": 100}) and not policy.skewed({"a": 299, "b": 100})
    assert not policy.skewed({"a": 5}) and not policy.skewed({"a": 5, "b": 0})  # an absent class is not a ratio
    assert policy.balance_classes("auto", {"a": 1322, "b": 93}) == policy.AUTO_BALANCE_POWER == 0.5
    assert policy.balance_classes("auto", {"a": 1, "b": 1}) == 0.0
    assert policy.balance_classes(True, {"a": 1, "b": 1}) == 1.0
    assert policy.balance_classes(False, {"a": 9, "b": 1}) == 0


def test_tempered_class_weights_are_the_root_of_the_full_ones():
    from headstart.train.head_step import class_weights

    y = np.array([0] * 9 + [1])
    full, tempered = class_weights(y, 2), class_weights(y, 2, 0.5)
    assert full == pytest.approx([10 / 18, 5.0]) and tempered == pytest.approx(np.sqrt([10 / 18, 5.0]))


def test_skewed_models_are_ranked_by_balanced_accuracy():
    assert policy.keep_finetuned("auto", RARE_MISSED, GAP, balanced=True)
    assert not policy.keep_finetuned("auto", FAIR, RARE_MISSED, balanced=True)  # same accuracy, lower balanced
    assert policy.keep_refit(FAIR, RARE_MISSED, balanced=True) and not policy.keep_refit(RARE_MISSED, FAIR, True)


def test_whole_view_keeps_the_whole_photo_at_up_to_256_px():
    cfg = PreprocessConfig(input_size=224, crop_pct=0.875, native_size=96)
    assert policy.whole_view(cfg, 300) == dataclasses.replace(cfg, input_size=256, crop_pct=1.0, native_size=0)
    assert policy.whole_view(cfg, 200).input_size == 224 and policy.whole_view(cfg, 100).input_size == 224
    assert policy.whole_view(cfg, 0).input_size == 256  # no readable size: the recipe's


def test_the_data_plans_the_epochs_and_the_time_limit_only_caps_them():
    # issue 26: epochs fitted to a timed step moved with the machine's load, and the model with them
    assert policy.deep_epochs(1474) == 10 and policy.deep_epochs(100) == policy.DEEP_EPOCHS
    assert policy.deep_epochs(100_000) == policy.DEEP_MIN_EPOCHS
    assert policy.finetune_budget(480, 100, 1000, 0.05) == pytest.approx(480 - 100 - 60 - policy.DEEP_RESERVE_S)


def test_an_epoch_starts_only_when_it_ends_before_the_deadline():
    import time

    from headstart.train.finetune import out_of_time

    now = time.perf_counter()
    assert not out_of_time(None, 30.0) and not out_of_time(now + 5, 0.0)  # no limit; no epoch measured yet
    assert out_of_time(now + 20, 30.0) and not out_of_time(now + 60, 30.0)


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
    from headstart.records import TrainConfig
    from headstart.train.policy import head_candidates

    cfg = TrainConfig(epochs=60, patience=10)
    candidates = head_candidates(hidden, 0.3, HeadConfig(100, 4), cfg, n_train, has_val, finetune_follows)
    assert all((c.in_features, c.n_classes) == (100, 4) for c, _ in candidates)
    assert [c.hidden for c, _ in candidates] == expected
    assert candidates[0][1] == cfg and candidates[0][0].dropout == 0.3
    if len(candidates) == 2:
        assert candidates[1][0].dropout == 0.6 and candidates[1][1].epochs == 20 and candidates[1][1].patience == 5


def test_refit_auto_refits_only_the_heads_where_the_refit_measured_a_gain():
    assert policy.refits("auto", measured_to_pay=True) and not policy.refits("auto", measured_to_pay=False)
    assert policy.refits(True, measured_to_pay=False) and not policy.refits(False, measured_to_pay=True)
