"""Manifests through the real command line (`python -m headstart` in subprocesses, the tiny backbone): train
--manifest, predict --manifest with one output row per input row, evaluate --manifest, and the one-line errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import pytest

from helpers_cli import assert_one_error_line, cli_env, run_headstart
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE

TIMEOUT_S = 180


@pytest.fixture(scope="module")
def env(tiny_onnx: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return cli_env(tmp_path_factory.mktemp("manifest-cache"), tiny_onnx)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """project/images/<class>/*.jpg listed by project/lists/labels.csv with paths relative to lists/, one of them
    missing; the folder layout itself is not what trains (the rows are)."""
    root = tmp_path_factory.mktemp("manifest-project")
    make_image_folder(root / "images", per_class=6)
    (root / "lists").mkdir()
    rows = [("path", "label", "split")]
    for p in sorted((root / "images").rglob("*.jpg")):
        split = "val" if p.stem.endswith(("004", "005")) else ""
        rows.append((f"../images/{p.parent.name}/{p.name}", p.parent.name, split))
    rows.append(("../images/cat/gone.jpg", "cat", ""))
    with open(root / "lists" / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


@pytest.fixture(scope="module")
def trained(project: Path, tiny_weights: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = project / "model"
    proc = run_headstart("train", "--manifest", project / "lists" / "labels.csv", "--backbone", TINY_BACKBONE,
                      "--weights", tiny_weights, "--epochs", "3", "--device", "cpu", "--out", out, env=env)
    return proc, out


def test_train_from_a_manifest(trained: tuple[subprocess.CompletedProcess[str], Path], project: Path) -> None:
    proc, out = trained
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gone.jpg" in proc.stderr + proc.stdout and "labels.csv:" in proc.stderr + proc.stdout  # skipped, named
    record = json.loads((out / "headstart.json").read_text())
    source = record["fit"]["source"]
    assert source["kind"] == "manifest" and source["rows"] == 19
    assert Path(source["path"]) == (project / "lists" / "labels.csv").resolve()
    assert record["fit"]["counts"]["val"] == {"cat": 2, "dog": 2, "fish": 2}  # the rows' own val split


def test_predict_manifest_gives_one_row_per_input_row(trained: tuple[subprocess.CompletedProcess[str], Path],
                                                      project: Path, env: dict[str, str]) -> None:
    _, model = trained
    inputs = project / "lists" / "inputs.jsonl"
    rows = [{"path": "../images/dog/dog_001.jpg", "label": "ignored"}, {"path": "../images/nowhere.jpg"},
            {"path": str(project / "images" / "cat" / "cat_000.jpg")}, {"path": "../images/dog/dog_001.jpg"}]
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_headstart("predict", model, "--manifest", inputs, "--format", "csv", env=env)
    assert proc.returncode == 0, proc.stderr
    out = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [Path(r["path"]).name for r in out] == ["dog_001.jpg", "nowhere.jpg", "cat_000.jpg", "dog_001.jpg"]
    assert out[1]["error"] == "no such file" and all(out[i]["label"] for i in (0, 2, 3))
    table = run_headstart("predict", model, "--manifest", inputs, "--format", "json", env=env)
    assert len(json.loads(table.stdout)) == 4


def test_evaluate_manifest(trained: tuple[subprocess.CompletedProcess[str], Path], project: Path,
                           env: dict[str, str]) -> None:
    _, model = trained
    proc = run_headstart("evaluate", model, "--manifest", project / "lists" / "labels.csv", "--format", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 18  # every readable row, whatever its split


@pytest.mark.parametrize("case", ["space label", "bad split", "bad json", "both", "neither", "predict bad"])
def test_bad_manifests_are_one_line_before_any_work(case: str, project: Path, tmp_path: Path,
                                                    env: dict[str, str]) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\n../x.jpg,cat,\n../y.jpg, dog,\n" if case == "space label"
                      else "path,label,split\n../x.jpg,cat,training\n")
    bad_json = tmp_path / "l.jsonl"
    bad_json.write_text('{"path": "a.jpg", "label": "cat"}\n{"path": "b.jpg",\n')
    args = {
        "space label": ["train", "--manifest", labels], "bad split": ["train", "--manifest", labels],
        "bad json": ["train", "--manifest", bad_json], "both": ["train", project / "images", "--manifest", labels],
        "neither": ["train"], "predict bad": ["predict", tmp_path, "--manifest", bad_json],
    }[case]
    line = assert_one_error_line(run_headstart(*args, "--out", tmp_path / "m", env=env) if args[0] == "train"
                           else run_headstart(*args, env=env))
    needle = {"space label": "labels.csv:3: label ' dog' has surrounding spaces",
              "bad split": "labels.csv:2: unknown split 'training'", "bad json": "l.jsonl:2: not valid JSON",
              "both": "not both", "neither": "nothing to train on", "predict bad": "l.jsonl:2: not valid JSON"}[case]
    assert needle in line
    assert not (tmp_path / "m").exists()
