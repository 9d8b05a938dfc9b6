"""What the CLI prints for a multi-label model: the train summary, `evaluate`'s tables and JSON, and `predict`'s
table, CSV (a `labels` column, then one probability column per label) and JSON. Every user-controlled string goes
through `render.shown`."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from headstart.cli.render import (
    _backbone_line,
    _head_line,
    _kept_head_candidates,
    _key_value_table,
    _listed,
    out_console,
    shown,
)
from headstart.api import ImageClassifier
from headstart.data.multilabel import MultiLabelSummary
from headstart.records import MultiLabelEvaluation
from headstart.serve.multilabel import LabelledRow


def figures_line(ev: MultiLabelEvaluation) -> str:
    return (f"mAP {ev.map:.3f}, micro F1 {ev.micro_f1:.3f}, macro F1 {ev.macro_f1:.3f}, subset accuracy "
            f"{ev.subset_accuracy:.1%}, Hamming loss {ev.hamming_loss:.4f} (n={ev.n})")


def train_summary(clf: ImageClassifier, data: Path, backbone: str, saved: Path) -> Table:
    classes, report = clf.classes_, clf.report_
    ml, history, timings, decision = report.multilabel, clf.history_, clf.timings_, clf.decision_
    listed = ", ".join(classes[:10]) + (f" ... (+{len(classes) - 10})" if len(classes) > 10 else "")
    images = ", ".join(f"{split} {n}" for split, n in ml.images.items())
    rows = [("data", str(data)), ("labels", f"{len(classes)}: {listed} (multi-label: sigmoid outputs)"),
            ("images", images), ("skipped files", str(len(clf.skipped_))),
            ("backbone", _backbone_line(backbone, clf.frozen_.spec.preprocess)),
            ("head", _head_line(clf.head_config_, _kept_head_candidates(decision))),
            ("features", f"{sum(ml.images.values()) - clf.cached_} extracted, {clf.cached_} from cache, "
                         f"{timings.get('features_s', 0.0):.1f} s"),
            ("training", f"{len(history.train_loss)} epochs{' (stopped early)' if history.stopped_early else ''}, "
                         f"best epoch {history.best_epoch + 1}, {timings.get('train_s', 0.0):.1f} s")]
    if decision.reason:
        rows.append(("strategy", f"{decision.strategy}: {decision.reason}"))
    if ml.val is not None:
        chose = (["the head"] if decision.kept_head_candidates else []) + ["its stopping epoch", "the thresholds"]
        rows.append(("validation", f"{figures_line(ml.val)}; this split chose {_listed(chose)}, so it flatters"
                                   + ("; of the head before its refit" if decision.refitted else "")))
    if ml.test is not None:
        rows.append(("test", f"{figures_line(ml.test)}; this split chose nothing"))
    rows.append(("thresholds", thresholds_line(clf)))
    if decision.refitted:
        rows.append(("refit", f"the shipped head was refitted on train + val ({decision.refitted} images) for "
                              f"{history.best_epoch + 1} epochs, keeping the thresholds"))
    rows.append(("saved to", str(saved)))
    return _key_value_table("headstart train (multi-label)", rows)


def thresholds_line(clf: ImageClassifier) -> str:
    ml = clf.report_.multilabel
    if ml.threshold_override is not None:
        return f"{ml.threshold_override:g} for every label (--threshold)"
    if len(ml.untuned) == len(clf.classes_):
        return "0.5 for every label (no validation split to tune them on)"
    line = "each label's own, maximising its F1 on validation (shrunk towards 0.5 when few positives back it)"
    if ml.untuned:
        line += (f"; {len(ml.untuned)} label(s) with under {ml.min_positives} validation positives keep 0.5: "
                 + ", ".join(ml.untuned))
    return line


def print_evaluation(ev: MultiLabelEvaluation) -> None:
    console = out_console()
    console.print(_key_value_table("evaluation (multi-label)", [
        ("images", str(ev.n)), ("mAP", f"{ev.map:.4f} (macro average precision over labels with a positive)"),
        ("micro F1", f"{ev.micro_f1:.4f}"), ("macro F1", f"{ev.macro_f1:.4f}"),
        ("subset accuracy", f"{ev.subset_accuracy:.2%} (every label of the image right)"),
        ("Hamming loss", f"{ev.hamming_loss:.4f} (wrong image-label pairs)")]))
    table = Table(title="per label", title_justify="left")
    table.add_column("label")
    for name in ("precision", "recall", "F1", "AP", "support", "threshold"):
        table.add_column(name, justify="right")
    for s in ev.per_label:
        table.add_row(Text(shown(s.name)), f"{s.precision:.3f}", f"{s.recall:.3f}", f"{s.f1:.3f}",
                      "-" if s.ap is None else f"{s.ap:.3f}", str(s.support), f"{s.threshold:.3f}")
    console.print(table)


def evaluation_json(ev: MultiLabelEvaluation, skipped: Sequence[tuple[Path, str]]) -> str:
    payload = ev.to_dict()
    for s in payload["per_label"]:
        s["name"] = shown(s["name"])
    payload["skipped"] = [{"path": shown(path), "reason": shown(reason)} for path, reason in skipped]
    return json.dumps(payload, indent=2)


def csv_header(classes: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["path", "labels", *(shown(c) for c in classes), "error"])
    return buf.getvalue()


def csv_row(row: LabelledRow, classes: Sequence[str]) -> str:
    """One CSV line: the path, its labels separated by ';' (as a manifest writes them), each label's probability."""
    buf = io.StringIO()
    probs = [f"{row.probabilities[c]:.4f}" for c in classes] if row.error is None else [""] * len(classes)
    csv.writer(buf, lineterminator="\n").writerow(
        [shown(row.path), ";".join(shown(label) for label in row.labels), *probs, shown(row.error or "")])
    return buf.getvalue()


