"""The command line: parsing, exit codes, output formats. Runs against a fake `headstart.api`.

The fake honours the ImageClassifier contract and returns real `Evaluation`s, so these tests need no
torch, no network and no pretrained weights; they check the CLI layer only (the library has its own tests).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from headstart import cli
from headstart.cli import render as cli_render
from headstart.cli import render_predictions
from headstart.cli.progress import ProgressBars
from headstart.cli import train as cli_train
from headstart.errors import WeightsError
from headstart.errors import DataError
from headstart.heads.config import HeadConfig
from headstart.records import Decision, HeadCandidate, History, RefitReport, Stage2Report
from headstart.records import FinetuneConfig
from headstart.evaluate.metrics import evaluate
from headstart.records import Evaluation
from headstart.records import EvaluationResult
from headstart.vision.preprocess import PreprocessConfig

SRC = Path(__file__).resolve().parents[1] / "src"
CLASSES = ["cat", "dog"]
runner = CliRunner()


def _evaluation() -> Evaluation:
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    return evaluate(y, proba, CLASSES)


@dataclass
class FakePrediction:
    path: Path
    label: str | None
    confidence: float | None
    top_k: list[tuple[str, float]]
    error: str | None


class FakeClassifier:
    """Just enough of headstart.api.ImageClassifier; class attributes let a test steer it."""

    created: list[FakeClassifier] = []
    raise_in_fit: BaseException | None = None
    raise_in_load: BaseException | None = None
    n_skipped = 1

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.engine = params.get("engine", "auto")
        FakeClassifier.created.append(self)

    def fit(self, data: Path, progress: Any, checkpoint_dir: Path | None = None, resume: bool = False) -> FakeClassifier:
        self.fit_args = {"checkpoint_dir": checkpoint_dir, "resume": resume}
        if self.raise_in_fit is not None:
            raise self.raise_in_fit
        progress.start("extracting features", 6)
        progress.advance(6)
        progress.finish()
        progress.start("training head", None)
        progress.advance(3)
        progress.finish()
        self.classes_ = list(CLASSES)
        self.counts_ = {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}}
        self.skipped_ = [(Path(data) / f"notes{i}.txt", "not an image") for i in range(self.n_skipped)]
        self.val_metrics_ = _evaluation()
        self.test_metrics_ = None
        self.history_ = types.SimpleNamespace(
            train_loss=[1.0, 0.5, 0.4], val_loss=[1.0, 0.6, 0.7], val_accuracy=[0.5, 1.0, 1.0],
            best_epoch=1, stopped_early=True,
        )  # fmt: skip
        self.timings_ = {"scan_s": 0.01, "features_s": 1.5, "train_s": 0.25}
        self.cached_ = 2
        self.frozen_ = types.SimpleNamespace(spec=types.SimpleNamespace(
            name="fake", preprocess=PreprocessConfig(native_size=128)), engine_name="fp32", companion=None)
        self.head_config_ = HeadConfig(16, 2, (64,), 0.6)
        self.decision_ = Decision(strategy="head", kept="head", head_candidates=(
            HeadCandidate((), 0.2, 0.62), HeadCandidate((64,), 0.6, 0.56)))
        # What the report `train` writes reads: the run's record (no temperature fitted), no per-image results.
        self.report_ = types.SimpleNamespace(counts=self.counts_, skipped=self.skipped_, calibration=None,
                                             cv_skipped="")
        self.cv_ = None
        self.validation_ = None
        return self

    def save(self, out_dir: Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "headstart.json").write_text("{}")
        return out

    @classmethod
    def load(cls, model_dir: Path) -> FakeClassifier:
        if cls.raise_in_load is not None:
            raise cls.raise_in_load
        clf = cls()
        clf.classes_ = list(CLASSES)
        return clf

    def iter_table(self, images: list[Path], top_k: int = 3, progress: Any = None) -> Iterator[FakePrediction]:
        return iter(self.predict_table(images, top_k, progress))

    def predict_table(self, images: list[Path], top_k: int = 3, progress: Any = None) -> list[FakePrediction]:
        progress.start("predicting", len(images))
        rows = []
        for path in images:
            if Path(path).suffix == ".jpg":
                rows.append(FakePrediction(Path(path), "cat", 0.9, [("cat", 0.9), ("dog", 0.1)][:top_k], None))
            else:
                rows.append(FakePrediction(Path(path), None, None, [], "cannot identify image file"))
            progress.advance()
        progress.finish()
        return rows

    def evaluate(self, folder: Path, progress: Any = None) -> EvaluationResult:
        return EvaluationResult(_evaluation(), ((Path(folder) / "cat" / "broken.jpg", "truncated file"),))


@pytest.fixture(autouse=True)
def fake_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Install the fake as `headstart.api`, whether or not the real module exists yet (it imports torch)."""
    module = types.ModuleType("headstart.api")
    module.ImageClassifier = FakeClassifier  # type: ignore[attr-defined]
    module.Prediction = FakePrediction  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "headstart.api", module)
    monkeypatch.setattr(FakeClassifier, "created", [])


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # The CLI reconfigures the root logger (basicConfig(force=True)); give pytest its own back.
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    return path


