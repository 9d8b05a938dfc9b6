"""The README's own command lines, run as a new user types them (issue 24): read from README.md's marked code
blocks, so that the README and the tests cannot drift apart, and run one after another from a new working folder
with relative paths, a copy of hymenoptera as `photos/`, the real default backbone, default settings (the engine
as `auto` resolves on this CPU: no pin) and a cold cache, under umask 022.

This is the user's lane. Every other test may pin the engine, use absolute temporary paths or the tiny backbone;
this one must not, because that is how `make demo`, `train --out model/`, `check` after `train` and `serve` after
`train` all broke while 872 tests passed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera"
MARK = "<!-- tests/test_readme.py runs this block"
TIMEOUT_S = 600
PORT = 18743


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block that follows a MARK comment, in README order."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for found in re.finditer(re.escape(MARK), text):
        fence = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M).search(text, found.end())
        assert fence is not None, "a marked README block without a code fence after it"
        blocks.append((fence.group(1), fence.group(2)))
    return blocks


def commands(block: str) -> list[list[str]]:
    """The shell lines of a block as argument lists, their trailing comments dropped."""
    out = []
    for line in block.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line:
            out.append(line.split())
    return out


def test_the_readme_marks_its_command_blocks() -> None:
    blocks = readme_blocks()
    assert [lang for lang, _ in blocks] == ["", "python"]
    verbs = [c[1] for c in commands(blocks[0][1])]
    for verb in ("train", "evaluate", "predict", "check", "report", "export", "serve"):
        assert verb in verbs, f"the README's tested block lacks `headstart {verb}`"


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A new working folder holding only photos/, and the environment a user's shell has (a cold cache)."""
    if not HYMENOPTERA.is_dir():
        pytest.fail(f"{HYMENOPTERA} is missing: the integration tests need ../shared/data beside the checkout")
    folder = tmp_path_factory.mktemp("user")
    shutil.copytree(HYMENOPTERA, folder / "photos")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HEADSTART_CACHE=str(tmp_path_factory.mktemp("user-cache")), HF_HUB_OFFLINE="1", COLUMNS="100",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return {"cwd": folder, "env": env}


def _run(argv: list[str], user: dict) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=user["cwd"], env=user["env"], capture_output=True, text=True,
                          timeout=TIMEOUT_S, umask=0o022)
    shown = f"$ {' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    return proc


def _serve(argv: list[str], user: dict) -> None:
    """Start the service as typed (on a free port for the test), post one photo, stop it."""
    import httpx

    argv = [a if a != "8000" else str(PORT) for a in argv]
    server = subprocess.Popen(argv, cwd=user["cwd"], env=user["env"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, umask=0o022)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert server.poll() is None, server.stdout.read()
        photo = user["cwd"] / "photos/val/bees" / sorted(os.listdir(user["cwd"] / "photos/val/bees"))[0]
        reply = httpx.post(f"http://127.0.0.1:{PORT}/predict", files={"file": (photo.name, photo.read_bytes())},
                           timeout=60)
        assert reply.status_code == 200 and reply.json()["results"][0]["label"] in ("ants", "bees"), reply.text
    finally:
        server.terminate()
        out = server.communicate(timeout=60)[0]
    assert "serving" in out and "Traceback" not in out, out


def test_the_readme_runs_as_written(user: dict) -> None:
    shell, python = readme_blocks()
    cwd: Path = user["cwd"]
    for argv in commands(shell[1]):
        assert argv[0] == "headstart", argv
        if argv[1] == "serve":
            _serve(argv, user)
            continue
        proc = _run(argv, user)
        if argv[1] == "train":
            assert (cwd / "model/headstart.json").is_file() and (cwd / "model/report.html").is_file()
        if argv[1] == "check":  # check right after train finds the features train cached, whatever the engine
            assert "not cached" not in proc.stdout + proc.stderr, proc.stderr
        if argv[1] == "export":
            assert (cwd / "model/model.onnx").is_file()
    _run([sys.executable, "-c", python[1]], user)
    assert (cwd / "model2/headstart.json").is_file()
    for name in ("model.safetensors", "headstart.json", "report.html", "model.onnx"):
        assert stat.S_IMODE((cwd / "model" / name).stat().st_mode) == 0o644, name  # readable by a teammate
