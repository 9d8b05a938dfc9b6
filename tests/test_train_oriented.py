"""Oriented training (`train.oriented`, issue 26): the eight orientations are the dihedral group, the oriented
engine averages over them (so it cannot tell a photo from its turns), the setting travels with the preprocessing
(absent when off: older keys unchanged), and "auto" with a weak head keeps an oriented model only when it validates
better; once kept, the saved model predicts from the very features training scored its validation on; its seeds' heads
merge into one whose logits are their mean."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from helpers_models import TINY_BACKBONE
from headstart.heads.config import head_logits_numpy
from headstart.numeric import mean_features
from headstart.runtime.engines import OrientedEngine
from headstart.train import policy
from headstart.vision.preprocess import ORIENTATIONS, PreprocessConfig, oriented


def test_the_eight_orientations_are_the_turns_and_mirror_images_of_a_square() -> None:
    a = np.random.default_rng(0).normal(size=(2, 3, 5, 5))
    expected = {np.rot90(m, k, axes=(-2, -1)).tobytes() for k in range(4) for m in (a, a[..., ::-1])}
    got = {name: oriented(a, name) for name in ORIENTATIONS}
    assert {g.tobytes() for g in got.values()} == expected and len(got) == 8
    assert np.array_equal(got["hflip"], a[..., ::-1]) and np.array_equal(got["upright"], a)
    assert all(g.flags["C_CONTIGUOUS"] for g in got.values())


class _Positional:
    """An engine whose features depend on where things are: each row's pixels, flattened (not turn-invariant)."""

    kind = "test"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return batch.reshape(len(batch), -1).astype(np.float32)


def test_the_oriented_engine_averages_the_orientations_and_cannot_tell_a_photo_from_its_turns() -> None:
    batch = np.random.default_rng(1).normal(size=(3, 3, 4, 4)).astype(np.float32)
    inner = _Positional()
    engine = OrientedEngine(inner)
    got = engine(batch)
    assert inner.calls == 8 and engine.kind == "test"
    assert np.array_equal(got, mean_features(inner(oriented(batch, n)) for n in ORIENTATIONS))
    for name in ORIENTATIONS:  # the group is closed: any turn of the photo gives the same mean
        np.testing.assert_allclose(engine(oriented(batch, name)), got, atol=1e-6)
    assert not np.allclose(inner(oriented(batch, "rot90")), inner(batch))  # the inner engine could tell


def test_two_orientations_are_the_photo_and_its_mirror_image() -> None:
    batch = np.random.default_rng(2).normal(size=(3, 3, 4, 4)).astype(np.float32)
    inner = _Positional()
    got = OrientedEngine(inner, 2)(batch)
    assert inner.calls == 2
    assert np.array_equal(got, mean_features([inner(batch), inner(batch[..., ::-1])]))


def test_orientations_travel_with_the_preprocessing_and_are_absent_when_off() -> None:
    assert "orientations" not in PreprocessConfig().to_dict()  # older models and feature caches keep their keys
    on = PreprocessConfig(orientations=8)
    assert on.to_dict()["orientations"] == 8 and PreprocessConfig.from_dict(on.to_dict()) == on
    assert PreprocessConfig.from_dict(PreprocessConfig().to_dict()).orientations == 1


def test_keep_oriented_only_when_it_validates_better() -> None:
    from headstart.evaluate.metrics import evaluate

    y = np.array([0, 0, 0, 1])
    good = evaluate(y, np.eye(2)[[0, 0, 0, 1]], ("a", "b"))
    worse = evaluate(y, np.eye(2)[[0, 0, 0, 0]], ("a", "b"))
    assert policy.keep_oriented(good, worse, balanced=True) and not policy.keep_oriented(worse, good, True)
    assert not policy.keep_oriented(good, good, True)


def test_the_oriented_stage_is_skipped_when_its_features_would_not_fit_in_memory() -> None:
    assert policy.oriented_fits(1843, 1904)  # elpv
    assert not policy.oriented_fits(20_000, 1904)


@pytest.fixture
def weak_auto(tiny_weights, tiny_cache, monkeypatch):
    """ImageClassifier factory whose head always counts as weak (so "auto" goes on past stage 1)."""
    from headstart import ImageClassifier

    monkeypatch.setattr(policy, "AUTO_MIN_TRAIN_IMAGES", 1)
    monkeypatch.setattr(policy, "AUTO_WEAK_BALANCED", 2.0)
    return functools.partial(ImageClassifier, TINY_BACKBONE, weights=tiny_weights, epochs=4, device="cpu",
                             strategy="auto")


