"""Kept only for importers of the old module: `headstart/__main__.py` imports `main` from here.

The commands live in their own modules (train, evaluate, predict, backbones) on `base.app`.
"""

from headstart.cli.base import app, main
from headstart.cli.train import DEFAULT_BACKBONE, _parse_hidden, _parse_unfreeze, train

__all__ = ["app", "main", "train", "DEFAULT_BACKBONE", "_parse_hidden", "_parse_unfreeze"]
