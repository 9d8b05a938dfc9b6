"""The records of a model's figures on a set of images: single-label metrics, calibration, cross-validation,
test-time augmentation and multi-label scores. The math that fills them is in `evaluate/`; they live here, at
the bottom, because the fit report, the saved model and the report read them. numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from headstart.numeric import softmax

MIN_POSITIVES = 5  # validation positives below which a label's threshold is not tuned (0.5); see evaluate.multilabel
DEFAULT_THRESHOLD = 0.5


# eq=False: the generated __eq__/__hash__ would compare/hash numpy arrays, which raises.
@dataclass(frozen=True, eq=False)
class Evaluation:
    """All metrics for one labelled set. Arrays are indexed by class and are read-only."""

    classes: tuple[str, ...]
    accuracy: float
    balanced_accuracy: float
    log_loss: float
    ece: float
    confusion: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    n: int

    def __post_init__(self) -> None:
        # Frozen only stops attribute rebinding; copy and lock the arrays so the record is
        # genuinely immutable and does not alias (or lock) arrays the caller still owns.
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        dtypes = {
            "confusion": np.int64,
            "precision": np.float64,
            "recall": np.float64,
            "f1": np.float64,
            "support": np.int64,
        }
        for name, dtype in dtypes.items():
            arr = np.array(getattr(self, name), dtype=dtype, copy=True)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        k = len(self.classes)
        if self.confusion.shape != (k, k):
            raise ValueError(f"confusion must be [{k}, {k}] for {k} classes, got {self.confusion.shape}")
        for name in ("precision", "recall", "f1", "support"):
            if getattr(self, name).shape != (k,):
                raise ValueError(f"{name} must have one entry per class ({k}), got shape {getattr(self, name).shape}")

    def to_dict(self) -> dict:
        """Plain-Python (JSON-serialisable) view: built-in floats/ints, lists, per-class dict."""
        per_class = {
            c: {
                "precision": float(self.precision[i]),
                "recall": float(self.recall[i]),
                "f1": float(self.f1[i]),
                "support": int(self.support[i]),
            }
            for i, c in enumerate(self.classes)
        }
        return {
            "classes": list(self.classes),
            "n": int(self.n),
            "accuracy": float(self.accuracy),
            "balanced_accuracy": float(self.balanced_accuracy),
            "log_loss": float(self.log_loss),
            "ece": float(self.ece),
            "per_class": per_class,
            "confusion": self.confusion.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Evaluation":
        """The inverse of `to_dict` (how a saved model's metrics load back)."""
        classes = tuple(d["classes"])
        per = [d["per_class"][c] for c in classes]
        return cls(
            classes=classes, accuracy=float(d["accuracy"]), balanced_accuracy=float(d["balanced_accuracy"]),
            log_loss=float(d["log_loss"]), ece=float(d["ece"]), confusion=np.asarray(d["confusion"], np.int64),
            precision=[p["precision"] for p in per], recall=[p["recall"] for p in per], f1=[p["f1"] for p in per],
            support=[p["support"] for p in per], n=int(d["n"]),
        )


@dataclass(frozen=True)
class Calibration:
    """What temperature scaling did on one measured set. `fitted_on` says where T came from: "validation" (a
    separate set: an honest after-figure), or "cross-fitted" (k folds of the measured set itself, each fold
    scored with a T fitted on the others, so no image is scored by a T it helped fit)."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n: int
    fitted_on: str
    n_bins: int = 15
    refused: float = 0.0  # a fitted temperature not kept (it raised the ECE where it was fitted); 0: none

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(float(d["temperature"]), float(d["ece_before"]), float(d["ece_after"]), float(d["nll_before"]),
                   float(d["nll_after"]), int(d["n"]), str(d["fitted_on"]), int(d.get("n_bins", 15)),
                   float(d.get("refused", 0.0)))


@dataclass(frozen=True, eq=False)
class ReliabilityBins:
    """Per equal-width confidence bin (right-closed, as `expected_calibration_error` bins): how many predictions,
    their mean confidence and their accuracy (0 where a bin is empty)."""

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


@dataclass(frozen=True)
class CrossValidation:
    """k-fold accuracy of the head: each fold's, their mean, and a 95 % interval (see the module's doc)."""

    folds: int
    n: int  # images cross-validated
    fold_accuracies: tuple[float, ...]
    accuracy: float  # pooled out-of-fold accuracy (the folds differ in size by at most one image per class)
    low: float
    high: float

    rows: str = "train"  # what was cross-validated: "train" (compare's folder), or "train+val" (train's)
    groups: int = 0  # groups of two or more near-duplicates (or a manifest's groups) each kept in one fold

    def contains(self, accuracy: float) -> bool:
        return self.low <= accuracy <= self.high

    def to_dict(self) -> dict:
        return {"folds": self.folds, "n": self.n, "fold_accuracies": list(self.fold_accuracies),
                "accuracy": self.accuracy, "low": self.low, "high": self.high, "rows": self.rows,
                **({"groups": self.groups} if self.groups else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "CrossValidation":
        return cls(int(d["folds"]), int(d["n"]), tuple(float(a) for a in d.get("fold_accuracies", [])),
                   float(d["accuracy"]), float(d["low"]), float(d["high"]), str(d.get("rows", "train")),
                   int(d.get("groups", 0)))


@dataclass(frozen=True)
class LabelScores:
    name: str
    precision: float
    recall: float
    f1: float
    ap: float | None  # None: no positive among the images scored
    support: int  # positives among the images scored
    threshold: float


@dataclass(frozen=True)
class MultiLabelEvaluation:
    """A multi-label model's figures on a set of images: what `headstart.json`, the summary and `evaluate` show."""

    n: int
    map: float
    micro_f1: float
    macro_f1: float
    subset_accuracy: float
    hamming_loss: float
    per_label: tuple[LabelScores, ...] = ()

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "per_label"},
                "per_label": [asdict(s) for s in self.per_label]}

    @classmethod
    def from_dict(cls, d: dict) -> "MultiLabelEvaluation":
        per = tuple(LabelScores(str(s["name"]), float(s["precision"]), float(s["recall"]), float(s["f1"]),
                                None if s.get("ap") is None else float(s["ap"]), int(s["support"]),
                                float(s["threshold"])) for s in d.get("per_label") or [])
        return cls(int(d["n"]), float(d["map"]), float(d["micro_f1"]), float(d["macro_f1"]),
                   float(d["subset_accuracy"]), float(d["hamming_loss"]), per)