def predictions_json(rows: Iterable[LabelledRow]) -> str:
    return json.dumps([row_json(r) for r in rows], indent=2)


def row_json(row: LabelledRow) -> dict[str, Any]:
    return {"path": shown(row.path), "labels": [shown(label) for label in row.labels],
            "scores": [{"label": shown(c), "probability": p, "threshold": row.thresholds[c], "on": c in row.labels}
                       for c, p in row.probabilities.items()],
            "error": None if row.error is None else shown(row.error)}


def predictions_table(rows: Sequence[LabelledRow]) -> Table:
    table = Table()
    table.add_column("path", no_wrap=True)
    table.add_column("labels", overflow="fold")
    table.add_column("probabilities (on ones first)", overflow="fold")
    for row in rows:
        if row.error is not None:
            table.add_row(Text(shown(row.path)), Text("-"), Text(f"error: {shown(row.error)}", style="red"))
            continue
        ranked = sorted(row.probabilities.items(), key=lambda kv: (kv[0] not in row.labels, -kv[1]))
        ranked = ranked[:max(5, len(row.labels))]
        table.add_row(Text(shown(row.path)), Text(", ".join(shown(label) for label in row.labels) or "(none)"),
                      Text(", ".join(f"{shown(c)} {p:.3f}" for c, p in ranked)))
    return table


def print_check(summary: MultiLabelSummary) -> None:
    """`headstart check` on a multi-label manifest (`data.multilabel.MultiLabelSummary`)."""
    from headstart.cli.render import note, print_skipped

    console = out_console()
    images = ", ".join(f"{split} {n}" for split, n in summary.images.items())
    console.print(Text(shown(f"headstart check {summary.root}: multi-label, {len(summary.classes)} labels, "
                             f"{images}; {summary.unlabelled} image(s) with no label")))
    splits = list(summary.positives)
    table = Table(title="positives per label", title_justify="left")
    table.add_column("label")
    for split in splits:
        table.add_column(split, justify="right")
    for c in summary.classes:
        table.add_row(Text(shown(c)), *(str(summary.positives[s][c]) for s in splits))
    console.print(table)
    if summary.pairs:
        pairs = Table(title="labels that occur together most (images holding both)", title_justify="left")
        pairs.add_column("labels")
        pairs.add_column("images", justify="right")
        for a, b, n in summary.pairs:
            pairs.add_row(Text(shown(f"{a} + {b}")), str(n))
        console.print(pairs)
    if summary.never:
        note(f"warning: no training image has {', '.join(map(shown, summary.never))}: it cannot be learnt")
    if summary.always:
        note(f"warning: every training image has {', '.join(map(shown, summary.always))}: nothing to tell apart")
    print_skipped(summary.skipped)
