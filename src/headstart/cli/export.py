"""`headstart export`: the saved model as one ONNX file (optionally int8), checked against PyTorch."""

from pathlib import Path
from typing import Annotated, Literal

import typer

from headstart.cli import render
from headstart.cli.base import app


@app.command()
def export(
    model: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="A saved model directory.")],
    data: Annotated[Path | None, typer.Option(
        exists=True,
        help="The folder (or manifest) the model was trained on: parity is checked on its validation photos (else "
             "on generated images) and int8 is calibrated on its training photos.")] = None,
    quantize: Annotated[Literal["int8"] | None, typer.Option(
        help="int8: static quantization, kept only if validation accuracy holds (needs --data).")] = None,
    val: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False, help="Validation folder for the int8 check (default: the split of --data).")
    ] = None,
    max_drop: Annotated[float, typer.Option(
        min=0.0, help="Accuracy points int8 may lose before the float model is kept.")] = 1.0,
) -> None:
    """Write MODEL/model.onnx: pixels in, probabilities out, class names and preprocessing in its metadata."""
    from headstart.errors import ConfigError

    if quantize and data is None:
        raise ConfigError("--quantize int8 calibrates on the training photos: pass --data FOLDER (the folder the "
                          "model was trained on)")
    from headstart.serve import artifact
    from headstart.serve.export_quantize import quantize_int8

    if quantize and artifact.load(model, with_backbone=False).record.head.multi_label:
        raise ConfigError("--quantize int8 is not available for multi-label models yet (its check is single-label "
                          "accuracy); export in float32")
    write_export(model, data)
    if quantize:
        q = quantize_int8(model, data, max_drop=max_drop, val=val)
        verdict = "kept int8" if q.accepted else "refused: model.onnx stays float32"
        typer.echo(f"int8 on {q.n_val} validation photos (calibrated on {q.n_calibration} training photos): "
                   f"{q.reason}")
        typer.echo(f"int8 size {_mib(q.float_bytes)} -> {_mib(q.int8_bytes)}, "
                   f"{q.float_images_per_s:.0f} -> {q.int8_images_per_s:.0f} images/s with decoding: {verdict}")
        if not q.accepted:
            render.note(f"int8 refused: accuracy dropped more than {max_drop:g} points (see --max-drop)")


def write_export(model: Path, data: Path | None) -> None:
    """Export and say how the file agrees with PyTorch (shared by `export` and `train --export`)."""
    from headstart.serve.export import export_model

    report = export_model(model, data)
    p = report.parity
    typer.echo(f"wrote {report.path} ({_mib(report.bytes)}, {report.quantization})")
    against = "the model's int8 engine" if report.quantization == "int8" else "PyTorch"
    typer.echo(f"parity with {against} on {p.n_images} {p.source}: max |Δprob| {p.max_dprob:.1e}, "
               f"top-1 agreement {p.top1_agreement:.1%}")
    if report.note:
        render.note(f"note: {report.note}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
