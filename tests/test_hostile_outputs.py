"""What comes out of the real CLI for hostile inputs: odd file names under real locales, unreadable files, a bad
--out or --resume, a model whose weights do not match its record. Every case is the documented outcome: rows in
input order (errors in place) and exit 0, or one `error:` line and exit 2; never a traceback.

The model is built without training (a random head on the tiny backbone, `synthetic_artifact`), so the module
costs a few CLI runs, not a fit.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from helpers_cli import assert_one_error_line, cli_env, run_headstart
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE
from test_serve_artifact import synthetic_artifact

from headstart.serve import artifact

TIMEOUT_S = 180
_run = partial(run_headstart, text=False)  # bytes out: the test decodes, strictly, what the CLI wrote
BAD_NAME = os.fsencode("photo-") + b"\xff\xfe.jpg"  # not UTF-8: reaches Python as surrogate escapes
BAD_SHOWN = "photo-\\xff\\xfe.jpg"  # how the CLI writes it (render.shown)


@pytest.fixture(scope="module")
def env(tiny_onnx: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return cli_env(tmp_path_factory.mktemp("hostile-cache"), tiny_onnx)


@pytest.fixture(scope="module")
def model(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifact.save(synthetic_artifact(tiny_weights), tmp_path_factory.mktemp("hostile-model") / "model")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("hostile") / "photos", per_class=3)


def _locale_env(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """LANG/LC_ALL for `name`; en_US.UTF-8 is generated into a private LOCPATH when the system lacks it (nothing
    system-wide changes). Without localedef, the stdout en_US.UTF-8 gives Python (utf-8, strict) is set directly."""
    listed = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout.lower().split()
    chosen = {"LANG": name, "LC_ALL": name}
    if name.lower().replace("-", "") in [n.replace("-", "") for n in listed]:
        return chosen
    if name.startswith("en_US") and shutil.which("localedef"):
        where = tmp_path_factory.mktemp("locales")
        made = subprocess.run(["localedef", "-i", "en_US", "-f", "UTF-8", str(where / name)], capture_output=True)
        if made.returncode in (0, 1) and (where / name).exists():  # 1: warnings only
            return {**chosen, "LOCPATH": str(where)}
    return {**chosen, "PYTHONIOENCODING": "utf-8:strict"}


@pytest.fixture(scope="module", params=["en_US.UTF-8", "C.UTF-8"])
def locale_env(request: pytest.FixtureRequest, env: dict[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {**env, **_locale_env(request.param, tmp_path_factory)}


@pytest.fixture(scope="module")
def odd_names(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    """A folder of good photos under odd names; returns it and the names, as bytes, in the order given."""
    folder = tmp_path_factory.mktemp("odd-names")
    source = sorted(photos.rglob("*.jpg"))
    names = [BAD_NAME, "café photo.jpg".encode(), b"tab\there.jpg", b"[red]markup[bold].jpg", b"plain.jpg"]
    for name, src in zip(names, source):
        shutil.copy(src, os.path.join(os.fsencode(folder), name))
    return folder, names


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_predict_writes_undecodable_names_escaped_under_real_locales(model, odd_names, locale_env, fmt):
    folder, names = odd_names
    paths = [os.path.join(os.fsencode(folder), n) for n in names]
    proc = _run("predict", model, *paths, "--format", fmt, env=locale_env)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    assert b"Traceback" not in proc.stderr
    out = proc.stdout.decode("utf-8")  # strict: a raw \xff byte in the output fails here
    text = "\n".join(r["path"] for r in json.loads(out)) if fmt == "json" else out
    assert BAD_SHOWN in text and "café photo.jpg" in text
    expected = [os.fsdecode(p) for p in paths]
    expected[0] = expected[0].replace(os.fsdecode(BAD_NAME), BAD_SHOWN)
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [r["path"] for r in rows] == expected and all(r["label"] and not r["error"] for r in rows)
    elif fmt == "json":
        rows = json.loads(out)
        assert [r["path"] for r in rows] == expected and all(r["label"] and r["error"] is None for r in rows)
    else:
        assert "[red]markup[bold].jpg" in out  # printed as text, not read as rich markup


def _without_dac_override() -> list[str] | None:
    """A command prefix under which this process's own uid is subject to file permissions: as root, setpriv drops
    the capabilities that let root read anything; as another user, nothing is needed. None: not possible here."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        return None
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def test_predict_makes_an_unreadable_file_a_row_and_predicts_the_rest(model, photos, env, tmp_path):
    prefix = _without_dac_override()
    if prefix is None:
        pytest.skip("cannot make a file unreadable to this process (root without setpriv); test_cli covers it")
    good = sorted(photos.rglob("*.jpg"))[:2]
    secret = tmp_path / "secret.jpg"
    shutil.copy(good[0], secret)
    secret.chmod(0)
    proc = subprocess.run([*prefix, sys.executable, "-m", "headstart", "predict", str(model), str(good[0]),
                           str(secret), str(good[1]), "--format", "csv"],
                          capture_output=True, text=True, env={**env, "COLUMNS": "200"}, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["path"] for r in rows] == [str(good[0]), str(secret), str(good[1])]
    assert rows[0]["label"] and rows[2]["label"] and not rows[1]["label"]
    assert rows[1]["error"] and "Traceback" not in proc.stderr


