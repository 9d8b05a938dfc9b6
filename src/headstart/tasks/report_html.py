"""The report page drawn from a `report.Report`: HTML tables, the clickable confusion matrix, the top-loss
gallery with its heat maps, thumbnails and SVG charts (`svg_plot`) as data: URIs, all filled into
`report_page.html`. Grad-CAM's overlay is imported only for the gallery.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import numpy as np
from PIL import Image

from headstart.evaluate.calibration import reliability_bins, scaled_proba
from headstart.evaluate.crossval import wilson_interval
from headstart.evaluate.gradcam import HeatMap, overlay
from headstart.evaluate.labels import LabelIssue
from headstart.evaluate.svg_plot import Line, Panel, chart_uri
from headstart.records import Calibration, Evaluation, History, Scored
from headstart.tasks.check import Finding
from headstart.text import shown
from headstart.vision.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("report_page.html")
MAX_THUMBS = 600  # images beyond this are listed by name only: 600 thumbnails are ~1.5 MB of page
THUMB_PX = 96
GALLERY = 8  # top-loss images shown, each with its heat map (a second of CPU each)


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
    heat: list[HeatMap]
    history: History
    stage2: History | None
    extra: list[tuple[str, Sequence[LabelIssue] | Sequence[Finding]]] = field(default_factory=list)  # (title, rows)
    left_out: list[str] = field(default_factory=list)  # sections not drawn, and why
    max_thumbs: int = MAX_THUMBS


def _curves_uri(stages: list[tuple[str, History]]) -> str:
    panels = []
    for name, h in stages:
        epochs = list(range(1, len(h.train_loss) + 1))
        panel = Panel(name, "epoch", "loss", right_label="val accuracy", right_range=(0.0, 1.02),
                      lines=[Line(epochs, h.train_loss, "train loss", "blue"),
                             Line(epochs[:len(h.val_loss)], h.val_loss, "val loss", "orange"),
                             Line(epochs[:len(h.val_accuracy)], h.val_accuracy, "val accuracy", "green", right=True)])
        if h.best_epoch >= 0:
            panel.vlines.append((h.best_epoch + 1, "kept epoch"))
        panels.append(panel)
    return chart_uri(panels)


def _reliability_uri(scored: Scored, cal: Calibration) -> str:
    width = 1.0 / cal.n_bins
    panel = Panel(f"reliability ({cal.n_bins} bins of {width:.3f})", "confidence (top class)", "accuracy",
                  x_range=(0.0, 1.0), y_range=(0.0, 1.02))
    for name, t, colour in (("before", 1.0, "red"), (f"T = {cal.temperature:.2f}", cal.temperature, "blue")):
        b = reliability_bins(scored.labels, scaled_proba(scored.logits, t), cal.n_bins)
        used = b.count > 0
        panel.lines.append(Line(b.confidence[used].tolist(), b.accuracy[used].tolist(), name, colour, markers=True))
    panel.lines.append(Line([0.0, 1.0], [0.0, 1.0], "perfect", "grey", dashed=True))
    return chart_uri([panel], width=330, height=300)


def _jpeg_uri(img: Image.Image, px: int) -> str:
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


def _table(head: list[str], rows: Sequence[Sequence[object]], attrs: str = "") -> str:
    def cell(v: object, tag: str) -> str:
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


def _gallery_html(report: Report, cfg: PreprocessConfig) -> str:
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


def _records_html(records: Sequence[LabelIssue] | Sequence[Finding]) -> str:
    if not records:
        return "<p>Nothing found.</p>"
    def shown(v: object) -> object:
        if isinstance(v, Path):
            return v.name
        if isinstance(v, tuple) and v and all(isinstance(p, Path) for p in v):
            return ", ".join(f"{p.parent.name}/{p.name}" for p in v)
        return "" if v is None else v

    names = [f.name for f in dataclasses.fields(records[0])]
    return _table(names, [[shown(getattr(r, n)) for n in names] for r in records])


def _sections(report: Report, cfg: PreprocessConfig) -> list[str]:
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


def render_html(report: Report, cfg: PreprocessConfig) -> str:
    """The page as one string. `cfg` is the backbone's PreprocessConfig (the heat maps are drawn on its crop)."""
    data = json.dumps(_images_data(report), separators=(",", ":")).replace("</", "<\\/")  # cannot close the tag
    # Names from the file system may not be valid UTF-8 (`text.shown`): the page shows their bad bytes as \xNN.
    return shown(Template(PAGE.read_text(encoding="utf-8")).substitute(
        title=html.escape(report.title), subtitle=html.escape(f"model {report.title}, evaluated on {report.evaluated_on}"),
        sections="\n".join(_sections(report, cfg)), images_json=data))
