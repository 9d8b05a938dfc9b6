"""The shipped head refitted on train + validation (`refit`), the k-fold accuracy of its settings (`cv`), and the
train summary that says which split each score comes from: through ImageClassifier, headstart.json and the real
command line, on the tiny backbone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from helpers_cli import cli_env, run_headstart
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE
from headstart import ImageClassifier
from headstart.records import CrossValidation
from headstart.records import Decision, FitReport
from headstart.train import policy

FORMAT1 = Path(__file__).parent / "data" / "format1-headstart.json"


@pytest.fixture(scope="module")
def env(tiny_onnx, tmp_path_factory) -> dict[str, str]:
    return cli_env(tmp_path_factory.mktemp("refit-cache"), tiny_onnx)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("refit") / "photos", per_class=10, size=(48, 40), seed=3)


@pytest.fixture(scope="module")
def pair(photos, tiny_weights, env) -> tuple[ImageClassifier, ImageClassifier]:
    """The same run without and with the refit (and the k-fold accuracy), test split held out."""
    old = os.environ.get("HEADSTART_CACHE")
    os.environ["HEADSTART_CACHE"] = env["HEADSTART_CACHE"]
    try:
        kw = dict(weights=tiny_weights, epochs=4, device="cpu", test_split=0.2, engine="fp32")
        return (ImageClassifier(TINY_BACKBONE, refit=False, cv=0, **kw).fit(photos),
                ImageClassifier(TINY_BACKBONE, refit=True, cv=3, **kw).fit(photos))
    finally:
        if old is None:
            os.environ.pop("HEADSTART_CACHE")
        else:
            os.environ["HEADSTART_CACHE"] = old


def test_the_refit_changes_the_shipped_head_and_keeps_the_validation_figures(pair):
    plain, refitted = pair
    counts = refitted.counts_
    assert refitted.decision_.refitted == sum(counts["train"].values()) + sum(counts["val"].values())
    assert plain.decision_.refitted == 0
    # Fails if the refit silently does nothing: the shipped weights are not the validated head's.
    changed = [k for k in plain.head_state_ if not np.array_equal(plain.head_state_[k], refitted.head_state_[k])]
    assert "mean" in changed and any(k.startswith("layers.") for k in changed)
    # What validation chose, and its figures, are those of the same head before the refit.
    assert refitted.val_metrics_.to_dict() == plain.val_metrics_.to_dict()
    assert refitted.history_.to_dict() == plain.history_.to_dict()
    # The temperature fitted on validation travels to the refitted head unchanged (it is not refitted).
    assert refitted.head_config_ == plain.head_config_
    assert refitted.test_metrics_ is not None and refitted.test_metrics_.n == plain.test_metrics_.n
    assert "refit_s" in refitted.timings_


def test_the_k_fold_accuracy_is_recorded_and_survives_save_and_load(pair, tmp_path):
    plain, refitted = pair
    cv = refitted.cv_
    assert isinstance(cv, CrossValidation) and cv.folds == 3 and cv.rows == "train+val"
    assert cv.n == refitted.decision_.refitted and len(cv.fold_accuracies) == 3
    assert 0.0 <= cv.low <= cv.accuracy <= cv.high <= 1.0
    assert plain.cv_ is None and plain.report_.cv_skipped == "--cv 0"
    back = ImageClassifier.load(refitted.save(tmp_path / "m"))
    assert back.cv_ == cv and back.decision_.refitted == refitted.decision_.refitted
    meta = json.loads((tmp_path / "m" / "headstart.json").read_text())
    assert meta["fit"]["decision"]["refitted"] == refitted.decision_.refitted and meta["fit"]["cv"]["folds"] == 3


def test_records_saved_before_the_refit_load_as_not_refitted():
    report = FitReport.from_v1(json.loads(FORMAT1.read_text()))
    assert report.decision.refitted == 0 and report.cv is None and report.cv_skipped == ""
    assert Decision.from_dict({}).refitted == 0
    d = report.to_dict()
    assert "cv" not in d and FitReport.from_dict(d).decision.refitted == 0


def test_cv_auto_runs_where_cheap_and_says_why_not_elsewhere():
    assert policy.cv_folds("auto", 245, 1280, 2, 8) == (5, "")  # hymenoptera's linear head
    folds, why = policy.cv_folds("auto", 3457, 3808, 64, 15)  # flowers' hidden head
    assert folds == 0 and "--cv 5" in why
    assert policy.cv_folds(5, 3457, 3808, 64, 15) == (5, "")  # asked for by number: always


def test_train_summary_says_where_each_score_comes_from(photos, tiny_weights, env, tmp_path):
    out = tmp_path / "model"
    proc = run_headstart(
        "train", photos, "--backbone", TINY_BACKBONE, "--weights", tiny_weights, "--epochs", "3", "--device", "cpu",
        "--test-split", "0.2", "--refit", "--cv", "3", "--out", out, "--engine", "fp32",
        env=env, columns=250, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in proc.stdout.splitlines()
             if line.count("│") >= 3 and line.split("│")[1].strip()}
    assert "this split chose its stopping epoch" in lines["validation"] and "flatters" in lines["validation"]
    assert "before its refit" in lines["validation"]
    assert lines["test"].endswith("this split chose nothing; of the shipped (refitted) head")
    assert lines["cross-validation"].startswith("3-fold accuracy ") and "95% interval" in lines["cross-validation"]
    assert lines["refit"].startswith("the shipped head was refitted on train + val (")



def test_without_the_refit_the_summary_says_neither(pair, photos, tmp_path):
    from rich.console import Console

    from headstart.cli import render

    console = Console(record=True, width=250)
    console.print(render.train_summary(pair[0], photos, TINY_BACKBONE, tmp_path, None))
    text = console.export_text()
    assert "refitted" not in text and "before its refit" not in text
    assert "not run: --cv 0" in text and "this split chose nothing" in text
