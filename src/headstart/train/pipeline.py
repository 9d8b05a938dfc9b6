"""A training run top to bottom: scan -> features -> head (stage 1) -> [fine-tune -> refit (stage 2)] -> the kept
model and its `FitReport`. fastai's `fine_tune` in spirit: each step is a call, the rules deciding between them
are `policy`'s, and what the run found travels as records.

Neither importing this module nor a CPU run of stage 1 imports torch (the head trains in numpy); fine-tuning does.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from headstart.backbones.registry import BackboneSpec, resolve
from headstart.cache.dataset import DatasetFeatures, dataset_features
from headstart.data import groups
from headstart.data.dataset import Dataset
from headstart.data.scan import scan_folder, typical_short_side
from headstart.errors import DataError, FinetuneError
from headstart.evaluate.calibration import MIN_CALIBRATION
from headstart.evaluate.metrics import evaluate
from headstart.heads.config import HeadConfig, head_logits_numpy, head_proba
from headstart.progress import NoProgress, Progress
from headstart.records import (
    Decision,
    DistributedRun,
    Evaluation,
    FinetuneConfig,
    FitReport,
    RefitReport,
    Scored,
    Stage2Report,
    TrainConfig,
)
from headstart.runtime import distributed
from headstart.runtime.device import pick_device
from headstart.runtime.frozen import FrozenBackbone
from headstart.settings import Settings
from headstart.train import deep, policy

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Fitted:
    """A trained classifier: its classes, backbone and head, and what the run found (`report`)."""

    classes: tuple[str, ...]
    frozen: FrozenBackbone
    head_config: HeadConfig
    head_state: dict[str, np.ndarray]
    report: FitReport
    epoch_lrs: tuple[float, ...] = ()  # the head's plateau rate per epoch, for a refit to replay
    refit_state: dict[str, np.ndarray] | None = None  # the head refitted on train + val (`shipped_refit` ships it)
    validation: Scored | None = None  # the kept model on the validation split, for train's report

    def evaluate(self, feats: np.ndarray, labels: np.ndarray) -> Evaluation | None:
        return evaluate(labels, head_proba(self.head_config, self.head_state, feats), self.classes) if len(labels) \
            else None


def fit(s: Settings, data: str | Path | Dataset, progress: Progress, checkpoint_dir: Path | None, resume: bool) -> Fitted:
    """Train on a class-folder set or manifest (or a Dataset already made of them) with settings `s`
    (`settings.Settings`, already checked)."""
    distributed.start(s.device)  # under torchrun: joins the other ranks (after every check that needs no one)
    t0 = time.perf_counter()
    dataset = data if isinstance(data, Dataset) else scan_folder(data, val_split=s.val_split,
                                                                 test_split=s.test_split, seed=s.seed)
    standard = resolve(s.backbone)
    # "auto" starts as "head" does: its stage 2, when the head is weak, chooses its own view (`train.deep`).
    spec = sized_for_photos(standard, dataset, s.native_view, fine_tuning=s.strategy == "finetune")
    frozen = FrozenBackbone.pretrained(spec, Path(s.weights) if s.weights else None).with_engine(s.engine, s.device)
    t1 = time.perf_counter()
    feats = dataset_features(dataset, frozen, s.device, progress)
    dataset, grouping = groups.regroup(dataset, feats.paths, feats.features, feats.splits, feats.labels)
    if grouping.moved:  # the same features, their rows in the new splits (read back from the cache); the run's
        # own count of features taken from the cache is the first read's
        feats = replace(dataset_features(dataset, frozen, s.device, NoProgress()), cached=feats.cached,
                        failures=feats.failures)
    groups.log_grouping(grouping)
    t2 = time.perf_counter()
    power = policy.balance_classes(s.balance, feats.counts(dataset.classes).get("train", {}))
    stage1 = fit_stage1(s, dataset, frozen, feats, progress, power)
    resized = spec.preprocess.input_size != standard.preprocess.input_size
    report = replace(stage1.report, timings={"scan_s": t1 - t0, "features_s": t2 - t1, "train_s": time.perf_counter() - t2},
                     decision=replace(stage1.report.decision, native_input=spec.preprocess.input_size if resized else 0,
                                      groups=groups.describe(grouping), moved=grouping.to))
    stage1 = replace(stage1, report=report)

    head_acc = report.val_metrics.accuracy if report.val_metrics else None
    run, reason = policy.run_stage2(s.strategy, int((feats.splits == "train").sum()), bool((feats.splits == "val").any()),
                                    report.val_metrics)
    stage1 = replace(stage1, report=replace(report, decision=replace(report.decision, reason=reason,
                                                                      head_val_accuracy=head_acc)))
    if not run and s.strategy == "auto":
        log.info("auto: keeping the head alone (%s)", reason)
    if run and s.strategy == "auto":  # the cheaper remedy first: no backbone training
        stage1, oriented = fit_oriented(s, stage1, feats, progress)
        if oriented is not None:
            kept, feats = oriented
            return shipped_refit(with_temperature(kept, feats, kept.frozen, s.device), kept.refit_state, feats)
    kept = fit_stage2(s, stage1, feats, progress, checkpoint_dir, resume, t0) if run else stage1
    # The temperature is fitted on the validation logits of the head validation chose; a head fitted after this
    # point (a refit on more data) keeps it: replace(its_config, temperature=kept.head_config.temperature).
    return refit_and_cross_validate(s, with_temperature(kept, feats, stage1.frozen, s.device), feats, progress)


def refit_and_cross_validate(s: Settings, fitted: Fitted, feats: DatasetFeatures, progress: Progress) -> Fitted:
    """When the kept model is the stage-1 head: with `s.cv` folds, its k-fold accuracy at the settings validation
    chose (`crossval.cross_validate_settings`, on train + validation); with `s.refit`, the shipped head refitted
    on train + validation with those settings for the chosen epoch count (`fit_head.refit_full`), its temperature
    kept (fitted on validation logits that the refitted head has trained on), its test figures rescored, its
    validation figures those of the head validation chose. Both run side by side (they share nothing)."""
    from concurrent.futures import ThreadPoolExecutor

    from headstart.runtime.device import one_blas_thread
    from headstart.train.crossval import cross_validate_settings
    from headstart.train.fit_head import refit_full

    report = fitted.report
    rows = np.flatnonzero(feats.splits != "test")  # train then val: one block (`dataset_features`' order)
    if report.decision.kept != "head" or not (feats.splits == "val").any():
        return fitted
    x, y = feats.features[rows[0]:rows[-1] + 1], feats.labels[rows]
    epochs, cfg, t0 = report.history.best_epoch + 1, report.train_config, time.perf_counter()
    wanted = policy.refits(s.refit, measured_to_pay=False)
    with one_blas_thread(), ThreadPoolExecutor(max_workers=1) as pool:  # BLAS's count is the process's
        refit = pool.submit(refit_full, replace(fitted.head_config, temperature=1.0), cfg, x, y, epochs,
                            fitted.epoch_lrs, progress) if wanted and fitted.refit_state is None else None
        head_cfg = fitted.head_config
        folds, skipped = policy.cv_folds(s.cv, len(y), x.shape[1], (head_cfg.hidden or (head_cfg.n_classes,))[0],
                                         epochs)
        folds, skipped = (folds, skipped) if len(y) >= 4 else (0, f"only {len(y)} images")
        ids = groups.row_groups(report.source, [feats.paths[i] for i in rows], x, y)[0] if folds else None
        cv = cross_validate_settings(x, y, head_cfg, cfg, epochs, fitted.epoch_lrs, folds, s.seed,
                                     ids) if folds else None
        state = refit.result()[0].state_dict() if refit else fitted.refit_state if wanted else None
    timings = {**report.timings, "refit_s": time.perf_counter() - t0}
    return shipped_refit(replace(fitted, report=replace(report, cv=cv, cv_skipped=skipped, timings=timings)), state,
                         feats)


def shipped_refit(fitted: Fitted, state: dict[str, np.ndarray] | None, feats: DatasetFeatures) -> Fitted:
    """`fitted` shipping `state`, its head refitted on train + validation (None: as validation chose it): its
    test figures rescored, its validation figures and temperature those of the head validation chose."""
    if state is None:
        return fitted
    out = replace(fitted, head_state=state)
    refitted = int((feats.splits != "test").sum())
    report = out.report
    return replace(out, report=replace(report, test_metrics=out.evaluate(*feats.part("test")),
                                       decision=replace(report.decision, refitted=refitted)))


def fit_stage1(s: Settings, dataset: Dataset, frozen: FrozenBackbone, feats: DatasetFeatures, progress: Progress,
               power: float = 0.0) -> Fitted:
    """The head on the frozen backbone's cached features: each candidate `policy.head_candidates` names, the one
    with the lowest validation loss kept; the loss weighted by inverse class frequency to `power` (0: not)."""
    from headstart.train.fit_head import fit_best_head

    (x_tr, y_tr), (x_va, y_va) = feats.part("train"), feats.part("val")
    _check_every_class_trains(dataset, y_tr)
    train_cfg = train_config(s, power)
    candidates = policy.head_candidates(s.hidden, s.dropout, HeadConfig(feats.features.shape[1], len(dataset.classes)),
                                        train_cfg, len(y_tr), len(y_va) > 0, finetune_follows=s.strategy == "finetune")
    # The refit trains beside the candidates when it is sure to be wanted (`fit_best_head`); else after them.
    wanted = policy.refits(s.refit, measured_to_pay=False) and s.strategy != "finetune" and len(y_va) > 0
    full = feats.features[:len(y_tr) + len(y_va)] if wanted else None
    fitted = fit_best_head(candidates, x_tr, y_tr, x_va, y_va, progress, full,
                           None if full is None else feats.labels[:len(full)])
    decision = Decision(strategy=s.strategy, native_size=frozen.spec.preprocess.native_size,
                        head_candidates=fitted.candidates if len(candidates) > 1 else (), balanced=power > 0)
    report = FitReport(decision, fitted.history, fitted.train_config, feats.counts(dataset.classes),
                       tuple(dataset.skipped) + tuple(feats.failures), feats.cached, source=dataset.source,
                       distributed=DistributedRun(distributed.joined().world_size, distributed.joined().backend))
    refit = fitted.refit and fitted.refit.state_dict()
    out = Fitted(tuple(dataset.classes), frozen, fitted.head.cfg, fitted.state, report, fitted.epoch_lrs, refit)
    return replace(out, report=replace(report, val_metrics=out.evaluate(x_va, y_va),
                                       test_metrics=out.evaluate(*feats.part("test"))))


def fit_oriented(s: Settings, stage1: Fitted, feats: DatasetFeatures, progress: Progress
                 ) -> tuple[Fitted, tuple[Fitted, DatasetFeatures] | None]:
    """`train.oriented` for a weak head: the head trained on each photo's eight orientations, features averaged
    over them. Returns stage 1 with what was tried in its reason, and the oriented model with its features when
    it validates better by `policy.score` (else None: the labels depend on the orientation)."""
    from headstart.train import oriented

    if not policy.oriented_fits(len(feats.paths), feats.features.shape[1]):
        why = f"{len(feats.paths)} photos' 8 orientations would not fit {policy.ORIENTED_MAX_BYTES / 1e9:g} GB"
        return _with_decision(stage1, reason=f"{stage1.report.decision.reason}; {why}"), None
    t0 = time.perf_counter()
    base = oriented.oriented_base(stage1.frozen, s.device)
    if policy.oriented_fits(len(feats.paths), 2 * feats.features.shape[1]):  # else not worth a look at the weights
        base = oriented.with_companion(base) or base
    every = oriented.all_orientations(feats, stage1.frozen, base, s.device, progress)
    report, head = stage1.report, stage1.report.val_metrics
    fitted, ev, seeds = oriented.fit_oriented_head(every, feats, stage1.classes, report.train_config, progress)
    won = policy.keep_oriented(ev, head, report.decision.balanced)
    beside = f" with {base.companion.spec.name}'s features beside {base.spec.name}'s" if base.companion else ""
    tried = (f"tried the head on all 8 turns and mirror images of each photo{beside}, features averaged over them: "
             f"validation accuracy {ev.accuracy:.3f}, balanced {ev.balanced_accuracy:.3f}, against the upright "
             f"head's {head.accuracy:.3f}, {head.balanced_accuracy:.3f} ({time.perf_counter() - t0:.0f} s)")
    log.info("auto: %s", tried)
    stage1 = _with_decision(stage1, reason=f"{report.decision.reason}; {tried}"
                            + ("" if won else ": the labels depend on the orientation"))
    if not won:
        return stage1, None
    averaged = oriented.oriented_dataset(feats, every)
    # Refitted on train + validation unless --no-refit: shipped after the temperature is fitted (`shipped_refit`).
    wanted = policy.refits(s.refit, measured_to_pay=True)
    refit = oriented.refit_oriented_head(every, feats, seeds, progress) if wanted else None
    report = stage1.report
    decision = replace(report.decision, kept="oriented", head_candidates=fitted.candidates)
    report = replace(report, decision=decision, history=fitted.history, train_config=fitted.train_config,
                     val_metrics=ev, timings={**report.timings, "oriented_s": time.perf_counter() - t0})
    out = Fitted(stage1.classes, base.oriented(), fitted.head.cfg, fitted.state, report, fitted.epoch_lrs, refit)
    return stage1, (replace(out, report=replace(report, test_metrics=out.evaluate(*averaged.part("test")))), averaged)


def fit_stage2(s: Settings, stage1: Fitted, feats: DatasetFeatures, progress: Progress, checkpoint_dir: Path | None,
               resume: bool, t_start: float | None = None) -> Fitted:
    """Fine-tune the backbone from a head (stage 1's; with "auto", one fitted at the whole view `train.deep`
    chooses), refit a head on the tuned features, and keep whichever model `policy` prefers."""
    from headstart.train.stage2 import kept_test, refit_head, run_finetune, try_mirror

    if not (feats.splits == "val").any():
        raise DataError("fine-tuning needs a validation split for early stopping; use --val-split 0.2")
    decision, balanced = stage1.report.decision, stage1.report.decision.balanced
    power = stage1.report.train_config.balance_power if balanced else 0.0
    t0 = time.perf_counter()
    if s.strategy == "auto" and s.time_limit - (time.perf_counter() - (t_start or t0)) <= policy.DEEP_RESERVE_S:
        log.info("auto: no time left in --time-limit %g s to fine-tune", s.time_limit)
        return _with_decision(stage1, reason=f"{decision.reason}; no time left in --time-limit {s.time_limit:g} s "
                                             "to fine-tune")
    if s.strategy == "auto":  # the head is weak (`policy.decide_auto`): the deep recipe, in the time limit
        frozen, head_cfg, head_state, cfg, plan = _deep_start(s, stage1, feats, progress, t_start or t0)
        stage1 = _with_decision(stage1, plan=plan)
    else:
        frozen, head_cfg, head_state = stage1.frozen, stage1.head_config, stage1.head_state
        cfg = finetune_config(s, decision.native_input > 0, power)
    start_loss = None if balanced or frozen is not stage1.frozen else stage1.report.val_metrics.log_loss
    in_split = {name: [p for p, sp in zip(feats.paths, feats.splits) if sp == name] for name in ("train", "val")}
    try:
        result = run_finetune(frozen, head_cfg, head_state, cfg, in_split["train"], feats.part("train")[1],
                              in_split["val"], feats.part("val")[1], checkpoint_dir, resume, progress, start_loss)
    except FinetuneError as exc:
        if s.strategy == "finetune":
            raise
        log.info("auto: keeping the head alone (%s)", exc)
        return _with_decision(stage1, reason=f"this backbone cannot be fine-tuned ({exc})")
    tuned = evaluate(result.val_labels, result.val_proba, stage1.classes)
    refit = refit_head(result.frozen, head_cfg, s.hidden, s.dropout, train_config(s, power), feats.paths,
                       feats.labels, feats.splits, s.device, progress)
    refitted = evaluate(refit.val[1], refit.val[0], stage1.classes)
    keep_refit = policy.keep_refit(refitted, tuned, balanced)
    head_cfg, head_state = (refit.head_cfg, refit.head_state) if keep_refit else (head_cfg, result.head_state)
    tuned = refitted if keep_refit else tuned
    if checkpoint_dir:  # finished: the result is in memory, saving it is next
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    refit_report = RefitReport(keep_refit, refitted.accuracy, refitted.log_loss, refit.candidates)
    stage2 = Stage2Report(result.config, result.history, tuned.accuracy, refit_report)
    timings = {**stage1.report.timings, "finetune_s": time.perf_counter() - t0}
    head_eval = stage1.report.val_metrics
    if not policy.keep_finetuned(s.strategy, head_eval, tuned, balanced):
        log.info("kept the head (head val %.4f, fine-tuned val %.4f)", head_eval.accuracy, tuned.accuracy)
        return _with_decision(stage1, stage2=stage2, timings=timings)
    log.info("kept the fine-tuned model (head val %.4f, fine-tuned val %.4f)", head_eval.accuracy, tuned.accuracy)
    kept = Fitted(stage1.classes, result.frozen, head_cfg, head_state, stage1.report)
    mirrored = try_mirror(result.frozen, head_cfg, head_state, stage1.classes, feats, s.device, progress)
    keep = policy.keep_mirrored(mirrored, tuned, balanced)
    log.info("the fine-tuned model with each photo's mirror image averaged in: val accuracy %.4f against %.4f%s",
             mirrored.accuracy, tuned.accuracy, ", kept" if keep else "")
    stage2 = replace(stage2, mirrored_accuracy=mirrored.accuracy, mirrored=keep)
    kept, tuned = (replace(kept, frozen=kept.frozen.oriented(2)), mirrored) if keep else (kept, tuned)
    # stage 1's test features predate the tuning: the refit's, or the mirrored ones
    test = kept.evaluate(*kept_test(kept.frozen, feats, refit.test, s.device))
    timings = {**stage1.report.timings, "finetune_s": time.perf_counter() - t0}
    report = replace(stage1.report, val_metrics=tuned, test_metrics=test, timings=timings,
                     decision=replace(stage1.report.decision, kept="finetune", stage2=stage2))
    return replace(kept, report=report)


def _deep_start(s: Settings, stage1: Fitted, feats: DatasetFeatures, progress: Progress, t_start: float):
    """`train.deep`'s start for a weak head: the whole view, its head, the orientation test, and the settings
    that fit what is left of `s.time_limit`; with a line saying what was chosen and why."""

    balanced = stage1.report.decision.balanced
    power = stage1.report.train_config.balance_power if balanced else 0.0
    train_paths = [p for p, split in zip(feats.paths, feats.splits) if split == "train"]
    side = typical_short_side(train_paths)
    start = deep.whole_view_start(stage1.frozen, feats, train_config(s, power), side, s.device, progress)
    proba, y = _val_proba(start)
    whole = evaluate(y, proba, stage1.classes)
    view = f"whole photo at {start.frozen.spec.preprocess.input_size} px"
    if not stage1.frozen.spec.preprocess.native_size and \
            policy.score(whole, balanced) < policy.score(stage1.report.val_metrics, balanced):
        # the standard view validated better: fine-tune from stage 1 itself (elpv: 0.786 / 0.608 against 0.710 / 0.540)
        view = f"the standard view (whole photo {whole.balanced_accuracy:.3f} balanced on validation)"
        start = deep.Start(stage1.frozen, feats, stage1.head_config, stage1.head_state, start.seconds_per_image)
    augment, why = deep.orientation_augment(start, s.device) if s.augment == "light" else (s.augment, "")
    budget = policy.finetune_budget(s.time_limit, time.perf_counter() - t_start, len(feats.paths),
                                    start.seconds_per_image)
    cfg = deep.deep_config(finetune_config(s, False, power), augment, budget, len(train_paths))
    plan = (f"{view}, top {cfg.unfreeze} stages trained for {cfg.epochs} epochs "
            f"(within {budget:.0f} s of --time-limit {s.time_limit:g} s), augment {cfg.augment}"
            + (f" ({why})" if why else "")
            + (f", classes weighted by inverse frequency ^ {power:g}" if balanced else ""))
    log.info("auto: %s", plan)
    return start.frozen, start.head_cfg, start.head_state, cfg, plan


def with_temperature(fitted: Fitted, feats: DatasetFeatures, stage1_frozen: FrozenBackbone, device: str) -> Fitted:
    """The kept head with its temperature (`evaluate.calibration.stored_temperature`) fitted on the kept model's
    validation logits, and the test metrics rescored with it (the accuracy cannot move); T = 1 without enough
    validation images. A fine-tuned backbone's features come from the cache (its refit extracted them)."""
    from headstart.evaluate.calibration import stored_temperature

    if fitted.frozen is not stage1_frozen:
        from headstart.train.stage2 import kept_features

        rows = np.flatnonzero(feats.splits != "train")
        feats = kept_features(fitted.frozen, [feats.paths[i] for i in rows], feats.labels[rows], feats.splits[rows],
                              device)

    x_va, y_va = feats.part("val")
    logits = head_logits_numpy(fitted.head_state, fitted.head_config, x_va)
    cal = stored_temperature(logits, y_va)
    val_paths = [p for p, split in zip(feats.paths, feats.splits) if split == "val"]
    scored = Scored(Path(), val_paths, y_va, logits, x_va, [], cal.temperature if cal else 1.0) if len(y_va) else None
    if cal is None:
        log.info("no temperature fitted (%d validation images, %d needed): probabilities are the plain softmax",
                 len(y_va), MIN_CALIBRATION)
        return replace(fitted, validation=scored)
    out = replace(fitted, head_config=replace(fitted.head_config, temperature=cal.temperature), validation=scored)
    test = out.evaluate(*feats.part("test"))
    return replace(out, report=replace(fitted.report, calibration=cal, test_metrics=test or fitted.report.test_metrics))


