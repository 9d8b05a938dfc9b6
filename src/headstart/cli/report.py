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
        Path | None, typer.Argument(exists=True,
                                    help="A labelled folder (class sub-folders) to score, e.g. held-out photos; a "
                                         "manifest of path,labels rows for a multi-label model.")
    ] = None,
    out: Annotated[Path | None, typer.Option(dir_okay=False, help="Where to write it (default MODEL/report.html).")] = None,
    heatmaps: Annotated[bool, typer.Option(help="Grad-CAM heat maps for the highest-loss images.")] = True,
) -> None:
    """Write MODEL/report.html: summary, scores, per-class table, confusion matrix, curves, gallery, calibration."""
    from headstart.api import ImageClassifier
    from headstart.tasks.report import write_report

    clf = ImageClassifier.load(model)
    if getattr(clf, "multi_label_", False):  # a test's stand-in classifier has none
        _multi_label_report(clf, model, data, out)
        return
    with ProgressBars() as bars:
        path = write_report(clf, model, data, out, heat_maps=heatmaps, progress=bars)
    render.note(f"report written to {path}")


def _multi_label_report(clf, model: Path, data: Path | None, out: Path | None) -> None:
    """A multi-label model's page, scored on a manifest (held-out rows)."""
    from headstart.errors import DataError
    from headstart.serve.multilabel import scored_manifest
    from headstart.tasks.report_multilabel import write_report

    if data is None or data.is_dir():
        raise DataError(f"a multi-label model is reported on a manifest of path,labels rows: headstart report "
                        f"{model} test.csv")
    with ProgressBars() as bars:
        scored, skipped = scored_manifest(clf._predictor(), data, bars)
    render.note(f"report written to {write_report(clf, model, scored, str(data), out)}")
    render.print_skipped(skipped)