def test_a_kept_oriented_model_predicts_from_the_features_its_validation_was_scored_on(weak_auto, image_folder,
                                                                                       tmp_path, monkeypatch):
    monkeypatch.setattr(policy, "keep_oriented", lambda *a: True)
    clf = weak_auto().fit(image_folder)
    d = clf.decision_
    assert d.kept == "oriented" and d.stage2 is None and "8 turns and mirror images" in d.reason
    from rich.console import Console

    from headstart.cli import render

    console = Console(record=True, width=200)
    console.print(render.train_summary(clf, image_folder, TINY_BACKBONE, tmp_path, None))
    summary = " ".join(console.export_text().split())
    assert "averaged over its 8 turns and mirror images" in summary and "kept oriented" in summary
    assert "s (the oriented head, with its 8 orientations' extraction and its refit)" in summary
    assert "of the head before its refit" in summary and "the shipped head was refitted on train + val" in summary
    clf.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "headstart.json").read_text())
    assert saved["fit"]["decision"]["kept"] == "oriented"
    from headstart import ImageClassifier

    loaded = ImageClassifier.load(tmp_path / "m")
    assert loaded.decision_.kept == "oriented"
    scored = clf.validation_  # the kept model on its validation split, as training computed it
    got = loaded.predict_proba(scored.paths)
    np.testing.assert_array_equal(got, clf.predict_proba(scored.paths))
    from headstart.heads.config import head_proba

    expected = head_proba(loaded.head_config_, loaded.head_state_, scored.features)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # What ships is the head refitted on train + validation, not the one validation scored.
    assert d.refitted == sum(clf.counts_["train"].values()) + sum(clf.counts_["val"].values())
    assert not np.allclose(head_logits_numpy(loaded.head_state_, loaded.head_config_, scored.features), scored.logits)
    from headstart.tasks.report import build_report

    report = build_report(loaded, tmp_path / "m", image_folder, heat_maps=False, split="val")
    assert "refitted on these photos too" in report.evaluated_on
    assert "before its refit" in report.scores[0].chose
    from headstart.serve.export import export_model
    from headstart.serve.onnx_predictor import OnnxPredictor

    export_model(tmp_path / "m", image_folder)  # the eight orientations inside the graph, checked against the model
    onnx, _ = OnnxPredictor(tmp_path / "m" / "model.onnx").proba_paths(scored.paths)
    np.testing.assert_allclose(onnx, got, atol=1e-3)


def test_no_refit_ships_the_oriented_head_validation_scored(weak_auto, image_folder, monkeypatch):
    monkeypatch.setattr(policy, "keep_oriented", lambda *a: True)
    clf = weak_auto(refit=False).fit(image_folder)
    assert clf.decision_.kept == "oriented" and clf.decision_.refitted == 0
    scored = clf.validation_
    np.testing.assert_allclose(head_logits_numpy(clf.head_state_, clf.head_config_, scored.features), scored.logits,
                               atol=1e-5)


def test_an_oriented_model_that_validates_no_better_is_not_kept(weak_auto, image_folder, monkeypatch):
    from headstart.train import pipeline

    monkeypatch.setattr(policy, "keep_oriented", lambda *a: False)
    went_on = []
    monkeypatch.setattr(pipeline, "fit_stage2", lambda s, stage1, *a, **k: went_on.append(stage1) or stage1)
    clf = weak_auto().fit(image_folder)
    assert clf.decision_.kept == "head" and clf.frozen_.spec.preprocess.orientations == 1
    assert len(went_on) == 1  # deep fine-tuning is tried next, knowing what was tried
    assert "the labels depend on the orientation" in went_on[0].report.decision.reason


