"""The report `headstart train` writes beside the model it saved: the same page as `headstart report`, built from
what the run holds in memory (the kept model's validation logits and features, its histories, its temperature),
so that it costs a fraction of a second rather than another pass over the photos.

What needs more than that is left out, and the page says how to get it: Grad-CAM heat maps (a backbone forward
and backward per image, ~1 s each on a CPU), likely label errors (k head fits and cleanlab) and the data check
(every file read again) are `headstart report MODEL DATA`'s.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from headstart.api import ImageClassifier
from headstart.evaluate.calibration import MIN_CALIBRATION
from headstart.evaluate.metrics import evaluate
from headstart.tasks.report import Report, _scores, _summary, render_html

__all__ = ["TRAIN_THUMBS", "build_train_report", "write_train_report"]

# Thumbnails (misclassified first): ~0.7 ms each to decode and encode; the train-written page keeps to a budget.
TRAIN_THUMBS = 150


def build_train_report(clf: ImageClassifier, model_dir: str | Path, data: str | Path) -> Report:
    """The page's records from a classifier just fitted (`clf.validation_` set by `fit`): per-image results on
    its validation split when it has one, else what the run recorded."""
    model_dir = Path(model_dir)
    scored = getattr(clf, "validation_", None)
    more = f"headstart report {model_dir} {data}"
    left_out = [(f"Heat maps, likely label errors and data-check findings: left out by train to stay fast; "
                 f"`{more}` adds them (and `headstart check DATA` lists the data problems)")]
    if scored is None:
        ev, on = clf.val_metrics_, "nothing: no validation split (no per-image results)"
        left_out.append("Confusion-matrix images, top-loss gallery, calibration: need a validation split "
                        "(train --val-split 0.2) or a labelled folder (headstart report MODEL DATA)")
    else:
        scored = dataclasses.replace(scored, folder=Path(data))
        ev = evaluate(scored.labels, scored.proba, clf.classes_)
        on = f"the validation split carved from {data} (n={len(scored.labels)}; it chose the head and its epoch)"
    cal = clf.report_.calibration
    if scored is not None and cal is None:
        left_out.append(f"Calibration: no temperature fitted (fewer than {MIN_CALIBRATION} validation images)")
    stage2 = clf.decision_.stage2.history if clf.decision_.stage2 else None
    return Report(model_dir.name, _summary(clf, model_dir), _scores(clf, None, None, "val"), ev, on, scored,
                  cal if scored is not None else None, [], clf.history_, stage2, [], left_out, TRAIN_THUMBS)


def write_train_report(clf: ImageClassifier, model_dir: str | Path, data: str | Path) -> Path:
    """Write MODEL/report.html atomically (a previous report stays whole if this fails); its path."""
    from headstart.paths import atomic_write_bytes

    path = Path(model_dir) / "report.html"
    report = build_train_report(clf, model_dir, data)
    atomic_write_bytes(path, render_html(report, clf.frozen_.spec.preprocess).encode("utf-8"))
    return path
