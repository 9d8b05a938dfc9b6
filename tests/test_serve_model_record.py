"""The saved model's record (headstart.json format 2): `save(load(m))` keeps every fitted attribute, a format-1
file (written by the previous headstart, kept in tests/data) loads with its whole run record, and each record
type round-trips through its dict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers_models import TINY_BACKBONE
from headstart import ImageClassifier
from headstart.evaluate.metrics import evaluate
from headstart.records import Decision, FitReport, HeadCandidate, History, RefitReport, Stage2Report
from headstart.serve import artifact
from headstart.serve.artifact import META_FILE
from headstart.records import FinetuneConfig, TrainConfig

FORMAT1 = Path(__file__).parent / "data" / "format1-headstart.json"
FITTED = ("classes_", "head_config_", "decision_", "history_", "train_config_", "counts_", "skipped_", "cached_",
          "timings_")


def _meta(model_dir: Path) -> dict:
    meta = json.loads((model_dir / META_FILE).read_text())
    meta.pop("created")
    return meta


def _same_fitted(a: ImageClassifier, b: ImageClassifier) -> None:
    for name in FITTED:
        got, want = getattr(b, name), getattr(a, name)
        assert (got.to_dict() if hasattr(got, "to_dict") else got) == \
            (want.to_dict() if hasattr(want, "to_dict") else want), name
    for name in ("val_metrics_", "test_metrics_"):
        got, want = getattr(b, name), getattr(a, name)
        assert (got and got.to_dict()) == (want and want.to_dict()), name
    assert b.head_state_.keys() == a.head_state_.keys()
    assert all(np.array_equal(b.head_state_[k], a.head_state_[k]) for k in a.head_state_)
    assert b.frozen_.weights_id == a.frozen_.weights_id
    assert repr(b.frozen_.spec) == repr(a.frozen_.spec)  # repr: an unregistered timm name has params_m NaN


@pytest.mark.parametrize("strategy", ["head", "finetune"])
def test_save_load_save_keeps_every_fitted_attribute(image_folder, tiny_weights, tiny_cache, tmp_path, strategy):
    clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=4, device="cpu", strategy=strategy,
                          finetune_epochs=2, views=1, test_split=0.2).fit(image_folder)
    first = clf.save(tmp_path / "a")
    loaded = ImageClassifier.load(first, device="cpu")
    _same_fitted(clf, loaded)
    second = loaded.save(tmp_path / "b")
    assert _meta(second) == _meta(first)  # nothing lost on the way, nothing invented
    if strategy == "finetune":
        assert loaded.decision_.kept == "finetune" and loaded.decision_.stage2.history.train_loss


def test_a_format_1_model_loads_with_its_run_record(image_folder, tiny_weights, tiny_cache, tmp_path):
    """The weights of a model trained now, under the record format 1 wrote for a fine-tuned run (its own
    classes, head and backbone substituted so that they describe these tensors)."""
    model = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=3, device="cpu").fit(image_folder)
    model_dir = model.save(tmp_path / "m")
    now = json.loads((model_dir / META_FILE).read_text())
    old = json.loads(FORMAT1.read_text())
    assert old["format_version"] == 1 and "fit" not in old
    old.update(classes=now["classes"], head=now["head"], backbone=now["backbone"])
    (model_dir / META_FILE).write_text(json.dumps(old))

    clf = ImageClassifier.load(model_dir)
    d = old["decision"]
    assert clf.decision_.kept == d["kept"] == "finetune" and clf.decision_.strategy == "finetune"
    # settings added since (class weights, the time budget) load at their defaults: what those runs did
    config = clf.decision_.stage2.config.to_dict()
    assert {k: config[k] for k in d["finetune_config"]} == d["finetune_config"]
    assert (config["balance"], config["balance_power"], config["time_budget_s"]) == (False, 1.0, 0.0)
    assert clf.decision_.stage2.history.val_loss == d["finetune_history"]["val_loss"]
    assert clf.decision_.stage2.refit.kept == d["refit"]["kept"]
    assert clf.history_.train_loss == old["history"]["train_loss"]
    assert {k: clf.train_config_.to_dict()[k] for k in old["train"]} == old["train"] and clf.counts_ == old["counts"]
    assert clf.train_config_.balance_power == 1.0  # added since: the full inverse frequency `balance` meant then
    assert clf.val_metrics_.accuracy == old["metrics"]["val"]["accuracy"]
    assert clf.test_metrics_.to_dict() == old["metrics"]["test"]
    assert clf.get_params()["strategy"] == old["params"]["strategy"]
    saved = json.loads((clf.save(tmp_path / "again") / META_FILE).read_text())
    assert saved["format_version"] == artifact.PLAIN_FORMAT_VERSION == 2 and artifact.FORMAT_VERSION == 3
    assert saved["fit"]["decision"]["stage2"]["config"] == config


def test_records_round_trip_through_their_dicts():
    ev = evaluate(np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), ["a", "b"])
    refit = RefitReport(True, 0.5, 0.4, (HeadCandidate((64,), 0.6, 0.3),))
    decision = Decision("auto", "finetune", "room left", 64, 128, 0.7, (HeadCandidate((), 0.2, 0.5),),
                        Stage2Report(FinetuneConfig(unfreeze="all"), History([1.0], [0.9], [0.5], 0), 0.8, refit))
    report = FitReport(decision, History([1.0, 0.8], [0.9, 0.7], [0.5, 0.6], 1, True), TrainConfig(epochs=3),
                       {"train": {"a": 2, "b": 1}}, ((Path("x.jpg"), "empty file"),), 2, {"train_s": 1.5}, ev, None)
    again = FitReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.to_dict() == report.to_dict()
    assert again.decision.kept_head_candidates == refit.candidates  # the refit's, since it was kept
    assert again.val_metrics.to_dict() == ev.to_dict() and again.test_metrics is None
