"""The HTML report: what it shows matches the model's scores, it loads nothing from elsewhere, and the command
writes it (or says in one line why not). The tiny backbone keeps this to seconds; test_report_browser.py looks
at the page in Chromium."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import run_headstart
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE, seed_tiny_export

from headstart.tasks import report as rep

CLASSES = ("cat", "dog", "fish")


def tiny_report_model(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path, tiny_onnx) -> tuple[Path, Path, Path]:
    """(model directory, a labelled folder it did not train on, the cache), built once per test run."""

    base = tmp_path_factory.getbasetemp() / "report-tiny"
    model, held_out, cache = base / "model", base / "held-out", base / "cache"
    if (model / "headstart.json").is_file():
        return model, held_out, cache
    seed_tiny_export(tiny_onnx, cache)
    make_image_folder(base / "photos", per_class=10, size=(96, 80), seed=3)
    make_image_folder(held_out, per_class=8, size=(96, 80), seed=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADSTART_CACHE", str(cache))
        from headstart import ImageClassifier

        ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=6, device="cpu").fit(base / "photos").save(model)
    return model, held_out, cache


@pytest.fixture
def tiny(tmp_path_factory, tiny_weights, tiny_onnx, monkeypatch):
    model, held_out, cache = tiny_report_model(tmp_path_factory, tiny_weights, tiny_onnx)
    monkeypatch.setenv("HEADSTART_CACHE", str(cache))
    from headstart import ImageClassifier

    return ImageClassifier.load(model, device="cpu"), model, held_out


def _external(page: str) -> list[str]:
    """Anything the page would fetch: src/href to a scheme other than data:, or a <link> at all."""
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.IGNORECASE)
    return [r for r in refs if not r.startswith("data:") and not r.startswith("#")] + re.findall(r"<link\b", page)


def test_a_score_carries_its_wilson_interval() -> None:
    s = rep.Score("validation", "split", 49, 1.0, "the head")
    assert s.interval[1] == pytest.approx(1.0) and s.interval[0] == pytest.approx(0.927, abs=1e-3)
    assert [round(v, 3) for v in rep.Score("x", "y", 100, 0.5, "").interval] == [0.404, 0.596]


def test_the_report_shows_the_models_own_scores_and_every_image_once(tiny, tmp_path: Path) -> None:
    clf, model, held_out = tiny
    report = rep.build_report(clf, model, held_out, heat_maps=True)
    ev = clf.evaluate(held_out).metrics
    assert report.evaluation.n == ev.n == 24
    np.testing.assert_array_equal(report.evaluation.confusion, ev.confusion)
    np.testing.assert_allclose(report.evaluation.f1, ev.f1)
    assert [s.name for s in report.scores] == ["validation", "this folder"]
    assert report.scores[0].chose.endswith("optimistic") and report.scores[1].chose.startswith("nothing")
    assert report.calibration is not None and report.calibration.fitted_on == "cross-fitted"
    assert len(report.heat) == rep.GALLERY

    page = rep.render_html(report, clf.frozen_.spec.preprocess)
    assert _external(page) == []
    for title in ("Summary", "Scores", "Per class", "Confusion matrix", "Learning curves", "Highest-loss images",
                  "Calibration"):
        assert f"<h2>{title}</h2>" in page
    data = json.loads(re.search(r'<script type="application/json" id="images-data">(.*?)</script>', page, re.DOTALL)[1])
    assert data["classes"] == list(CLASSES) and len(data["images"]) == 24
    listed = sorted(i for rows in data["cells"].values() for i in rows)
    assert listed == list(range(24))  # every image in exactly one cell
    pred = report.scored.proba.argmax(1)
    for key, rows in data["cells"].items():
        t, p = map(int, key.split(","))
        assert all(report.scored.labels[i] == t and pred[i] == p for i in rows)
        assert len(rows) == ev.confusion[t, p]
    assert all(im["thumb"].startswith("data:image/jpeg;base64,") for im in data["images"])
    assert page.count('class="heat"') == rep.GALLERY and page.count('class="photo"') == rep.GALLERY


def test_label_errors_and_the_data_check_are_drawn_and_heat_maps_named_as_left_out(tiny) -> None:
    clf, model, held_out = tiny
    report = rep.build_report(clf, model, held_out, heat_maps=False)
    assert [t for t, _ in report.extra] == ["Likely label errors", "Data check"]
    assert any("Heat maps" in line for line in report.left_out) and report.heat == []


def test_without_a_folder_the_report_shows_what_training_recorded(tiny) -> None:
    clf, model, _ = tiny
    report = rep.build_report(clf, model, None)
    assert report.scored is None and report.evaluation is clf.val_metrics_
    page = rep.render_html(report, clf.frozen_.spec.preprocess)
    assert 'id="confusion"' in page and "Highest-loss images" not in page and "need a labelled folder" in page
    assert _external(page) == []


def test_the_training_folders_validation_split_is_the_one_training_scored(tiny) -> None:
    clf, model, held_out = tiny
    report = rep.build_report(clf, model, held_out.parent / "photos", heat_maps=False, split="val")
    assert report.evaluation.n == clf.val_metrics_.n
    np.testing.assert_array_equal(report.evaluation.confusion, clf.val_metrics_.confusion)
    assert [s.name for s in report.scores] == ["validation"] and "(val split)" in report.evaluated_on


def test_a_folder_with_a_class_the_model_lacks_is_refused(tiny, tmp_path: Path) -> None:
    from headstart.errors import DataError

    clf, model, _ = tiny
    other = make_image_folder(tmp_path / "other", classes=("cat", "horse"), per_class=2)
    with pytest.raises(DataError, match="horse"):
        rep.build_report(clf, model, other)


def test_heat_maps_follow_the_target_class(tiny) -> None:
    from headstart.evaluate.gradcam import heat_maps

    clf, _, held_out = tiny
    path = min((held_out / "dog").iterdir())
    maps = heat_maps(clf.frozen_, clf.head_config_, clf.head_state_, [path, path, path], targets=[0, 1, 2])
    size = clf.frozen_.spec.preprocess.input_size
    for m in maps:
        assert m.heat.shape == (size, size) and np.isfinite(m.heat).all()
        assert m.heat.min() >= 0.0 and m.heat.max() <= 1.0
    assert [m.target for m in maps] == [0, 1, 2]
    # Each map explains its own class's logit: the logits are the head's (those the report scored).
    proba = clf.predict_proba([path])[0]
    logits = np.array([m.logit for m in maps])
    np.testing.assert_allclose(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum(), proba, atol=2e-3)
    assert not np.allclose(maps[0].heat, maps[1].heat)


def test_the_command_writes_the_report_into_the_model_directory(tiny) -> None:
    _, model, held_out = tiny
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = run_headstart("report", model, held_out, "--no-heatmaps", env=env, columns=None, timeout=300)
    assert out.returncode == 0, out.stderr
    page = (model / "report.html").read_text()
    assert "report written to" in out.stderr and _external(page) == []
    bad = run_headstart("report", model, model / "nope", env=env, columns=None, timeout=120)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
