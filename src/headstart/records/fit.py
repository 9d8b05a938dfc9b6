"""What a training run found and decided, as typed records: the pipeline returns a `FitReport`, the CLI renders it,
`headstart.json` stores it (`to_dict`) and loading gives it back whole (`from_dict`). torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from headstart.records.configs import FinetuneConfig, TrainConfig
from headstart.records.scores import Calibration, CrossValidation, Evaluation, MultiLabelReport, TTAEvaluation


@dataclass
class History:
    """Per-epoch losses of one training loop (mutable: the loop appends to it)."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls([float(v) for v in d.get("train_loss", [])], [float(v) for v in d.get("val_loss", [])],
                   [float(v) for v in d.get("val_accuracy", [])], int(d.get("best_epoch", -1)),
                   bool(d.get("stopped_early", False)))


@dataclass(frozen=True)
class EvaluationResult:
    """A model scored on a labelled set (`ImageClassifier.evaluate`): its metrics, and the files skipped with why.
    From `evaluate_tta`, `metrics` are those with test-time augmentation and `tta` (an `evaluate.tta.TTAEvaluation`)
    holds both sides."""

    metrics: Evaluation
    skipped: tuple[tuple[Path, str], ...] = ()
    tta: TTAEvaluation | None = None


@dataclass(frozen=True)
class DataSource:
    """Where a run's images came from: a folder of class folders, or a manifest file (its rows and the sha256 of
    its bytes, so a changed manifest is told from the one the model was trained on)."""

    kind: str  # "folder" | "manifest" | "files" (paths and labels given as lists: `ImageClassifier.fit(X, y)`)
    path: str
    rows: int = 0
    sha256: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataSource":
        return cls(str(d.get("kind", "")), str(d.get("path", "")), int(d.get("rows", 0)), str(d.get("sha256", "")))


@dataclass(frozen=True)
class DistributedRun:
    """How many processes trained the model together (torchrun's WORLD_SIZE) and the backend they talked over
    ("gloo", "nccl"; "" for one process). headstart.json keeps it at the top level as "distributed"."""

    world_size: int = 1
    backend: str = ""

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend or None}

    @classmethod
    def from_dict(cls, d: dict) -> "DistributedRun":
        return cls(int(d.get("world_size") or 1), str(d.get("backend") or ""))


@dataclass(frozen=True)
class HeadCandidate:
    """One head that was fitted to choose from, and its best validation loss."""

    hidden: tuple[int, ...]
    dropout: float
    val_loss: float

    def to_dict(self) -> dict:
        return {"hidden": list(self.hidden), "dropout": self.dropout, "val_loss": self.val_loss}

    @classmethod
    def from_dict(cls, d: dict) -> "HeadCandidate":
        return cls(tuple(int(h) for h in d["hidden"]), float(d["dropout"]), float(d["val_loss"]))


@dataclass(frozen=True)
class RefitReport:
    """The head refitted on the fine-tuned backbone's features, and whether it replaced stage 2's own head."""

    kept: bool
    val_accuracy: float
    val_log_loss: float
    candidates: tuple[HeadCandidate, ...] = ()

    def to_dict(self) -> dict:
        return {"kept": self.kept, "val_accuracy": self.val_accuracy, "val_log_loss": self.val_log_loss,
                "candidates": [c.to_dict() for c in self.candidates]}

    @classmethod
    def from_dict(cls, d: dict) -> "RefitReport":
        return cls(bool(d["kept"]), float(d["val_accuracy"]), float(d["val_log_loss"]),
                   tuple(HeadCandidate.from_dict(c) for c in d.get("candidates", [])))


@dataclass(frozen=True)
class Stage2Report:
    """A fine-tuning run: its settings, its epochs, the validation accuracy of what it produced, and the refit."""

    config: FinetuneConfig
    history: History
    val_accuracy: float
    refit: RefitReport | None = None
    # The kept model's validation accuracy with each photo's mirror image averaged in (None: not tried), and
    # whether the saved model predicts so (`train.stage2.mirrored_features`); `val_accuracy` is the upright one.
    mirrored_accuracy: float | None = None
    mirrored: bool = False

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "history": self.history.to_dict(), "val_accuracy": self.val_accuracy,
                "refit": self.refit.to_dict() if self.refit else None, "mirrored_accuracy": self.mirrored_accuracy,
                "mirrored": self.mirrored}

    @classmethod
    def from_dict(cls, d: dict) -> "Stage2Report":
        mirrored = d.get("mirrored_accuracy")  # models saved before the mirror was tried have neither
        return cls(FinetuneConfig.from_dict(d["config"]), History.from_dict(d["history"]), float(d["val_accuracy"]),
                   RefitReport.from_dict(d["refit"]) if d.get("refit") else None,
                   None if mirrored is None else float(mirrored), bool(d.get("mirrored", False)))


