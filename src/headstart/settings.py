"""A run's settings as one typed, frozen record: one field per entry of `options.OPTIONS`, with the option's
default (tests/test_layers.py holds the two together). `settings()` checks a mapping against the options'
rules and freezes it; the pipeline (with its `train_config` and `finetune_config`) reads the fields by name.

Standard library only, like `options`: `headstart --help` and the checks run before numpy is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from headstart import options

_D = options.DEFAULTS


@dataclass(frozen=True)
class Settings:
    """A run's settings, checked (see `settings`). Each field's meaning and rule: `options.OPTIONS`."""

    backbone: str = _D["backbone"]
    weights: str | os.PathLike[str] | None = _D["weights"]
    val_split: float = _D["val_split"]
    test_split: float = _D["test_split"]
    hidden: str | tuple[int, ...] = _D["hidden"]  # "auto", or the widths
    dropout: float = _D["dropout"]
    epochs: int = _D["epochs"]
    lr: float = _D["lr"]
    weight_decay: float = _D["weight_decay"]
    batch_size: int = _D["batch_size"]
    patience: int = _D["patience"]
    schedule: str = _D["schedule"]
    balance: str | bool = _D["balance"]  # "auto", or on/off
    refit: str | bool = _D["refit"]  # "auto" (the oriented head only), or on/off
    cv: str | int = _D["cv"]  # "auto", 0 (none) or the folds
    seed: int = _D["seed"]
    device: str = _D["device"]
    engine: str = _D["engine"]
    strategy: str = _D["strategy"]
    unfreeze: str | int = _D["unfreeze"]  # "all", "auto", or the top stages
    augment: str = _D["augment"]
    finetune_epochs: int = _D["finetune_epochs"]
    finetune_lr: float = _D["finetune_lr"]
    views: int = _D["views"]
    time_limit: float = _D["time_limit"]
    train_bn: bool = _D["train_bn"]
    multi_label: bool = _D["multi_label"]
    threshold: float | None = _D["threshold"]
    native_view: bool = _D["native_view"]


def settings(params: Mapping[str, object], spell: Callable[[str], str] = str) -> Settings:
    """`params` checked against the options' rules and frozen into `Settings` (hidden widths as a tuple)."""
    options.check(params, spell)
    values = dict(params)
    hidden = values.get("hidden", "auto")
    if not isinstance(hidden, str):
        values["hidden"] = tuple(int(w) for w in hidden)  # type: ignore[union-attr]
    return Settings(**values)  # type: ignore[arg-type]