def _assert_one_error_line(result: Any, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# --------------------------------------------------------------------------- help and startup


def test_help_lists_commands_without_importing_heavy_modules() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "120"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "headstart", "--help"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "evaluate", "predict", "backbones"):
        assert command in proc.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")]
    heavy = [m for m in imported if m.split(".")[0] in {"torch", "timm", "onnxruntime"} or m == "headstart.api"]
    assert heavy == []


def test_default_backbone_matches_library() -> None:
    from headstart.backbones.registry import DEFAULT_BACKBONE

    assert cli_train.DEFAULT_BACKBONE == DEFAULT_BACKBONE


# --------------------------------------------------------------------------- errors and exit codes


@pytest.mark.parametrize(
    "flags",
    [
        ["--val-split", "1.5"],
        ["--val-split", "-0.1"],
        ["--test-split", "1"],
        ["--val-split", "0.6", "--test-split", "0.5"],
        ["--hidden", "512,abc"],
        ["--hidden", "0"],
        ["--epochs", "0"],
        ["--lr", "0"],
        ["--dropout", "1"],
        ["--schedule", "linear"],
        ["--device", "tpu"],
        ["--batch-size", "many"],
    ],
)
def test_bad_train_flags_exit_2_with_one_line(image_folder: Path, flags: list[str]) -> None:
    result = runner.invoke(cli.app, ["train", str(image_folder), *flags])
    _assert_one_error_line(result)
    assert FakeClassifier.created == []  # rejected before anything is built


def test_missing_data_folder_is_a_usage_error(tmp_path: Path) -> None:
    _assert_one_error_line(runner.invoke(cli.app, ["train", str(tmp_path / "nope")]))


def test_user_error_from_fit_is_one_line(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeClassifier, "raise_in_fit", DataError("no images in photos/: add class sub-folders"))
    result = runner.invoke(cli.app, ["train", str(image_folder)])
    assert _assert_one_error_line(result) == "error: no images in photos/: add class sub-folders"


