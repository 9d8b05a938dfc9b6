"""`--format json` wherever the CLI offers JSON (`check --json` kept as its alias), and typer's shell completion."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_cli import run_headstart
from helpers_images import make_image_folder

TIMEOUT_S = 240


def _headstart(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_headstart(*args, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, columns=250,
                         timeout=TIMEOUT_S)


def test_check_takes_format_json_and_keeps_json_as_its_alias(tmp_path: Path) -> None:
    photos = make_image_folder(tmp_path / "photos", per_class=4)
    env = {"HEADSTART_CACHE": str(tmp_path / "cache")}
    by_format = _headstart("check", photos, "--format", "json", "--backbone", "", env=env)
    by_alias = _headstart("check", photos, "--json", "--backbone", "", env=env)
    assert by_format.returncode == by_alias.returncode == 0, by_format.stderr + by_alias.stderr
    assert json.loads(by_format.stdout) == json.loads(by_alias.stdout)
    assert "findings" in json.loads(by_format.stdout)
    table = _headstart("check", photos, "--format", "table", "--backbone", "", env=env)
    assert table.returncode == 0 and not table.stdout.lstrip().startswith("{")
    bad = _headstart("check", photos, "--format", "yaml", env=env)
    assert bad.returncode == 2 and "yaml" in bad.stderr and "Traceback" not in bad.stderr


def test_every_command_offering_json_spells_it_format_json() -> None:
    for command in ("check", "predict", "evaluate", "runs"):
        out = _headstart(command, "--help")
        assert out.returncode == 0 and "--format" in out.stdout, f"{command}: {out.stdout[-400:]}"


@pytest.mark.parametrize("words, cword, expected", [("headstart tr", 1, "train"),
                                                     ("headstart check --fo", 2, "--format")])
def test_shell_completion_completes_commands_and_options(words: str, cword: int, expected: str) -> None:
    out = _headstart(env={"_HEADSTART_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    assert out.returncode == 0 and expected in out.stdout.split(), out.stdout + out.stderr
    # typer finds the shell from the process tree (shellingham): run it from bash as a user's terminal would, since
    # `make test` runs under sh, which typer does not complete
    command = f"{shlex.quote(sys.executable)} -m headstart --show-completion; exit $?"  # not exec-ed: bash stays its parent
    script = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=TIMEOUT_S,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "SHELL": "/bin/bash"})
    assert script.returncode == 0 and "_HEADSTART_COMPLETE" in script.stdout, script.stdout + script.stderr
