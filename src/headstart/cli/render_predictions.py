"""What `headstart predict` prints: a table that never breaks a path, CSV rows (streamed one at a time) and
JSON; every user-controlled string through `render.shown` (see cli/render.py for why)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from headstart.cli.render import _pct, _table_frame, _widest, shown

if TYPE_CHECKING:
    from headstart.api import Prediction


def _top_k_text(top_k: Sequence[tuple[str, float]]) -> str:
    # The CSV form from the brief: label:0.123;label2:0.045
    return ";".join(f"{shown(label)}:{p:.4f}" for label, p in top_k)


def predictions_table(preds: Sequence[Prediction], width: int = 200) -> RenderableType:
    """A table at most `width` wide in which no path is ever broken or cut: the top-k column goes first, then
    the table itself (one path per line, its label beneath)."""
    paths = [shown(p.path) for p in preds]
    labels = [shown(p.label or "-") for p in preds]
    fixed = _widest("path", paths) + _widest("label", labels) + len("confidence")
    # top-k folds between its "label 0.123," pairs, so it needs room for the longest pair, never less.
    top_k_min = max([len("top-k"), *(len(label) + 7 for p in preds for label, _ in p.top_k)])
    if fixed + top_k_min + _table_frame(4) <= width:
        return _predictions_grid(preds, with_top_k=True)
    if fixed + _table_frame(3) <= width:
        return _predictions_grid(preds, with_top_k=False)
    lines: list[Text] = []
    for p in preds:
        lines.append(Text(shown(p.path), no_wrap=True, overflow="ignore"))  # whole, even past the edge
        lines.append(Text("  ") + _prediction_detail(p))
    return Group(*lines)


def _predictions_grid(preds: Sequence[Prediction], with_top_k: bool) -> Table:
    table = Table()
    table.add_column("path", no_wrap=True)
    table.add_column("label", overflow="fold")  # holds the error when there is no top-k column
    table.add_column("confidence", justify="right", no_wrap=True)
    if with_top_k:
        table.add_column("top-k", overflow="fold")
    for p in preds:
        if p.error is not None:
            error = Text(f"error: {shown(p.error)}", style="red")
            cells = [Text("-"), "", error] if with_top_k else [error, ""]
        else:
            confidence = _pct(p.confidence) if p.confidence is not None else ""
            cells = [Text(shown(p.label or "")), confidence] + ([Text(_top_k_words(p.top_k))] if with_top_k else [])
        table.add_row(Text(shown(p.path)), *cells)
    return table


def _top_k_words(top_k: Sequence[tuple[str, float]]) -> str:
    return ", ".join(f"{shown(label)} {prob:.3f}" for label, prob in top_k)


def _prediction_detail(p: Prediction) -> Text:
    if p.error is not None:
        return Text(f"error: {shown(p.error)}", style="red")
    confidence = f" {_pct(p.confidence)}" if p.confidence is not None else ""
    return Text(f"{shown(p.label or '')}{confidence}  (top-k: {_top_k_words(p.top_k)})")


CSV_HEADER = "path,label,confidence,top_k,error"


def predictions_csv(preds: Sequence[Prediction]) -> str:
    return CSV_HEADER + "\n" + "".join(prediction_csv_row(p) for p in preds)


def prediction_csv_row(p: Prediction) -> str:
    """One CSV line (with its newline), quoted as the csv module quotes."""
    buf = io.StringIO()
    confidence = f"{p.confidence:.4f}" if p.confidence is not None else ""
    csv.writer(buf, lineterminator="\n").writerow(
        [shown(p.path), shown(p.label or ""), confidence, _top_k_text(p.top_k), shown(p.error or "")])
    return buf.getvalue()


def predictions_json(preds: Sequence[Prediction]) -> str:
    rows: list[dict[str, Any]] = [
        {
            "path": shown(p.path),
            "label": None if p.label is None else shown(p.label),
            "confidence": p.confidence,
            "top_k": [{"label": shown(label), "confidence": prob} for label, prob in p.top_k],
            "error": None if p.error is None else shown(p.error),
        }
        for p in preds
    ]
    return json.dumps(rows, indent=2)
