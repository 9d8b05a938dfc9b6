"""`headstart train`: flags in, one `ImageClassifier` fitted and saved, a summary out.

Every setting's default, choices, help line and help panel come from `headstart.options`, and
`options.check` is the one validation: the CLI only turns text into values (`--hidden 512,256`,
`--unfreeze all`) and adds the flags that are its own (`--out`, `--resume`).
"""

import contextlib
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape

from headstart import options
from headstart.cli import render
from headstart.cli.base import app, main_rank
from headstart.cli.progress import ProgressBars
from headstart.progress import NoProgress

D = options.DEFAULTS
DEFAULT_BACKBONE = D["backbone"]  # equal to headstart.backbones.registry's (a test checks), without its numpy
OUTPUT = "Output"


def flag(name: str, **extra: Any) -> Any:
    """The typer option of a setting: its help line and panel as headstart.options defines them."""
    setting = options.OPTIONS[name]
    decls: tuple[str, ...] = ()
    if setting.default is False:
        # A switch that is off unless given: `--balance`. The '--no-' twin said nothing (it is the default) and took
        # a whole column of the help panel's width; `--no-native-view` stays because it turns a default off.
        decls = (flag_name(name),)
    elif setting.default is True:
        # A switch that is on unless turned off: only `--no-native-view` means anything, and a '--native-view'
        # column beside it squeezed every help line of its panel to a third of an 80-column terminal.
        decls = (" /--no-" + name.replace("_", "-"),)
    if isinstance(setting.default, bool):
        extra.setdefault("metavar", "")  # a switch takes no value: '<bool>' would only take width from the help
    help_line = setting.help
    if setting.choices and isinstance(setting.default, str) and not extra.get("metavar"):
        # typer would list the choices as the metavar, a column wide enough to squeeze the help into fragments
        # at 80 columns and to cut flag names at 60; the help line names them instead, unless it already does.
        extra["metavar"] = "<choice>"
        if not all(c in help_line for c in setting.choices):
            *others, last = setting.choices
            help_line = f"{help_line.rstrip('.')}: {', '.join(others)} or {last}."
    return typer.Option(*decls, help=escape(help_line), rich_help_panel=setting.panel, **extra)


def _one_of(name: str) -> Any:
    """A Literal of the setting's choices: typer refuses anything else in one line that names them."""
    return Literal[options.choices(name)]  # type: ignore[valid-type]


Schedule, Device, Strategy, Augment = (_one_of(n) for n in ("schedule", "device", "strategy", "augment"))
Engine = _one_of("engine")
TRACKERS = ("csv", "tensorboard", "mlflow")  # headstart.track.TRACKERS, spelt here so --help imports nothing


def flag_name(setting: str) -> str:
    """How a setting is spelled on the command line: val_split -> --val-split."""
    return "--" + setting.replace("_", "-")


def _parse_unfreeze(text: str) -> int | str:
    """'all' and 'auto' stay words, anything else must be a whole number (its range is options' to check)."""
    if text in ("all", "auto"):
        return text
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a stage count, 'all' or 'auto', e.g. --unfreeze 2",
                                 param_hint="'--unfreeze'") from None


def _parse_count_or_auto(text: str, flag: str) -> int | str:
    """'auto' stays a word, anything else must be a whole number (its range is options' to check)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number or 'auto', e.g. {flag} 5", param_hint=f"'{flag}'") from None


def _parse_seconds(text: str, flag: str) -> float:
    """'600', '600s', '10m' or '1.5h' -> seconds (its range is options' to check)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    body, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1.0)
    try:
        return float(body) * unit
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration, e.g. {flag} 600 or {flag} 10m",
                                 param_hint=f"'{flag}'") from None


def _parse_hidden(text: str) -> tuple[int, ...] | str:
    """'512,256' -> (512, 256); '' -> () (no hidden layer); 'auto' stays 'auto'. Ranges are options' to check."""
    if text.strip() == "auto":
        return "auto"
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise typer.BadParameter(
            f"'{text}' is not 'auto' or a comma list of layer widths, e.g. '512,256' (empty for none)",
            param_hint="'--hidden'",
        ) from None


def _trackers(values: list[str] | None) -> list[str] | None:
    bad = [v for v in values or () if v not in TRACKERS]
    if bad:
        raise typer.BadParameter(f"{bad[0]!r} is not one of {', '.join(TRACKERS)}", param_hint="'--track'")
    return values


