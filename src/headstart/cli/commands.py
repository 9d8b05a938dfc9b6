"""The `headstart` command line: parse flags, call `headstart.api`, print the results.

Nothing heavy is imported at module level: `headstart --help` must not pay for torch, timm or
onnxruntime, so every command imports `headstart.api` inside its body. Drawing lives in cli_render.

Exit codes: 0 success, 1 nothing could be done (every image failed), 2 a user error (bad flag, bad
data, missing weights: one `error: ...` line on stderr), 130 interrupted. Anything else is a bug and
keeps its traceback.
"""

import enum
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from headstart.cli import render
from headstart.errors import UserError

if TYPE_CHECKING:
    from headstart.evaluate.metrics import Evaluation

# Equal to headstart.backbones.DEFAULT_BACKBONE (a test checks): importing that module costs numpy at --help time.
DEFAULT_BACKBONE = "efficientnet_lite0"


class _Group(TyperGroup):
    """Turns the errors a user can cause into one stderr line and an exit code; bugs keep their traceback."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            render.note(f"error: {' '.join(str(exc).split())}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            # Caught here because typer would otherwise turn it into a silent exit 130.
            render.note("interrupted")
            raise typer.Exit(130) from None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # typer's (vendored) click usage and parameter errors
            # Typer draws usage errors as a multi-line panel; one line is easier to read and to grep.
            if type(exc).__name__ != "NoArgsIsHelpError":  # bare `headstart`: help was already printed
                ctx = getattr(exc, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                render.note(f"error: {exc.format_message()}{hint}")
            sys.exit(exc.exit_code)
        except typer.Abort:
            render.note("aborted")
            sys.exit(1)
        # Non-standalone click returns an Exit's code, or the command's return value (always None here).
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Group,
    help="Turn a folder of a few hundred photos into an image classifier by transfer learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can be whole tensors; the stack is what a bug report needs
)
# Later commands (check, export, serve, report, compare) are added below the same way: one function each.


class Schedule(str, enum.Enum):
    cosine = "cosine"
    plateau = "plateau"


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Strategy(str, enum.Enum):
    head = "head"
    finetune = "finetune"
    auto = "auto"


class Augment(str, enum.Enum):
    none = "none"
    light = "light"
    strong = "strong"


class EvalFormat(str, enum.Enum):
    table = "table"
    json = "json"


class PredictFormat(str, enum.Enum):
    table = "table"
    csv = "csv"
    json = "json"


def _fraction(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise typer.BadParameter(f"{value:g} is not a fraction in [0, 1), e.g. 0.2")
    return value


def _positive(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"{value:g} must be greater than 0, e.g. 1e-3")
    return value


def _parse_unfreeze(text: str) -> int | str:
    if text in ("all", "auto"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise typer.BadParameter(f"{text!r} is not a stage count >= 1, 'all' or 'auto', e.g. --unfreeze 2",
                             param_hint="'--unfreeze'")


def _parse_hidden(text: str) -> tuple[int, ...] | str:
    """'512,256' -> (512, 256); '' -> () (no hidden layer); 'auto' stays 'auto'."""
    if text.strip() == "auto":
        return "auto"
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != len(parts) or any(s < 1 for s in sizes):
        raise typer.BadParameter(
            f"'{text}' is not 'auto' or a comma list of positive layer widths, e.g. '512,256' (empty for none)",
            param_hint="'--hidden'",
        )
    return sizes


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log progress details (INFO) to stderr.")] = False,
) -> None:
    """Turn a folder of a few hundred photos into an image classifier by transfer learning."""
    render.setup_logging(logging.INFO if verbose else logging.WARNING)


@app.command()
def train(
    data: Annotated[Path, typer.Argument(exists=True, help="Folder of class sub-folders (optionally train/val/test).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to save the model in.")] = Path("model"),
    backbone: Annotated[str, typer.Option(help="Backbone name (see `headstart backbones`) or a timm model.")] = (
        DEFAULT_BACKBONE
    ),
    weights: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Backbone weights (.safetensors) to use.")
    ] = None,
    val_split: Annotated[float, typer.Option(callback=_fraction, help="Fraction held out for validation.")] = 0.2,
    test_split: Annotated[float, typer.Option(callback=_fraction, help="Fraction held out for testing.")] = 0.0,
    epochs: Annotated[int, typer.Option(min=1, help="Maximum training epochs.")] = 60,
    lr: Annotated[float, typer.Option(callback=_positive, help="Learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay.")] = 0.05,
    batch_size: Annotated[int, typer.Option(min=1, help="Training batch size.")] = 64,
    hidden: Annotated[str, typer.Option(
        help="Hidden layer widths, e.g. '512,256'; empty for none; auto: linear, or one small hidden layer when "
             "there are 1,000+ training photos and it validates better.")] = "auto",
    dropout: Annotated[float, typer.Option(callback=_fraction, help="Dropout before the output layer.")] = 0.2,
    schedule: Annotated[Schedule, typer.Option(help="Learning-rate schedule.")] = Schedule.cosine,
    patience: Annotated[int, typer.Option(min=1, help="Epochs without improvement before stopping.")] = 10,
    balance: Annotated[bool, typer.Option(help="Weight the loss by inverse class frequency.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed for splits and training.")] = 0,
    device: Annotated[Device, typer.Option(help="Where to run.")] = Device.auto,
    strategy: Annotated[Strategy, typer.Option(
        help="head: train the head on frozen features; finetune: then adapt the top stages; auto: fine-tune "
             "only if it pays, and keep whichever validates better.")] = Strategy.head,
    unfreeze: Annotated[str, typer.Option(
        help="Top backbone stages to fine-tune, or 'all'; auto: all for small photos (run at their own size), "
             "else 2.")] = "auto",
    augment: Annotated[Augment, typer.Option(help="Augmentation while fine-tuning.")] = Augment.light,
    finetune_epochs: Annotated[int, typer.Option(min=1, help="Maximum fine-tuning epochs.")] = 8,
    finetune_lr: Annotated[float, typer.Option(callback=_positive, help="Rate of the top unfrozen stage.")] = 5e-4,
    views: Annotated[int, typer.Option(min=1, help="Augmented views per image cached for fine-tuning.")] = 8,
    train_bn: Annotated[bool, typer.Option(help="Let BatchNorm in unfrozen stages update its statistics.")] = False,
    native_view: Annotated[bool, typer.Option(
        help="For photos much smaller than the backbone's input: add a view at their own size (head strategy), "
             "or fine-tune at their own size (finetune, auto).",
    )] = True,
    resume: Annotated[Path | None, typer.Option(
        file_okay=False, help="Continue an interrupted run whose model directory this is (finished work is reused "
             "from the caches; fine-tuning continues from its last epoch checkpoint).")] = None,
) -> None:
    """Train a classifier on a folder of labelled photos and save it."""
    # Flags are checked before anything slow is imported or loaded.
    hidden_sizes = _parse_hidden(hidden)
    unfreeze_value = _parse_unfreeze(unfreeze)
    if val_split + test_split >= 1.0:
        raise typer.BadParameter(
            f"{val_split:g} + {test_split:g} leaves nothing to train on; keep the sum below 1",
            param_hint="'--val-split' + '--test-split'",
        )
    from headstart.api import ImageClassifier

    clf = ImageClassifier(
        backbone=backbone, weights=weights, val_split=val_split, test_split=test_split, hidden=hidden_sizes,
        dropout=dropout, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
        patience=patience, schedule=schedule.value, balance=balance, seed=seed, device=device.value,
        strategy=strategy.value, unfreeze=unfreeze_value, augment=augment.value, finetune_epochs=finetune_epochs,
        finetune_lr=finetune_lr, views=views, train_bn=train_bn, native_view=native_view,
    )  # fmt: skip
    with render.ProgressBars() as bars:
        clf.fit(data, progress=bars, checkpoint_dir=(resume or out) / "checkpoint", resume=resume is not None)
    saved = clf.save(out)
    png = None
    if clf.val_metrics_ is not None:
        png = _write_confusion(clf.val_metrics_, out / "confusion_val.png", title="Validation confusion matrix")
    render.out_console().print(render.train_summary(clf, data, backbone, saved, png))
    render.print_skipped(clf.skipped_)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(exists=True, help="A saved model directory.")],
    data: Annotated[Path, typer.Argument(exists=True, help="Folder of class sub-folders named like the model's.")],
    fmt: Annotated[EvalFormat, typer.Option("--format", help="table, or json on stdout.")] = EvalFormat.table,
    confusion: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Where to write the confusion matrix PNG.")
    ] = None,
) -> None:
    """Score a saved model on a labelled folder."""
    from headstart.api import ImageClassifier

    clf = ImageClassifier.load(model)
    with render.ProgressBars() as bars:
        evaluation, skipped = clf.evaluate(data, progress=bars)
    png = _write_confusion(evaluation, confusion or model / "confusion.png", title=f"Confusion matrix: {data}")
    if fmt is EvalFormat.json:
        typer.echo(render.evaluation_json(evaluation, skipped))
    else:
        render.print_evaluation(evaluation)
    if png is not None:
        render.note(f"confusion matrix written to {png}")
    render.print_skipped(skipped)


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(exists=True, help="A saved model directory.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (folders recurse).")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many labels to list per image.")] = 3,
    fmt: Annotated[PredictFormat, typer.Option("--format", help="table, csv or json.")] = PredictFormat.table,
) -> None:
    """Label images with a saved model. Unreadable files become rows with an error."""
    from headstart.api import ImageClassifier

    clf = ImageClassifier.load(model)
    with render.ProgressBars() as bars:
        preds = clf.predict_table(images, top_k=top_k, progress=bars)
    if fmt is PredictFormat.csv:
        typer.echo(render.predictions_csv(preds), nl=False)
    elif fmt is PredictFormat.json:
        typer.echo(render.predictions_json(preds))
    else:
        render.out_console().print(render.predictions_table(preds))
    if not preds:
        render.note("no images found in the given paths")
    # Exit 1 only when nothing at all could be labelled; a few bad files are reported in their rows.
    if all(p.error is not None for p in preds):
        raise typer.Exit(1)


@app.command()
def backbones() -> None:
    """List the built-in backbones and whether their weights are available offline."""
    from headstart.backbones.registry import DEFAULT_BACKBONE as default
    from headstart.backbones.registry import REGISTRY, available_offline

    specs = list(REGISTRY.values())
    table = render.backbones_table(specs, [available_offline(s) for s in specs], default)
    render.out_console().print(table)


def _write_confusion(evaluation: "Evaluation", path: Path, title: str) -> Path | None:
    """The PNG is a by-product: a read-only model directory must not cost the user the metrics."""
    from headstart.evaluate import figures as report  # matplotlib, only when a figure is drawn

    try:
        return report.save_confusion_png(evaluation.confusion, evaluation.classes, path, title=title)
    except OSError as exc:
        render.note(f"warning: could not write {path}: {exc.strerror or exc}")
        return None


def main() -> None:
    """Entry point of the `headstart` console script."""
    app(prog_name="headstart")