# --- --out and --resume are checked before any work ------------------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A directory nothing can be written in, even by root: a read-only tmpfs where mounting is allowed; else,
    as another user, a mode 555 folder; else a folder under /proc (which refuses new entries)."""
    where = tmp_path / "ro"
    where.mkdir()
    if os.geteuid() != 0:
        where.chmod(0o555)
        yield where
        where.chmod(0o755)
        return
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)], capture_output=True).returncode == 0
    try:
        yield where if mounted else Path("/proc/headstart-not-here")
    finally:
        if mounted:
            subprocess.run(["umount", str(where)], capture_output=True)


def _bad_outs(tmp_path: Path, read_only: Path) -> dict[str, Path]:
    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    return {"an existing file": a_file, "under a file": a_file / "model", "read-only": read_only / "model"}


@pytest.mark.parametrize("case", ["an existing file", "under a file", "read-only"])
def test_an_unwritable_out_is_one_line_before_any_work(photos, tiny_weights, env, tmp_path, read_only_dir, case):
    out = _bad_outs(tmp_path, read_only_dir)[case]
    cache = tmp_path / "cache"
    started = time.monotonic()
    proc = _run("train", photos, "--backbone", TINY_BACKBONE, "--weights", tiny_weights, "--epochs", "2",
                "--device", "cpu", "--out", out, env={**env, "HEADSTART_CACHE": str(cache)})
    line = assert_one_error_line(proc)
    assert str(out) in line or str(out.parent) in line
    assert not (cache / "features").exists(), "features were extracted before the refusal"
    assert time.monotonic() - started < 60
    assert (tmp_path / "taken.txt").read_text() == "keep me"


def test_resume_from_nothing_is_one_line(photos, env, tmp_path):
    line = assert_one_error_line(_run("train", photos, "--resume", tmp_path / "no-such-run", "--out", tmp_path / "m",
                                env=env))
    assert "--resume" in line and "no-such-run" in line


# --- a model whose weights do not match its record ---------------------------------------------------------------

def test_predict_with_a_mismatched_head_is_one_line(model, photos, env, tmp_path):
    from safetensors.numpy import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    tensors = load_file(str(damaged / artifact.WEIGHTS_FILE))
    tensors["head.layers.1.weight"] = tensors["head.layers.1.weight"][:2]
    tensors["head.layers.1.bias"] = tensors["head.layers.1.bias"][:2]
    save_file(tensors, str(damaged / artifact.WEIGHTS_FILE))
    image = sorted(photos.rglob("*.jpg"))[0]
    for command in (["predict", damaged, image], ["evaluate", damaged, photos]):
        assert "layers.1" in assert_one_error_line(_run(*command, env=env))
