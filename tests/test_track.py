"""`train --track csv|tensorboard|mlflow` through the real CLI, read back with the real libraries (TensorBoard's event
reader, MLflow's client on its local store), and `headstart runs` listing what was trained."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(tiny_weights: Path, data: Path, out: Path, *extra: str) -> None:
    from typer.testing import CliRunner

    from headstart.cli import app

    result = CliRunner().invoke(app, [
        "train", str(data), "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--epochs", "4",
        "--device", "cpu", "--views", "1", "--finetune-epochs", "2", "--no-report", "--out", str(out), *extra])
    assert result.exit_code == 0, result.output


@pytest.fixture
def two_runs(tiny_weights, ft_cache, tmp_path, monkeypatch) -> tuple[Path, Path, Path]:
    """A fine-tuned run tracked everywhere with the defaults (./mlruns, OUT/tb, OUT/history.csv), and a head-only
    run into another MLflow store (MLFLOW_TRACKING_URI) with its csv and TensorBoard logs under --log-dir."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_image_folder(tmp_path / "photos", per_class=8)
    first, second = tmp_path / "models" / "tuned", tmp_path / "models" / "head"
    _train(tiny_weights, data, first, "--strategy", "finetune", "--track", "csv", "--track", "tensorboard",
           "--track", "mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "other-store").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store named by the user: MLflow 3's opt-in
    _train(tiny_weights, data, second, "--track", "mlflow", "--track", "tensorboard", "--track", "csv",
           "--log-dir", str(tmp_path / "logs"))
    return first, second, tmp_path


def _history(model: Path) -> dict:
    fit = json.loads((model / "headstart.json").read_text())["fit"]
    return {1: fit["history"], 2: fit["decision"]["stage2"]["history"] if fit["decision"]["stage2"] else None}


def test_csv_holds_every_epoch_of_both_stages_and_the_run(two_runs) -> None:
    tuned, head, root = two_runs
    history = _history(tuned)
    rows = list(csv.DictReader(open(tuned / "history.csv")))
    for stage in (1, 2):
        mine = [r for r in rows if r["stage"] == str(stage)]
        assert len(mine) == len(history[stage]["val_loss"]) >= 1
        assert [float(r["val_loss"]) for r in mine] == history[stage]["val_loss"]
        assert [float(r["val_accuracy"]) for r in mine] == history[stage]["val_accuracy"]
    run = {(r["section"], r["key"]): r["value"] for r in csv.DictReader(open(tuned / "run.csv"))}
    assert run["setting", "strategy"] == "finetune" and run["decision", "kept"] in ("head", "finetune")
    assert 0 <= float(run["metric", "val/balanced_accuracy"]) <= 1
    assert (root / "logs" / "head" / "history.csv").is_file()  # --log-dir: one sub-folder per run


def test_tensorboard_event_files_read_back(two_runs) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tuned, head, root = two_runs
    history = _history(tuned)
    events = EventAccumulator(str(tuned / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    for stage in (1, 2):
        got = [e.value for e in events.Scalars(f"stage{stage}/val_loss")]
        assert got == pytest.approx(history[stage]["val_loss"], rel=1e-6)
        assert [e.step for e in events.Scalars(f"stage{stage}/val_loss")] == list(range(1, len(got) + 1))
    assert "confusion_val" in tags["images"]
    assert {"settings/text_summary", "decision/text_summary"} <= set(tags["tensors"])
    assert events.Scalars("final/val/accuracy")[0].value == pytest.approx(
        json.loads((tuned / "headstart.json").read_text())["fit"]["metrics"]["val"]["accuracy"])
    other = EventAccumulator(str(root / "logs" / "head")).Reload()
    assert "stage1/train_loss" in other.Tags()["scalars"] and "stage2/val_loss" not in other.Tags()["scalars"]


def test_mlflow_runs_read_back_from_their_stores(two_runs) -> None:
    from mlflow.tracking import MlflowClient

    tuned, head, root = two_runs
    history = _history(tuned)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        default = MlflowClient((root / "mlruns").as_uri())  # the default: ./mlruns where train ran
        (run,) = default.search_runs([default.get_experiment_by_name("headstart").experiment_id])
        assert run.info.run_name == "tuned" and run.info.status == "FINISHED"
        assert run.data.params["strategy"] == "finetune" and run.data.params["backbone"] == TINY_BACKBONE
        assert run.data.tags["decision.kept"] in ("head", "finetune")
        for stage in (1, 2):
            steps = default.get_metric_history(run.info.run_id, f"stage{stage}/val_accuracy")
            assert [m.value for m in sorted(steps, key=lambda m: m.step)] == history[stage]["val_accuracy"]
        assert 0 <= run.data.metrics["val/balanced_accuracy"] <= 1
        assert {"confusion_val.png", "headstart.json"} <= {a.path for a in default.list_artifacts(run.info.run_id)}
        other = MlflowClient((root / "other-store").as_uri())  # MLFLOW_TRACKING_URI was respected
        (second,) = other.search_runs([other.get_experiment_by_name("headstart").experiment_id])
        assert second.info.run_name == "head" and "stage2/val_loss" not in second.data.metrics


def test_runs_lists_both_models(two_runs) -> None:
    from typer.testing import CliRunner

    from headstart.cli import app

    tuned, head, root = two_runs
    result = CliRunner().invoke(app, ["runs", str(root / "models"), "--format", "json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    by_name = {r["model"]: r for r in listed["runs"]}
    assert set(by_name) == {"tuned", "head"} and listed["unreadable"] == []
    assert [r["created"] for r in listed["runs"]] == sorted(r["created"] for r in listed["runs"])  # oldest first
    assert by_name["tuned"]["strategy"] == "finetune" and by_name["head"]["backbone"] == TINY_BACKBONE
    assert all(0 <= r["val_accuracy"] <= 1 and r["train_s"] > 0 and r["data"].endswith("photos")
               for r in listed["runs"])
    (root / "models" / "broken").mkdir()
    (root / "models" / "broken" / "headstart.json").write_text("{not json")
    table = CliRunner().invoke(app, ["runs", str(root / "models")], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "tuned" in table.output and "head" in table.output, table.output
    assert "skipped" in table.output and "broken" in table.output
