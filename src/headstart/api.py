"""`ImageClassifier`: the scikit-learn-style facade. It composes the modules below it and holds no numerics.

torch is imported only by `fit`; a saved model predicts with ONNX Runtime and numpy alone.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from headstart.serve import artifact
from headstart.backbones.registry import DEFAULT_BACKBONE, BackboneSpec, resolve
from headstart.data.scan import SPLITS, Dataset, list_images, scan_folder, split_rows, typical_short_side
from headstart.errors import DataError
from headstart.runtime.device import pick_device
from headstart.cache.features import FeatureCache
from headstart.runtime.frozen import FrozenBackbone
from headstart.cache.pipeline import extract
from headstart.heads.config import HeadConfig, head_proba
from headstart.train.config import TrainConfig
from headstart.evaluate.metrics import Evaluation, evaluate
from headstart.vision.preprocess import for_small_photos
from headstart.progress import NoProgress, Progress

log = logging.getLogger(__name__)
HEAD_BATCH_ROWS = 512  # images gathered before the head runs while predicting


@dataclass
class Prediction:
    path: Path
    label: str | None
    confidence: float | None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


class ImageClassifier:
    """Transfer learning from a folder of photos: frozen pretrained backbone, cached features, trained head."""

    def __init__(
        self, backbone: str = DEFAULT_BACKBONE, *, weights: str | Path | None = None, val_split: float = 0.2,
        test_split: float = 0.0, hidden: Sequence[int] | str = "auto", dropout: float = 0.2, epochs: int = 60,
        lr: float = 1e-3, weight_decay: float = 0.05, batch_size: int = 64, patience: int = 10,
        schedule: str = "cosine", balance: bool = False, seed: int = 0, device: str = "auto",
        strategy: str = "head", unfreeze: int | str = "auto", augment: str = "light", finetune_epochs: int = 8,
        finetune_lr: float = 5e-4, views: int = 8, train_bn: bool = False, native_view: bool = True,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.val_split = val_split
        self.test_split = test_split
        self.hidden = hidden if isinstance(hidden, str) else tuple(hidden)
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patience = patience
        self.schedule = schedule
        self.balance = balance
        self.seed = seed
        self.device = device
        self.strategy = strategy
        self.unfreeze = unfreeze
        self.augment = augment
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self.views = views
        self.train_bn = train_bn
        self.native_view = native_view

    # --- training ----------------------------------------------------------------------------------------------

    def fit(
        self, data: str | Path, progress: Progress | None = None, checkpoint_dir: str | Path | None = None,
        resume: bool = False,
    ) -> "ImageClassifier":
        """Stage 1 trains the head on cached features; with strategy "finetune" (or "auto", when it pays)
        stage 2 adapts the top of the backbone. `checkpoint_dir` gets a checkpoint after every stage-2 epoch;
        `resume` continues from it."""
        self._check_settings()
        # torch takes ~3 s to import; training needs it only once the features are ready, so it loads meanwhile.
        torch_loading = threading.Thread(target=importlib.import_module, args=("headstart.train",), daemon=True)
        torch_loading.start()

        progress = progress or NoProgress()
        t0 = time.perf_counter()
        dataset = scan_folder(data, val_split=self.val_split, test_split=self.test_split, seed=self.seed)
        standard = resolve(self.backbone)
        spec = self._sized_for_photos(standard, dataset)
        frozen = FrozenBackbone.pretrained(spec, Path(self.weights) if self.weights else None)
        t1 = time.perf_counter()
        paths, feats, labels, splits, failures, cached = self._dataset_features(dataset, frozen, progress)
        t2 = time.perf_counter()
        part = {split: (feats[rows], labels[rows]) for split, rows in split_rows(splits).items()}
        _check_every_class_trains(dataset, part["train"][1])

        torch_loading.join()
        from headstart.train.fit_head import describe_candidates, fit_best_head, head_candidates

        train_cfg = self._train_config()
        candidates = head_candidates(self.hidden, self.dropout, HeadConfig(feats.shape[1], len(dataset.classes)),
                                     train_cfg, len(part["train"][1]), len(part["val"][1]) > 0,
                                     finetune_follows=self.strategy != "head")
        head, history, train_cfg, val_losses = fit_best_head(candidates, *part["train"], *part["val"], progress)
        head_cfg = head.cfg
        t3 = time.perf_counter()

        self.classes_ = list(dataset.classes)
        self.frozen_ = frozen
        self.head_config_ = head_cfg
        self.head_state_ = {k: v.detach().cpu().numpy() for k, v in head.state_dict().items()}
        self.history_ = history
        self.train_config_ = train_cfg
        self.skipped_ = list(dataset.skipped) + failures
        self.counts_ = _readable_counts(dataset.classes, labels, splits)
        self.cached_ = cached
        self.val_metrics_ = self._evaluate_features(*part["val"]) if len(part["val"][1]) else None
        self.test_metrics_ = self._evaluate_features(*part["test"]) if len(part["test"][1]) else None
        self.timings_ = {"scan_s": t1 - t0, "features_s": t2 - t1, "train_s": t3 - t2}
        resized = spec.preprocess.input_size != standard.preprocess.input_size
        self.decision_ = {"strategy": self.strategy, "kept": "head", "native_size": spec.preprocess.native_size,
                          "native_input": spec.preprocess.input_size if resized else 0}
        if len(candidates) > 1:
            self.decision_["head_candidates"] = describe_candidates(candidates, val_losses)
        if self.strategy != "head":
            self._stage2(paths, labels, splits, checkpoint_dir, resume, progress)
        return self

    def _train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            schedule=self.schedule, patience=self.patience, balance=self.balance, seed=self.seed,
        )

    def _sized_for_photos(self, spec: BackboneSpec, dataset: Dataset) -> BackboneSpec:
        """The backbone's preprocessing fitted to training photos much smaller than its input (`for_small_photos`)."""
        if not (self.native_view and spec.any_input_size):
            return spec
        side = typical_short_side([s.path for s in dataset.samples if s.split == "train"])
        if not side:
            return spec
        pre = for_small_photos(spec.preprocess, side, fine_tuning=self.strategy != "head")
        if pre != spec.preprocess:
            log.info("photos are %d px on the short side: the network sees them at %d px%s", side,
                     pre.native_size or pre.input_size, " beside the standard view" if pre.native_size else "")
        return replace(spec, preprocess=pre)

    def _unfreeze(self) -> int | str:
        """`auto`: every stage at the photos' own size (see `for_small_photos`), else the top two."""
        if self.unfreeze != "auto":
            return self.unfreeze
        return "all" if self.decision_.get("native_input") else 2

    def _check_settings(self) -> None:
        """Fail before any work on settings stage 2 would only reject after stage 1."""
        from headstart.vision.augment import LEVELS

        try:
            self._train_config()
        except ValueError as exc:
            raise DataError(str(exc)) from None
        if isinstance(self.hidden, str) and self.hidden != "auto":
            raise DataError(f"hidden must be 'auto' or a list of layer widths, not {self.hidden!r}")
        if self.strategy not in ("head", "finetune", "auto"):
            raise DataError(f"strategy must be head, finetune or auto, not {self.strategy!r}")
        if self.augment not in LEVELS:
            raise DataError(f"augment must be one of {', '.join(LEVELS)}, not {self.augment!r}")
        if self.unfreeze not in ("all", "auto") and not (str(self.unfreeze).isdigit() and int(self.unfreeze) >= 1):
            raise DataError(f"unfreeze must be a stage count >= 1, 'all' or 'auto', not {self.unfreeze!r}")
        if self.views < 1 or self.finetune_epochs < 1:
            raise DataError("views and finetune_epochs must be >= 1")

    def _stage2(self, paths: list[Path], labels: np.ndarray, splits: np.ndarray, checkpoint_dir, resume: bool,
                progress: Progress) -> None:
        """Stage 2 on the images stage 1 could read (`paths`, with their labels and splits)."""
        from headstart.train.config import FinetuneConfig
        from headstart.errors import FinetuneError
        from headstart.train.stage2 import decide_auto, refit_head, run_finetune

        tr, va = splits == "train", splits == "val"
        head_acc = self.val_metrics_.accuracy if self.val_metrics_ else None
        if self.strategy == "finetune":
            run, reason = True, "asked for"
        else:
            run, reason = decide_auto(int(tr.sum()), bool(va.any()), head_acc)
        self.decision_.update(head_val_accuracy=head_acc, reason=reason)
        if not run:
            log.info("auto: keeping the head alone (%s)", reason)
            return
        if not va.any():
            raise DataError("fine-tuning needs a validation split for early stopping; use --val-split 0.2")
        in_split = {name: [p for p, s in zip(paths, splits) if s == name] for name in SPLITS}
        cfg = FinetuneConfig(
            unfreeze=self._unfreeze(), epochs=self.finetune_epochs, views=self.views, augment=self.augment,
            lr=self.finetune_lr, train_bn=self.train_bn, seed=self.seed, batch_size=min(32, self.batch_size),
            device=pick_device(self.device),
        )
        t0 = time.perf_counter()
        try:
            result = run_finetune(
                self.frozen_, self.head_config_, self.head_state_, cfg, in_split["train"], labels[tr],
                in_split["val"], labels[va], Path(checkpoint_dir) if checkpoint_dir else None, resume, progress,
            )
        except FinetuneError as exc:
            if self.strategy == "finetune":
                raise
            self.decision_["reason"] = f"this backbone cannot be fine-tuned ({exc})"
            log.info("auto: keeping the head alone (%s)", exc)
            return
        tuned = evaluate(labels[va], result.val_proba, self.classes_)
        head_cfg, head_state = self.head_config_, result.head_state
        refit = refit_head(result.frozen, head_cfg, self.hidden, self.dropout, self._train_config(), paths, labels,
                           splits, self.device, progress)
        refitted = evaluate(refit.val[1], refit.val[0], self.classes_)
        keep_refit = refitted.log_loss < tuned.log_loss
        self.decision_["refit"] = {"kept": keep_refit, "val_accuracy": refitted.accuracy,
                                   "val_log_loss": refitted.log_loss, "candidates": refit.candidates}
        if keep_refit:
            head_cfg, head_state, tuned = refit.head_cfg, refit.head_state, refitted
        if checkpoint_dir:  # finished: the result is in memory, save() is next
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        self.timings_["finetune_s"] = time.perf_counter() - t0
        self.decision_.update(finetune_val_accuracy=tuned.accuracy, finetune_config=cfg.to_dict(),
                              finetune_history=result.history.to_dict())
        better = tuned.accuracy > head_acc or (
            tuned.accuracy == head_acc and tuned.log_loss < self.val_metrics_.log_loss)
        if self.strategy == "finetune" or better:
            self.decision_["kept"] = "finetune"
            self.frozen_, self.head_config_, self.head_state_ = result.frozen, head_cfg, head_state
            self.val_metrics_ = tuned
            if len(refit.test[1]):  # the old test features came from the backbone before fine-tuning
                self.test_metrics_ = self._evaluate_features(*refit.test)
        log.info("kept %s (head val %.4f, fine-tuned val %.4f)", self.decision_["kept"], head_acc, tuned.accuracy)

    def _dataset_features(self, dataset: Dataset, frozen: FrozenBackbone, progress: Progress):
        # Split by split, so that each split's features are one block of rows: a view, never a copy, of what
        # may be a memory-mapped array.
        samples = sorted(dataset.samples, key=lambda sample: SPLITS.index(sample.split))
        paths = [s.path for s in samples]
        cache = FeatureCache(frozen)
        progress.start("extracting features", len(paths))
        cached = cache.features_for(paths, lambda: frozen.engine(self.device), progress.advance)
        progress.finish()
        readable = cached.readable
        labels = np.array([samples[i].label for i in readable], dtype=np.int64)
        splits = np.array([samples[i].split for i in readable])
        return [paths[i] for i in readable], cached.features, labels, splits, cached.failures, cached.hits

    def _evaluate_features(self, feats: np.ndarray, labels: np.ndarray) -> Evaluation:
        return evaluate(labels, self._proba(feats), self.classes_)

    def _proba(self, feats: np.ndarray) -> np.ndarray:
        return head_proba(self.head_config_, self.head_state_, feats)

    # --- inference ---------------------------------------------------------------------------------------------

    def predict_table(
        self, images: Sequence[str | Path] | str | Path, top_k: int = 3, progress: Progress | None = None
    ) -> list[Prediction]:
        self._check_fitted()
        progress = progress or NoProgress()
        paths, problems = list_images([images] if isinstance(images, (str, Path)) else images)
        rows = [Prediction(p, None, None, error=reason) for p, reason in problems]
        if paths:
            k = max(1, min(top_k, len(self.classes_)))
            progress.start("predicting", len(paths))
            for idx, proba, fails in self._predict_batches(paths, progress.advance):
                rows += [Prediction(paths[i], None, None, error=reason) for i, reason in fails]
                for i, p in zip(idx, proba):
                    best = np.argsort(-p)[:k]
                    top = [(self.classes_[j], float(p[j])) for j in best]
                    rows.append(Prediction(paths[i], top[0][0], top[0][1], top))
            progress.finish()
        order = {p: n for n, p in enumerate(paths)}
        return sorted(rows, key=lambda r: order.get(r.path, -1))

    def predict_proba(self, images: Sequence[str | Path]) -> np.ndarray:
        """Class probabilities, one row per readable image in `images` (a folder expands to its images)."""
        self._check_fitted()
        paths, _ = list_images(images)
        out = np.zeros((len(paths), len(self.classes_)), np.float32)
        for idx, proba, fails in self._predict_batches(paths):
            if fails:
                raise DataError(f"{paths[fails[0][0]]}: {fails[0][1]}; use predict_table to skip unreadable images")
            out[idx] = proba
        return out

    def _predict_batches(self, paths: list[Path], progress=None):
        """(indices, probabilities, failures) for `paths`, a few hundred images at a time. The head runs on
        gathered batches, not on each inference batch: a hidden layer's matrix product is big enough for BLAS to
        start its threads, which then fight ONNX Runtime's for the cores (1.2 s more on 3,400 photos)."""
        engine = self.frozen_.engine(self.device)
        idx: list[int] = []
        feats: list[np.ndarray] = []
        fails: list[tuple[int, str]] = []
        for batch_idx, batch_feats, batch_fails in extract(paths, self.frozen_.spec.preprocess, engine,
                                                           progress=progress):
            idx += batch_idx
            fails += batch_fails
            feats += [batch_feats] if batch_idx else []
            if len(idx) >= HEAD_BATCH_ROWS:
                yield idx, self._proba(np.concatenate(feats)), fails
                idx, feats, fails = [], [], []
        if idx or fails:
            yield idx, self._proba(np.concatenate(feats)) if idx else np.empty((0, len(self.classes_))), fails

    def predict(self, images: Sequence[str | Path]) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(images).argmax(1)]

    def evaluate(self, folder: str | Path, progress: Progress | None = None) -> tuple[Evaluation, list]:
        """Metrics on a class-folder set (all its images, whatever split folders it has)."""
        self._check_fitted()
        dataset = scan_folder(folder, val_split=0.0, seed=self.seed)
        unknown = [c for c in dataset.classes if c not in self.classes_]
        if unknown:
            raise DataError(f"{folder}: classes {unknown} are not among the model's {self.classes_}; "
                            "evaluate on folders named like the training classes")
        to_model = np.array([self.classes_.index(c) for c in dataset.classes])
        progress = progress or NoProgress()
        _, feats, labels, _, failures, _ = self._dataset_features(dataset, self.frozen_, progress)
        return evaluate(to_model[labels], self._proba(feats), self.classes_), list(dataset.skipped) + failures

    def score(self, folder: str | Path) -> float:
        """Accuracy on a class-folder set, as scikit-learn's `score`."""
        return self.evaluate(folder)[0].accuracy

    # --- persistence -------------------------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        self._check_fitted()
        from safetensors.numpy import load_file

        prefix = self.frozen_.weights_prefix
        backbone = {k[len(prefix):]: v for k, v in load_file(str(self.frozen_.weights)).items()
                    if k.startswith(prefix) and not k[len(prefix):].startswith("classifier.")}
        info = {
            "params": self.get_params(),
            "train": self.train_config_.to_dict() if hasattr(self, "train_config_") else None,
            "history": self.history_.to_dict() if hasattr(self, "history_") else None,
            "counts": getattr(self, "counts_", None),
            "metrics": {name: m.to_dict() for name, m in (("val", self.val_metrics_), ("test", self.test_metrics_))
                        if m is not None},
            "skipped": [[str(p), r] for p, r in getattr(self, "skipped_", [])],
            "decision": getattr(self, "decision_", None),
        }
        art = artifact.Artifact(self.classes_, self.frozen_.spec, self.frozen_.weights_id, self.head_config_,
                                self.head_state_, backbone, info)
        return artifact.save(art, out_dir)

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto") -> "ImageClassifier":
        art = artifact.load(model_dir)
        params = {k: v for k, v in art.info.get("params", {}).items() if k in _PARAM_NAMES}
        clf = cls(**{**params, "device": device})
        clf.classes_ = art.classes
        clf.frozen_ = FrozenBackbone(art.backbone, Path(model_dir) / artifact.WEIGHTS_FILE, art.backbone_weights_id,
                                     weights_prefix="backbone.")
        clf.head_config_ = art.head
        clf.head_state_ = art.head_state
        clf.info_ = art.info
        clf.val_metrics_ = clf.test_metrics_ = None
        return clf

    def get_params(self) -> dict:
        return {name: getattr(self, name) for name in _PARAM_NAMES}

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise DataError("this ImageClassifier is not fitted yet: call fit(folder) or ImageClassifier.load(dir)")


_PARAM_NAMES = (
    "backbone", "weights", "val_split", "test_split", "hidden", "dropout", "epochs", "lr", "weight_decay",
    "batch_size", "patience", "schedule", "balance", "seed", "device", "strategy", "unfreeze", "augment",
    "finetune_epochs", "finetune_lr", "views", "train_bn", "native_view",
)


def _check_every_class_trains(dataset: Dataset, train_labels: np.ndarray) -> None:
    present = set(np.unique(train_labels).tolist())
    empty = [c for i, c in enumerate(dataset.classes) if i not in present]
    if empty:
        raise DataError(f"classes {empty} have no readable training image; add images or remove those folders")


def _readable_counts(classes: Sequence[str], labels: np.ndarray, splits: np.ndarray) -> dict[str, dict[str, int]]:
    """Images per class in each split that has any, counting only those that could be read."""
    return {
        split: dict(zip(classes, np.bincount(labels[splits == split], minlength=len(classes)).tolist()))
        for split in SPLITS if (splits == split).any()
    }