def test_user_error_from_load_is_one_line(model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(FakeClassifier, "raise_in_load", WeightsError("model/headstart.json: not a headstart model"))
    result = runner.invoke(cli.app, ["predict", str(model_dir), str(tmp_path)])
    assert _assert_one_error_line(result) == "error: model/headstart.json: not a headstart model"


def test_ctrl_c_prints_interrupted_and_exits_130(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeClassifier, "raise_in_fit", KeyboardInterrupt())
    result = runner.invoke(cli.app, ["train", str(image_folder)])
    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted"


def test_bugs_are_not_swallowed(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeClassifier, "raise_in_fit", RuntimeError("a bug"))
    result = runner.invoke(cli.app, ["train", str(image_folder)])
    assert isinstance(result.exception, RuntimeError)  # propagates: the entry point shows its traceback
    assert result.exit_code == 1


# --------------------------------------------------------------------------- train


def test_resume_without_out_finishes_the_run_in_its_own_folder(image_folder: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where a default --out would land
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    result = runner.invoke(cli.app, ["train", str(image_folder), "--resume", str(run)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    (clf,) = FakeClassifier.created
    assert clf.fit_args == {"checkpoint_dir": run / "checkpoint", "resume": True}
    assert (run / "headstart.json").exists() and not Path("model").exists()


def test_train_maps_flags_saves_and_summarises(image_folder: Path, tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    out = tmp_path / "out"
    (tmp_path / "earlier").mkdir()  # --resume must name a folder that exists (a typo is refused before any work)
    args = [
        "train", str(image_folder), "--out", str(out), "--backbone", "efficientnet_lite1", "--weights", str(weights),
        "--val-split", "0.25", "--test-split", "0.1", "--epochs", "5", "--lr", "0.01", "--weight-decay", "0",
        "--batch-size", "8", "--hidden", "512, 256", "--dropout", "0.5", "--schedule", "plateau", "--patience", "3",
        "--balance", "--seed", "7", "--device", "cpu", "--strategy", "finetune", "--unfreeze", "all",
        "--augment", "strong", "--finetune-epochs", "3", "--finetune-lr", "0.002", "--views", "2", "--train-bn",
        "--resume", str(tmp_path / "earlier"), "--no-native-view", "--time-limit", "10m", "--no-refit",
    ]  # fmt: skip
    result = runner.invoke(cli.app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    (clf,) = FakeClassifier.created
    assert clf.params == dict(
        backbone="efficientnet_lite1", weights=weights, val_split=0.25, test_split=0.1, hidden=(512, 256),
        dropout=0.5, epochs=5, lr=0.01, weight_decay=0.0, batch_size=8, patience=3, schedule="plateau",
        balance=True, seed=7, device="cpu", strategy="finetune", unfreeze="all", augment="strong",
        finetune_epochs=3, finetune_lr=0.002, views=2, train_bn=True, native_view=False,
        cv="auto", engine="auto", refit=False, time_limit=600.0, multi_label=False, threshold=None,
    )  # fmt: skip
    assert clf.fit_args == {"checkpoint_dir": tmp_path / "earlier" / "checkpoint", "resume": True}
    assert (out / "headstart.json").exists()
    assert (out / "confusion_val.png").stat().st_size > 0
    for text in ("train 4, val 2", "4 extracted, 2 from cache", "3 epochs (stopped early), best epoch 2", "75.0%",
                 "224 px + a 128 px native view",
                 "hidden 64, dropout 0.6 (lowest val loss of linear, dropout 0.2: 0.620"):
        assert text in result.stdout
    assert str(out) in result.stdout
    assert "skipped: " in result.stderr and "notes0.txt: not an image" in result.stderr


def test_train_summary_names_the_oriented_heads_and_the_regression_averaged_in() -> None:
    from headstart.cli import render as cli_render

    seeds = (HeadCandidate((256,), 0.2, 0.713), HeadCandidate((256,), 0.2, 0.708))
    assert cli_render._averaged_head_line(seeds + (HeadCandidate((), 0.0, 0.74),)) == (
        "2 heads of hidden 256, dropout 0.2 (val loss 0.713, 0.708), their logits averaged, then averaged with a "
        "logistic regression's (val loss 0.740)")
    assert cli_render._averaged_head_line(seeds) == (  # a model saved before the regression
        "2 heads of hidden 256, dropout 0.2 (val loss 0.713, 0.708), their logits averaged")


def test_train_summary_says_a_fine_tuned_model_runs_at_the_photos_size_with_a_refitted_head() -> None:
    from headstart.cli import render as cli_render

    refit = (HeadCandidate((), 0.2, 0.52), HeadCandidate((64,), 0.6, 0.49))
    stage2 = Stage2Report(FinetuneConfig(), History(), 0.83, RefitReport(True, 0.83, 0.49, refit))
    decision = Decision(strategy="finetune", kept="finetune", reason="asked for", native_size=0, native_input=128,
                        head_val_accuracy=0.76, head_candidates=(), stage2=stage2)
    line = cli_render._decision_line(decision, {"finetune_s": 512.0})
    assert line == "finetune: kept finetune (val accuracy head 0.760, fine-tuned, head refitted 0.830; 512 s)"
    assert cli_render._kept_head_candidates(decision) == refit
    not_refitted = dataclasses.replace(stage2, refit=dataclasses.replace(stage2.refit, kept=False))
    assert cli_render._kept_head_candidates(dataclasses.replace(decision, stage2=not_refitted)) is None
    pre = PreprocessConfig(input_size=128, crop_pct=1.0)
    assert cli_render._backbone_line("efficientnet_lite0", pre, 128) == (
        "efficientnet_lite0, 128 px (the photos' own size: they are small)")
    assert cli_render._backbone_line("efficientnet_lite0", PreprocessConfig(), 0) == "efficientnet_lite0, 224 px"


def test_train_defaults_match_constructor_contract(image_folder: Path, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["train", str(image_folder), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    (clf,) = FakeClassifier.created
    assert clf.params == dict(
        backbone="efficientnet_lite0", weights=None, val_split=0.2, test_split=0.0, hidden="auto", dropout=0.2,
        epochs=60, lr=1e-3, weight_decay=0.05, batch_size=64, patience=10, schedule="cosine", balance="auto",
        seed=0, device="auto", strategy="auto", unfreeze="auto", augment="light", finetune_epochs=3, finetune_lr=5e-4,
        views=3, train_bn=False, native_view=True, cv="auto", engine="auto", refit="auto", time_limit=480.0,
        multi_label=False, threshold=None,
    )  # fmt: skip
    assert clf.fit_args == {"checkpoint_dir": tmp_path / "m" / "checkpoint", "resume": False}


def test_train_lists_at_most_50_skipped(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeClassifier, "n_skipped", 60)
    result = runner.invoke(cli.app, ["train", str(image_folder), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert sum(line.startswith("skipped: ") for line in lines) == 50
    last_skipped = max(i for i, line in enumerate(lines) if line.startswith("skipped: "))
    assert lines[last_skipped + 1] == "... and 10 more"


# --------------------------------------------------------------------------- predict


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    good, bad = tmp_path / "a,b.jpg", tmp_path / "notes.txt"  # a comma in a path must survive CSV quoting
    good.write_bytes(b"")
    bad.write_text("hello")
    return [good, bad]


def test_predict_csv_is_parseable_with_error_column(model_dir: Path, images: list[Path]) -> None:
    result = runner.invoke(cli.app, ["predict", str(model_dir), *map(str, images), "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["path", "label", "confidence", "top_k", "error"]
    good, bad = rows
    assert good == {
        "path": str(images[0]), "label": "cat", "confidence": "0.9000", "top_k": "cat:0.9000;dog:0.1000", "error": "",
    }  # fmt: skip
    assert bad["path"] == str(images[1]) and bad["label"] == "" and bad["error"] == "cannot identify image file"


def test_predict_json_parses(model_dir: Path, images: list[Path]) -> None:
    result = runner.invoke(cli.app, ["predict", str(model_dir), *map(str, images), "--format", "json", "--top-k", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0] == {
        "path": str(images[0]), "label": "cat", "confidence": 0.9, "top_k": [{"label": "cat", "confidence": 0.9}],
        "error": None,
    }  # fmt: skip
    assert rows[1]["label"] is None and rows[1]["error"]


def test_predict_table(model_dir: Path, images: list[Path]) -> None:
    result = runner.invoke(cli.app, ["predict", str(model_dir), *map(str, images)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "cat" in result.stdout and "90.0%" in result.stdout and "cannot identify image file" in result.stdout


def test_predict_exits_1_when_every_image_failed(model_dir: Path, images: list[Path]) -> None:
    result = runner.invoke(cli.app, ["predict", str(model_dir), str(images[1]), "--format", "csv"])
    assert result.exit_code == 1
    assert len(list(csv.reader(io.StringIO(result.stdout)))) == 2  # the header and the failed row still print


def test_predict_makes_an_unreadable_file_a_row(model_dir: Path, images: list[Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """click's Path(readable=True) asks os.access, which says yes to root whatever the mode: an unreadable file is
    simulated there. It must reach the classifier (a row with an error), not refuse the whole command."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == images[0] else real_access(p, mode, **kw))
    result = runner.invoke(cli.app, ["predict", str(model_dir), *map(str, images), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert [row["path"] for row in csv.DictReader(io.StringIO(result.stdout))] == [str(p) for p in images]


def test_train_warns_when_resume_has_no_checkpoint(image_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    result = runner.invoke(cli.app, ["train", str(image_folder), "--out", str(tmp_path / "m"), "--resume",
                                     str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "warning: --resume" in result.stderr and "no checkpoint" in result.stderr


@pytest.mark.parametrize("where", ["a file", "under a file", "no such resume"])
def test_train_refuses_an_unusable_out_or_resume_before_fitting(image_folder: Path, tmp_path: Path,
                                                                where: str) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    flags = {"a file": ["--out", str(taken)], "under a file": ["--out", str(taken / "m")],
             "no such resume": ["--out", str(tmp_path / "m"), "--resume", str(tmp_path / "nowhere")]}[where]
    line = _assert_one_error_line(runner.invoke(cli.app, ["train", str(image_folder), *flags]))
    assert "taken" in line or "nowhere" in line
    assert FakeClassifier.created == [] and taken.read_text() == "keep me"


def test_names_that_are_not_utf8_are_written_escaped() -> None:
    name = Path(os.fsdecode(b"/photos/caf\xe9-\xff.jpg"))
    pred = FakePrediction(name, "cat", 0.9, [("cat", 0.9)], None)
    for text in (render_predictions.predictions_csv([pred]), render_predictions.predictions_json([pred])):
        text.encode("utf-8")  # strict
        assert "caf\\xe9-\\xff.jpg" in text.replace("\\\\", "\\")
    assert cli_render.shown("café") == "café" and cli_render.shown("plain") == "plain"


def test_predict_top_k_must_be_positive(model_dir: Path, images: list[Path]) -> None:
    _assert_one_error_line(runner.invoke(cli.app, ["predict", str(model_dir), str(images[0]), "--top-k", "0"]))


# --------------------------------------------------------------------------- evaluate


def test_evaluate_json_is_the_only_stdout(model_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    png = tmp_path / "cm.png"
    result = runner.invoke(
        cli.app, ["evaluate", str(model_dir), str(image_folder), "--format", "json", "--confusion", str(png)]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload == {
        **_evaluation().to_dict(),
        "skipped": [{"path": str(image_folder / "cat" / "broken.jpg"), "reason": "truncated file"}],
    }
    assert png.stat().st_size > 0
    assert f"confusion matrix written to {png}" in result.stderr


def test_evaluate_table(model_dir: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[Path] = []

    def fake_png(confusion: np.ndarray, classes: tuple[str, ...], path: Path, title: str) -> Path:
        written.append(path)
        return path

    monkeypatch.setattr("headstart.evaluate.figures.save_confusion_png", fake_png)
    result = runner.invoke(cli.app, ["evaluate", str(model_dir), str(image_folder)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    for text in ("accuracy", "75.0%", "balanced accuracy", "log loss", "ECE", "precision", "confusion matrix"):
        assert text in result.stdout
    assert written == [model_dir / "confusion.png"]
    assert "skipped: " in result.stderr and "broken.jpg: truncated file" in result.stderr


# --------------------------------------------------------------------------- backbones, logging, progress


def test_backbones_lists_efficientnet_lite0_offline() -> None:
    result = runner.invoke(cli.app, ["backbones"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.stdout.splitlines() if "efficientnet_lite0 " in line]
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells == ["efficientnet_lite0", "tf_efficientnet_lite0", "224px", "3.4", "bundled package", "yes", "default"]


def test_verbose_sets_info_logging() -> None:
    assert runner.invoke(cli.app, ["-v", "backbones"]).exit_code == 0
    assert logging.getLogger().level == logging.INFO
    assert runner.invoke(cli.app, ["backbones"]).exit_code == 0
    assert logging.getLogger().level == logging.WARNING


def test_progress_bars_draw_rate_and_count_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(cli_render, "err_console", lambda: Console(file=buf, force_terminal=True, width=100))
    with ProgressBars() as bars:
        bars.start("extracting features", 10)
        bars.advance(4)
        bars.start("training head", None)  # the previous task was left open: it is closed, not leaked
        bars.advance(2)
        bars.finish()
    text = buf.getvalue()
    assert "extracting features" in text and "training head" in text
    assert "it/s" in text and "4/4" in text and "2/2" in text


def test_progress_bars_are_silent_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with ProgressBars() as bars:
        bars.start("extracting features", 3)
        bars.advance(3)
        bars.finish()
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- one source for settings


@pytest.mark.parametrize("flags, named", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--finetune-lr", "-inf"], "--finetune-lr"),
    (["--unfreeze", "0"], "--unfreeze"), (["--unfreeze", "-1"], "--unfreeze"), (["--unfreeze", "two"], "--unfreeze"),
    (["--hidden", "-4"], "--hidden"), (["--views", "0"], "--views"), (["--val-split", "1.5"], "--val-split"),
    (["--strategy", "Finetune"], "--strategy"), (["--weight-decay", "-0.1"], "--weight-decay"),
])
def test_bad_setting_names_its_flag(image_folder: Path, flags: list[str], named: str) -> None:
    line = _assert_one_error_line(runner.invoke(cli.app, ["train", str(image_folder), *flags]))
    assert named in line
    assert FakeClassifier.created == []


def test_train_help_fits_80_columns_in_panels() -> None:
    from headstart import options

    result = runner.invoke(cli.app, ["train", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    for panel in ("Data", "Head", "Fine-tuning", "Run", "Output"):
        assert any(line.startswith(f"╭─ {panel} ") for line in lines), panel
    # A switch that is on by default shows only its off side (`--no-native-view`): the other said nothing.
    flags = [cli_train.flag_name(n).replace("--", "--no-", 1) if options.OPTIONS[n].default is True
             else cli_train.flag_name(n) for n in options.OPTIONS]
    for flag in flags + ["--out", "--resume", "--no-native-view"]:
        assert any(f" {flag} " in f"{line} " for line in lines), flag  # whole, not cut to '--finetune-epo…'
    # Short help lines: no option's help runs to more than two lines besides its [default: ...].
    helps = [line for line in lines if line.startswith("│") and "[default:" not in line]
    assert len(helps) <= 2 * len(options.OPTIONS) + 10


# --------------------------------------------------------------------------- narrow terminals


def _render(renderable: Any, width: int) -> list[str]:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(renderable, crop=False)
    return buf.getvalue().splitlines()


@pytest.mark.parametrize("width", [200, 80, 60, 40])
def test_backbones_table_never_cuts_a_name(width: int) -> None:
    from headstart.backbones.registry import DEFAULT_BACKBONE, REGISTRY

    specs = list(REGISTRY.values())
    lines = _render(cli_render.backbones_table(specs, [True] * len(specs), DEFAULT_BACKBONE, width), width)
    for spec in specs:
        assert any(f" {spec.name} " in line for line in lines), (spec.name, lines)
    if width >= 60:
        assert all(len(line) <= width for line in lines)
        for spec in specs:  # the timm name is typed too (`--backbone tf_efficientnet_lite0`)
            assert any(f" {spec.timm_name} " in line for line in lines), spec.timm_name
        assert any(DEFAULT_BACKBONE in line and "default" in line for line in lines)  # a column, or the title


def _long_predictions(tmp_path: Path) -> list[FakePrediction]:
    deep = tmp_path / "a" / "rather-long-folder-name" / "holiday-2024"
    return [
        FakePrediction(deep / "IMG_0001-with-a-long-name.jpg", "cat", 0.9, [("cat", 0.9), ("dog", 0.1)], None),
        FakePrediction(Path("short.jpg"), "dog", 0.6, [("dog", 0.6), ("cat", 0.4)], None),
        FakePrediction(deep / "notes.txt", None, None, [], "cannot identify image file"),
    ]


@pytest.mark.parametrize("width", [200, 80, 60])
def test_predictions_table_never_breaks_a_path(tmp_path: Path, width: int) -> None:
    preds = _long_predictions(tmp_path)
    lines = _render(render_predictions.predictions_table(preds, width), width)
    for p in preds:
        assert any(str(p.path) in line for line in lines), (str(p.path), lines)
    words = " ".join(lines).split()  # the error may fold across lines, the path may not
    assert "cat" in words and "90.0%" in words and "cannot" in words and "file" in words


def test_predictions_table_drops_top_k_before_paths(tmp_path: Path) -> None:
    preds = [FakePrediction(Path("photos") / ("x" * 40 + ".jpg"), "cat", 0.9, [("cat", 0.9), ("dog", 0.1)], None)]
    wide, narrow = (_render(render_predictions.predictions_table(preds, w), w) for w in (120, 80))
    assert any("top-k" in line for line in wide) and not any("top-k" in line for line in narrow)
    assert any(str(preds[0].path) in line and "90.0%" in line for line in narrow)  # still one table row
