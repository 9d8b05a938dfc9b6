"""`headstart serve`: the REST API and its page for a model's export."""

import socket
from pathlib import Path
from typing import Annotated

import typer

from headstart.cli import render
from headstart.cli.base import app


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="A model directory with model.onnx.")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    max_upload_mb: Annotated[int, typer.Option(min=1, help="Largest request body, in MiB.")] = 20,
    max_images: Annotated[int, typer.Option(min=1, help="Most images one request may carry.")] = 16,
    max_batch: Annotated[int, typer.Option(
        min=1, help="Most images of waiting requests run as one inference call (1: each request alone).")] = 1,
) -> None:
    """Serve POST /predict, GET /health, GET /model and a page at / until interrupted."""
    from headstart.errors import ConfigError

    try:  # a clear line now, rather than uvicorn's log after the model has loaded
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another with --port") from None
    from headstart.serve.app import Limits, serve as run

    render.note(f"serving {model} at http://{host}:{port}/ (Ctrl+C to stop)")
    run(model, host, port, Limits(max_upload_bytes=max_upload_mb * 1024 * 1024, max_images=max_images,
                                  max_batch=max_batch))
