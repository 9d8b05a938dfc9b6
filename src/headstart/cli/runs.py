"""`headstart runs [FOLDER]`: the models saved under a folder, one row each, oldest first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from headstart.cli import render
from headstart.cli.base import app


@app.command()
def runs(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Where to look (searched down to 6 "
                                           "levels; checkpoint, tb and mlruns folders skipped).")] = Path("."),
    fmt: Annotated[Literal["table", "json"], typer.Option("--format", help="table, or json on stdout.")] = "table",
) -> None:
    """List the models under FOLDER: data, backbone, strategy, scores, training time, date."""
    from headstart.track.listing import find_runs

    found, unreadable = find_runs(folder)
    if fmt == "json":
        typer.echo(render.shown(json.dumps({"runs": [r.to_dict() for r in found],
                                            "unreadable": [[str(p), why] for p, why in unreadable]}, indent=2)))
        return
    if not found:
        render.note(f"no models under {folder} (a model is a folder with headstart.json)")
    else:
        render.out_console().print(_table(found))
    for path, why in unreadable:
        render.note(f"skipped {render.shown(path)}: {why}")


def _table(found) -> Table:
    table = Table(title="models", title_justify="left")
    for column in ("model", "data", "backbone", "strategy", "val acc", "val bal acc", "test acc", "cv acc",
                   "train", "date"):
        table.add_column(column, justify="right" if "acc" in column or column == "train" else "left")

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{x:.2%}"

    for r in found:
        strategy = r.strategy if r.strategy == r.kept or not r.kept else f"{r.strategy} → {r.kept}"
        table.add_row(render.shown(r.model), render.shown(_short(r.data)), r.backbone, strategy, pct(r.val_accuracy),
                      pct(r.val_balanced_accuracy), pct(r.test_accuracy), pct(r.cv_accuracy), f"{r.train_s:.1f} s",
                      r.created[:16].replace("T", " "))
    return table


def _short(path: str) -> str:
    """The last two parts of a data path: enough to tell runs apart in a table."""
    parts = Path(path).parts
    return str(Path(*parts[-2:])) if len(parts) > 2 else path
