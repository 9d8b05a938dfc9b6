"""`headstart predict`: label images with a saved model, as a table, CSV or JSON."""

from pathlib import Path
from typing import Annotated, Literal

import typer

from headstart.cli import render
from headstart.cli.progress import ProgressBars
from headstart.cli.base import app


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(exists=True, help="A saved model directory.")],
    # readable=False: click would refuse the whole command for one unreadable file; it is a row with an error.
    images: Annotated[list[Path], typer.Argument(readable=False, help="Image files or folders (folders recurse).")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many labels to list per image.")] = 3,
    fmt: Annotated[Literal["table", "csv", "json"], typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Label images with a saved model. Unreadable files become rows with an error."""
    from headstart.api import ImageClassifier

    clf = ImageClassifier.load(model)
    if fmt == "csv":  # streamed: a row per input as soon as its chunk is predicted, memory flat
        with ProgressBars() as bars:
            preds = []
            typer.echo(render.CSV_HEADER)
            for row in clf.iter_table(images, top_k=top_k, progress=bars):
                typer.echo(render.prediction_csv_row(row), nl=False)
                preds.append(row.error is None)
        if not preds:
            render.note("no images found in the given paths")
        if not any(preds):
            raise typer.Exit(1)
        return
    with ProgressBars() as bars:
        preds = clf.predict_table(images, top_k=top_k, progress=bars)
    if fmt == "json":
        typer.echo(render.predictions_json(preds))
    else:
        console = render.out_console()
        console.print(render.predictions_table(preds, console.width), crop=False)
    if not preds:
        render.note("no images found in the given paths")
    # Exit 1 only when nothing at all could be labelled; a few bad files are reported in their rows.
    if all(p.error is not None for p in preds):
        raise typer.Exit(1)
