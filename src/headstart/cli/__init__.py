"""The `headstart` command line."""

from headstart.cli.commands import app, main

__all__ = ["app", "main"]