@dataclass(frozen=True)
class MultiLabelReport:
    """A multi-label run's figures: validation (which chose the thresholds, so it flatters) and test, and the
    labels whose thresholds stayed at 0.5 for want of validation positives."""

    val: MultiLabelEvaluation | None = None
    test: MultiLabelEvaluation | None = None
    untuned: tuple[str, ...] = ()  # labels left at DEFAULT_THRESHOLD
    min_positives: int = MIN_POSITIVES
    threshold_override: float | None = None  # a threshold the user fixed for every label
    images: dict[str, int] = field(default_factory=dict)  # readable images per split

    def to_dict(self) -> dict:
        return {"val": self.val.to_dict() if self.val else None, "test": self.test.to_dict() if self.test else None,
                "untuned": list(self.untuned), "min_positives": self.min_positives,
                "threshold_override": self.threshold_override, "images": dict(self.images)}

    @classmethod
    def from_dict(cls, d: dict) -> "MultiLabelReport":
        over = d.get("threshold_override")
        return cls(MultiLabelEvaluation.from_dict(d["val"]) if d.get("val") else None,
                   MultiLabelEvaluation.from_dict(d["test"]) if d.get("test") else None,
                   tuple(str(n) for n in d.get("untuned") or ()), int(d.get("min_positives", MIN_POSITIVES)),
                   None if over is None else float(over),
                   {str(k): int(v) for k, v in (d.get("images") or {}).items()})


@dataclass(frozen=True, eq=False)
class TTAEvaluation:
    """The same images scored as they are (`plain`) and with their mirror image averaged in (`tta`)."""

    plain: Evaluation
    tta: Evaluation

    @property
    def accuracy_gain(self) -> float:
        return self.tta.accuracy - self.plain.accuracy

    @property
    def log_loss_gain(self) -> float:
        """How much lower the log loss is with TTA (positive: better)."""
        return self.plain.log_loss - self.tta.log_loss


@dataclass(frozen=True, eq=False)
class Scored:
    """The model's logits for every readable image of a labelled folder, with true labels in the model's order."""

    folder: Path
    paths: list[Path]
    labels: np.ndarray
    logits: np.ndarray
    features: np.ndarray
    skipped: list[tuple[Path, str]]
    temperature: float = 1.0  # the model's: `proba` is what it predicts

    @property
    def proba(self) -> np.ndarray:
        return softmax(np.asarray(self.logits, np.float64), self.temperature)

    @property
    def losses(self) -> np.ndarray:
        return -np.log(np.clip(self.proba[np.arange(len(self.labels)), self.labels], 1e-12, 1.0))


@dataclass(frozen=True, eq=False)  # eq=False: arrays
class MultiLabelScored:
    """Per-image results of a multi-label model on a labelled set: paths, 0/1 targets and probabilities."""

    paths: list[Path]
    targets: np.ndarray  # [n, labels]
    proba: np.ndarray  # [n, labels]
