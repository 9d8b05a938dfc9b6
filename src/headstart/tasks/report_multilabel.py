"""A multi-label model's report page: one self-contained HTML file (no script, nothing fetched) with the scores, the
per-label table, each label's precision-recall curve and, per label, the most confident mistakes (the negatives it
scored highest over its threshold, the positives it scored lowest under it) as thumbnails.

`train` writes it from the validation split it holds in memory; `headstart report MODEL test.csv` from a manifest.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from headstart.api import ImageClassifier
from headstart.evaluate.multilabel import _pr_points, decide
from headstart.evaluate.svg_plot import Line, Panel, chart_uri
from headstart.records import MultiLabelEvaluation, MultiLabelScored
from headstart.tasks.report_html import _table, _thumb

MISTAKES_PER_LABEL = 3  # of each kind: confident false positives, confident misses
CURVES_PER_ROW = 3

_STYLE = """body{font:15px/1.45 system-ui,sans-serif;color:#1d2430;max-width:1200px;margin:0 auto;padding:0 16px 40px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #dde1e7;padding:3px 8px}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f5f8}.muted{color:#5d6673}
.mistakes{display:flex;flex-wrap:wrap;gap:10px;margin:4px 0 14px}.mistakes figure{margin:0;width:110px;font-size:12px}
.mistakes img{display:block;width:96px;height:96px;object-fit:cover}img.curves{max-width:100%}"""


def render(title: str, evaluated_on: str, summary: list[tuple[str, str]], ev: MultiLabelEvaluation,
           scored: MultiLabelScored, classes: tuple[str, ...] | list[str], thresholds: tuple[float, ...]) -> str:
    """The page as one string."""
    scores = [["images", ev.n], ["mAP (macro AP, labels with a positive)", ev.map], ["micro F1", ev.micro_f1],
              ["macro F1", ev.macro_f1], ["subset accuracy", ev.subset_accuracy], ["Hamming loss", ev.hamming_loss]]
    per = [[s.name, s.precision, s.recall, s.f1, "-" if s.ap is None else s.ap, s.support, s.threshold]
           for s in ev.per_label]
    parts = [f"<h1>{html.escape(title)}</h1><p class=muted>multi-label model, evaluated on "
             f"{html.escape(evaluated_on)}</p>", "<h2>Summary</h2>", _table(["", ""], [list(r) for r in summary]),
             "<h2>Scores</h2>", _table(["figure", "value"], scores), "<h2>Per label</h2>",
             _table(["label", "precision", "recall", "F1", "AP", "support", "threshold"], per),
             "<h2>Precision-recall curves</h2>", *_curves(scored, classes, thresholds),
             "<h2>Most confident mistakes per label</h2>", *_mistakes(scored, classes, thresholds)]
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content="
            f"'width=device-width,initial-scale=1'><title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{''.join(parts)}</body></html>")


def _curves(scored: MultiLabelScored, classes, thresholds) -> list[str]:
    panels = []
    for j, name in enumerate(classes):
        y = scored.targets[:, j].astype(bool)
        if not y.any():
            continue
        precision, recall, cut, _ = _pr_points(y, scored.proba[:, j])
        at = int(np.argmin(np.abs(cut - thresholds[j])))  # the point the stored threshold picks
        panels.append(Panel(f"{name} (n+={int(y.sum())})", "recall", "precision", [
            Line([0.0, *recall.tolist()], [1.0, *precision.tolist()], "curve"),
            Line([float(recall[at])], [float(precision[at])], "at threshold", colour="orange", markers=True)],
            x_range=(0.0, 1.0), y_range=(0.0, 1.0)))
    rows = [panels[i:i + CURVES_PER_ROW] for i in range(0, len(panels), CURVES_PER_ROW)]
    return [f'<img class=curves alt="precision-recall curves" src="{chart_uri(r, 300, 200)}">' for r in rows] \
        or ["<p class=muted>no label has a positive among these images</p>"]


def _mistakes(scored: MultiLabelScored, classes, thresholds) -> list[str]:
    on = decide(scored.proba, thresholds).astype(bool)
    y = scored.targets.astype(bool)
    out = []
    for j, name in enumerate(classes):
        wrong_on = np.flatnonzero(on[:, j] & ~y[:, j])
        missed = np.flatnonzero(~on[:, j] & y[:, j])
        wrong_on = wrong_on[np.argsort(-scored.proba[wrong_on, j])][:MISTAKES_PER_LABEL]
        missed = missed[np.argsort(scored.proba[missed, j])][:MISTAKES_PER_LABEL]
        if not len(wrong_on) and not len(missed):
            continue
        figures = [_figure(scored, i, j, "on, not tagged") for i in wrong_on] + \
                  [_figure(scored, i, j, "tagged, missed") for i in missed]
        out.append(f"<h3>{html.escape(name)}</h3><div class=mistakes>{''.join(figures)}</div>")
    return out or ["<p class=muted>no mistakes</p>"]


def _figure(scored: MultiLabelScored, i: int, j: int, kind: str) -> str:
    thumb = _thumb(scored.paths[i])
    img = f'<img alt="" src="{thumb}">' if thumb else ""
    return (f"<figure>{img}<figcaption>{html.escape(kind)}: {scored.proba[i, j]:.2f}<br>"
            f"{html.escape(scored.paths[i].name)}</figcaption></figure>")


def write_report(clf: ImageClassifier, model_dir: str | Path, scored: MultiLabelScored, evaluated_on: str,
                 out: str | Path | None = None) -> Path:
    """Write the page (default MODEL/report.html) atomically for the fitted or loaded multi-label `clf`."""
    from headstart.evaluate.multilabel import evaluate_multilabel
    from headstart.paths import atomic_write_bytes

    model_dir = Path(model_dir)
    thresholds = clf.decision_thresholds()
    ev = evaluate_multilabel(scored.targets, scored.proba, thresholds, clf.classes_)
    head = clf.head_config_
    ml = clf.report_.multilabel
    summary = [("labels", ", ".join(clf.classes_)), ("backbone", clf.frozen_.spec.name),
               ("head", f"hidden {list(head.hidden)}" if head.hidden else "linear"),
               ("trained on", ", ".join(f"{s} {n}" for s, n in (ml.images.items() if ml else ()))),
               ("thresholds", "each label's own (validation F1, shrunk towards 0.5)" if clf.threshold is None
                else f"{clf.threshold:g} for every label")]
    if ml is not None and ml.untuned:
        summary.append(("left at 0.5 (few validation positives)", ", ".join(ml.untuned)))
    path = Path(out) if out else model_dir / "report.html"
    page = render(model_dir.name, evaluated_on, summary, ev, scored, clf.classes_, thresholds)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
