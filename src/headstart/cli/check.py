"""`headstart check DATA`: data problems before training, as a table (or `--format json`, `--json` its alias kept from
before the other commands' `--format`); --strict exits 1 on blocking ones.

Exit codes: 0 the check ran (findings or not), 1 with --strict when a finding blocks, 2 a user error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.table import Table
from rich.text import Text

from headstart import options
from headstart.cli import render
from headstart.cli.base import app
from headstart.cli.progress import ProgressBars
from headstart.cli.train import Device, Engine, flag

if TYPE_CHECKING:
    from headstart.tasks.check import CheckReport

D = options.DEFAULTS
MAX_FILES_SHOWN = 6  # files per finding in the terminal; --format json lists every one


@app.command()
def check(
    data: Annotated[Path, typer.Argument(exists=True, help="Folder of class sub-folders (optionally train/val/test).")],
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when a finding blocks (unreadable files, one "
                                         "photo under two labels, duplicates across splits).")] = False,
    fmt: Annotated[Literal["table", "json"], typer.Option("--format", help="table, or json on stdout.")] = "table",
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.", hidden=True)] = False,
    deep: Annotated[bool, typer.Option("--deep", help="Extract the backbone's features if not cached, for "
                                       "near-duplicates and likely label errors.")] = False,
    backbone: Annotated[str, typer.Option(
        help="Backbone whose features find near-duplicates and label errors (empty: none).")] = D["backbone"],
    weights: Annotated[Path | None, flag("weights", exists=True, dir_okay=False)] = D["weights"],
    val_split: Annotated[float, flag("val_split")] = D["val_split"],  # carved as train carves it, for leakage
    seed: Annotated[int, flag("seed")] = D["seed"],
    device: Annotated[Device, flag("device")] = D["device"],
    engine: Annotated[Engine, flag("engine")] = D["engine"],
) -> None:
    """Find data problems: unreadable files, duplicates and leakage, imbalance, odd images, likely label errors."""
    options.check({"val_split": val_split, "seed": seed, "device": device, "backbone": backbone, "engine": engine},
                  spell=lambda n: "--" + n.replace("_", "-"))
    from headstart.data.manifest import is_manifest
    from headstart.data.multilabel import is_multilabel_manifest

    if is_manifest(data) and is_multilabel_manifest(data):
        _check_multilabel(data, val_split, seed, as_json, strict, deep)
        return
    from headstart.tasks.check import check_folder

    with ProgressBars() as bars:
        report = check_folder(data, val_split=val_split, seed=seed, backbone=backbone, weights=weights,
                              device=device, deep=deep, progress=bars, engine=engine)
    if as_json or fmt == "json":
        typer.echo(render.shown(json.dumps(report.to_dict(), indent=2)))
    else:
        print_report(report)
    if strict and report.blocking:
        raise typer.Exit(1)


def _check_multilabel(data: Path, val_split: float, seed: int, as_json: bool, strict: bool, deep: bool) -> None:
    """A multi-label manifest: the split train would make, each label's positives, labels never or always present,
    images with no label, the commonest label pairs, and the files skipped (blocking with --strict)."""
    from headstart.data.multilabel import read_multilabel, summarize

    summary = summarize(read_multilabel(data, val_split=val_split, seed=seed))
    if as_json:
        typer.echo(render.shown(json.dumps(summary.to_dict(), indent=2)))
    else:
        from headstart.cli.render_multilabel import print_check

        print_check(summary)
    if deep:
        render.note("note: --deep (near-duplicates, likely label errors) is not available for multi-label "
                    "manifests yet")
    if strict and summary.skipped:
        raise typer.Exit(1)


def print_report(report: CheckReport) -> None:
    console = render.out_console()
    counts = ", ".join(f"{split} {sum(per.values())}" for split, per in report.counts.items())
    console.print(Text(render.shown(f"headstart check {report.root}: {len(report.classes)} classes, {counts}")))
    if report.findings:
        console.print(findings_table(report))
    blocking = len(report.blocking)
    console.print(Text(f"{len(report.findings)} findings, {blocking} blocking"
                       + (f"; near-duplicates and label errors from {report.backbone}'s features"
                          f" (cosine >= {report.near_duplicate_cosine})" if report.backbone else "")))
    for line in report.notes:
        render.note(f"note: {line}")


def findings_table(report: CheckReport) -> Table:
    """One row per finding; paths fold onto further lines rather than being cut."""
    table = Table(title="Findings", title_justify="left", show_lines=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("finding", overflow="fold", ratio=1)
    table.add_column("files", overflow="fold", ratio=2)
    for f in report.findings:
        files = [render.shown(p) for p in f.files[:MAX_FILES_SHOWN]]
        if len(f.files) > MAX_FILES_SHOWN:
            files.append(f"... and {len(f.files) - MAX_FILES_SHOWN} more (--format json lists them)")
        table.add_row(Text(f.severity, style="bold red" if f.severity == "error" else "yellow"), f.kind,
                      Text(render.shown(f.message)), Text("\n".join(files)))
    return table
