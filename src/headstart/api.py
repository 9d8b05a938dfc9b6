"""`ImageClassifier`: the scikit-learn-style facade. It stores settings, calls the training pipeline, holds what
was fitted, and hands predicting to `serve.predictor`. It holds no numerics and no policy.

torch is imported only by `fit`; a saved model predicts with ONNX Runtime and numpy alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from headstart import options
from headstart.errors import DataError
from headstart.heads.config import HeadConfig
from headstart.progress import NoProgress, Progress
from headstart.records import CrossValidation, Decision, Evaluation, EvaluationResult, FitReport, History, TrainConfig
from headstart.runtime.device import pick_device
from headstart.runtime.frozen import FrozenBackbone
from headstart.serve import artifact
from headstart.serve.onnx_predictor import OnnxPredictor, load_export
from headstart.serve.multilabel import LabelledRow
from headstart.serve.predictor import Images, Prediction, Predictor
from headstart.settings import settings as checked_settings

__all__ = ["EvaluationResult", "ImageClassifier", "Prediction", "labelled_files"]

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
        refit: bool | str = _D["refit"], cv: int | str = _D["cv"],
        seed: int = _D["seed"], device: str = _D["device"], strategy: str = _D["strategy"],
        unfreeze: int | str = _D["unfreeze"], augment: str = _D["augment"],
        finetune_epochs: int = _D["finetune_epochs"], finetune_lr: float = _D["finetune_lr"], views: int = _D["views"],
        time_limit: float = _D["time_limit"], train_bn: bool = _D["train_bn"], native_view: bool = _D["native_view"],
        engine: str = _D["engine"],
        multi_label: bool = _D["multi_label"], threshold: float | None = _D["threshold"],
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
        self.multi_label = multi_label
        self.threshold = threshold

    # --- settings ----------------------------------------------------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in options.OPTIONS}

    def __repr__(self) -> str:
        # scikit-learn's print_changed_only: the settings that differ from their defaults, in option order.
        changed = [f"{name}={value!r}" for name, value in self.get_params().items()
                   if not _same(value, _D[name])]
        return f"{type(self).__name__}({', '.join(changed)})"

    # scikit-learn's estimator protocol, without importing scikit-learn (1.4 s on these CPUs) for every command:
    # `is_classifier` reads the tags (scikit-learn >= 1.6) or `_estimator_type` (before), `check_is_fitted`
    # asks `__sklearn_is_fitted__`. The tags are built only when scikit-learn, already imported, asks for them.
    _estimator_type = "classifier"

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        # X is a list of image paths (or a folder, or a manifest), never a numeric 2-D array; y holds labels.
        return Tags(estimator_type="classifier", target_tags=TargetTags(required=False),
                    classifier_tags=ClassifierTags(), input_tags=InputTags(two_d_array=False, string=True),
                    non_deterministic=False)

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "classes_")

    def set_params(self, **params: Any) -> "ImageClassifier":
        unknown = [k for k in params if k not in options.OPTIONS]
        if unknown:
            raise DataError(f"unknown setting(s) {unknown}; the settings are {', '.join(options.OPTIONS)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    # --- training ----------------------------------------------------------------------------------------------

    def fit(
        self, data: str | Path | Sequence[str | Path], y: Sequence[Any] | None = None,
        progress: Progress | None = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
    ) -> "ImageClassifier":
        """Train on `data`: a class-folder set or a manifest file, or (scikit-learn's X, y) a list of image paths
        and `y`, their labels, which is what `GridSearchCV` hands each fold. Stage 1 trains the head on cached
        features; with strategy "finetune" (or "auto", when it pays) stage 2 adapts the top of the backbone.
        `checkpoint_dir` gets a checkpoint after every stage-2 epoch; `resume` continues from it."""
        settings = checked_settings(self.get_params())  # before any work: a bad setting costs nothing
        multi_label = _multi_label(settings.multi_label, data)  # label lists in a manifest, or asked for
        from headstart.train import pipeline

        if y is not None:
            from headstart.data.manifest import scan_pairs

            if isinstance(data, (str, os.PathLike)):
                raise DataError(f"y is given, so X must be a list of image paths, not {str(data)!r}; give a folder "
                                "or a manifest without y")
            data = scan_pairs(list(data), list(y), settings.val_split, settings.test_split, settings.seed)
        elif not isinstance(data, (str, os.PathLike)):
            raise DataError("a list of images needs its labels: fit(paths, labels), or fit(folder_or_manifest)")

        if settings.weights is not None:  # a torch file is read with weights_only=True, once, into safetensors
            from headstart.backbones.weights import as_safetensors

            settings = dataclasses.replace(settings, weights=as_safetensors(Path(settings.weights)))

        if multi_label:
            from headstart.train.multilabel import fit_multilabel

            fitted = fit_multilabel(settings, data, progress or NoProgress())
        else:
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
    # Multi-label models: sigmoid outputs, each label on at or above its threshold (`threshold` overrides them all).
    multi_label_: bool = property(lambda self: self.head_config_.multi_label)  # type: ignore[assignment]
    thresholds_: tuple = property(lambda self: self.head_config_.thresholds)  # type: ignore[assignment]
    multilabel_metrics_ = property(lambda self: self.report_.multilabel)  # evaluate.multilabel.MultiLabelReport

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

    def predict_proba(self, images: Images) -> np.ndarray:
        """Class probabilities, one row per input in input order: image files, folders (expanded in place, sorted,
        to their images), and images already decoded (PIL images, uint8 H x W x 3 arrays, a 4-D array of them),
        which go through the same colour conversion, resize and crop as files (a JPEG file is decoded at a
        reduced scale first, an image in memory is not, so their probabilities can differ slightly). An input
        without a result (missing, unreadable, an empty folder) raises a DataError naming it: rows never
        silently shift. `predict_table` reports such files as rows instead."""
        return self._predictor().predict_proba(images)

    def predict(self, images: Images) -> list[str] | list[list[str]]:
        """Labels, one per input in input order; the inputs and rule of `predict_proba`. A multi-label model gives
        each input the list of its labels at or above their thresholds (possibly empty)."""
        proba = self.predict_proba(images)
        if self.multi_label_:
            from headstart.serve.multilabel import label_lists

            return label_lists(proba, self.decision_thresholds(), self.classes_)
        return [self.classes_[i] for i in proba.argmax(1)]

    def iter_labelled(self, images: Sequence[str | Path] | str | Path, progress: Progress | None = None
                      ) -> Iterator[LabelledRow]:
        """A multi-label model's rows (`serve.multilabel.LabelledRow`: the labels on, every label's probability
        and threshold, or an error), streamed in input order as `iter_table`'s."""
        from headstart.serve.multilabel import labelled_rows

        rows = self.iter_table(images, top_k=len(self.classes_), progress=progress)
        return labelled_rows(rows, self.classes_, self.decision_thresholds())

    def decision_thresholds(self) -> tuple[float, ...]:
        """A multi-label model's thresholds as applied: its stored ones, or `threshold` for every label."""
        from headstart.serve.multilabel import thresholds_for

        return thresholds_for(self.thresholds_, self.threshold)

    def evaluate(self, folder: str | Path, progress: Progress | None = None) -> EvaluationResult:
        """Metrics on a class-folder set or manifest (all its images, whatever split folders it has), and the
        files skipped. A multi-label model is evaluated on a manifest: its metrics are a `MultiLabelEvaluation`
        (mAP, F1s, per-label figures)."""
        if hasattr(self, "classes_") and self.multi_label_:
            from headstart.serve.multilabel import evaluate_manifest

            metrics, skipped = evaluate_manifest(self._predictor(), folder, self.decision_thresholds(), progress)
            return EvaluationResult(metrics, tuple(skipped))
        metrics, skipped = self._predictor().evaluate(folder, self.seed, progress)
        return EvaluationResult(metrics, tuple(skipped))

    def evaluate_tta(self, folder: str | Path, progress: Progress | None = None) -> EvaluationResult:
        """`evaluate` with test-time augmentation: `metrics` with each image's mirror image averaged in, `tta` the
        `evaluate.tta.TTAEvaluation` holding both sides, and the files skipped. Not for multi-label models yet."""
        if hasattr(self, "classes_") and self.multi_label_:
            raise DataError("test-time augmentation is not available for multi-label models yet; use evaluate")
        both, skipped = self._predictor().evaluate_tta(folder, self.seed, progress)
        return EvaluationResult(both.tta, tuple(skipped), both)

    def score(self, X: str | Path | Images, y: Sequence[Any] | None = None) -> float:  # noqa: N803  sklearn's names
        """Accuracy, as scikit-learn's `score`: on a class-folder set or manifest `X`, or (with `y`) of the
        predictions for the images `X` against the labels `y`. A multi-label model: the mAP on a manifest."""
        if y is None:
            metrics = self.evaluate(X).metrics  # type: ignore[arg-type]
            return metrics.map if self.multi_label_ else metrics.accuracy
        if self.multi_label_:
            raise DataError("score(X, y) scores single-label predictions; score a multi-label model on a manifest: "
                            "score('tags.csv')")
        predicted = self.predict(X)
        if len(predicted) != len(y):
            raise DataError(f"{len(predicted)} images but {len(y)} labels: give one label per image")
        return float(np.mean([p == str(t) for p, t in zip(predicted, y)]))

    # --- persistence -------------------------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """Write the model directory; under torchrun rank 0 alone writes it (every rank holds the same model)."""
        self._predictor()  # fitted, or a clear refusal
        from headstart.runtime import distributed

        if not distributed.current().is_main:
            return Path(out_dir)
        companion = self.frozen_.companion
        # The engine that computed the head's features ("int8", "fp32"), not "auto": a fine-tuned backbone is float32.
        params = {**_jsonable_params(self.get_params()), "engine": self.frozen_.engine_name}
        record = artifact.ModelRecord(tuple(self.classes_), self.frozen_.spec, self.frozen_.weights_id,
                                      self.head_config_, params, self.report_,
                                      companion=companion.spec if companion else None,
                                      companion_weights_id=companion.weights_id if companion else "")
        backbone, *beside = _backbone_tensors(self.frozen_, *([companion] if companion else []))
        return artifact.save(artifact.Artifact(record, self.head_state_, backbone,
                                               companion_state=beside[0] if beside else None), out_dir)

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto") -> "ImageClassifier":
        art = artifact.load(model_dir)
        record = art.record
        clf = cls(**{**{k: v for k, v in record.params.items() if k in options.OPTIONS}, "device": device})
        frozen = FrozenBackbone(record.backbone, art.weights_path, record.backbone_weights_id,
                                weights_prefix="backbone.")
        if record.companion is not None:
            companion = FrozenBackbone(record.companion, art.weights_path, record.companion_weights_id,
                                       weights_prefix="companion.")
            frozen = dataclasses.replace(frozen, companion=companion)
        # The engine it was trained with (models saved before engines were a setting: float32); int8 finds its
        # calibration in the cache, or predicts in float32 where that cache does not hold it.
        frozen = frozen.with_engine(str(record.params.get("engine", "fp32")), device=device)
        report = record.fit or FitReport(Decision(), History(), TrainConfig(), {})
        clf._set_fitted(list(record.classes), frozen, record.head, art.head_state, report)
        clf._export = load_export(model_dir)
        return clf


