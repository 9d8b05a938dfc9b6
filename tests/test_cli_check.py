"""`headstart check` and `headstart compare` as a user runs them: real subprocesses on the tiny backbone."""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest
from helpers_cli import cli_env, run_headstart
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE

TIMEOUT_S = 240
_headstart = partial(run_headstart, columns=250, timeout=TIMEOUT_S)  # a test may ask for a narrow terminal


@pytest.fixture(scope="module")
def env(tiny_onnx: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return cli_env(tmp_path_factory.mktemp("check-cache"), tiny_onnx)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("check") / "photos", per_class=6)


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("leaky") / "photos"
    make_image_folder(root / "train", per_class=5, seed=1)
    make_image_folder(root / "val", per_class=2, seed=2)
    shutil.copy(root / "train/cat/cat_000.jpg", root / "val/cat/leaked.jpg")
    return root


def _ok(proc: subprocess.CompletedProcess[str], code: int = 0) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc


def test_check_prints_findings_with_whole_paths_and_strict_blocks(leaky: Path, env: dict[str, str]) -> None:
    proc = _ok(_headstart("check", leaky, "--backbone", "", env=env))
    assert "leakage" in proc.stdout and str(leaky / "val/cat/leaked.jpg") in proc.stdout
    assert "1 blocking" in proc.stdout
    _ok(_headstart("check", leaky, "--strict", "--backbone", "", env=env), code=1)
    report = json.loads(_ok(_headstart("check", leaky, "--json", "--backbone", "", env=env)).stdout)
    (leak,) = [f for f in report["findings"] if f["kind"] == "leakage"]
    assert set(leak["files"]) == {str(leaky / "train/cat/cat_000.jpg"), str(leaky / "val/cat/leaked.jpg")}
    assert leak["severity"] == "error" and report["blocking"] == 1


def test_check_deep_uses_the_backbones_features(photos: Path, tiny_weights: Path, env: dict[str, str]) -> None:
    flags = ("--backbone", TINY_BACKBONE, "--weights", tiny_weights, "--device", "cpu", "--json")
    shallow = json.loads(_ok(_headstart("check", photos, *flags, env=env)).stdout)
    assert shallow["backbone"] is None and any("--deep" in n for n in shallow["notes"])
    deep = json.loads(_ok(_headstart("check", photos, *flags, "--deep", "--strict", env=env)).stdout)
    assert deep["backbone"] == TINY_BACKBONE and deep["blocking"] == 0  # (features cached since: test_data_check)


def test_check_refuses_a_bad_flag_in_one_line(photos: Path, env: dict[str, str]) -> None:
    proc = _ok(_headstart("check", photos, "--val-split", "1.5", env=env), code=2)
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_compare_tabulates_and_picks(photos: Path, tiny_weights: Path, env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "model"
    proc = _ok(_headstart("compare", photos, "--backbones", TINY_BACKBONE, "--weights", tiny_weights,
                          "--device", "cpu", "--pick", "--out", out, env=env))
    assert TINY_BACKBONE in proc.stdout and "95% interval" in proc.stdout and f"best: {TINY_BACKBONE}" in proc.stdout
    assert (out / "headstart.json").is_file()
    again = _ok(_headstart("compare", photos, "--backbones", TINY_BACKBONE, "--weights", tiny_weights,
                           "--device", "cpu", env=env, columns=80))
    header = next(line for line in again.stdout.splitlines() if line.split()[:1] == ["backbone"])
    row = next(line for line in again.stdout.splitlines() if line.split()[:1] == [TINY_BACKBONE])
    # At 80 columns every header and value stays whole on one line ('95% interval' was split into 'inter'/'val').
    assert header.split() == ["backbone", "img/s", "cv", "accuracy", "(95%)", "M", "params", "ms/img", "new"]
    assert len(row.split()) == 7 and max(map(len, again.stdout.splitlines())) <= 80
    assert row.split()[-1] == "0"  # the second run extracted nothing


def test_compare_refuses_weights_for_two_backbones(photos: Path, tiny_weights: Path, env: dict[str, str]) -> None:
    proc = _ok(_headstart("compare", photos, "--backbones", f"{TINY_BACKBONE},efficientnet_lite0", "--weights",
                          tiny_weights, env=env), code=2)
    assert "--weights" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
