"""`headstart train` beyond tests/test_cli.py: --unfreeze is parsed and bad values refused in one line, and a
fine-tuned model trains end to end (that its flags and defaults are ImageClassifier's: tests/test_options.py).

Torch-free at import, like test_cli.py; the tests that fine-tune run with one torch thread (see conftest)."""

from __future__ import annotations

import json

import pytest

from helpers_cli import assert_one_line
from helpers_models import N_STAGES, TINY_BACKBONE


def test_cli_parses_unfreeze():
    from headstart.cli.train import _parse_unfreeze

    assert _parse_unfreeze("all") == "all" and _parse_unfreeze("3") == 3 and _parse_unfreeze("auto") == "auto"


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_trains_a_fine_tuned_model(tiny_weights, ft_cache, image_folder, tmp_path):
    from typer.testing import CliRunner

    from headstart.cli import app

    out = tmp_path / "m"
    result = CliRunner().invoke(app, [
        "train", str(image_folder), "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--epochs", "3",
        "--device", "cpu", "--strategy", "finetune", "--finetune-epochs", "1", "--views", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert (out / "model.safetensors").exists() and (out / "headstart.json").exists()
    assert not (out / "checkpoint").exists()
    info = json.loads((out / "headstart.json").read_text())
    assert info["fit"]["decision"]["kept"] == "finetune" and info["params"]["unfreeze"] == "auto"
    assert info["fit"]["decision"]["stage2"]["config"]["unfreeze"] == 2  # auto: the top two stages at the standard size


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("value", ["0", "banana", "-1", ""])
def test_cli_refuses_a_bad_unfreeze(image_folder, tmp_path, value):
    from typer.testing import CliRunner

    from headstart.cli import app

    result = CliRunner().invoke(app, ["train", str(image_folder), "--strategy", "finetune", "--unfreeze", value,
                                      "--out", str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert_one_line(result.stderr.strip(), "--unfreeze")
    assert not (tmp_path / "m").exists()


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_unfreeze_beyond_the_backbone_is_one_line(tiny_weights, ft_cache, image_folder, tmp_path):
    """More stages than this backbone has passes the flag check; fine-tuning then refuses it as a user error."""
    from typer.testing import CliRunner

    from headstart.cli import app

    result = CliRunner().invoke(app, [
        "train", str(image_folder), "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--epochs", "2",
        "--device", "cpu", "--strategy", "finetune", "--unfreeze", str(N_STAGES + 1), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert_one_line(result.stderr.strip(), "--unfreeze", f"1..{N_STAGES}")
