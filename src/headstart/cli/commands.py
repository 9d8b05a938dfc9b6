"""Kept only because `headstart/__main__.py` imports `main` from here (that file is not the CLI's to edit);
once it reads `from headstart.cli import main`, this module can go. The commands live in their own modules."""

from headstart.cli.base import main

__all__ = ["main"]
