"""What the tests of headstart's command line share: `python -m headstart` in a subprocess with the environment it
needs, and the checks on a message or an error that must be one line.

Not a test file (pytest collects only test_*.py); imported as `from helpers_cli import ...`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers_models import seed_tiny_export

TIMEOUT_S = 180


def cli_env(cache: Path, tiny_onnx: tuple[Path, Path] | None = None) -> dict[str, str]:
    """This process's environment for a `headstart` subprocess: its cache at `cache` (seeded with the tiny
    backbone's ONNX export when `tiny_onnx` is given, so it does not pay for one), never the hub."""
    if tiny_onnx is not None:
        seed_tiny_export(tiny_onnx, cache)
    return {**os.environ, "HEADSTART_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def run_headstart(*args: str | bytes | Path, env: dict[str, str], columns: int | None = 200, timeout: float = TIMEOUT_S,
                  cwd: Path | None = None, text: bool = True) -> subprocess.CompletedProcess:
    """`python -m headstart ARGS`, its output captured (text, or bytes with text=False). The environment is `env`
    with a terminal `columns` wide (a wide one by default, so that table assertions do not depend on the machine
    running the tests; None: `env` as it is)."""
    argv = [sys.executable, "-m", "headstart", *(a if isinstance(a, bytes) else str(a) for a in args)]
    env = env if columns is None else {**env, "COLUMNS": str(columns)}
    return subprocess.run(argv, capture_output=True, text=text, env=env, timeout=timeout, cwd=cwd)


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The command exited with `code`, without a traceback, and said why in one `error: ...` line on stderr;
    returns that line. Output in bytes is decoded as UTF-8."""
    out, err = (s.decode("utf-8", "replace") if isinstance(s, bytes) else s for s in (proc.stdout, proc.stderr))
    assert proc.returncode == code, out + err
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def assert_one_line(message: str, *needles: str) -> str:
    """`message` is one non-empty line holding every needle; returns it."""
    assert message and "\n" not in message, repr(message)
    for needle in needles:
        assert needle in message, message
    return message