@app.command()
def train(
    data: Annotated[Path | None, typer.Argument(
        help="Folder of class sub-folders (optionally train/val/test), or a manifest file.", show_default=False)] = None,
    manifest: Annotated[Path | None, typer.Option(
        "--manifest", help="A CSV or JSON Lines file of path,label[,split] rows, instead of DATA.",
        show_default=False, rich_help_panel="Data")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help=escape("Directory to save the model in. [default: model, or the --resume folder]"),
        show_default=False, rich_help_panel=OUTPUT)] = None,
    export: Annotated[bool, typer.Option(
        "--export", help="Also write model.onnx.", rich_help_panel=OUTPUT)] = False,
    report: Annotated[bool, typer.Option(
        help="Write OUT/report.html.",
        rich_help_panel=OUTPUT)] = True,
    resume: Annotated[Path | None, typer.Option(
        file_okay=False, help="Continue the interrupted run saved there.",
        rich_help_panel=OUTPUT)] = None,
    track: Annotated[list[str] | None, typer.Option(
        "--track", help="Log the run: csv, tensorboard or mlflow (repeatable).",
        show_default=False, metavar="<tracker>", callback=_trackers, rich_help_panel=OUTPUT)] = None,
    log_dir: Annotated[Path | None, typer.Option(
        "--log-dir", file_okay=False, help="Where csv and tensorboard logs go (default: OUT).", show_default=False, rich_help_panel=OUTPUT)] = None,
    val_split: Annotated[float, flag("val_split")] = D["val_split"],
    test_split: Annotated[float, flag("test_split")] = D["test_split"],
    native_view: Annotated[bool, flag("native_view")] = D["native_view"],
    multi_label: Annotated[bool, flag("multi_label")] = D["multi_label"],
    threshold: Annotated[float | None, flag("threshold", metavar="<p>")] = D["threshold"],
    hidden: Annotated[str, flag("hidden", metavar="<widths>")] = D["hidden"],
    dropout: Annotated[float, flag("dropout")] = D["dropout"],
    epochs: Annotated[int, flag("epochs")] = D["epochs"],
    lr: Annotated[float, flag("lr")] = D["lr"],
    weight_decay: Annotated[float, flag("weight_decay")] = D["weight_decay"],
    batch_size: Annotated[int, flag("batch_size")] = D["batch_size"],
    patience: Annotated[int, flag("patience")] = D["patience"],
    schedule: Annotated[Schedule, flag("schedule")] = D["schedule"],
    balance: Annotated[bool | None, flag("balance", show_default="auto")] = None,
    refit: Annotated[bool | None, flag("refit", show_default="auto")] = None,
    cv: Annotated[str, flag("cv", metavar="<folds|auto>")] = D["cv"],
    strategy: Annotated[Strategy, flag("strategy")] = D["strategy"],
    unfreeze: Annotated[str, flag("unfreeze", metavar="<n|all|auto>")] = D["unfreeze"],
    augment: Annotated[Augment, flag("augment")] = D["augment"],
    finetune_epochs: Annotated[int, flag("finetune_epochs")] = D["finetune_epochs"],
    finetune_lr: Annotated[float, flag("finetune_lr")] = D["finetune_lr"],
    views: Annotated[int, flag("views")] = D["views"],
    time_limit: Annotated[str, flag("time_limit", metavar="<seconds|10m>")] = f"{D['time_limit']:g}",
    train_bn: Annotated[bool, flag("train_bn")] = D["train_bn"],
    backbone: Annotated[str, flag("backbone")] = D["backbone"],
    weights: Annotated[Path | None, flag("weights", exists=True, dir_okay=False)] = D["weights"],
    seed: Annotated[int, flag("seed")] = D["seed"],
    device: Annotated[Device, flag("device")] = D["device"],
    engine: Annotated[Engine, flag("engine")] = D["engine"],
) -> None:
    """Train a classifier on a folder of labelled photos and save it."""
    # Every parameter named like a setting is that setting: the ImageClassifier gets them one to one.
    settings = {name: value for name, value in locals().items() if name in options.OPTIONS}
    settings["hidden"] = _parse_hidden(hidden)
    settings["unfreeze"] = _parse_unfreeze(unfreeze)
    settings["cv"] = _parse_count_or_auto(cv, "--cv")
    settings["balance"] = "auto" if balance is None else balance  # --balance / --no-balance, else auto
    settings["refit"] = "auto" if refit is None else refit
    settings["time_limit"] = _parse_seconds(time_limit, "--time-limit")
    # Checked before anything slow is imported or loaded, so a bad flag fails at once.
    options.check(settings, spell=flag_name)
    out = out or resume or Path("model")  # resuming a run finishes it where it was going
    from headstart.data.scan import check_root

    data = _data_or_manifest(data, manifest)
    check_root(data)
    _check_output(out, resume)
    from headstart.api import ImageClassifier
    from headstart.runtime import distributed

    clf = ImageClassifier(**settings)
    main = distributed.current().is_main  # under torchrun rank 0 alone draws, saves and sums up
    with ProgressBars() if main else contextlib.nullcontext(NoProgress()) as bars:
        clf.fit(data, progress=bars, checkpoint_dir=(resume or out) / "checkpoint", resume=resume is not None)
    if not main:
        return
    saved = clf.save(out)
    if getattr(clf, "multi_label_", False):  # a test's stand-in classifier has none
        _multi_label_done(clf, data, backbone, saved, report, export)
        return
    png = None
    if clf.val_metrics_ is not None:
        png = render.write_confusion(clf.val_metrics_, out / "confusion_val.png", title="Validation confusion matrix")
    render.out_console().print(render.train_summary(clf, data, backbone, saved, png))
    render.print_skipped(clf.skipped_)
    if report:  # from what the run holds in memory: a fraction of a second (tasks.report_train)
        from headstart.tasks.report_train import write_train_report

        render.note(f"report written to {write_train_report(clf, saved, data)}")
    if export:
        from headstart.cli.export import write_export

        write_export(saved, data)
    if track:
        from headstart.track import run_log
        from headstart.track import track as log_run

        for kind, where in log_run(track, run_log(clf.report_, clf.get_params(), saved, data), log_dir):
            render.note(f"tracked ({kind}): {render.shown(where)}")


