"""The temperature fitted at the end of training: stored in the head, applied by every path that turns logits into
probabilities (head_proba, predict, evaluate, the saved record), absent (T = 1) without enough validation images,
and read as 1 from records saved before it existed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE, seed_tiny_export
from headstart import ImageClassifier
from headstart.errors import ArtifactError
from headstart.evaluate.calibration import MIN_CALIBRATION, fit_temperature, scaled_proba, stored_temperature
from headstart.heads.config import HeadConfig, head_logits_numpy, head_proba
from headstart.serve import artifact
from headstart.serve.artifact import META_FILE

FORMAT1 = Path(__file__).parent / "data" / "format1-headstart.json"


def _noisy_folder(root: Path) -> Path:
    """Three colour classes, 36 photos each, with every fourth photo of each class moved to the next class: the
    validation split (about 21 images) has wrong answers, so the fitted temperature is not the trivial 1."""
    make_image_folder(root, per_class=36, size=(48, 40), seed=5)
    classes = sorted(p.name for p in root.iterdir())
    for n, c in enumerate(classes):
        for i, f in enumerate(sorted((root / c).iterdir())):
            if i % 4 == 0:
                f.rename(root / classes[(n + 1) % len(classes)] / f"moved_{f.name}")
    return root


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, tiny_weights, tiny_onnx):
    """(classifier fitted on the noisy folder, the folder), with the module's own feature cache."""
    base = tmp_path_factory.mktemp("temperature")
    cache = seed_tiny_export(tiny_onnx, base / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADSTART_CACHE", str(cache))
        data = _noisy_folder(base / "photos")
        clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=6, device="cpu", test_split=0.2).fit(data)
    return clf, data, cache


