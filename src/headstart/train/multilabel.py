"""A multi-label training run: manifest -> features -> sigmoid head -> per-label thresholds -> `Fitted`.

The same cached multi-scale features and the same `--hidden auto` candidates as a single-label run (`pipeline`),
with binary cross-entropy per label instead of a softmax. Thresholds are chosen on the validation split
(`evaluate.multilabel.choose_thresholds`) and stored in the head's config. No temperature: each label's threshold
is chosen on the probabilities it is applied to.

The shipped head is refitted on train + validation (`fit_head.refit_full`: the chosen settings, for the epochs
validation chose) unless `--no-refit` says not (`--refit`'s "auto" refits), keeping the thresholds the validation
head chose: on planet_sample (10 seeded inner splits of the acceptance's training rows, before the weights and
shrinkage settled) the refit scored mAP 0.610 against 0.594, micro F1 0.846 against 0.843, macro F1 0.489 against
0.485. The validation figures are the validation head's.

Not (yet) for multi-label: fine-tuning (stage 2) and k-fold cross-validation; the first is refused before any
work, the second reported as not run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from headstart.backbones.registry import resolve
from headstart.cache.dataset import path_features
from headstart.data.multilabel import MultiLabelData, read_multilabel
from headstart.errors import ConfigError
from headstart.evaluate.multilabel import choose_thresholds, evaluate_multilabel
from headstart.heads.config import HeadConfig, head_proba
from headstart.progress import Progress
from headstart.records import DEFAULT_THRESHOLD, MIN_POSITIVES, Decision, DistributedRun, FitReport, MultiLabelReport
from headstart.runtime import distributed
from headstart.runtime.frozen import FrozenBackbone
from headstart.settings import Settings
from headstart.train import policy
from headstart.train.pipeline import Fitted, sized_for_paths, train_config

log = logging.getLogger(__name__)

# Measured on planet_sample (6 to 10 seeded 60/20/20 inner splits of the acceptance's training rows, the 256-unit
# head; docs/multilabel.md): label smoothing 0 scored mAP 0.574 against 0.564 with the single-label default of 0.1
# (which pulls every rare label's few positives towards 0.5), at 0.7 points of micro F1; positive weights
# (`head_step.positive_weights`) raised mAP from 0.581 to 0.593 and macro F1 from 0.461 to 0.479 at the same micro
# F1. Both are fixed for multi-label runs: the weights are on whatever --balance says (for a softmax head it means
# class weights).
LABEL_SMOOTHING = 0.0
POSITIVE_WEIGHTS = True


def check_settings(s: Settings) -> None:
    """What a multi-label run cannot do yet, refused before any work."""
    if s.strategy == "finetune":
        raise ConfigError("--strategy finetune is not available for multi-label models yet; train the head "
                          "(--strategy head, the default)")


def fit_multilabel(s: Settings, data: str | Path, progress: Progress) -> Fitted:
    """Train a multi-label model on a manifest with settings `s` (`settings.Settings`, already checked)."""
    check_settings(s)
    distributed.start(s.device)
    t0 = time.perf_counter()
    ml = read_multilabel(data, val_split=s.val_split, test_split=s.test_split, seed=s.seed)
    train_paths = [p for p, split in zip(ml.paths, ml.splits) if split == "train"]
    spec = sized_for_paths(resolve(s.backbone), train_paths, s.native_view)
    frozen = FrozenBackbone.pretrained(spec, Path(s.weights) if s.weights else None).with_engine(s.engine, s.device)
    t1 = time.perf_counter()
    feats = path_features(list(ml.paths), np.arange(len(ml.paths)), ml.splits, frozen, s.device, progress,
                          "extracting features")
    targets = ml.targets[feats.labels]  # the readable rows' targets (path_features drops the unreadable)
    part = {split: (x, ml.targets[rows]) for split in ("train", "val", "test") for x, rows in [feats.part(split)]}
    t2 = time.perf_counter()
    (x_tr, y_tr), (x_va, y_va) = part["train"], part["val"]
    from headstart.train.fit_head import fit_best_head

    train_cfg = replace(train_config(s), label_smoothing=LABEL_SMOOTHING, balance=POSITIVE_WEIGHTS or s.balance)
    shape = HeadConfig(feats.features.shape[1], len(ml.classes), multi_label=True)
    candidates = policy.head_candidates(s.hidden, s.dropout, shape, train_cfg, int(y_tr.sum()), len(y_va) > 0)
    # The refit on train + val trains beside the candidates (`fit_best_head`'s shadows), not after them.
    n_full = len(y_tr) + len(y_va)  # train then val: one block of rows (`path_features`' order)
    y_full = np.concatenate([y_tr, y_va])
    refit = bool(len(y_va)) and policy.refits(s.refit, measured_to_pay=True)  # measured (the module's docstring)
    fitted = fit_best_head(candidates, x_tr, y_tr, x_va, y_va, progress, feats.features[:n_full] if refit else None,
                           y_full if refit else None)
    state = fitted.state
    thresholds, untuned = _thresholds(s.threshold, fitted.head.cfg, state, x_va, y_va, ml.classes)
    head_cfg = replace(fitted.head.cfg, thresholds=thresholds)
    scored = {split: evaluate_multilabel(y, head_proba(head_cfg, state, x), thresholds, ml.classes) if len(y) else None
              for split, (x, y) in part.items()}
    refitted = 0
    if refit:
        from headstart.train.fit_head import refit_full

        refitted = n_full
        head = fitted.refit or refit_full(fitted.head.cfg, fitted.train_config, feats.features[:n_full], y_full,
                                          fitted.history.best_epoch + 1, fitted.epoch_lrs, progress)[0]
        state = head.state_dict()
        x_te, y_te = part["test"]
        scored["test"] = evaluate_multilabel(y_te, head_proba(head_cfg, state, x_te), thresholds, ml.classes) \
            if len(y_te) else None
    decision = Decision(strategy=s.strategy, native_size=frozen.spec.preprocess.native_size,
                        head_candidates=fitted.candidates if len(candidates) > 1 else (),
                        reason="multi-label models train the head alone" if s.strategy == "auto" else "",
                        refitted=refitted)
    counts = MultiLabelData(ml.root, ml.classes, tuple(feats.paths), targets, feats.splits).counts()
    report = FitReport(decision, fitted.history, fitted.train_config, counts,
                       tuple(ml.skipped) + tuple(feats.failures), feats.cached,
                       timings={"scan_s": t1 - t0, "features_s": t2 - t1, "train_s": time.perf_counter() - t2},
                       source=ml.source, cv_skipped="not run for multi-label models",
                       distributed=DistributedRun(distributed.joined().world_size, distributed.joined().backend),
                       multilabel=MultiLabelReport(scored["val"], scored["test"], untuned, MIN_POSITIVES, s.threshold,
                                                   {k: len(y) for k, (_, y) in part.items() if len(y)}))
    validation = None
    if len(y_va):  # per-image results of the validation head, for the report `train` writes
        from headstart.records import MultiLabelScored

        val_paths = [p for p, split in zip(feats.paths, feats.splits) if split == "val"]
        validation = MultiLabelScored(val_paths, y_va, head_proba(head_cfg, fitted.state, x_va))
    return Fitted(ml.classes, frozen, head_cfg, state, report, validation=validation)


def _thresholds(override: float | None, cfg: HeadConfig, state: dict[str, np.ndarray], x_val: np.ndarray,
                y_val: np.ndarray, classes: tuple[str, ...]) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """The stored thresholds and the labels left at 0.5: the user's one threshold for all, else each label's
    chosen on validation (every label at 0.5 without a validation split)."""
    if override is not None:
        return (float(override),) * len(classes), ()
    if not len(y_val):
        log.info("no validation split: every label's threshold is %g", DEFAULT_THRESHOLD)
        return (DEFAULT_THRESHOLD,) * len(classes), tuple(classes)
    thresholds, untuned = choose_thresholds(y_val, head_proba(cfg, state, x_val))
    if untuned:
        log.info("labels with under %d validation positives keep the threshold %g: %s", MIN_POSITIVES,
                 DEFAULT_THRESHOLD, ", ".join(classes[j] for j in untuned))
    return thresholds, tuple(classes[j] for j in untuned)
