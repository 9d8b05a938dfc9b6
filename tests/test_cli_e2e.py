"""The real command line end to end: `python -m headstart` as a subprocess, on the tiny backbone.

tests/test_cli.py checks the CLI layer against a fake classifier; these run the real library behind it, so they
catch what only the pieces together do: exit codes through the real entry point, a model directory that
`evaluate` and `predict` can read back, and flag errors that never reach a traceback.
"""

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
    """One cache for the module (seeded with the tiny backbone's ONNX export, like conftest's tiny_cache), so
    the model trained once below is read back without a second export; never the user's cache, never the hub."""
    return cli_env(tmp_path_factory.mktemp("e2e-cache"), tiny_onnx)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("e2e") / "photos", per_class=6)


@pytest.fixture(scope="module")
def trained(
    photos: Path, tiny_weights: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`headstart train` run once for the module: (its process, the model directory)."""
    out = tmp_path_factory.mktemp("e2e-model") / "model"
    proc = run_headstart("train", photos, "--backbone", TINY_BACKBONE, "--weights", tiny_weights, "--epochs", "3",
                      "--device", "cpu", "--out", out, env=env)
    return proc, out


def test_train_saves_a_model_and_summarises(trained: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = trained
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "headstart.json").is_file() and (out / "model.safetensors").is_file()
    assert "headstart train" in proc.stdout and TINY_BACKBONE in proc.stdout and str(out) in proc.stdout
    assert "Traceback" not in proc.stderr


def test_evaluate_prints_tables(trained: tuple[subprocess.CompletedProcess[str], Path], photos: Path,
                                env: dict[str, str]) -> None:
    _, model = trained
    proc = run_headstart("evaluate", model, photos, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in ("evaluation", "accuracy", "per class", "cat", "dog", "fish", "confusion matrix"):
        assert text in proc.stdout


def test_evaluate_json_is_the_only_stdout(trained: tuple[subprocess.CompletedProcess[str], Path], photos: Path,
                                          env: dict[str, str], tmp_path: Path) -> None:
    _, model = trained
    proc = run_headstart("evaluate", model, photos, "--format", "json", "--confusion", tmp_path / "cm.png", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["n"] == 18 and 0.0 <= payload["accuracy"] <= 1.0 and payload["skipped"] == []
    assert (tmp_path / "cm.png").stat().st_size > 0


def test_predict_csv_has_one_row_per_input(trained: tuple[subprocess.CompletedProcess[str], Path], photos: Path,
                                           env: dict[str, str], tmp_path: Path) -> None:
    _, model = trained
    images = sorted(photos.glob("*/*_00[01].jpg"))
    broken = tmp_path / "notes.txt"
    broken.write_text("not an image")
    proc = run_headstart("predict", model, *images, broken, "--format", "csv", "--top-k", "2", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # one bad file among good ones is a row, not a failure
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [row["path"] for row in rows] == [str(p) for p in [*images, broken]]
    for row in rows[:-1]:
        assert row["label"] in ("cat", "dog", "fish") and row["error"] == ""
        assert len(row["top_k"].split(";")) == 2
    assert rows[-1]["label"] == "" and rows[-1]["error"]


def test_predict_table_shows_each_path_whole(trained: tuple[subprocess.CompletedProcess[str], Path], photos: Path,
                                            env: dict[str, str]) -> None:
    _, model = trained
    images = sorted(photos.glob("cat/*.jpg"))[:2]
    proc = run_headstart("predict", model, *images, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for image in images:
        assert any(str(image) in line for line in lines), proc.stdout


def test_predict_exits_1_when_no_file_is_readable(trained: tuple[subprocess.CompletedProcess[str], Path],
                                                  env: dict[str, str], tmp_path: Path) -> None:
    _, model = trained
    bad = [tmp_path / "a.jpg", tmp_path / "b.txt"]
    bad[0].write_bytes(b"\xff\xd8 truncated")
    bad[1].write_text("hello")
    proc = run_headstart("predict", model, *bad, "--format", "csv", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(rows) == 2 and all(row["error"] for row in rows)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, named", [
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--val-split", "1.5"], "--val-split"),
    (["--unfreeze", "0"], "--unfreeze"),
    (["--epochs", "0"], "--epochs"),
])
def test_a_bad_flag_is_one_error_line_and_exit_2(photos: Path, tmp_path: Path, env: dict[str, str],
                                                 flags: list[str], named: str) -> None:
    proc = run_headstart("train", photos, *flags, "--out", tmp_path / "m", env=env)
    assert named in assert_one_error_line(proc)
    assert not (tmp_path / "m").exists()


def test_a_missing_model_directory_is_exit_2(photos: Path, tmp_path: Path, env: dict[str, str]) -> None:
    for command in (["evaluate", tmp_path / "no-model", photos], ["predict", tmp_path / "no-model", photos]):
        assert_one_error_line(run_headstart(*command, env=env))


def test_a_diverging_run_is_one_error_line_and_saves_nothing(photos: Path, tiny_weights: Path, tmp_path: Path,
                                                             env: dict[str, str]) -> None:
    proc = run_headstart("train", photos, "--backbone", TINY_BACKBONE, "--weights", tiny_weights, "--epochs", "6",
                      "--lr", "1e20", "--device", "cpu", "--out", tmp_path / "m", env=env)
    assert "diverged" in assert_one_error_line(proc)
    assert not (tmp_path / "m" / "headstart.json").exists()