def _backbone_tensors(*backbones: FrozenBackbone) -> list[dict[str, np.ndarray]]:
    """Each backbone's own tensors as a saved model stores them: without the ImageNet classifier. A file two of
    them share (a loaded model's backbone and companion) is read once."""
    from safetensors.numpy import load_file

    files: dict[Path, dict[str, np.ndarray]] = {}
    out = []
    for frozen in backbones:
        if frozen.weights not in files:
            files[frozen.weights] = load_file(str(frozen.weights))
        prefix = frozen.weights_prefix
        out.append({k[len(prefix):]: v for k, v in files[frozen.weights].items()
                    if k.startswith(prefix) and not k[len(prefix):].startswith("classifier.")})
    return out


def labelled_files(data: str | Path) -> tuple[list[Path], list[str]]:
    """Every image of a class-folder set or manifest (all its splits) and its label: the X and y that
    `GridSearchCV(ImageClassifier(...), grid).fit(X, y)` splits into folds."""
    from headstart.data.scan import scan_folder

    dataset = scan_folder(data, val_split=0.0)
    return [s.path for s in dataset.samples], [dataset.classes[s.label] for s in dataset.samples]


def _same(value: Any, default: Any) -> bool:
    """Whether a setting is at its default, a list of widths equal to the same tuple."""
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    return type(value) is type(default) and value == default


def _multi_label(asked: bool, data: str | Path | Sequence[str | Path]) -> bool:
    """Whether a run is multi-label: asked for, or a manifest whose rows carry label lists. Only manifests carry
    label lists: asking for multi-label on a folder is one line."""
    from headstart.data.manifest import is_manifest
    from headstart.data.multilabel import is_multilabel_manifest

    if not isinstance(data, (str, Path)):  # scikit-learn's X, a list of paths with their labels in y
        if asked:
            raise DataError("multi-label training reads a manifest of path,labels rows, not fit(X, y); "
                            "give fit('tags.csv')")
        return False
    if is_manifest(data):
        return asked or is_multilabel_manifest(data)
    if asked:
        raise DataError(f"{data}: multi-label training reads a manifest of path,labels rows (labels separated by "
                        "';'), not a folder — give --manifest tags.csv")
    return False


def _jsonable_params(params: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON holds them: paths as strings, widths as lists."""
    out = dict(params)
    if out.get("weights") is not None:
        out["weights"] = str(out["weights"])
    if not isinstance(out.get("hidden"), str):
        out["hidden"] = list(out["hidden"])
    return out
