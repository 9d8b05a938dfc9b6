"""`headstart evaluate`: score a saved model on a labelled folder, as tables or JSON; `--tta` also scores each
image averaged with its mirror image and says what that gained."""

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from headstart.cli import render
from headstart.cli.base import app
from headstart.cli.progress import ProgressBars


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
    tta: Annotated[bool, typer.Option(
        "--tta", help="Average each image with its mirror image; report accuracy and log loss with and without.")
    ] = False,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", metavar="<p>",
        help="Multi-label: one threshold for every label instead of the model's own.", show_default=False)] = None,
) -> None:
    """Score a saved model on a labelled folder (a multi-label model: on a manifest of path,labels rows)."""
    from headstart.cli.train import _data_or_manifest

    data = _data_or_manifest(data, manifest, "evaluate")
    from headstart import options
    from headstart.api import ImageClassifier
    from headstart.cli.train import flag_name

    options.check({"threshold": threshold}, spell=flag_name)  # (0, 1), checked as train checks it
    clf = ImageClassifier.load(model)
    if getattr(clf, "multi_label_", False):  # a test's stand-in classifier has none
        _evaluate_multilabel(clf, data, fmt, tta, threshold)
        return
    with ProgressBars() as bars:
        if tta:
            result = clf.evaluate_tta(data, progress=bars)
        else:
            result = clf.evaluate(data, progress=bars)
    evaluation, skipped, both = result.metrics, list(result.skipped), result.tta
    png = render.write_confusion(evaluation, confusion or model / "confusion.png", title=f"Confusion matrix: {data}")
    if fmt == "json":
        text = render.evaluation_json(evaluation, skipped)
        if tta:  # the metrics above are with TTA; what it gained, against the plain ones, beside them
            payload = json.loads(text)
            payload["tta"] = {"views": ["as is", "mirrored left-right"], "without": both.plain.to_dict(),
                              "accuracy_gain": both.accuracy_gain, "log_loss_gain": both.log_loss_gain}
            text = json.dumps(payload, indent=2)
        typer.echo(text)
    else:
        render.print_evaluation(evaluation)
        if tta:
            render.out_console().print(_tta_table(both))
    if png is not None:
        render.note(f"confusion matrix written to {png}")
    render.print_skipped(skipped)


def _evaluate_multilabel(clf, data: Path, fmt: str, tta: bool, threshold: float | None) -> None:
    from headstart.cli import render_multilabel
    from headstart.errors import DataError

    if tta:
        raise DataError("--tta is not available for multi-label models yet; evaluate without it")
    clf.threshold = threshold if threshold is not None else clf.threshold
    with ProgressBars() as bars:
        result = clf.evaluate(data, progress=bars)
    evaluation, skipped = result.metrics, list(result.skipped)
    if fmt == "json":
        typer.echo(render_multilabel.evaluation_json(evaluation, skipped))
    else:
        render_multilabel.print_evaluation(evaluation)
    render.print_skipped(skipped)


def _tta_table(both) -> object:
    """Without and with TTA, side by side (the evaluation table above is the one with)."""
    plain, with_tta = both.plain, both.tta
    rows = [("views", "the image, and its mirror image (left-right), probabilities averaged"),
            ("accuracy", f"{plain.accuracy:.2%} -> {with_tta.accuracy:.2%} ({both.accuracy_gain * 100:+.2f} points)"),
            ("log loss", f"{plain.log_loss:.4f} -> {with_tta.log_loss:.4f} ({-both.log_loss_gain:+.4f})"),
            ("ECE", f"{plain.ece:.4f} -> {with_tta.ece:.4f}")]
    return render._key_value_table("test-time augmentation (without -> with)", rows)