def test_head_proba_divides_the_logits_by_the_temperature() -> None:
    rng = np.random.default_rng(0)
    state = {"mean": np.zeros(5, np.float32), "std": np.ones(5, np.float32),
             "layers.1.weight": rng.normal(size=(3, 5)).astype(np.float32), "layers.1.bias": np.zeros(3, np.float32)}
    x = rng.normal(size=(40, 5)).astype(np.float32)
    logits = head_logits_numpy(state, HeadConfig(5, 3), x)
    for t in (0.5, 1.0, 2.5):
        p = head_proba(HeadConfig(5, 3, temperature=t), state, x)
        np.testing.assert_allclose(p, scaled_proba(logits, t), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(p.argmax(1), logits.argmax(1))


def test_a_head_config_without_temperature_reads_as_one() -> None:
    old = json.loads(FORMAT1.read_text())["head"]
    assert "temperature" not in old
    assert HeadConfig.from_dict(old).temperature == 1.0
    assert HeadConfig.from_dict(HeadConfig(4, 2, temperature=1.7).to_dict()).temperature == 1.7


def test_stored_temperature_needs_enough_validation_images() -> None:
    rng = np.random.default_rng(1)
    z, y = rng.normal(0, 3, (MIN_CALIBRATION, 3)), rng.integers(0, 3, MIN_CALIBRATION)
    assert stored_temperature(z[:-1], y[:-1]) is None
    cal = stored_temperature(z, y)
    assert cal.temperature == pytest.approx(fit_temperature(z, y)) and cal.n == MIN_CALIBRATION
    assert cal.nll_after <= cal.nll_before + 1e-12  # T minimises the NLL of these very logits


def test_training_fits_the_temperature_on_the_validation_logits(noisy) -> None:
    """T is the NLL-minimising temperature of the kept head's validation logits, stored in the head; the test
    metrics are scored with it (same accuracy as without)."""
    clf, data, _ = noisy
    from headstart.cache.dataset import dataset_features
    from headstart.data.scan import scan_folder
    from headstart.evaluate.metrics import evaluate
    from headstart.progress import NoProgress

    dataset = scan_folder(data, val_split=0.2, test_split=0.2, seed=0)
    feats = dataset_features(dataset, clf.frozen_, "cpu", NoProgress())
    x_va, y_va = feats.part("val")
    assert len(y_va) >= MIN_CALIBRATION
    t = clf.head_config_.temperature
    assert t != 1.0 and t == pytest.approx(fit_temperature(head_logits_numpy(clf.head_state_, clf.head_config_, x_va),
                                                           y_va), rel=1e-6)
    cal = clf.report_.calibration
    assert cal.temperature == t and cal.n == len(y_va) and cal.nll_after < cal.nll_before
    x_te, y_te = feats.part("test")
    logits = head_logits_numpy(clf.head_state_, clf.head_config_, x_te)
    raw = evaluate(y_te, scaled_proba(logits), clf.classes_)
    assert clf.test_metrics_.accuracy == raw.accuracy
    assert clf.test_metrics_.log_loss == pytest.approx(evaluate(y_te, scaled_proba(logits, t), clf.classes_).log_loss)


def test_saved_model_predicts_and_evaluates_with_its_temperature(noisy, tmp_path, monkeypatch) -> None:
    clf, data, cache = noisy
    monkeypatch.setenv("HEADSTART_CACHE", str(cache))
    model = clf.save(tmp_path / "m")
    assert json.loads((model / META_FILE).read_text())["head"]["temperature"] == clf.head_config_.temperature
    loaded = ImageClassifier.load(model, device="cpu")
    assert loaded.head_config_ == clf.head_config_
    assert loaded.report_.calibration.to_dict() == clf.report_.calibration.to_dict()
    paths = sorted(data.glob("*/*.jpg"))[:12]
    proba = loaded.predict_proba(paths)
    from headstart.serve.predictor import Predictor

    with_t1 = Predictor(tuple(loaded.classes_), loaded.frozen_,
                        HeadConfig(**{**loaded.head_config_.to_dict(), "temperature": 1.0,
                                      "hidden": tuple(loaded.head_config_.hidden)}), loaded.head_state_, "cpu")
    raw = with_t1.predict_proba(paths)
    np.testing.assert_array_equal(proba.argmax(1), raw.argmax(1))
    logits = np.log(raw)  # up to a per-row constant, which the softmax ignores
    np.testing.assert_allclose(proba, scaled_proba(logits, loaded.head_config_.temperature), atol=1e-5)
    ev = loaded.evaluate(data).metrics
    ev_raw, _ = with_t1.evaluate(data)  # the predictor, below the facade, still answers a pair
    assert ev.accuracy == ev_raw.accuracy and ev.log_loss != pytest.approx(ev_raw.log_loss, abs=1e-6)


def test_no_validation_split_keeps_the_plain_softmax(image_folder, tiny_weights, tiny_cache) -> None:
    clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=2, device="cpu", val_split=0.0).fit(image_folder)
    assert clf.head_config_.temperature == 1.0 and clf.report_.calibration is None


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_an_impossible_saved_temperature_is_refused(noisy, tmp_path, bad) -> None:
    clf, _, _ = noisy
    model = clf.save(tmp_path / "m")
    meta = json.loads((model / META_FILE).read_text())
    meta["head"]["temperature"] = bad
    (model / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="impossible head"):
        artifact.load(model)


def test_a_temperature_that_raises_the_validation_ece_is_refused() -> None:
    """hymenoptera's case: a few confident mistakes among well-calibrated right answers drive the NLL's optimum to
    a near-uniform softmax (T at its bound), which ruins the ECE; the stored temperature stays 1 and says so."""
    rng = np.random.default_rng(0)
    n = 49
    y = rng.integers(0, 2, n)
    z = np.zeros((n, 2))
    z[np.arange(n), y] = rng.uniform(3.0, 6.0, n)  # right and about as sure as they are right
    wrong = np.arange(4)
    z[wrong] = 0.0
    z[wrong, 1 - y[wrong]] = 12.0  # four confident mistakes
    assert fit_temperature(z, y) > 2.0
    cal = stored_temperature(z, y)
    assert cal.temperature == 1.0 and cal.refused == pytest.approx(fit_temperature(z, y))
    assert cal.ece_after == cal.ece_before
    from headstart.records import Calibration

    assert Calibration.from_dict(cal.to_dict()) == cal
