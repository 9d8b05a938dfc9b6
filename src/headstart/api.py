"""`ImageClassifier`: the scikit-learn-style facade. It stores settings, calls the training pipeline, holds what
was fitted, and hands predicting to `serve.predictor`. It holds no numerics and no policy.

torch is imported only by `fit`; a saved model predicts with ONNX Runtime and numpy alone.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Sequence

import numpy as np

from headstart import options
from headstart.errors import DataError
from headstart.evaluate.crossval import CrossValidation
from headstart.evaluate.metrics import Evaluation
from headstart.heads.config import HeadConfig
from headstart.progress import NoProgress, Progress
from headstart.records import Decision, FitReport, History
from headstart.runtime.frozen import FrozenBackbone
from headstart.serve import artifact
from headstart.runtime.device import pick_device
from headstart.serve.onnx_predictor import OnnxPredictor, load_export
from headstart.serve.predictor import Prediction, Predictor
from headstart.train.config import TrainConfig

__all__ = ["ImageClassifier", "Prediction"]

log = logging.getLogger(__name__)
_D = options.DEFAULTS


class ImageClassifier:
    """Transfer learning from a folder of photos: frozen pretrained backbone, cached features, trained head.

    Fitted attributes: `classes_`, `frozen_` (the backbone with its weights), `head_config_`, `head_state_`, and
    `report_` (a `FitReport`: decision, history, counts, metrics...); `decision_`, `history_`, `val_metrics_`,
    `test_metrics_`, `counts_`, `skipped_`, `cached_`, `timings_` and `train_config_` read it. `save` writes all of
    them and `load` restores all of them."""

    def __init__(
        self, backbone: str = _D["backbone"], *, weights: str | Path | None = _D["weights"],
        val_split: float = _D["val_split"], test_split: float = _D["test_split"],
        hidden: Sequence[int] | str = _D["hidden"], dropout: float = _D["dropout"], epochs: int = _D["epochs"],
        lr: float = _D["lr"], weight_decay: float = _D["weight_decay"], batch_size: int = _D["batch_size"],
        patience: int = _D["patience"], schedule: str = _D["schedule"], balance: bool | str = _D["balance"],
        refit: bool = _D["refit"], cv: int | str = _D["cv"],
        seed: int = _D["seed"], device: str = _D["device"], strategy: str = _D["strategy"],
        unfreeze: int | str = _D["unfreeze"], augment: str = _D["augment"],
        finetune_epochs: int = _D["finetune_epochs"], finetune_lr: float = _D["finetune_lr"], views: int = _D["views"],
        time_limit: float = _D["time_limit"], train_bn: bool = _D["train_bn"], native_view: bool = _D["native_view"],
        engine: str = _D["engine"],
    ) -> None:
        # scikit-learn's rule: store the arguments as given; `fit` checks them (`options.check`).
        self.backbone = backbone
        self.weights = weights
        self.val_split = val_split
        self.test_split = test_split
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patience = patience
        self.schedule = schedule
        self.balance = balance
        self.refit = refit
        self.cv = cv
        self.seed = seed
        self.device = device
        self.strategy = strategy
        self.unfreeze = unfreeze
        self.augment = augment
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self.views = views
        self.time_limit = time_limit
        self.train_bn = train_bn
        self.native_view = native_view
        self.engine = engine

    # --- settings ----------------------------------------------------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in options.OPTIONS}

    def set_params(self, **params: Any) -> "ImageClassifier":
        unknown = [k for k in params if k not in options.OPTIONS]
        if unknown:
            raise DataError(f"unknown setting(s) {unknown}; the settings are {', '.join(options.OPTIONS)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    # --- training ----------------------------------------------------------------------------------------------

    def fit(
        self, data: str | Path, progress: Progress | None = None, checkpoint_dir: str | Path | None = None,
        resume: bool = False,
    ) -> "ImageClassifier":
        """Stage 1 trains the head on cached features; with strategy "finetune" (or "auto", when it pays)
        stage 2 adapts the top of the backbone. `checkpoint_dir` gets a checkpoint after every stage-2 epoch;
        `resume` continues from it."""
        settings = options.settings(self.get_params())  # before any work: a bad setting costs nothing
        from headstart.train import pipeline

        if settings.weights is not None:  # a torch file is read with weights_only=True, once, into safetensors
            from headstart.backbones.weights import as_safetensors

            settings = dataclasses.replace(settings, weights=as_safetensors(Path(settings.weights)))

        fitted = pipeline.fit(settings, data, progress or NoProgress(),
                              Path(checkpoint_dir) if checkpoint_dir else None, resume)
        self._set_fitted(list(fitted.classes), fitted.frozen, fitted.head_config, fitted.head_state, fitted.report)
        self.validation_ = fitted.validation  # per-image validation results, for the report `train` writes (not saved)
        return self

    def _set_fitted(self, classes: list[str], frozen: FrozenBackbone, head_config: HeadConfig,
                    head_state: dict[str, np.ndarray], report: FitReport) -> None:
        self.classes_ = classes
        self.frozen_ = frozen
        self.head_config_ = head_config
        self.head_state_ = head_state
        self.report_ = report
        self._export: OnnxPredictor | None = None  # set by `load` when the model directory holds model.onnx

    # The run's record, attribute by attribute (read-only views of `report_`).
    decision_: Decision = property(lambda self: self.report_.decision)  # type: ignore[assignment]
    history_: History = property(lambda self: self.report_.history)  # type: ignore[assignment]
    train_config_: TrainConfig = property(lambda self: self.report_.train_config)  # type: ignore[assignment]
    counts_: dict = property(lambda self: self.report_.counts)  # type: ignore[assignment]
    skipped_: list = property(lambda self: list(self.report_.skipped))  # type: ignore[assignment]
    cached_: int = property(lambda self: self.report_.cached)  # type: ignore[assignment]
    timings_: dict = property(lambda self: self.report_.timings)  # type: ignore[assignment]
    val_metrics_: Evaluation | None = property(lambda self: self.report_.val_metrics)  # type: ignore[assignment]
    test_metrics_: Evaluation | None = property(lambda self: self.report_.test_metrics)  # type: ignore[assignment]
    # The k-fold accuracy of the kept head's settings on train + val, with its 95 % interval; None: not run.
    cv_: CrossValidation | None = property(lambda self: self.report_.cv)  # type: ignore[assignment]

    # --- inference ---------------------------------------------------------------------------------------------

    def _predictor(self) -> Predictor | OnnxPredictor:
        """The exported model.onnx of a loaded model when it is up to date and the model runs on the CPU (no torch,
        no cache needed), else the backbone through the feature engine and the head in numpy."""
        if not hasattr(self, "classes_"):
            raise DataError("this ImageClassifier is not fitted yet: call fit(folder) or ImageClassifier.load(dir)")
        if self._export is not None and pick_device(self.device) == "cpu":
            return self._export
        return Predictor(tuple(self.classes_), self.frozen_, self.head_config_, self.head_state_, self.device)

    def predict_table(
        self, images: Sequence[str | Path] | str | Path, top_k: int = 3, progress: Progress | None = None
    ) -> list[Prediction]:
        """One row per input file, in input order (a folder expands in place, sorted, to its images); a file that
        cannot be read, or an input with no image, is a row with `error` set, where it was given."""
        return self._predictor().predict_table(images, top_k, progress)

    def iter_table(
        self, images: Sequence[str | Path] | str | Path, top_k: int = 3, progress: Progress | None = None
    ) -> Iterator[Prediction]:
        """`predict_table`'s rows, streamed in input order (for folders too large to hold every row)."""
        return self._predictor().iter_table(images, top_k, progress)

    def predict_proba(self, images: Sequence[str | Path] | str | Path) -> np.ndarray:
        """Class probabilities, one row per input file in input order (a folder expands in place, sorted, to its
        images). An input without a result (missing, unreadable, an empty folder) raises a DataError naming it:
        rows never silently shift. `predict_table` reports such inputs as rows instead."""
        return self._predictor().predict_proba(images)

    def predict(self, images: Sequence[str | Path] | str | Path) -> list[str]:
        """Labels, one per input file in input order; the rule of `predict_proba`."""
        return [self.classes_[i] for i in self.predict_proba(images).argmax(1)]

    def evaluate(self, folder: str | Path, progress: Progress | None = None) -> tuple[Evaluation, list]:
        """Metrics on a class-folder set (all its images, whatever split folders it has), and the files skipped."""
        return self._predictor().evaluate(folder, self.seed, progress)

    def evaluate_tta(self, folder: str | Path, progress: Progress | None = None) -> tuple[Any, list]:
        """`evaluate` with test-time augmentation: an `evaluate.tta.TTAEvaluation` (the metrics without and with
        each image's mirror image averaged in), and the files skipped."""
        return self._predictor().evaluate_tta(folder, self.seed, progress)

    def score(self, folder: str | Path) -> float:
        """Accuracy on a class-folder set, as scikit-learn's `score`."""
        return self.evaluate(folder)[0].accuracy

    # --- persistence -------------------------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """Write the model directory; under torchrun rank 0 alone writes it (every rank holds the same model)."""
        self._predictor()  # fitted, or a clear refusal
        from headstart.runtime import distributed

        if not distributed.current().is_main:
            return Path(out_dir)
        from safetensors.numpy import load_file

        prefix = self.frozen_.weights_prefix
        backbone = {k[len(prefix):]: v for k, v in load_file(str(self.frozen_.weights)).items()
                    if k.startswith(prefix) and not k[len(prefix):].startswith("classifier.")}
        # The engine that computed the head's features ("int8", "fp32"), not "auto": a fine-tuned backbone is float32.
        params = {**_jsonable_params(self.get_params()), "engine": self.frozen_.engine_name}
        record = artifact.ModelRecord(tuple(self.classes_), self.frozen_.spec, self.frozen_.weights_id,
                                      self.head_config_, params, self.report_)
        return artifact.save(artifact.Artifact(record, self.head_state_, backbone), out_dir)

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto") -> "ImageClassifier":
        art = artifact.load(model_dir)
        record = art.record
        clf = cls(**{**{k: v for k, v in record.params.items() if k in options.OPTIONS}, "device": device})
        frozen = FrozenBackbone(record.backbone, art.weights_path, record.backbone_weights_id,
                                weights_prefix="backbone.")
        # The engine it was trained with (models saved before engines were a setting: float32); int8 finds its
        # calibration in the cache, or predicts in float32 where that cache does not hold it.
        frozen = frozen.with_engine(str(record.params.get("engine", "fp32")))
        report = record.fit or FitReport(Decision(), History(), TrainConfig(), {})
        clf._set_fitted(list(record.classes), frozen, record.head, art.head_state, report)
        clf._export = load_export(model_dir)
        return clf


def _jsonable_params(params: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON holds them: paths as strings, widths as lists."""
    out = dict(params)
    if out.get("weights") is not None:
        out["weights"] = str(out["weights"])
    if not isinstance(out.get("hidden"), str):
        out["hidden"] = list(out["hidden"])
    return out
