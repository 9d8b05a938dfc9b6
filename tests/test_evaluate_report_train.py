"""The report `headstart train` writes: built from the run's in-memory validation results (no second pass over
the photos, no heat maps), saying what it left out and how to get it; `--no-report` skips it."""

from __future__ import annotations

import json
import re

import pytest

from helpers_cli import cli_env, run_headstart
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE
from test_evaluate_temperature import _noisy_folder


def _images(page: str) -> list[dict]:
    data = re.search(r'<script type="application/json" id="images-data">(.*?)</script>', page, re.S)
    assert data, "no image data on the page"
    return json.loads(data.group(1).replace("<\\/", "</"))["images"]


def test_the_page_comes_from_the_runs_validation_results(tmp_path, tiny_weights, tiny_cache, monkeypatch) -> None:
    from headstart import ImageClassifier
    from headstart.cache import dataset as cache_dataset
    from headstart.tasks.report_train import write_train_report

    data = _noisy_folder(tmp_path / "photos")
    clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=4, device="cpu").fit(data)
    model = clf.save(tmp_path / "m")

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the train report read features again")

    monkeypatch.setattr(cache_dataset, "path_features", no_second_pass)
    page = write_train_report(clf, model, data).read_text()
    assert clf.validation_ is not None and len(clf.validation_.labels) == clf.val_metrics_.n >= 20
    assert len(_images(page)) == clf.val_metrics_.n  # every validation image once, none of the training ones
    assert 'id="gallery"' in page and 'class="photo"' in page and 'class="heat"' not in page
    assert f"headstart report {model} {data}" in page  # how to get the heat maps
    t = clf.head_config_.temperature
    assert t != 1.0 and f"T = {t:.2f}" in page and "validation (fitted there)" in page


def test_without_a_validation_split_the_page_says_what_it_lacks(tmp_path, tiny_weights, tiny_cache) -> None:
    from headstart import ImageClassifier
    from headstart.tasks.report_train import write_train_report

    data = make_image_folder(tmp_path / "photos", per_class=4)
    clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=2, device="cpu", val_split=0.0).fit(data)
    page = write_train_report(clf, clf.save(tmp_path / "m"), data).read_text()
    assert clf.validation_ is None and _images(page) == []
    assert "need a validation split" in page and "none fitted" in page


@pytest.fixture(scope="module")
def env(tiny_onnx, tmp_path_factory) -> dict[str, str]:
    return {**cli_env(tmp_path_factory.mktemp("report-train-cache"), tiny_onnx), "COLUMNS": "200"}


@pytest.mark.parametrize("flag", [None, "--no-report"])
def test_train_writes_the_report_unless_told_not_to(flag, env, tiny_weights, tmp_path) -> None:
    photos = make_image_folder(tmp_path / "photos", per_class=8)
    args = ["train", photos, "--out", tmp_path / "m", "--backbone", TINY_BACKBONE, "--weights", tiny_weights,
            "--epochs", "2", "--device", "cpu"]
    out = run_headstart(*args, *([flag] if flag else []), env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    page = tmp_path / "m" / "report.html"
    assert "calibration" in out.stdout  # the summary says whether a temperature was fitted
    if flag:
        assert not page.exists() and "report written" not in out.stderr
    else:
        assert f"report written to {page}" in out.stderr and "<h2>Confusion matrix</h2>" in page.read_text()
