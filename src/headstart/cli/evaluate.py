"""`headstart evaluate`: score a saved model on a labelled folder, as tables or JSON."""

from pathlib import Path
from typing import Annotated, Literal

import typer

from headstart.cli import render
from headstart.cli.progress import ProgressBars
from headstart.cli.base import app


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(exists=True, help="A saved model directory.")],
    data: Annotated[Path | None, typer.Argument(
        exists=True, help="Folder of class sub-folders named like the model's, or a manifest.", show_default=False)] = None,
    manifest: Annotated[Path | None, typer.Option(
        "--manifest", exists=True, dir_okay=False, help="A CSV or JSON Lines file of path,label rows, instead of DATA.",
        show_default=False)] = None,
    fmt: Annotated[Literal["table", "json"], typer.Option("--format", help="table, or json on stdout.")] = "table",
    confusion: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Where to write the confusion matrix PNG.")
    ] = None,
) -> None:
    """Score a saved model on a labelled folder."""
    from headstart.cli.train import _data_or_manifest

    data = _data_or_manifest(data, manifest, "evaluate")
    from headstart.api import ImageClassifier

    clf = ImageClassifier.load(model)
    with ProgressBars() as bars:
        evaluation, skipped = clf.evaluate(data, progress=bars)
    png = render.write_confusion(evaluation, confusion or model / "confusion.png", title=f"Confusion matrix: {data}")
    if fmt == "json":
        typer.echo(render.evaluation_json(evaluation, skipped))
    else:
        render.print_evaluation(evaluation)
    if png is not None:
        render.note(f"confusion matrix written to {png}")
    render.print_skipped(skipped)