def test_both_workers_keep_one_blas_thread_until_both_are_done() -> None:
    """BLAS's thread count is the process's: a fit that finishes first must not hand its sibling two threads
    (its products would then sum in another order, and a rerun would not repeat them to the bit)."""
    import threading
    import time

    from threadpoolctl import threadpool_info, threadpool_limits

    from headstart.progress import NoProgress
    from headstart.runtime.device import one_blas_thread
    from headstart.train.oriented import _two_at_a_time

    def blas() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    first_in = threading.Event()

    def fit(item: int, bar) -> set[int]:  # each fit pins itself, as `fit_best_head` and `refit_full` do
        if item == 1:
            first_in.wait(5)
        with one_blas_thread():
            if item == 0:
                first_in.set()
                time.sleep(0.05)
                return blas()
            time.sleep(0.3)  # the first has finished and left its pin by now
            return blas()

    with threadpool_limits(2, user_api="blas"):
        assert _two_at_a_time(fit, [0, 1], NoProgress()) == [{1}, {1}]
        assert blas() == {2}  # the caller's count, back


def test_merged_heads_give_the_mean_of_their_logits() -> None:
    from headstart.heads.config import HeadConfig, head_logits_numpy
    from headstart.train.oriented import merge_heads

    rng = np.random.default_rng(0)
    cfg = HeadConfig(6, 3, hidden=(4,))
    base = {"mean": rng.normal(size=6).astype(np.float32), "std": rng.uniform(1, 2, 6).astype(np.float32)}
    states = [{**base, "layers.1.weight": rng.normal(size=(4, 6)).astype(np.float32),
               "layers.1.bias": rng.normal(size=4).astype(np.float32),
               "layers.4.weight": rng.normal(size=(3, 4)).astype(np.float32),
               "layers.4.bias": rng.normal(size=3).astype(np.float32)} for _ in range(3)]
    merged_cfg, merged = merge_heads(cfg, states)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    expected = np.mean([head_logits_numpy(st, cfg, x) for st in states], axis=0)
    assert merged_cfg.hidden == (12,)
    np.testing.assert_allclose(head_logits_numpy(merged, merged_cfg, x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        merge_heads(cfg, [states[0], {**states[1], "mean": base["mean"] + 1}])


def test_a_linear_model_rides_in_the_head_as_half_its_logits() -> None:
    from headstart.heads.config import HeadConfig, head_logits_numpy
    from headstart.train.oriented import with_linear

    rng = np.random.default_rng(1)
    cfg = HeadConfig(6, 3, hidden=(4,))
    state = {"mean": rng.normal(size=6).astype(np.float32), "std": rng.uniform(1, 2, 6).astype(np.float32),
             "layers.1.weight": rng.normal(size=(4, 6)).astype(np.float32),
             "layers.1.bias": rng.normal(size=4).astype(np.float32),
             "layers.4.weight": rng.normal(size=(3, 4)).astype(np.float32),
             "layers.4.bias": rng.normal(size=3).astype(np.float32)}
    coef, bias = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    merged_cfg, merged = with_linear(cfg, state, (coef, bias))
    x = rng.normal(size=(5, 6)).astype(np.float32)
    linear = ((x - state["mean"]) / state["std"]) @ coef.T + bias
    assert merged_cfg.hidden == (10,)
    np.testing.assert_allclose(head_logits_numpy(merged, merged_cfg, x),
                               (head_logits_numpy(state, cfg, x) + linear) / 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_the_linear_model_is_scikit_learns_logistic_regression_on_the_heads_inputs(n_classes) -> None:
    from sklearn.linear_model import LogisticRegression

    from headstart.records import TrainConfig
    from headstart.train.oriented import fit_linear

    rng = np.random.default_rng(2)
    counts = np.array([36, 9, 16][:n_classes])
    y = np.repeat(np.arange(n_classes), counts)
    x = (rng.normal(size=(len(y), 5)) + y[:, None]).astype(np.float32)
    head = {"mean": x.mean(0) + 1, "std": x.std(0) * 2}  # the head standardises otherwise: rows of 8 orientations
    cfg = TrainConfig(balance=True, balance_power=0.5)
    coef, bias = fit_linear(x, y, head, n_classes + 1, cfg)  # the last class is absent
    ours = ((x - head["mean"]) / head["std"]) @ coef.T + bias
    z = (x - x.mean(0)) / x.std(0)
    weights = {k: (counts.max() / counts[k]) ** 0.5 for k in range(n_classes)}  # the largest class weighs 1
    theirs = LogisticRegression(C=policy.ORIENTED_LINEAR_C, max_iter=1000, class_weight=weights).fit(z, y)
    theirs = theirs.predict_proba(z)
    proba = np.exp(ours - ours.max(1, keepdims=True))
    proba /= proba.sum(1, keepdims=True)
    np.testing.assert_allclose(proba[:, :n_classes], theirs, atol=1e-3)
    assert (ours.argmax(1) < n_classes).all() and proba[:, n_classes].max() < 1e-4


def test_a_stacked_engine_joins_two_engines_features_and_names_their_kinds() -> None:
    from headstart.runtime.engines import StackedEngine

    batch = np.random.default_rng(2).normal(size=(2, 3, 4, 4)).astype(np.float32)
    first, second = _Positional(), _Positional()
    second.kind = "other"
    engine = StackedEngine(first, first)
    got = engine(batch)
    assert got.shape == (2, 96) and np.array_equal(got[:, 48:], got[:, :48]) and engine.kind == "test"
    assert np.array_equal(StackedEngine(first, second)(batch)[:, :48], first(batch))
    assert StackedEngine(first, second).kind == "test+other"


def test_a_companion_keys_its_own_features_and_sees_the_first_backbones_inputs(frozen) -> None:
    from headstart.runtime.frozen import FrozenBackbone

    oriented8 = frozen.oriented()
    paired = oriented8.with_companion(FrozenBackbone.pretrained(frozen.spec, frozen.weights))
    assert paired.companion.spec.preprocess == frozen.spec.preprocess  # upright: the outer engine orients both
    assert paired.cache_key() != oriented8.cache_key() and paired.alone().cache_key() == oriented8.cache_key()
    assert paired.upright().companion == paired.companion and paired.engine_kind("cpu") == frozen.engine_kind("cpu")
    size = frozen.spec.preprocess.input_size
    batch = np.random.default_rng(3).normal(size=(2, 3, size, size)).astype(np.float32)
    alone = frozen.engine("cpu")(batch)
    both = paired.upright().engine("cpu")(batch)
    np.testing.assert_allclose(both, np.concatenate([alone, alone], axis=1), rtol=1e-5, atol=1e-5)
    import torch

    with torch.inference_mode():
        torch_both = paired.upright().build_torch()(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(torch_both, both, rtol=1e-3, atol=1e-4)


def test_a_kept_model_with_a_companion_saves_both_backbones_and_predicts_as_validation_scored(
        weak_auto, image_folder, tmp_path, monkeypatch, tiny_weights):
    """The oriented stage with a companion (here the tiny backbone beside itself): the head reads both backbones'
    features, the summary names both, and the saved model holds both and predicts what training scored."""
    from rich.console import Console

    from headstart import ImageClassifier
    from headstart.cli import render
    from headstart.errors import ArtifactError
    from headstart.runtime.frozen import FrozenBackbone
    from headstart.serve.export import export_model
    from headstart.train import oriented as oriented_mod

    monkeypatch.setattr(policy, "keep_oriented", lambda *a: True)
    monkeypatch.setattr(oriented_mod, "with_companion", lambda base: base.with_companion(
        FrozenBackbone.pretrained(base.spec, tiny_weights)))
    clf = weak_auto().fit(image_folder)
    assert clf.decision_.kept == "oriented" and clf.frozen_.companion is not None
    assert f"with {TINY_BACKBONE}'s features beside {TINY_BACKBONE}'s" in clf.decision_.reason
    console = Console(record=True, width=200)
    console.print(render.train_summary(clf, image_folder, TINY_BACKBONE, tmp_path, None))
    assert f"and {TINY_BACKBONE} side by side (features joined)" in " ".join(console.export_text().split())
    clf.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "headstart.json").read_text())
    assert saved["companion"]["name"] == TINY_BACKBONE and saved["companion"]["weights_id"]
    loaded = ImageClassifier.load(tmp_path / "m")
    assert loaded.frozen_.companion.weights_prefix == "companion."
    scored = clf.validation_
    half = scored.features.shape[1] // 2  # the companion is the same network: its half equals the first's
    assert loaded.head_config_.in_features == 2 * half
    np.testing.assert_allclose(scored.features[:, half:], scored.features[:, :half], rtol=1e-5, atol=1e-5)
    got = loaded.predict_proba(scored.paths)
    np.testing.assert_array_equal(got, clf.predict_proba(scored.paths))
    from headstart.heads.config import head_proba

    np.testing.assert_allclose(got, head_proba(loaded.head_config_, loaded.head_state_, scored.features), atol=1e-6)
    with pytest.raises(ArtifactError, match="joins the features"):
        export_model(tmp_path / "m")
