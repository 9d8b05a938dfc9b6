"""The HTML report of a saved model: one self-contained file (thumbnails and plots embedded as data: URIs, the
style and the script inline, nothing fetched from anywhere) that says what the model was trained on, what it
chose, how well it does on a labelled folder and where it fails.

`build_report` gathers records (per-image scores, calibration, heat maps); `render_html` draws them into
`report_page.html`. matplotlib and torch are imported only when a plot or a heat map is made.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import importlib
import importlib.util
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import numpy as np

from headstart.data.scan import scan_folder
from headstart.errors import DataError
from headstart.evaluate.calibration import (
    MIN_CALIBRATION,
    Calibration,
    calibrate,
    measured,
    reliability_bins,
    scaled_proba,
)
from headstart.evaluate.crossval import wilson_interval
from headstart.evaluate.metrics import Evaluation, evaluate
from headstart.progress import NoProgress, Progress
from headstart.records import History

log = logging.getLogger(__name__)

__all__ = ["Report", "Score", "Scored", "build_report", "render_html", "score_folder", "write_report"]

PAGE = Path(__file__).with_name("report_page.html")
MAX_THUMBS = 600  # images beyond this are listed by name only: 600 thumbnails are ~1.5 MB of page
THUMB_PX = 96
GALLERY = 8  # top-loss images shown, each with its heat map (a second of CPU each)
# The other engineers' modules, used when they are part of the build: (module, function, section title).
LABELS_MODULE = ("headstart.evaluate.labels", "find_label_errors", "Likely label errors")
CHECK_MODULE = ("headstart.data.check", "check_folder", "Data check")
STORED = "the model's own, fitted on its validation split at training"


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
        return scaled_proba(self.logits, self.temperature)

    @property
    def losses(self) -> np.ndarray:
        return -np.log(np.clip(self.proba[np.arange(len(self.labels)), self.labels], 1e-12, 1.0))


@dataclass(frozen=True)
class Score:
    name: str
    source: str  # which images
    n: int
    accuracy: float
    chose: str  # what these images decided during training ("nothing" for a held-out set)

    @property
    def interval(self) -> tuple[float, float]:
        lo, hi = wilson_interval(round(self.accuracy * self.n), self.n)
        return max(0.0, lo), min(1.0, hi)


@dataclass(frozen=True, eq=False)
class Report:
    title: str
    summary: list[tuple[str, str]]
    scores: list[Score]
    evaluation: Evaluation | None
    evaluated_on: str
    scored: Scored | None
    calibration: Calibration | None
    heat: list[Any]  # gradcam.HeatMap
    history: History
    stage2: History | None
    extra: list[tuple[str, list[Any]]] = field(default_factory=list)  # (title, records) from optional modules
    left_out: list[str] = field(default_factory=list)  # sections not drawn, and why
    max_thumbs: int = MAX_THUMBS


def score_folder(clf: Any, folder: str | Path, progress: Progress | None = None, split: str | None = None) -> Scored:
    """The model's logits on every image of a class-folder set (features from the cache where they are). With
    `split` ("val", "test"), only that split of the *training* folder, carved as `train` carved it (the model's
    fractions and seed): what `train` reports on right after fitting."""
    from headstart.cache.dataset import dataset_features
    from headstart.heads.config import head_logits_numpy

    if split is None:
        dataset = scan_folder(folder, val_split=0.0, seed=clf.seed)
    else:
        whole = scan_folder(folder, val_split=clf.val_split, test_split=clf.test_split, seed=clf.seed)
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


def _summary(clf: Any, model_dir: Path) -> list[tuple[str, str]]:
    rep, d = clf.report_, clf.decision_
    counts = ", ".join(f"{split} {sum(per.values())}" for split, per in rep.counts.items()) or "not recorded"
    per_class = "; ".join(f"{c}: " + ", ".join(f"{s} {per.get(c, 0)}" for s, per in rep.counts.items())
                          for c in clf.classes_)
    head = clf.head_config_
    rows = [("model", str(model_dir)), ("classes", f"{len(clf.classes_)}: {', '.join(clf.classes_)}"),
            ("training images", counts), ("per class", per_class), ("skipped at training", str(len(rep.skipped))),
            ("backbone", f"{clf.frozen_.spec.name}, {clf.frozen_.spec.preprocess.input_size} px"
                         + (f", native view {d.native_size} px" if d.native_size else "")),
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


def _scores(clf: Any, scored: Scored | None, ev: Evaluation | None, split: str | None) -> list[Score]:
    d, out = clf.decision_, []
    chose = "the head, its stopping epoch" + (" and the strategy" if d.strategy != "head" or d.stage2 else "")
    if clf.val_metrics_ is not None:
        out.append(Score("validation", "split carved from the training folder", clf.val_metrics_.n,
                         clf.val_metrics_.accuracy, chose + ": optimistic"))
    if clf.test_metrics_ is not None:
        out.append(Score("test", "split held out of the training folder", clf.test_metrics_.n,
                         clf.test_metrics_.accuracy, "nothing"))
    if scored is not None and ev is not None and not split:
        out.append(Score("this folder", str(scored.folder), ev.n, ev.accuracy,
                         "nothing, unless it overlaps the training folder"))
    return out


def _optional(spec: tuple[str, str, str]) -> Any:
    """Another module's function when the build has it; else a line saying why its section is left out. A
    feature check, not a try/except: an error inside the module is a bug and keeps its traceback."""
    module_name, function, title = spec
    if importlib.util.find_spec(module_name) is None:
        return f"{title}: left out, {module_name} is not part of this build"
    module = importlib.import_module(module_name)
    if not hasattr(module, function):
        return f"{title}: left out, {module_name} has no {function}()"
    return getattr(module, function)


def _extra(clf: Any, scored: Scored, left_out: list[str], split: str | None) -> list[tuple[str, list[Any]]]:
    """Likely label errors among this folder's images (out-of-fold on its features) and the data check's
    findings about the folder, from the other modules when they are there."""
    out = []
    find = _optional(LABELS_MODULE)
    if isinstance(find, str):
        left_out.append(find)
    else:
        out.append((LABELS_MODULE[2], find(scored.features, scored.labels, scored.paths, clf.classes_, seed=clf.seed)))
    check = _optional(CHECK_MODULE)
    if isinstance(check, str):
        left_out.append(check)
    else:  # features are not looked at here: the label errors above come from this folder's own
        out.append((CHECK_MODULE[2], list(check(scored.folder, val_split=clf.val_split if split else 0.0,
                                                        test_split=clf.test_split if split else 0.0,
                                                        backbone=None).findings)))
    return out


def build_report(clf: Any, model_dir: str | Path, data: str | Path | None = None, heat_maps: bool = True,
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
    heat: list[Any] = []
    if scored is not None and heat_maps:
        from headstart.evaluate.gradcam import heat_maps as grad_cam

        top = np.argsort(-scored.losses, kind="stable")[:GALLERY]
        heat = grad_cam(clf, [scored.paths[i] for i in top], [int(scored.proba[i].argmax()) for i in top])
    elif scored is not None:
        left_out.append("Heat maps: turned off (--no-heatmaps)")
    extra = _extra(clf, scored, left_out, split) if scored is not None else []
    stage2 = clf.decision_.stage2.history if clf.decision_.stage2 else None
    return Report(model_dir.name, _summary(clf, model_dir), _scores(clf, scored, ev, split), ev, on, scored, cal, heat,
                  clf.history_, stage2, extra, left_out)


# --------------------------------------------------------------------------- drawing


def _png_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(width: float, height: float, n: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, n, i + 1) for i in range(n)]


def _curves_uri(stages: list[tuple[str, History]]) -> str:
    fig, axes = _figure(5.2 * len(stages), 3.4, len(stages))
    for ax, (name, h) in zip(axes, stages):
        epochs = np.arange(1, len(h.train_loss) + 1)
        ax.plot(epochs, h.train_loss, label="train loss")
        ax.plot(epochs[:len(h.val_loss)], h.val_loss, label="val loss")
        ax.set_xlabel("epoch"), ax.set_title(name)
        if h.best_epoch >= 0:
            ax.axvline(h.best_epoch + 1, color="grey", ls=":", label="kept epoch")
        acc = ax.twinx()
        acc.plot(epochs[:len(h.val_accuracy)], h.val_accuracy, color="tab:green", label="val accuracy")
        acc.set_ylim(0, 1.02), acc.set_ylabel("val accuracy")
        ax.legend(loc="center right", fontsize=8)
    # Fixed margins, not tight_layout: measuring every label's extent was a third of the page's cost, which
    # `train` pays on every run (evaluate.report_train).
    fig.subplots_adjust(left=0.6 / fig.get_figwidth() * len(stages), right=1 - 0.75 / fig.get_figwidth() * len(stages),
                        bottom=0.15, top=0.9, wspace=0.45)
    return _png_uri(fig)


def _reliability_uri(scored: Scored, cal: Calibration) -> str:
    fig, (ax,) = _figure(4.6, 4.2)
    width = 1.0 / cal.n_bins
    for name, t, colour in (("before", 1.0, "tab:red"), (f"T = {cal.temperature:.2f}", cal.temperature, "tab:blue")):
        b = reliability_bins(scored.labels, scaled_proba(scored.logits, t), cal.n_bins)
        used = b.count > 0
        ax.plot(b.confidence[used], b.accuracy[used], "o-", color=colour, label=name)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect")
    ax.set_xlabel("confidence (top class)"), ax.set_ylabel("accuracy"), ax.set_xlim(0, 1), ax.set_ylim(0, 1.02)
    ax.set_title(f"reliability ({cal.n_bins} bins of {width:.3f})"), ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.15, right=0.94, bottom=0.12, top=0.92)
    return _png_uri(fig)


def _jpeg_uri(img: Any, px: int) -> str:
    img = img.copy()
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(path: Path) -> str | None:
    from headstart.data.imageio import ImageDecodeError, load_rgb

    try:
        return _jpeg_uri(load_rgb(path, THUMB_PX), THUMB_PX)
    except (ImageDecodeError, OSError) as exc:  # read once for its features; gone or changed since
        log.warning("%s: no thumbnail (%s)", path, exc)
        return None


def _images_data(report: Report) -> dict:
    classes = list(report.evaluation.classes) if report.evaluation else []
    s = report.scored
    if s is None:
        return {"classes": classes, "images": [], "cells": {}}
    pred = s.proba.argmax(1)
    conf = s.proba.max(1)
    # Thumbnails for the misclassified first, then the rest in order, up to MAX_THUMBS.
    order = sorted(range(len(pred)), key=lambda i: (bool(pred[i] == s.labels[i]), i))
    thumbs = {i: _thumb(s.paths[i]) for i in order[:report.max_thumbs]}
    images = [{"name": s.paths[i].name, "conf": round(float(conf[i]), 4), "thumb": thumbs.get(i)}
              for i in range(len(pred))]
    cells: dict[str, list[int]] = {}
    for i in range(len(pred)):
        cells.setdefault(f"{int(s.labels[i])},{int(pred[i])}", []).append(i)
    return {"classes": classes, "images": images, "cells": cells}


def _table(head: list[str], rows: list[list[Any]], attrs: str = "") -> str:
    def cell(v: Any, tag: str) -> str:
        num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        text = f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)
        cls = ' class="num"' if num else ""
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

    body = "".join("<tr>" + "".join(cell(v, "td") for v in r) + "</tr>" for r in rows)
    return f"<table{attrs}><tr>{''.join(cell(h, 'th') for h in head)}</tr>{body}</table>"


def _confusion_html(ev: Evaluation, clickable: bool) -> str:
    cm = ev.confusion
    rows = cm.sum(1, keepdims=True)
    rate = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ev.classes)
    body = []
    for i, c in enumerate(ev.classes):
        tds = "".join(f'<td class="cell" data-true="{i}" data-pred="{j}" title="{rate[i, j]:.1%} of {html.escape(c)}"'
                      f' style="background: rgba(9,105,218,{0.08 + 0.8 * rate[i, j]:.2f}); color: '
                      f'{"#fff" if rate[i, j] > 0.55 else "#000"}">{cm[i, j]}</td>' for j in range(len(ev.classes)))
        body.append(f"<tr><th>{html.escape(c)}</th>{tds}</tr>")
    hint = ("Click a cell to list its images." if clickable
            else "Per-image lists need a labelled folder: headstart report MODEL DATA.")
    return (f'<table id="confusion"><tr><th class="corner">true \\ predicted</th>{head}</tr>{"".join(body)}</table>'
            f'<p class="note">{hint}</p><p id="cell-caption" class="note"></p><div id="cell-list"></div>')


def _gallery_html(report: Report, cfg: Any) -> str:
    from headstart.evaluate.gradcam import overlay

    s, cards = report.scored, []
    by_path = {h.path: h for h in report.heat}
    classes = report.evaluation.classes
    top = np.argsort(-s.losses, kind="stable")[:GALLERY]
    for i in top:
        p, pr = s.paths[i], s.proba[i]
        h = by_path.get(p)
        heat = f'<img class="heat" alt="heat map" src="{_jpeg_uri(overlay(p, h.heat, cfg), 224)}">' if h else ""
        thumb = _thumb(p)
        img = f'<img class="photo" alt="{html.escape(p.name)}" src="{thumb}">' if thumb else ""
        wrong = ' class="bad"' if pr.argmax() != s.labels[i] else ""
        cards.append(f'<div class="card"><div class="pair">{img}{heat}</div><div>{html.escape(p.name)}</div>'
                     f'<div>true {html.escape(classes[s.labels[i]])}, <span{wrong}>predicted '
                     f'{html.escape(classes[int(pr.argmax())])} ({pr.max():.1%})</span>, loss {s.losses[i]:.2f}</div></div>')
    note = ("Heat maps: Grad-CAM of the predicted class over the model's centre crop (red: what raised its score)."
            if report.heat else "")
    return f'<p class="note">{note}</p><div class="gallery" id="gallery">{"".join(cards)}</div>'


def _records_html(records: list[Any]) -> str:
    if not records:
        return "<p>Nothing found.</p>"
    def shown(v: Any) -> Any:
        if isinstance(v, Path):
            return v.name
        if isinstance(v, tuple) and v and all(isinstance(p, Path) for p in v):
            return ", ".join(f"{p.parent.name}/{p.name}" for p in v)
        return "" if v is None else v

    names = [f.name for f in dataclasses.fields(records[0])]
    return _table(names, [[shown(getattr(r, n)) for n in names] for r in records])


def _sections(report: Report, cfg: Any) -> list[str]:
    out = ["<h2>Summary</h2>" + _table(["", ""], [list(r) for r in report.summary])]
    if report.scores:
        rows = [[s.name, s.source, s.n, f"{s.accuracy:.1%}", f"{s.interval[0]:.1%} to {s.interval[1]:.1%}", s.chose]
                for s in report.scores]
        out.append("<h2>Scores</h2>" + _table(["score", "images", "n", "accuracy", "95 % interval (Wilson)",
                                               "what these images chose"], rows))
    ev = report.evaluation
    if ev is not None:
        rows = [[c, float(ev.precision[i]), float(ev.recall[i]), float(ev.f1[i]), int(ev.support[i])]
                for i, c in enumerate(ev.classes)]
        out.append(f"<h2>Per class</h2><p class='note'>On {html.escape(report.evaluated_on)}.</p>"
                   + _table(["class", "precision", "recall", "F1", "support"], rows, ' id="per-class"'))
        out.append("<h2>Confusion matrix</h2>" + _confusion_html(ev, report.scored is not None))
    stages = [("stage 1: head", report.history)] if report.history.train_loss else []
    stages += [("stage 2: fine-tuning", report.stage2)] if report.stage2 and report.stage2.train_loss else []
    if stages:
        out.append(f'<h2>Learning curves</h2><img class="plot" alt="learning curves" src="{_curves_uri(stages)}">')
    if report.scored is not None:
        out.append("<h2>Highest-loss images</h2>" + _gallery_html(report, cfg))
    if report.calibration is not None:
        c = report.calibration
        out.append("<h2>Calibration</h2>" + _table(
            ["", "ECE", "log loss"], [["before", c.ece_before, c.nll_before],
                                      [f"after temperature scaling ({c.fitted_on}, T = {c.temperature:.2f})",
                                       c.ece_after, c.nll_after]])
            + f'<p class="note">n = {c.n}, {c.n_bins} bins. {"Cross-fitted: each half scored with a temperature fitted on the other half." if c.fitted_on == "cross-fitted" else ""}</p>'
            + f'<img class="plot" alt="reliability diagram" src="{_reliability_uri(report.scored, c)}">')
    for title, records in report.extra:
        out.append(f"<h2>{html.escape(title)}</h2>" + _records_html(records))
    if report.left_out:
        out.append("<h2>Left out</h2><ul class='missing'>" + "".join(f"<li>{html.escape(m)}</li>"
                                                                    for m in report.left_out) + "</ul>")
    return out


def render_html(report: Report, cfg: Any) -> str:
    """The page as one string. `cfg` is the backbone's PreprocessConfig (the heat maps are drawn on its crop)."""
    data = json.dumps(_images_data(report), separators=(",", ":")).replace("</", "<\\/")  # cannot close the tag
    return Template(PAGE.read_text(encoding="utf-8")).substitute(
        title=html.escape(report.title), subtitle=html.escape(f"model {report.title}, evaluated on {report.evaluated_on}"),
        sections="\n".join(_sections(report, cfg)), images_json=data)


def write_report(clf: Any, model_dir: str | Path, data: str | Path | None = None, out: str | Path | None = None,
                 heat_maps: bool = True, progress: Progress | None = None, split: str | None = None) -> Path:
    """Build and write the report (atomically: a failed run leaves any previous report whole); its path."""
    from headstart.paths import atomic_write_bytes

    report = build_report(clf, model_dir, data, heat_maps, progress, split)
    path = Path(out) if out is not None else Path(model_dir) / "report.html"
    atomic_write_bytes(path, render_html(report, clf.frozen_.spec.preprocess).encode("utf-8"))
    return path
