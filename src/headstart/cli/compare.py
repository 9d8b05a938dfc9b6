"""`headstart compare DATA --backbones a,b,c [--pick --out model/]`: backbones side by side as a table; --pick
trains the best one (its features are cached by then, so that costs the head alone)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from headstart import options
from headstart.cli import render
from headstart.cli.base import app
from headstart.cli.progress import ProgressBars
from headstart.cli.train import Device, Engine, flag

if TYPE_CHECKING:
    from headstart.tasks.compare import BackboneResult

D = options.DEFAULTS


@app.command()
def compare(
    data: Annotated[Path, typer.Argument(exists=True, help="Folder of class sub-folders (optionally train/val/test).")],
    backbones: Annotated[str, typer.Option(help="Comma list of backbones, e.g. efficientnet_lite0,efficientnet_lite1.")]
    = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2",
    pick: Annotated[bool, typer.Option("--pick", help="Train the best backbone and save it in --out.")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where --pick saves the model.")] = Path("model"),
    weights: Annotated[Path | None, flag("weights", exists=True, dir_okay=False)] = D["weights"],  # one backbone
    val_split: Annotated[float, flag("val_split")] = D["val_split"],  # for --pick's training
    seed: Annotated[int, flag("seed")] = D["seed"],  # of the folds and the split
    device: Annotated[Device, flag("device")] = D["device"],
    engine: Annotated[Engine, flag("engine")] = D["engine"],
) -> None:
    """Compare backbones: extraction speed, 5-fold accuracy with its 95 % interval, size and latency."""
    names = [b.strip() for b in backbones.split(",") if b.strip()]
    options.check({"val_split": val_split, "seed": seed, "device": device, "engine": engine}, spell=lambda n: "--" + n.replace("_", "-"))
    if pick:
        from headstart.serve.artifact import check_writable

        check_writable(out)  # before the extractions, not after them
    from headstart.tasks.compare import best, compare_backbones

    with ProgressBars() as bars:
        results = compare_backbones(data, names, weights=weights, device=device, val_split=val_split, seed=seed,
                                    progress=bars, engine=engine)
    render.out_console().print(results_table(results))
    chosen = best(results)
    grouped = f"; {chosen.cv.groups} groups of near-duplicates each kept in one fold" if chosen.cv.groups else ""
    render.out_console().print(Text(f"best: {chosen.backbone} (5-fold accuracy {chosen.cv.accuracy:.1%}{grouped})"))
    if pick:
        _train(data, chosen.backbone, weights, out, val_split, seed, device, engine)


def results_table(results: list[BackboneResult]) -> Table:
    """One row per backbone, whole words and whole values at 80 columns: the fold count goes into the title and the
    interval beside the accuracy, and columns are separated by spaces rather than boxes (at 80 columns the boxed
    table split '95% interval' into 'inter'/'val' and '92.1%' over two lines)."""
    folds = sorted({r.cv.folds for r in results})
    table = Table(title=f"Backbones: img/s of feature extraction, {'/'.join(map(str, folds))}-fold head accuracy "
                        "with its 95% interval, one image's latency, images extracted by this run",
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("backbone", no_wrap=True)
    for header in ("img/s", "cv accuracy (95%)", "M params", "ms/img", "new"):  # MB: 4 x params, left out
        table.add_column(header, justify="right", no_wrap=True)
    for r in results:
        table.add_row(Text(render.shown(r.backbone)), f"{r.images_per_s:.1f}",
                      f"{r.cv.accuracy:.1%} ({100 * r.cv.low:.1f}-{100 * r.cv.high:.1f})", f"{r.params_m:.2f}",
                      f"{r.latency_ms:.1f}", str(r.extracted))
    return table


def _train(data: Path, backbone: str, weights: Path | None, out: Path, val_split: float, seed: int,
           device: str, engine: str) -> None:
    from headstart.api import ImageClassifier

    clf = ImageClassifier(backbone=backbone, weights=weights, val_split=val_split, seed=seed, device=device,
                          engine=engine)
    with ProgressBars() as bars:
        clf.fit(data, progress=bars)
    saved = clf.save(out)
    render.out_console().print(render.train_summary(clf, data, backbone, saved, None))
