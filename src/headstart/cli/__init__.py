"""The `headstart` command line: one module per command, all registered on `base.app`; drawing lives in `render`.

Nothing heavy is imported at module level: `headstart --help` must not pay for numpy, torch, timm or
onnxruntime, so every command imports `headstart.api` inside its body.
"""

# Imported for their @app.command() registration; the order is the order `headstart --help` lists them in.
from headstart.cli import train, evaluate, predict, backbones  # noqa: F401  isort: skip
from headstart.cli import export  # noqa: F401  isort: skip
from headstart.cli import serve  # noqa: F401  isort: skip
from headstart.cli import report  # noqa: F401  isort: skip
from headstart.cli import check  # noqa: F401  isort: skip
from headstart.cli import compare  # noqa: F401  isort: skip
from headstart.cli import runs  # noqa: F401  isort: skip
from headstart.cli.base import app, main

__all__ = ["app", "main"]
