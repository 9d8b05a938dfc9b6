"""`headstart predict`: label images with a saved model, as a table, CSV or JSON."""

from pathlib import Path
from typing import Annotated, Literal

import typer

from headstart.cli import render, render_predictions
from headstart.cli.base import app
from headstart.cli.progress import ProgressBars


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(exists=True, help="A saved model directory.")],
    # readable=False: click would refuse the whole command for one unreadable file; it is a row with an error.
    images: Annotated[list[Path] | None, typer.Argument(
        readable=False, help="Image files or folders (folders recurse).", show_default=False)] = None,
    manifest: Annotated[Path | None, typer.Option(
        "--manifest", help="A CSV (with a 'path' column) or JSON Lines file listing the images: one row out per row.",
        show_default=False)] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many labels to list per image.")] = 3,
    fmt: Annotated[Literal["table", "csv", "json"], typer.Option("--format", help="table, csv or json.")] = "table",
    threshold: Annotated[float | None, typer.Option(
        "--threshold", metavar="<p>",
        help="Multi-label: one threshold for every label instead of the model's own.", show_default=False)] = None,
) -> None:
    """Label images with a saved model. Unreadable files become rows with an error."""
    images = _images_or_manifest(images or [], manifest)  # a bad manifest row is one line before the model loads
    from headstart import options
    from headstart.api import ImageClassifier
    from headstart.cli.train import flag_name

    options.check({"threshold": threshold}, spell=flag_name)  # (0, 1), checked as train checks it
    clf = ImageClassifier.load(model)
    if getattr(clf, "multi_label_", False):  # a test's stand-in classifier has none
        clf.threshold = threshold if threshold is not None else clf.threshold
        _predict_multilabel(clf, images, fmt)
        return
    if fmt == "csv":  # streamed: a row per input as soon as its chunk is predicted, memory flat
        with ProgressBars() as bars:
            preds = []
            typer.echo(render_predictions.CSV_HEADER)
            for row in clf.iter_table(images, top_k=top_k, progress=bars):
                typer.echo(render_predictions.prediction_csv_row(row), nl=False)
                preds.append(row.error is None)
        if not preds:
            render.note("no images found in the given paths")
        if not any(preds):
            raise typer.Exit(1)
        return
    with ProgressBars() as bars:
        preds = clf.predict_table(images, top_k=top_k, progress=bars)
    if fmt == "json":
        typer.echo(render_predictions.predictions_json(preds))
    else:
        console = render.out_console()
        console.print(render_predictions.predictions_table(preds, console.width), crop=False)
    if not preds:
        render.note("no images found in the given paths")
    # Exit 1 only when nothing at all could be labelled; a few bad files are reported in their rows.
    if all(p.error is not None for p in preds):
        raise typer.Exit(1)


def _predict_multilabel(clf, images: list[Path], fmt: str) -> None:
    """Every label over its threshold and each label's probability; CSV streamed as single-label CSV is."""
    from headstart.cli import render_multilabel

    with ProgressBars() as bars:
        rows = clf.iter_labelled(images, progress=bars)
        if fmt == "csv":
            typer.echo(render_multilabel.csv_header(clf.classes_), nl=False)
            done = []
            for row in rows:
                typer.echo(render_multilabel.csv_row(row, clf.classes_), nl=False)
                done.append(row.error is None)
        else:
            rows = list(rows)
            done = [row.error is None for row in rows]
    if fmt == "json":
        typer.echo(render_multilabel.predictions_json(rows))
    elif fmt == "table":
        render.out_console().print(render_multilabel.predictions_table(rows), crop=False)
    if not done:
        render.note("no images found in the given paths")
    if not any(done):
        raise typer.Exit(1)


def _images_or_manifest(images: list[Path], manifest: Path | None) -> list[Path]:
    """The inputs: IMAGES, or the paths --manifest lists in its order (relative to its folder), not both."""
    from headstart.errors import DataError

    if manifest is None:
        if not images:
            raise DataError("nothing to predict — give image files or folders, or --manifest inputs.csv")
        return images
    if images:
        raise DataError(f"give image paths or --manifest ({manifest}), not both")
    from headstart.data.manifest import MANIFEST_SUFFIXES, input_paths

    if manifest.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataError(f"--manifest {manifest}: name it .csv (comma-separated, a header line first) or .jsonl (one "
                        "JSON object per line) so headstart knows how to read it")
    return input_paths(manifest)
