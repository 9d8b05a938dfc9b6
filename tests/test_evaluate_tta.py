"""evaluate --tta: each image averaged with its mirror image, for both predictors (the backbone's engine + numpy
head, and model.onnx), the mirrored features cached under their own key, and the gain reported by the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps


from helpers_cli import cli_env, run_headstart
from helpers_serve import tiny_model
from headstart.evaluate.metrics import evaluate
from headstart.evaluate.tta import averaged
from headstart.records import TTAEvaluation


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_weights, tiny_onnx) -> tuple[Path, Path, Path]:
    return tiny_model(tmp_path_factory, tiny_weights, tiny_onnx)


def _mirrored_copies(photos: Path, dst: Path) -> list[Path]:
    out = []
    for p in sorted(photos.rglob("*.jpg")):
        q = dst / p.parent.name / p.name
        q.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.mirror(Image.open(p).convert("RGB")).save(q, quality=100)
        out.append(q)
    return out


def test_averaged_views_and_the_gain() -> None:
    p, q = np.array([[0.9, 0.1], [0.4, 0.6]]), np.array([[0.5, 0.5], [0.8, 0.2]])
    np.testing.assert_allclose(averaged(p, q), [[0.7, 0.3], [0.6, 0.4]])
    y = np.array([0, 0])
    both = TTAEvaluation(evaluate(y, p, ("a", "b")), evaluate(y, averaged(p, q), ("a", "b")))
    assert both.accuracy_gain == pytest.approx(0.5) and both.log_loss_gain > 0


def test_engine_path_averages_the_mirrored_features_and_caches_them(exported, tmp_path, monkeypatch) -> None:
    from headstart import ImageClassifier
    from headstart.runtime.frozen import FrozenBackbone

    model, photos, cache = exported
    monkeypatch.setenv("HEADSTART_CACHE", str(cache))
    clf = ImageClassifier.load(model, device="cpu")
    clf._export = None  # the backbone's engine and the numpy head, not model.onnx
    result = clf.evaluate_tta(photos)
    both, skipped = result.tta, result.skipped
    plain = clf.evaluate(photos).metrics
    assert skipped == () and both.plain.to_dict() == plain.to_dict() and result.metrics is both.tta
    paths = sorted(photos.rglob("*.jpg"))
    flipped = clf.predict_proba(_mirrored_copies(photos, tmp_path / "mirror"))
    y = np.array([clf.classes_.index(p.parent.name) for p in paths])
    expected = evaluate(y, averaged(clf.predict_proba(paths), flipped), clf.classes_)
    assert both.tta.log_loss == pytest.approx(expected.log_loss, abs=0.02)  # mirrored crop vs crop of the mirror
    assert (cache / "features").exists() and len(list((cache / "features").iterdir())) >= 2  # a key of its own

    def no_extraction(self, device="cpu"):
        raise AssertionError("the mirrored features were extracted again")

    monkeypatch.setattr(FrozenBackbone, "engine", no_extraction)
    again = clf.evaluate_tta(photos).tta
    assert again.tta.to_dict() == both.tta.to_dict()


def test_onnx_path_mirrors_the_graph_inputs(exported, tmp_path) -> None:
    from headstart.serve.onnx_predictor import OnnxPredictor

    model, photos, _ = exported
    predictor = OnnxPredictor(model / "model.onnx")
    both, skipped = predictor.evaluate_tta(photos)
    plain, _ = predictor.evaluate(photos)
    assert skipped == [] and both.plain.to_dict() == plain.to_dict()
    paths = sorted(photos.rglob("*.jpg"))
    views = [np.stack(v) for v in zip(*(predictor.load(p) for p in paths))]
    by_hand = averaged(predictor.run(views), predictor.run([v[:, :, ::-1] for v in views]))
    y = np.array([predictor.classes.index(p.parent.name) for p in paths])
    assert both.tta.log_loss == pytest.approx(evaluate(y, by_hand, predictor.classes).log_loss, rel=1e-5)
    from_files = averaged(predictor.predict_proba(paths),
                          predictor.predict_proba(_mirrored_copies(photos, tmp_path / "mirror")))
    assert np.abs(from_files - by_hand).max() < 0.05  # the same views, to within a pixel of cropping


def test_cli_reports_what_tta_gained(exported) -> None:
    model, photos, cache = exported
    env = cli_env(cache)
    run = lambda *extra: run_headstart("evaluate", model, photos, "--tta", *extra, env=env, timeout=300)  # noqa: E731
    table = run()
    assert table.returncode == 0, table.stderr
    assert "test-time augmentation" in table.stdout and "log loss" in table.stdout and "->" in table.stdout
    out = run("--format", "json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    tta = payload["tta"]
    assert tta["accuracy_gain"] == pytest.approx(payload["accuracy"] - tta["without"]["accuracy"])
    assert tta["log_loss_gain"] == pytest.approx(tta["without"]["log_loss"] - payload["log_loss"])
