"""Multi-label models through the real command line (the tiny backbone, generated images whose labels are the
colours they contain) and through the API: train, the saved model, predict's three formats, evaluate, and the
one-line refusals."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_cli import cli_env, run_headstart
from helpers_models import TINY_BACKBONE

TIMEOUT_S = 180
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220)}


def _image(labels: tuple[str, ...], rng: np.random.Generator) -> Image.Image:
    """Left and right halves in the labels' colours (grey for an image with none), plus noise."""
    arr = np.full((32, 32, 3), 128.0)
    halves = [COLOURS[name] for name in labels] or [(128, 128, 128)]
    arr[:, :16] = halves[0]
    arr[:, 16:] = halves[-1]
    arr += rng.normal(0, 12, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _write(root: Path, name: str, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    sets = [("red",), ("green",), ("blue",), ("red", "green"), ("green", "blue"), ("blue", "red"), ()]
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = [["path", "labels"]]
    for i in range(n):
        labels = sets[i % len(sets)]
        _image(labels, rng).save(root / "img" / f"{name}-{i:03d}.png")
        rows.append([f"img/{name}-{i:03d}.png", ";".join(labels)])
    with open(root / f"{name}.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root / f"{name}.csv"


@pytest.fixture(scope="module")
def env(tiny_onnx: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return cli_env(tmp_path_factory.mktemp("ml-cache"), tiny_onnx)


@pytest.fixture(scope="module")
def trained(tiny_weights: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ml-project")
    train_csv, test_csv = _write(root, "train", 84, 0), _write(root, "test", 28, 1)
    proc = run_headstart("train", "--manifest", train_csv, "--backbone", TINY_BACKBONE, "--weights", tiny_weights,
                      "--out", root / "model", "--epochs", "40", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, root / "model", test_csv


def test_train_saves_a_multi_label_model_with_thresholds(trained) -> None:
    proc, model, _ = trained
    assert "multi-label" in proc.stdout and "thresholds" in proc.stdout
    meta = json.loads((model / "headstart.json").read_text())
    assert meta["classes"] == ["blue", "green", "red"]
    assert meta["head"]["multi_label"] is True and len(meta["head"]["thresholds"]) == 3
    assert meta["fit"]["multilabel"]["val"]["map"] > 0


def test_predict_csv_json_and_threshold_override(trained, env: dict[str, str]) -> None:
    _, model, test_csv = trained
    images = sorted(str(p) for p in (test_csv.parent / "img").glob("test-00[0-6].png"))
    proc = run_headstart("predict", model, *images, "/no/such.png", "--format", "csv", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert list(rows[0]) == ["path", "labels", "blue", "green", "red", "error"]
    assert rows[-1]["error"] and rows[-1]["labels"] == ""
    for row in rows[:-1]:
        assert all(0 <= float(row[c]) <= 1 for c in ("blue", "green", "red"))
    low = json.loads(run_headstart("predict", model, *images, "--format", "json", "--threshold", "0.01",
                                env=env).stdout)
    assert all(r["labels"] == ["blue", "green", "red"] for r in low if all(s["probability"] >= 0.01
                                                                           for s in r["scores"]))
    assert {s["threshold"] for r in low for s in r["scores"]} == {0.01}


def test_evaluate_json_and_the_api_agree(trained, env: dict[str, str]) -> None:
    from sklearn.metrics import average_precision_score

    from headstart import ImageClassifier

    _, model, test_csv = trained
    proc = run_headstart("evaluate", model, "--manifest", test_csv, "--format", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    clf = ImageClassifier.load(model)
    rows = list(csv.DictReader(open(test_csv)))
    paths = [test_csv.parent / r["path"] for r in rows]
    proba = clf.predict_proba(paths)
    assert proba.shape == (len(rows), 3)
    y = np.array([[c in r["labels"].split(";") for c in clf.classes_] for r in rows], int)
    assert figures["map"] == pytest.approx(average_precision_score(y, proba, average="macro"), abs=1e-4)
    assert clf.score(test_csv) == pytest.approx(figures["map"], abs=1e-4)
    assert figures["map"] > 0.7  # colours are easy even for random features
    labels = clf.predict(paths)
    assert all(isinstance(row, list) for row in labels) and any(len(row) == 2 for row in labels)
    on = proba >= np.asarray(clf.thresholds_, np.float32)
    assert [sorted(row) for row in labels] == [sorted(np.array(clf.classes_)[r].tolist()) for r in on]


def test_refusals_are_one_line(trained, tiny_weights: Path, env: dict[str, str], tmp_path: Path) -> None:
    _, model, test_csv = trained
    train_csv = test_csv.parent / "train.csv"
    for args, words in [
        (("train", "--manifest", train_csv, "--strategy", "finetune"), "not available for multi-label"),
        (("train", test_csv.parent / "img", "--multi-label"), "reads a manifest"),
        (("evaluate", model, "--manifest", test_csv, "--tta"), "--tta is not available"),
    ]:
        proc = run_headstart(*args, "--out", tmp_path / "m", env=env) if args[0] == "train" else run_headstart(*args, env=env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_export_and_serve_answer_every_label(trained, env: dict[str, str], monkeypatch) -> None:
    """model.onnx ends in sigmoids with the thresholds in its metadata; the service answers each label's
    probability, threshold and on/off; the loaded classifier predicts the same through the export."""
    from fastapi.testclient import TestClient

    # The cache the model was trained in (the CLI's engine, int8 on a VNNI CPU, calibrated there): the model's
    # own answers, which its export must give.
    monkeypatch.setenv("HEADSTART_CACHE", env["HEADSTART_CACHE"])

    from headstart import ImageClassifier
    from headstart.serve.app import create_app
    from headstart.serve.onnx_predictor import OnnxPredictor

    _, model, test_csv = trained
    before = ImageClassifier.load(model)
    paths = sorted((test_csv.parent / "img").glob("test-00*.png"))
    engine_proba = before.predict_proba(paths)
    proc = run_headstart("export", model, "--data", test_csv.parent / "train.csv", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    predictor = OnnxPredictor(model / "model.onnx")
    assert predictor.info.multi_label and predictor.info.thresholds == tuple(before.thresholds_)
    clf = ImageClassifier.load(model)
    assert clf._export is not None
    np.testing.assert_allclose(clf.predict_proba(paths), engine_proba, atol=1e-3)
    with TestClient(create_app(predictor), base_url="http://localhost") as client:
        info = client.get("/model").json()
        assert info["multi_label"] is True and set(info["thresholds"]) == {"blue", "green", "red"}
        answer = client.post("/predict", files=[("file", (p.name, p.read_bytes(), "image/png"))
                                                for p in paths[:4]]).json()["results"]
    for result, row in zip(answer, clf.predict_proba(paths[:4])):
        assert [s["label"] for s in result["scores"]] == [clf.classes_[j] for j in np.argsort(-row)]
        on = {s["label"] for s in result["scores"] if s["probability"] >= s["threshold"]}
        assert {s["label"] for s in result["scores"] if s["on"]} == on == set(result["labels"])
    proc = run_headstart("export", model, "--data", test_csv.parent / "train.csv", "--quantize", "int8", env=env)
    assert proc.returncode == 2 and "not available for multi-label" in proc.stderr


def test_a_multi_label_fit_does_not_import_scikit_learn(trained, tiny_weights: Path, env: dict[str, str]) -> None:
    """scikit-learn's import alone cost ~1.5 s of a ~3 s warm train: the split and the figures are numpy's. (torch
    is the single-label path's business: the same features, the same numpy head.)"""
    _, _, test_csv = trained
    code = ("import sys; from headstart import ImageClassifier; "
            f"ImageClassifier({TINY_BACKBONE!r}, weights={str(tiny_weights)!r}, epochs=3, device='cpu')"
            f".fit({str(test_csv.parent / 'train.csv')!r}); "
            "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_check_reports_label_counts_and_co_occurrence(trained, env: dict[str, str]) -> None:
    _, model, test_csv = trained
    proc = run_headstart("check", test_csv.parent / "train.csv", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["multi_label"] is True and summary["classes"] == ["blue", "green", "red"]
    assert sum(summary["images"].values()) == 84 and summary["images"]["val"] > 0
    assert summary["unlabelled"] == 12  # every seventh image has no label
    assert sum(summary["positives"][s]["red"] for s in summary["positives"]) == 36
    assert {tuple(p["labels"]) for p in summary["co_occurrence"]} == {("green", "red"), ("blue", "green"),
                                                                      ("blue", "red")}


def test_train_writes_a_report_and_report_scores_a_manifest(trained, env: dict[str, str]) -> None:
    _, model, test_csv = trained
    page = (model / "report.html").read_text()  # train's, from its validation split
    assert "validation split" in page and "Precision-recall curves" in page
    proc = run_headstart("report", model, test_csv, "--out", model / "held-out.html", env=env)
    assert proc.returncode == 0, proc.stderr
    page = (model / "held-out.html").read_text()
    assert "test.csv" in page and page.count("<tr>") >= 3 + 6 + 1 + 3  # summary, scores, per-label rows
    assert "data:image/svg+xml;base64," in page and "<script" not in page and "http://" not in page
    proc = run_headstart("report", model, env=env)
    assert proc.returncode == 2 and "reported on a manifest" in proc.stderr
