"""options: one table of settings, checked once, that the CLI and the API agree with; ImageClassifier's __init__
stores, fit checks, set_params sets."""

from __future__ import annotations

import inspect
import math

import pytest

from helpers_cli import assert_one_line
from headstart import ImageClassifier, options
from headstart.settings import settings
from headstart.errors import ConfigError, DataError


CLI_ONLY = {"data", "out", "resume", "export", "report", "manifest", "track", "log_dir"}  # train flags, no setting


def test_the_cli_the_api_and_the_options_table_agree():
    """The one check that the three faces of the settings agree: ImageClassifier's parameters and `headstart
    train`'s flags are the entries of headstart.options (the CLI adds only its own), each with the table's default,
    and the defaults pass their own rules."""
    from headstart.cli import train as cli_train

    options.check(dict(options.DEFAULTS))

    api = {k: p.default for k, p in inspect.signature(ImageClassifier.__init__).parameters.items() if k != "self"}
    assert api == dict(options.DEFAULTS)

    params = inspect.signature(cli_train.train).parameters
    assert set(params) == set(options.OPTIONS) | CLI_ONLY
    cli = {name: p.default for name, p in params.items() if name in options.OPTIONS}
    cli["hidden"] = cli_train._parse_hidden(cli["hidden"])  # flags arrive as text
    cli["unfreeze"] = cli_train._parse_unfreeze(cli["unfreeze"])
    cli["balance"] = "auto" if cli["balance"] is None else cli["balance"]  # --balance/--no-balance
    cli["refit"] = "auto" if cli["refit"] is None else cli["refit"]  # --refit/--no-refit
    cli["time_limit"] = cli_train._parse_seconds(cli["time_limit"], "--time-limit")
    assert cli == dict(options.DEFAULTS) == api


@pytest.mark.parametrize("name, value", [
    ("lr", math.inf), ("lr", math.nan), ("lr", 0.0), ("finetune_lr", -1e-3), ("weight_decay", math.inf),
    ("val_split", 1.0), ("val_split", -0.1), ("dropout", math.nan), ("epochs", 0), ("epochs", 2.5),
    ("epochs", True), ("views", 0), ("schedule", "Cosine"), ("strategy", "magic"), ("unfreeze", 0),
    ("unfreeze", "some"), ("hidden", "big"), ("hidden", (64, 0)), ("balance", "yes"), ("device", "tpu"),
])
def test_each_setting_outside_its_rule_is_refused_in_one_line_naming_it(name, value):
    with pytest.raises(ConfigError) as err:
        options.check({name: value})
    assert_one_line(str(err.value), name, repr(value))


def test_settings_that_only_fail_together_are_refused():
    with pytest.raises(ConfigError, match="leaves nothing to train on"):
        options.check({"val_split": 0.6, "test_split": 0.4})


def test_the_cli_spelling_names_the_flag():
    with pytest.raises(ConfigError) as err:
        options.check({"val_split": 1.5}, spell=lambda n: "--" + n.replace("_", "-"))
    assert_one_line(str(err.value), "--val-split")


def test_accepted_values_of_every_kind():
    options.check({"unfreeze": 3, "hidden": (512, 256), "weights": "w.safetensors", "seed": -1, "val_split": 0.0})
    assert settings({"hidden": [64]}).hidden == (64,)


def test_init_only_stores_and_fit_refuses_before_any_work(image_folder, isolated_cache):
    clf = ImageClassifier(hidden=[64], lr=math.inf)  # stored as given, no check yet
    assert clf.hidden == [64] and math.isinf(clf.lr)
    with pytest.raises(DataError, match="lr"):
        clf.fit(image_folder)
    assert not (isolated_cache / "features").exists()


def test_set_params_sets_known_settings_and_refuses_others():
    clf = ImageClassifier()
    assert clf.set_params(epochs=5, strategy="auto") is clf
    assert clf.get_params()["epochs"] == 5 and clf.strategy == "auto"
    with pytest.raises(DataError, match="epoch"):
        clf.set_params(epoch=5)
