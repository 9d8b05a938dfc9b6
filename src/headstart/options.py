"""Every setting of a training run, defined once: its default, its rule (range or choices), a short help line and
the panel `train --help` shows it in. The CLI and `ImageClassifier` both read this table, and `check` is the one
place settings are validated: scikit-learn's `_parameter_constraints`, checked once when `fit` starts.

Standard library only: `headstart --help` reads it before numpy is imported.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from headstart.errors import ConfigError

DATA, HEAD, FINETUNE, RUN = "Data", "Head", "Fine-tuning", "Run"


@dataclass(frozen=True)
class Interval:
    """A number of `kind` (int or float) in a range; floats must be finite. `closed`: which ends are included."""

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"  # "both", "left", "right" or "neither"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        if not math.isfinite(value):
            return False
        low_ok = self.low is None or (value >= self.low if self.closed in ("both", "left") else value > self.low)
        high_ok = self.high is None or (value <= self.high if self.closed in ("both", "right") else value < self.high)
        return low_ok and high_ok

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = ("[" if self.closed in ("both", "left") else "("), ("]" if self.closed in ("both", "right") else ")")
            return f"{what} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{what} {'>=' if self.closed in ('both', 'left') else '>'} {self.low:g}"
        return what


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (compared exactly: 'Cosine' is not 'cosine')."""

    values: tuple

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, bool, type(None))) and value in self.values

    def describe(self) -> str:
        return " or ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class Widths:
    """Hidden layer widths: a sequence of positive integers (empty: no hidden layer)."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (tuple, list)) and all(
            isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1 for w in value)

    def describe(self) -> str:
        return "a list of positive layer widths"


@dataclass(frozen=True)
class Kind:
    """An instance of one of `types`."""

    types: tuple[type, ...]
    name: str

    def accepts(self, value: Any) -> bool:
        return isinstance(value, self.types) and not (bool in self.types and not isinstance(value, bool))

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    rules: tuple  # the value must satisfy one of them
    help: str
    panel: str

    @property
    def choices(self) -> tuple:
        """The values a choice option takes (for the CLI's choice lists)."""
        return tuple(v for rule in self.rules if isinstance(rule, OneOf) for v in rule.values)


_FRACTION = Interval(float, 0.0, 1.0, "left")
_COUNT = Interval(int, 1)
_RATE = Interval(float, 0.0, None, "neither")

OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("backbone", "efficientnet_lite0", (Kind((str,), "a backbone name"),),
           "Backbone (see `headstart backbones`) or a timm name.", RUN),
    Option("weights", None, (OneOf((None,)), Kind((str, os.PathLike), "a file path")),
           "Backbone weights file (.safetensors).", RUN),
    Option("val_split", 0.2, (_FRACTION,), "Fraction held out for validation.", DATA),
    Option("test_split", 0.0, (_FRACTION,), "Fraction held out for testing.", DATA),
    Option("hidden", "auto", (OneOf(("auto",)), Widths()),
           "Hidden widths, e.g. 512,256; empty: none; auto: picks.", HEAD),
    Option("dropout", 0.2, (_FRACTION,), "Dropout before the output layer.", HEAD),
    Option("epochs", 60, (_COUNT,), "Maximum head epochs.", HEAD),
    Option("lr", 1e-3, (_RATE,), "Head learning rate.", HEAD),
    Option("weight_decay", 0.05, (Interval(float, 0.0),), "AdamW weight decay.", HEAD),
    Option("batch_size", 64, (_COUNT,), "Training batch size.", HEAD),
    Option("patience", 10, (_COUNT,), "Epochs without gain before stopping.", HEAD),
    Option("schedule", "cosine", (OneOf(("cosine", "plateau")),), "Learning-rate schedule.", HEAD),
    Option("balance", "auto", (OneOf(("auto",)), Kind((bool,), "true or false")),
           "Class weights; auto: if classes are skewed.", HEAD),
    Option("refit", "auto", (OneOf(("auto",)), Kind((bool,), "true or false")),
           "Refit the kept head on train + val; auto: the oriented head's.", HEAD),
    Option("cv", "auto", (OneOf(("auto",)), Interval(int, 0, 0), Interval(int, 2)),
           "Cross-validation folds; 0: none; auto: 5 if cheap.", HEAD),
    Option("seed", 0, (Interval(int),), "Random seed for splits and training.", RUN),
    Option("device", "auto", (OneOf(("auto", "cpu", "cuda")),), "Where to run.", RUN),
    Option("engine", "auto", (OneOf(("auto", "fp32", "int8")),),
           "CPU feature engine; auto: int8 where the CPU has VNNI, else fp32.", RUN),
    Option("strategy", "auto", (OneOf(("head", "finetune", "auto")),),
           "finetune: adapt the backbone; auto: if the head is weak.", FINETUNE),
    Option("unfreeze", "auto", (OneOf(("all", "auto")), _COUNT),
           "Top stages to fine-tune; auto: all if small photos, else 2.", FINETUNE),
    Option("augment", "light", (OneOf(("none", "light", "strong", "flips", "turns")),),
           "Fine-tuning augmentation (turns: + 90°).", FINETUNE),
    Option("finetune_epochs", 3, (_COUNT,), "Maximum fine-tuning epochs.", FINETUNE),
    Option("finetune_lr", 5e-4, (_RATE,), "Backbone rate at its top, falling below.", FINETUNE),
    Option("views", 3, (_COUNT,), "Augmented views per image cached for fine-tuning.", FINETUNE),
    Option("time_limit", 480.0, (Interval(float, 0.0, None, "neither"),),
           "Seconds (or 10m) that auto's fine-tuning fits into.", FINETUNE),
    Option("train_bn", False, (Kind((bool,), "true or false"),), "Let BatchNorm statistics update.", FINETUNE),
    Option("multi_label", False, (Kind((bool,), "true or false"),),
           "Several labels per image (on for label-list manifests).", DATA),
    Option("threshold", None, (OneOf((None,)), Interval(float, 0.0, 1.0, "neither")),
           "Multi-label: one threshold for all labels.", HEAD),
    Option("native_view", True, (Kind((bool,), "true or false"),),
           "Small photos: also seen at their own size.", DATA),
)}

DEFAULTS: Mapping[str, Any] = {name: o.default for name, o in OPTIONS.items()}


def choices(name: str) -> tuple:
    return OPTIONS[name].choices


def check(params: Mapping[str, Any], spell: Callable[[str], str] = str) -> None:
    """Refuse the first setting outside its rule, naming it, the value and what it takes; then the rules that
    tie settings together. `spell` writes a setting's name as the caller's user knows it (the CLI: `--val-split`)."""
    for name, value in params.items():
        option = OPTIONS.get(name)
        if option is None:
            raise ConfigError(f"unknown setting {name!r}; the settings are {', '.join(OPTIONS)}")
        if not any(rule.accepts(value) for rule in option.rules):
            wanted = " or ".join(rule.describe() for rule in option.rules)
            raise ConfigError(f"{spell(name)}={value!r} is not allowed: {spell(name)} must be {wanted}")
    val, test = params.get("val_split", 0.0), params.get("test_split", 0.0)
    if val + test >= 1.0:
        raise ConfigError(f"{spell('val_split')} + {spell('test_split')} = {val + test:g} leaves nothing to train on; "
                          "keep the sum below 1 (e.g. 0.2 and 0.1)")
