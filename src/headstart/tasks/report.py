"""The HTML report of a saved model: one self-contained file (thumbnails and plots embedded as data: URIs, the
style and the script inline, nothing fetched from anywhere) that says what the model was trained on, what it
chose, how well it does on a labelled folder and where it fails.

`build_report` gathers records (per-image scores, calibration, heat maps); `render_html` (`report_html`) draws
them into `report_page.html`. torch is imported only when a heat map is made.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from headstart.api import ImageClassifier
from headstart.cache.dataset import dataset_features
from headstart.data import groups
from headstart.data.scan import scan_folder
from headstart.errors import DataError
from headstart.evaluate.calibration import MIN_CALIBRATION, calibrate, measured
from headstart.evaluate.gradcam import HeatMap
from headstart.evaluate.gradcam import heat_maps as grad_cam
from headstart.evaluate.labels import LabelIssue, find_label_errors
from headstart.evaluate.metrics import evaluate
from headstart.heads.config import head_logits_numpy
from headstart.paths import atomic_write_bytes
from headstart.progress import NoProgress, Progress
from headstart.records import Calibration, Evaluation, Scored
from headstart.tasks.check import Finding, check_folder
from headstart.tasks.report_html import GALLERY, Report, Score, render_html

log = logging.getLogger(__name__)

__all__ = ["Report", "Score", "Scored", "build_report", "render_html", "score_folder", "write_report"]

STORED = "the model's own, fitted on its validation split at training"


def score_folder(clf: ImageClassifier, folder: str | Path, progress: Progress | None = None, split: str | None = None) -> Scored:
    """The model's logits on every image of a class-folder set (features from the cache where they are). With
    `split` ("val", "test"), only that split of the *training* folder, carved as `train` carved it (the model's
    fractions and seed): what `train` reports on right after fitting."""
    if split is None:
        dataset = scan_folder(folder, val_split=0.0, seed=clf.seed)
    else:
        whole = scan_folder(folder, val_split=clf.val_split, test_split=clf.test_split, seed=clf.seed)
        whole = groups.apply_moves(whole, clf.decision_.moved)  # as training's near-duplicate groups left it
        dataset = dataclasses.replace(whole, samples=whole.subset(split))
    unknown = [c for c in dataset.classes if c not in clf.classes_]
    if unknown:
        raise DataError(f"{folder}: classes {unknown} are not among the model's {list(clf.classes_)}; "
                        "report on folders named like the training classes")
    to_model = np.array([clf.classes_.index(c) for c in dataset.classes])
    feats = dataset_features(dataset, clf.frozen_, clf.device, progress or NoProgress())
    logits = head_logits_numpy(clf.head_state_, clf.head_config_, np.asarray(feats.features))
    return Scored(Path(folder), list(feats.paths), to_model[feats.labels], logits, np.asarray(feats.features),
                  list(dataset.skipped) + list(feats.failures), clf.head_config_.temperature)


def _summary(clf: ImageClassifier, model_dir: Path) -> list[tuple[str, str]]:
    rep, d = clf.report_, clf.decision_
    counts = ", ".join(f"{split} {sum(per.values())}" for split, per in rep.counts.items()) or "not recorded"
    per_class = "; ".join(f"{c}: " + ", ".join(f"{s} {per.get(c, 0)}" for s, per in rep.counts.items())
                          for c in clf.classes_)
    head = clf.head_config_
    rows = [("model", str(model_dir)), ("classes", f"{len(clf.classes_)}: {', '.join(clf.classes_)}"),
            ("training images", counts), ("per class", per_class), ("skipped at training", str(len(rep.skipped))),
            ("backbone", f"{clf.frozen_.spec.name}, {clf.frozen_.spec.preprocess.input_size} px"
                         + (f", native view {d.native_size} px" if d.native_size else "")
                         + (f", {clf.frozen_.companion.spec.name}'s features beside it" if clf.frozen_.companion
                            else "")),
            ("head", f"hidden {list(head.hidden) or 'none (linear)'}, dropout {head.dropout}"),
            ("temperature", _temperature_line(rep.calibration)),
            ("strategy", f"asked {d.strategy}, kept {d.kept}" + (f": {d.reason}" if d.reason else ""))]
    if d.head_candidates:
        rows.append(("head candidates", "; ".join(f"hidden {list(c.hidden)}, dropout {c.dropout}: val loss "
                                                   f"{c.val_loss:.3f}" for c in d.kept_head_candidates)))
    return rows


def _temperature_line(cal: Calibration | None) -> str:
    if cal is None:
        return (f"1 (none fitted: no validation split of at least {MIN_CALIBRATION} images); probabilities are the "
                "plain softmax")
    if cal.refused:
        return (f"1: the temperature fitted on {cal.n} validation images ({cal.refused:.3g}) raised their ECE, so "
                "none is kept; probabilities are the plain softmax")
    return (f"{cal.temperature:.3g}, fitted on {cal.n} validation images: their ECE {cal.ece_before:.3f} -> "
            f"{cal.ece_after:.3f}, log loss {cal.nll_before:.3f} -> {cal.nll_after:.3f}; probabilities are "
            "softmax(logits / T), labels unchanged")


def _scores(clf: ImageClassifier, scored: Scored | None, ev: Evaluation | None, split: str | None) -> list[Score]:
    d, out = clf.decision_, []
    chose = "the head, its stopping epoch" + (" and the strategy" if d.strategy != "head" or d.stage2 else "")
    if clf.val_metrics_ is not None:
        before = "; of the head before its refit on train + val" if d.refitted else ""
        out.append(Score("validation", "split carved from the training folder", clf.val_metrics_.n,
                         clf.val_metrics_.accuracy, chose + ": optimistic" + before))
    if clf.test_metrics_ is not None:
        out.append(Score("test", "split held out of the training folder", clf.test_metrics_.n,
                         clf.test_metrics_.accuracy, "nothing"))
    if scored is not None and ev is not None and not split:
        out.append(Score("this folder", str(scored.folder), ev.n, ev.accuracy,
                         "nothing, unless it overlaps the training folder"))
    return out


def _extra(clf: ImageClassifier, scored: Scored, split: str | None
           ) -> list[tuple[str, Sequence[LabelIssue] | Sequence[Finding]]]:
    """Likely label errors among this folder's images (out-of-fold on its features) and the data check's
    findings about the folder (features are not looked at there: the label errors come from this folder's own)."""
    issues = find_label_errors(scored.features, scored.labels, scored.paths, clf.classes_, seed=clf.seed)
    report = check_folder(scored.folder, val_split=clf.val_split if split else 0.0,
                          test_split=clf.test_split if split else 0.0, backbone=None)
    return [("Likely label errors", issues), ("Data check", list(report.findings))]


def build_report(clf: ImageClassifier, model_dir: str | Path, data: str | Path | None = None, heat_maps: bool = True,
                 progress: Progress | None = None, split: str | None = None) -> Report:
    """Everything the page shows. With `data` (a labelled folder), per-image results: the confusion matrix's
    images, the top-loss gallery with Grad-CAM, calibration; without it, what the training run recorded."""
    model_dir = Path(model_dir)
    scored = score_folder(clf, data, progress, split) if data is not None else None
    left_out: list[str] = []
    if scored is not None and len(scored.labels) == 0:
        raise DataError(f"{data}: no readable images to report on")
    if scored is not None:
        ev = evaluate(scored.labels, scored.proba, clf.classes_)
        on = f"{data}{f' ({split} split)' if split else ''} (n={len(scored.labels)})"
        if split == "val" and clf.decision_.refitted:
            on += "; the shipped head was refitted on these photos too, so they flatter it"
    else:
        ev, on = clf.val_metrics_, "the training run's validation split (no folder given: no per-image results)"
        left_out.append("Top-loss gallery, heat maps, calibration: need a labelled folder (headstart report MODEL DATA)")
    cal = None
    if scored is not None and len(scored.labels) >= MIN_CALIBRATION and scored.temperature != 1.0:
        cal = measured(scored.logits, scored.labels, scored.temperature, STORED)
    elif scored is not None and len(scored.labels) >= MIN_CALIBRATION:
        cal = calibrate(scored.logits, scored.labels, folds=2, seed=clf.seed)
    elif scored is not None:
        left_out.append(f"Calibration: fewer than {MIN_CALIBRATION} images")
    heat: list[HeatMap] = []
    if scored is not None and heat_maps:
        top = np.argsort(-scored.losses, kind="stable")[:GALLERY]
        heat = grad_cam(clf.frozen_, clf.head_config_, clf.head_state_, [scored.paths[i] for i in top],
                        [int(scored.proba[i].argmax()) for i in top])
    elif scored is not None:
        left_out.append("Heat maps: turned off (--no-heatmaps)")
    extra = _extra(clf, scored, split) if scored is not None else []
    stage2 = clf.decision_.stage2.history if clf.decision_.stage2 else None
    return Report(model_dir.name, _summary(clf, model_dir), _scores(clf, scored, ev, split), ev, on, scored, cal, heat,
                  clf.history_, stage2, extra, left_out)


def write_report(clf: ImageClassifier, model_dir: str | Path, data: str | Path | None = None, out: str | Path | None = None,
                 heat_maps: bool = True, progress: Progress | None = None, split: str | None = None) -> Path:
    """Build and write the report (atomically: a failed run leaves any previous report whole); its path."""
    report = build_report(clf, model_dir, data, heat_maps, progress, split)
    path = Path(out) if out is not None else Path(model_dir) / "report.html"
    atomic_write_bytes(path, render_html(report, clf.frozen_.spec.preprocess).encode("utf-8"))
    return path