def _multi_label_done(clf, data: Path, backbone: str, saved: Path, report: bool, export: bool) -> None:
    """A multi-label model's summary, its report page (from the validation split, when there is one), its export."""
    from headstart.cli import render_multilabel

    render.out_console().print(render_multilabel.train_summary(clf, data, backbone, saved))
    render.print_skipped(clf.skipped_)
    if report and getattr(clf, "validation_", None) is not None:
        from headstart.tasks.report_multilabel import write_report

        page = write_report(clf, saved, clf.validation_, f"the validation split carved from {data} (n="
                            f"{len(clf.validation_.paths)}; it chose the head, its epoch and the thresholds)")
        render.note(f"report written to {page}")
    if export:
        from headstart.cli.export import write_export

        write_export(saved, data)


def _data_or_manifest(data: Path | None, manifest: Path | None, verb: str = "train") -> Path:
    """What to train (or evaluate) on: DATA, or --manifest's file (one of them, not both)."""
    from headstart.errors import DataError

    if data is not None and manifest is not None:
        raise DataError(f"give DATA ({data}) or --manifest ({manifest}), not both")
    if data is None and manifest is None:
        raise DataError(f"nothing to {verb} on — give a folder of class sub-folders ({verb} ... photos/) or "
                        "--manifest labels.csv")
    if manifest is not None and manifest.is_dir():
        raise DataError(f"--manifest {manifest}: is a folder — give it as DATA ({verb} ... {manifest}), or give "
                        "--manifest a CSV or JSON Lines file")
    if manifest is not None and manifest.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise DataError(f"--manifest {manifest}: name it .csv (comma-separated, a header line first) or .jsonl (one "
                        "JSON object per line) so headstart knows how to read it")
    return data if data is not None else manifest


def _check_output(out: Path, resume: Path | None) -> None:
    """What would otherwise fail only after the training: an --out (or --resume, where checkpoints go) that is a
    file, lies under one, or cannot be written. --resume naming nothing is refused too (a mistyped path would
    silently cost a whole run); a folder without a checkpoint is only a warning, since a run killed before its
    first checkpoint restarts from the start anyway (its features are cached)."""
    from headstart.errors import DataError
    from headstart.serve.artifact import check_writable

    if resume is not None:
        if not resume.is_dir():
            raise DataError(f"--resume {resume}: no such folder, so there is no run to continue; give the --out "
                            "folder of the interrupted run, or drop --resume to train from the start")
        if not (resume / "checkpoint").exists() and main_rank():  # under torchrun: said once, by rank 0
            render.note(f"warning: --resume {resume}: no checkpoint there (the run stopped before its first "
                        "fine-tuning epoch, or finished); training from the start")
        check_writable(resume)
    check_writable(out)
