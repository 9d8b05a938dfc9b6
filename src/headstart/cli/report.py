"""`headstart report`: one self-contained HTML page about a saved model, written into its directory."""

from pathlib import Path
from typing import Annotated

import typer

from headstart.cli import render
from headstart.cli.base import app
from headstart.cli.progress import ProgressBars


@app.command()
def report(
    model: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="A saved model directory.")],
    data: Annotated[
        Path | None, typer.Argument(exists=True, file_okay=False,
                                    help="A labelled folder (class sub-folders) to score, e.g. held-out photos.")
    ] = None,
    out: Annotated[Path | None, typer.Option(dir_okay=False, help="Where to write it (default MODEL/report.html).")] = None,
    heatmaps: Annotated[bool, typer.Option(help="Grad-CAM heat maps for the highest-loss images.")] = True,
) -> None:
    """Write MODEL/report.html: summary, scores, per-class table, confusion matrix, curves, gallery, calibration."""
    from headstart.api import ImageClassifier
    from headstart.evaluate.report import write_report

    clf = ImageClassifier.load(model)
    if clf.multi_label_:
        from headstart.errors import ConfigError

        raise ConfigError(f"{model}: report.html is not available for multi-label models yet; `headstart evaluate "
                          f"{model} --manifest test.csv` prints every label's precision, recall, F1 and AP")
    with ProgressBars() as bars:
        path = write_report(clf, model, data, out, heat_maps=heatmaps, progress=bars)
    render.note(f"report written to {path}")
