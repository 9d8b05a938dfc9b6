"""Manifests through the real command line (`python -m headstart` in subprocesses, the tiny backbone): train
--manifest, predict --manifest with one output row per input row, evaluate --manifest, and the one-line errors."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE, seed_tiny_export

TIMEOUT_S = 180


def _headstart(*args: str | Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "headstart", *map(str, args)], capture_output=True, text=True,
                          env={**env, "COLUMNS": "200"}, timeout=TIMEOUT_S, cwd=cwd)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def env(tiny_onnx: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = seed_tiny_export(tiny_onnx, tmp_path_factory.mktemp("manifest-cache"))
    return {**os.environ, "HEADSTART_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


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
    proc = _headstart("train", "--manifest", project / "lists" / "labels.csv", "--backbone", TINY_BACKBONE,
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
    proc = _headstart("predict", model, "--manifest", inputs, "--format", "csv", env=env)
    assert proc.returncode == 0, proc.stderr
    out = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [Path(r["path"]).name for r in out] == ["dog_001.jpg", "nowhere.jpg", "cat_000.jpg", "dog_001.jpg"]
    assert out[1]["error"] == "no such file" and all(out[i]["label"] for i in (0, 2, 3))
    table = _headstart("predict", model, "--manifest", inputs, "--format", "json", env=env)
    assert len(json.loads(table.stdout)) == 4


def test_evaluate_manifest(trained: tuple[subprocess.CompletedProcess[str], Path], project: Path,
                           env: dict[str, str]) -> None:
    _, model = trained
    proc = _headstart("evaluate", model, "--manifest", project / "lists" / "labels.csv", "--format", "json", env=env)
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
    line = _one_error_line(_headstart(*args, "--out", tmp_path / "m", env=env) if args[0] == "train"
                           else _headstart(*args, env=env))
    needle = {"space label": "labels.csv:3: label ' dog' has surrounding spaces",
              "bad split": "labels.csv:2: unknown split 'training'", "bad json": "l.jsonl:2: not valid JSON",
              "both": "not both", "neither": "nothing to train on", "predict bad": "l.jsonl:2: not valid JSON"}[case]
    assert needle in line
    assert not (tmp_path / "m").exists()