def train_config(s: Settings, power: float | None = None) -> TrainConfig:
    """The head's settings; `power`: the class weighting `policy.balance_classes` chose (None: `s.balance` as
    given, "auto" counting as off)."""
    power = (1.0 if s.balance is True else 0.0) if power is None else power
    return TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay,
                       schedule=s.schedule, patience=s.patience, balance=power > 0, balance_power=power or 1.0,
                       seed=s.seed)


def finetune_config(s: Settings, at_photos_size: bool, power: float = 0.0) -> FinetuneConfig:
    return FinetuneConfig(
        unfreeze=policy.unfreeze_stages(s.unfreeze, at_photos_size), epochs=s.finetune_epochs, views=s.views,
        augment=s.augment, lr=s.finetune_lr, train_bn=s.train_bn, seed=s.seed, batch_size=min(32, s.batch_size),
        device=pick_device(s.device), balance=power > 0, balance_power=power or 1.0,
    )


def sized_for_photos(spec: BackboneSpec, dataset: Dataset, native_view: bool = True, fine_tuning: bool = False
                     ) -> BackboneSpec:
    """The backbone's preprocessing fitted to training photos much smaller than its input (`for_small_photos`):
    what `train` runs, and so what `check` must run to find the features `train` cached."""
    return sized_for_paths(spec, [sample.path for sample in dataset.samples if sample.split == "train"], native_view,
                           fine_tuning)


