"""`headstart serve`: the REST API and its page for a model, exported first when it has no up-to-date model.onnx."""

import socket
import time
from pathlib import Path
from typing import Annotated

import typer

from headstart.cli import render
from headstart.cli.base import app


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="A saved model directory.")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    max_upload_mb: Annotated[int, typer.Option(min=1, help="Largest request body, in MiB.")] = 20,
    max_images: Annotated[int, typer.Option(min=1, help="Most images one request may carry.")] = 16,
    max_batch: Annotated[int, typer.Option(
        min=1, help="Most images of waiting requests run as one inference call (1: each request alone).")] = 1,
    allow_host: Annotated[list[str] | None, typer.Option(
        "--allow-host", help="A Host name to answer besides the bound address and localhost (repeatable; '*': any; "
        "default: $HEADSTART_ALLOWED_HOSTS).", show_default=False)] = None,
) -> None:
    """Serve POST /predict, GET /health, GET /model and a page at / until interrupted (exports model.onnx first
    when the model has none, or an older one)."""
    check_port(host, port)  # a clear line now, rather than uvicorn's log after the model has loaded
    ensure_export(model)
    from headstart.serve.app import Limits
    from headstart.serve.app import serve as run

    run(model, host, port, Limits(max_upload_bytes=max_upload_mb * 1024 * 1024, max_images=max_images,
                                  max_batch=max_batch),
        allowed_hosts=_hosts(host, allow_host),
        ready=lambda: render.note(f"serving {model} at http://{host}:{port}/ (Ctrl+C to stop)"))


def check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on, in one line. SO_REUSEADDR, as uvicorn binds: without it, the
    connections of a server stopped a moment ago (TIME_WAIT, ~60 s) made a restart on the same port fail here
    although uvicorn would have bound it."""
    from headstart.errors import ConfigError

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another with --port") from None


def ensure_export(model: Path) -> None:
    """Export the model when it has no model.onnx, or one made from other weights: a model just trained serves."""
    from headstart.serve.onnx_predictor import EXPORT_FILE, load_export

    if load_export(model) is not None:
        return
    from headstart.cli.export import write_export

    why = "is older than the model" if (model / EXPORT_FILE).is_file() else "does not exist yet"
    render.note(f"{model / EXPORT_FILE} {why}: exporting it (once)")
    start = time.perf_counter()
    write_export(model, None)
    render.note(f"exported in {time.perf_counter() - start:.1f} s")


def _hosts(host: str, extra: list[str] | None) -> tuple[str, ...] | None:
    """The Host names to answer: the bound address's and localhost's, and those given; None: the service's default
    ($HEADSTART_ALLOWED_HOSTS, else the bound address's and localhost's)."""
    if not extra:
        return None
    from headstart.serve.hardening import default_hosts

    return tuple(dict.fromkeys((*default_hosts(host), *(h.strip().lower() for h in extra if h.strip()))))
