"""What a tracker logs of a run, as one record made from the saved model's `FitReport` and settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headstart.records import FitReport, History

# Files of a model directory a tracker keeps beside the numbers, when the run wrote them.
ARTIFACTS = ("confusion_val.png", "report.html", "headstart.json")


@dataclass(frozen=True)
class EpochRow:
    """One epoch of one stage: stage 1 trains the head, stage 2 fine-tunes. A value the loop did not record is None."""

    stage: int
    epoch: int  # from 1
    train_loss: float | None
    val_loss: float | None
    val_accuracy: float | None

    def metrics(self) -> dict[str, float]:
        values = {"train_loss": self.train_loss, "val_loss": self.val_loss, "val_accuracy": self.val_accuracy}
        return {f"stage{self.stage}/{k}": v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class RunLog:
    """A finished run as trackers log it: its name (the model folder's), where it was saved and what it learnt
    from, its settings, every epoch, the decision, the final metrics and the files to keep as artifacts."""

    name: str
    model_dir: Path
    data: str
    params: dict[str, str]
    epochs: tuple[EpochRow, ...]
    decision: dict[str, str]
    metrics: dict[str, float]
    artifacts: tuple[Path, ...]


def run_log(report: FitReport, params: dict[str, Any], model_dir: str | Path, data: str | Path) -> RunLog:
    """The RunLog of a run saved in `model_dir` with these settings (`ImageClassifier.get_params()`)."""
    model_dir = Path(model_dir)
    epochs = _epochs(1, report.history)
    stage2 = report.decision.stage2
    if stage2 is not None:
        epochs += _epochs(2, stage2.history)
    return RunLog(
        name=model_dir.resolve().name, model_dir=model_dir, data=str(data),
        params={k: _text(v) for k, v in params.items()}, epochs=tuple(epochs), decision=_decision(report),
        metrics=_final_metrics(report),
        artifacts=tuple(model_dir / name for name in ARTIFACTS if (model_dir / name).is_file()))


def _epochs(stage: int, history: History) -> list[EpochRow]:
    n = max(len(history.train_loss), len(history.val_loss), len(history.val_accuracy))

    def at(values: list[float], i: int) -> float | None:
        return float(values[i]) if i < len(values) else None

    return [EpochRow(stage, i + 1, at(history.train_loss, i), at(history.val_loss, i), at(history.val_accuracy, i))
            for i in range(n)]


def _decision(report: FitReport) -> dict[str, str]:
    d = report.decision
    out = {"strategy": d.strategy, "kept": d.kept, "reason": d.reason,
           "stage1_best_epoch": str(report.history.best_epoch + 1),
           "stage1_stopped_early": str(report.history.stopped_early)}
    if d.head_candidates:
        out["head_candidates"] = "; ".join(f"hidden {list(c.hidden)} val_loss {c.val_loss:.4f}"
                                           for c in d.head_candidates)
    if d.stage2 is not None:
        out["stage2_best_epoch"] = str(d.stage2.history.best_epoch + 1)
    if d.native_size:
        out["native_view"] = f"{d.native_size} px"
    return {k: v for k, v in out.items() if v != ""}


def _final_metrics(report: FitReport) -> dict[str, float]:
    out: dict[str, float] = {}
    for split, ev in (("val", report.val_metrics), ("test", report.test_metrics)):
        if ev is not None:
            out.update({f"{split}/accuracy": ev.accuracy, f"{split}/balanced_accuracy": ev.balanced_accuracy,
                        f"{split}/log_loss": ev.log_loss, f"{split}/ece": ev.ece})
    if report.decision.head_val_accuracy is not None:
        out["decision/head_val_accuracy"] = report.decision.head_val_accuracy
    if report.decision.stage2 is not None:
        out["decision/finetune_val_accuracy"] = report.decision.stage2.val_accuracy
    if report.cv is not None:
        out.update({"cv/accuracy": report.cv.accuracy, "cv/low": report.cv.low, "cv/high": report.cv.high})
    if report.calibration is not None:
        out.update({"calibration/temperature": report.calibration.temperature,
                    "calibration/val_ece_before": report.calibration.ece_before,
                    "calibration/val_ece_after": report.calibration.ece_after})
    out.update({f"time/{k}": float(v) for k, v in report.timings.items()})
    return {k: float(v) for k, v in out.items()}


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "''"
    return str(value)