def sized_for_paths(spec: BackboneSpec, train_paths: list[Path], native_view: bool = True, fine_tuning: bool = False
                    ) -> BackboneSpec:
    """`sized_for_photos` for the training photos' paths."""
    if not (native_view and spec.any_input_size):
        return spec
    side = typical_short_side(train_paths)
    if not side:
        return spec
    pre = policy.for_small_photos(spec.preprocess, side, fine_tuning=fine_tuning)
    if pre != spec.preprocess:
        log.info("photos are %d px on the short side: the network sees them at %d px%s", side,
                 pre.native_size or pre.input_size, " beside the standard view" if pre.native_size else "")
    return replace(spec, preprocess=pre)


def _val_proba(start: deep.Start) -> tuple[np.ndarray, np.ndarray]:
    """`train.deep.Start`'s head on its validation features: (probabilities, labels)."""
    x, y = start.feats.part("val")
    return head_proba(start.head_cfg, start.head_state, x), y


def _with_decision(fitted: Fitted, timings: dict | None = None, **changes: Any) -> Fitted:
    report = fitted.report
    report = replace(report, decision=replace(report.decision, **changes), timings=timings or report.timings)
    return replace(fitted, report=report)


def _check_every_class_trains(dataset: Dataset, train_labels: np.ndarray) -> None:
    present = set(np.unique(train_labels).tolist())
    empty = [c for i, c in enumerate(dataset.classes) if i not in present]
    if empty:
        raise DataError(f"classes {empty} have no readable training image; add images or remove those folders")