@dataclass(frozen=True)
class Decision:
    """What the run chose and why: the strategy asked for, the model kept ("head" or "finetune"), the photos'
    sizes it adapted to (`native_size`: a second view; `native_input`: the input itself), the head candidates."""

    strategy: str = "head"
    kept: str = "head"
    reason: str = ""
    native_size: int = 0
    native_input: int = 0
    head_val_accuracy: float | None = None
    head_candidates: tuple[HeadCandidate, ...] = ()
    stage2: Stage2Report | None = None
    refitted: int = 0  # images (train + val) the shipped head was refitted on after validation chose it; 0: not
    balanced: bool = False  # the loss weighted by inverse class frequency (`--balance`, or auto on skewed classes)
    plan: str = ""  # what deep fine-tuning chose (view, stages, epochs in the time limit, augmentation) and why
    groups: str = ""  # the near-duplicate groups kept on one side of the split (`data.groups.describe`); "": none
    moved: tuple[tuple[str, str], ...] = ()  # (photo, its split) for each photo the groups moved, to carve it again

    @property
    def kept_head_candidates(self) -> tuple[HeadCandidate, ...]:
        """The heads the kept one was chosen among: stage 1's, or the refit's after fine-tuning."""
        if self.kept == "finetune" and self.stage2 and self.stage2.refit and self.stage2.refit.kept:
            return self.stage2.refit.candidates
        return self.head_candidates

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "kept": self.kept, "reason": self.reason, "native_size": self.native_size,
                "native_input": self.native_input, "head_val_accuracy": self.head_val_accuracy,
                "head_candidates": [c.to_dict() for c in self.head_candidates],
                "stage2": self.stage2.to_dict() if self.stage2 else None, "refitted": self.refitted,
                "balanced": self.balanced, "plan": self.plan, "groups": self.groups,
                "moved": [list(m) for m in self.moved]}

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        acc = d.get("head_val_accuracy")
        return cls(str(d.get("strategy", "head")), str(d.get("kept", "head")), str(d.get("reason", "")),
                   int(d.get("native_size", 0)), int(d.get("native_input", 0)), None if acc is None else float(acc),
                   tuple(HeadCandidate.from_dict(c) for c in d.get("head_candidates", [])),
                   Stage2Report.from_dict(d["stage2"]) if d.get("stage2") else None, int(d.get("refitted", 0)),
                   bool(d.get("balanced", False)), str(d.get("plan", "")),
                   str(d.get("groups", "")),
                   tuple((str(p), str(sp)) for p, sp in d.get("moved", [])))  # the last four absent from older models


@dataclass(frozen=True)
class FitReport:
    """Everything `fit` learnt besides the weights: what `headstart.json` stores under "fit"."""

    decision: Decision
    history: History
    train_config: TrainConfig
    counts: dict[str, dict[str, int]]  # readable images per split and class
    skipped: tuple[tuple[Path, str], ...] = ()  # files not used, and why
    cached: int = 0  # images whose features came from the cache
    timings: dict[str, float] = field(default_factory=dict)
    val_metrics: Evaluation | None = None
    test_metrics: Evaluation | None = None
    source: DataSource | None = None  # where the images came from (None: saved before this was recorded)
    calibration: Calibration | None = None  # the stored temperature's fit on validation; None: T = 1, none fitted
    distributed: DistributedRun = field(default_factory=DistributedRun)  # stored beside "fit" (serve.artifact)
    cv: CrossValidation | None = None  # k-fold accuracy of the kept head's settings on train + val; None: not run
    cv_skipped: str = ""  # why no k-fold accuracy was computed, when it was not ("" also: not a head, or older)
    multilabel: MultiLabelReport | None = None  # a multi-label model's figures (its val/test_metrics are None)

    def to_dict(self) -> dict:
        metrics = {name: m.to_dict() for name, m in (("val", self.val_metrics), ("test", self.test_metrics)) if m}
        return {"decision": self.decision.to_dict(), "history": self.history.to_dict(),
                "train_config": self.train_config.to_dict(), "counts": self.counts,
                "skipped": [[str(p), reason] for p, reason in self.skipped], "cached": self.cached,
                "timings": dict(self.timings), "metrics": metrics,
                **({"source": self.source.to_dict()} if self.source else {}),
                "calibration": self.calibration.to_dict() if self.calibration else None,
                **({"cv": self.cv.to_dict()} if self.cv else {}),
                **({"cv_skipped": self.cv_skipped} if self.cv_skipped else {}),
                **({"multilabel": self.multilabel.to_dict()} if self.multilabel else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "FitReport":
        metrics = d.get("metrics") or {}
        return cls(
            decision=Decision.from_dict(d.get("decision") or {}), history=History.from_dict(d.get("history") or {}),
            train_config=TrainConfig.from_dict(d.get("train_config") or {}),
            counts={s: {c: int(n) for c, n in per.items()} for s, per in (d.get("counts") or {}).items()},
            skipped=tuple((Path(p), str(r)) for p, r in d.get("skipped") or []), cached=int(d.get("cached", 0)),
            timings={k: float(v) for k, v in (d.get("timings") or {}).items()},
            val_metrics=Evaluation.from_dict(metrics["val"]) if "val" in metrics else None,
            test_metrics=Evaluation.from_dict(metrics["test"]) if "test" in metrics else None,
            source=DataSource.from_dict(d["source"]) if d.get("source") else None,
            calibration=Calibration.from_dict(d["calibration"]) if d.get("calibration") else None,
            cv=CrossValidation.from_dict(d["cv"]) if d.get("cv") else None, cv_skipped=str(d.get("cv_skipped", "")),
            multilabel=MultiLabelReport.from_dict(d["multilabel"]) if d.get("multilabel") else None,
        )

    @classmethod
    def from_v1(cls, meta: dict[str, Any]) -> "FitReport":
        """A format-1 `headstart.json`, whose run record lay at the top level with the decision as a flat dict."""
        old = meta.get("decision") or {}
        stage2 = None
        if "finetune_config" in old:
            refit = old.get("refit")
            stage2 = {"config": old["finetune_config"], "history": old.get("finetune_history") or {},
                      "val_accuracy": old.get("finetune_val_accuracy", 0.0), "refit": refit}
        decision = {**old, "stage2": stage2}
        return cls.from_dict({"decision": decision, "history": meta.get("history"), "train_config": meta.get("train"),
                              "counts": meta.get("counts"), "skipped": meta.get("skipped"),
                              "metrics": meta.get("metrics")})
