"""ImageClassifier with strategy finetune/auto, end to end on the tiny backbone: the decision and the fine-tuned
backbone are saved and predict the same after load, the test split is scored with the kept model, the head is
linear when fine-tuning follows, and a run resumes (after an interruption or a real SIGKILL) to match an
uninterrupted one."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from helpers_images import make_image_folder
from helpers_models import N_STAGES, TINY_BACKBONE

torch = pytest.importorskip("torch")

from headstart import ImageClassifier  # noqa: E402
from headstart.backbones.weights import read_state_dict  # noqa: E402
from headstart.train import policy  # noqa: E402
from helpers_finetune import (  # noqa: E402
    _always_improving, _assert_safetensors_layout, _images, _interrupt_at_validation, _is_bn_stat, _is_conv_weight,
    _stage_of,
)
from helpers_finetune import finetune_classifier  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest: the tiny model's steps, one thread


@pytest.fixture
def make_clf(tiny_weights, ft_cache):
    """finetune_classifier (helpers_finetune) with this run's tiny weights, in a cache holding both exports."""
    return functools.partial(finetune_classifier, tiny_weights)


# --- saving what stage 2 kept -----------------------------------------------------------------------------------


def test_auto_stage2_decision_is_saved(make_clf, image_folder, tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(policy, "AUTO_MIN_TRAIN_IMAGES", 1)
    monkeypatch.setattr(policy, "AUTO_WEAK_BALANCED", 2.0)
    monkeypatch.setattr(policy, "keep_oriented", lambda *a: False)  # the labels depend on orientation: fine-tune
    clf = make_clf(strategy="auto").fit(image_folder)
    clf.save(tmp_path / "m")
    decision = json.loads((tmp_path / "m" / "headstart.json").read_text())["fit"]["decision"]
    assert decision["strategy"] == "auto" and decision["kept"] in ("head", "finetune")
    assert isinstance(decision["head_val_accuracy"], float) and isinstance(decision["stage2"]["val_accuracy"], float)
    # a weak head: the deep recipe (train.deep), its plan said, its epochs planned from the photos' number
    assert "whole photo" in decision["plan"] and "--time-limit" in decision["plan"]
    ft = decision["stage2"]["config"]
    assert ft["unfreeze"] == policy.DEEP_UNFREEZE and ft["epochs"] == policy.DEEP_EPOCHS  # few photos: the most
    assert ft["time_budget_s"] > 0
    if decision["stage2"]["val_accuracy"] > decision["head_val_accuracy"]:
        assert decision["kept"] == "finetune"
    if decision["stage2"]["val_accuracy"] < decision["head_val_accuracy"]:
        assert decision["kept"] == "head"
    saved = read_state_dict(tmp_path / "m" / "model.safetensors")
    pretrained = read_state_dict(tiny_weights)
    same = all(torch.equal(saved[f"backbone.{k}"], v) for k, v in pretrained.items() if f"backbone.{k}" in saved)
    assert same == (decision["kept"] == "head")


def test_fine_tuned_model_saves_its_backbone_and_predicts_the_same_after_load(
        make_clf, image_folder, tiny_weights, tmp_path, monkeypatch):
    with monkeypatch.context() as mp:
        _always_improving(mp)  # the last epoch's weights are kept, whatever the tiny random model learns
        clf = make_clf().fit(image_folder)
    files = _images(image_folder)
    before = clf.predict_proba(files)
    clf.save(tmp_path / "m")
    info = json.loads((tmp_path / "m" / "headstart.json").read_text())
    decision = info["fit"]["decision"]
    assert decision["strategy"] == "finetune" and decision["kept"] == "finetune"
    assert isinstance(decision["head_val_accuracy"], float) and isinstance(decision["stage2"]["val_accuracy"], float)
    assert decision["stage2"]["history"]["best_epoch"] == 1  # a trained epoch was kept

    loaded = ImageClassifier.load(tmp_path / "m", device="cpu")
    np.testing.assert_allclose(loaded.predict_proba(files), before, atol=1e-5, rtol=0)

    # The saved backbone is the fine-tuned one: frozen stages and (without train_bn) every BatchNorm statistic
    # as pretrained, the top stages' convolutions changed.
    saved = {k[len("backbone."):]: v for k, v in read_state_dict(tmp_path / "m" / "model.safetensors").items()
             if k.startswith("backbone.")}
    pretrained = {k: v for k, v in read_state_dict(tiny_weights).items() if not k.startswith("classifier.")}
    assert set(saved) == set(pretrained)
    boundary = N_STAGES - 2
    for k, v in pretrained.items():
        if _stage_of(k) < boundary or _is_bn_stat(k):
            assert torch.equal(saved[k], v), k
        elif _is_conv_weight(k):
            assert not torch.equal(saved[k], v), f"{k} was not fine-tuned"


def test_test_split_is_scored_with_the_fine_tuned_backbone(tiny_weights, tmp_path):
    """After stage 2 the held-out test metrics come from the model that is kept, not the stage-1 features."""
    data = make_image_folder(tmp_path / "photos", per_class=12)
    clf = ImageClassifier(backbone=TINY_BACKBONE, weights=tiny_weights, strategy="finetune", test_split=0.25,
                          epochs=3, finetune_epochs=1, views=1).fit(data)
    assert clf.decision_.kept == "finetune" and clf.test_metrics_ is not None
    from headstart.data.scan import scan_folder
    from headstart.evaluate.metrics import evaluate

    test = scan_folder(data, val_split=0.2, test_split=0.25, seed=0)
    expected = evaluate(test.labels("test"), clf.predict_proba(test.paths("test")), clf.classes_)  # from pixels
    assert clf.test_metrics_.n == expected.n == 9
    assert clf.test_metrics_.log_loss == pytest.approx(expected.log_loss, abs=1e-4)


@pytest.mark.parametrize("kept", [True, False])
def test_a_fine_tuned_model_tries_its_mirror_images_and_predicts_as_validation_chose(tiny_weights, tmp_path,
                                                                                   monkeypatch, kept):
    """Each photo's features averaged with its mirror image's (`train.stage2.mirrored_features`), kept only when
    `policy.keep_mirrored` says so: the saved model, its export and the summary then do the same."""
    monkeypatch.setattr(policy, "keep_mirrored", lambda *a: kept)
    data = make_image_folder(tmp_path / "photos", per_class=12)
    clf = ImageClassifier(backbone=TINY_BACKBONE, weights=tiny_weights, strategy="finetune", test_split=0.25,
                          epochs=3, finetune_epochs=1, views=1).fit(data)
    stage2 = clf.decision_.stage2
    assert clf.decision_.kept == "finetune" and stage2.mirrored is kept
    assert isinstance(stage2.mirrored_accuracy, float)
    assert clf.frozen_.spec.preprocess.orientations == (2 if kept else 1)
    assert clf.val_metrics_.accuracy == (stage2.mirrored_accuracy if kept else stage2.val_accuracy)
    scored = clf.validation_  # the features the temperature and the validation figures came from
    np.testing.assert_allclose(clf.predict_proba(scored.paths), scored.proba, atol=1e-5)
    from headstart.data.scan import scan_folder

    test = scan_folder(data, val_split=0.2, test_split=0.25, seed=0)  # the test split, scored from its pixels
    from headstart.evaluate.metrics import evaluate

    expected = evaluate(test.labels("test"), clf.predict_proba(test.paths("test")), clf.classes_)
    assert clf.test_metrics_.log_loss == pytest.approx(expected.log_loss, abs=1e-4)
    clf.save(tmp_path / "m")
    loaded = ImageClassifier.load(tmp_path / "m")
    assert loaded.decision_.stage2.mirrored is kept and loaded.frozen_.spec.preprocess.orientations == (
        2 if kept else 1)
    np.testing.assert_array_equal(loaded.predict_proba(scored.paths), clf.predict_proba(scored.paths))
    from headstart.serve.export import export_model
    from headstart.serve.onnx_predictor import OnnxPredictor

    export_model(tmp_path / "m", data)  # checks itself against the model: mirrored inside the graph
    onnx, _ = OnnxPredictor(tmp_path / "m" / "model.onnx").proba_paths(scored.paths)
    np.testing.assert_allclose(onnx, clf.predict_proba(scored.paths), atol=1e-3)
    from rich.console import Console

    from headstart.cli import render

    console = Console(record=True, width=240)
    console.print(render.train_summary(clf, data, TINY_BACKBONE, tmp_path / "m", None))
    summary = " ".join(console.export_text().split())
    assert f"with each photo's mirror image averaged in {stage2.mirrored_accuracy:.3f}, " \
           f"{'kept' if kept else 'not kept'}" in summary
    assert ("averaged with its mirror image's" in summary) is kept


def test_auto_head_is_linear_when_fine_tuning_follows(any_size_clf, image_folder, monkeypatch) -> None:
    from headstart.train import policy

    monkeypatch.setattr(policy, "AUTO_HIDDEN_MIN_TRAIN", 1)  # the generated folder is far below 1,000 photos
    head_only = any_size_clf(epochs=3).fit(image_folder)
    assert [list(c.hidden) for c in head_only.decision_.head_candidates] == [[], [64]]
    tuned = any_size_clf(epochs=3, strategy="finetune", finetune_epochs=1, views=1).fit(image_folder)
    assert not tuned.decision_.head_candidates  # stage 2 starts from a linear head, its better start
    assert tuned.head_config_.hidden == ()


# --- checkpoints and resuming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("unfreeze", [2, "all"])  # stored activations; stored pixels with the stem training
def test_resume_after_an_interruption_matches_an_uninterrupted_run(make_clf, image_folder, tmp_path, monkeypatch,
                                                                   unfreeze):
    settings = dict(finetune_epochs=3, views=2, batch_size=8, unfreeze=unfreeze)  # several batches: RNG matters
    files = _images(image_folder)
    whole = make_clf(**settings).fit(image_folder, checkpoint_dir=tmp_path / "A")
    assert not (tmp_path / "A").exists()  # a finished run removes its checkpoint
    assert whole.decision_.kept == "finetune"
    expected = whole.predict_proba(files)

    ckpt = tmp_path / "B"
    with monkeypatch.context() as mp:
        _interrupt_at_validation(mp, call=2)  # dies at the end of epoch 2, after epoch 1's checkpoint
        with pytest.raises(KeyboardInterrupt):
            make_clf(**settings).fit(image_folder, checkpoint_dir=ckpt)
    names = sorted(p.name for p in ckpt.iterdir())  # no pickle: one tensor file named by its digest, and JSON
    assert len(names) == 2 and names[1] == "state.json" and names[0].startswith("state-") and names[0].endswith(".safetensors")
    _assert_safetensors_layout(ckpt / names[0])
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 0

    calls = _interrupt_at_validation(monkeypatch, call=-1)  # counts only
    resumed = make_clf(**settings).fit(image_folder, checkpoint_dir=ckpt, resume=True)
    assert calls[0] == 2  # epochs 2 and 3 only: epoch 1 came from the checkpoint (the baseline is stage 1's)
    assert not ckpt.exists()
    assert resumed.decision_.stage2.history == whole.decision_.stage2.history
    assert resumed.frozen_.weights_id == whole.frozen_.weights_id
    np.testing.assert_allclose(resumed.predict_proba(files), expected, atol=1e-6, rtol=0)


_KILLED_RUN = textwrap.dedent("""
    import sys, time
    import headstart.train.finetune as ft
    real = ft._validate
    def slow(*args, **kwargs):  # slows epochs down (not their numbers) so the kill lands mid-run
        out = real(*args, **kwargs)
        time.sleep(0.4)
        return out
    ft._validate = slow
    from headstart import ImageClassifier
    weights, data, ckpt = sys.argv[1:4]
    ImageClassifier("{backbone}", weights=weights, **{params!r}).fit(data, checkpoint_dir=ckpt)
    print("finished")
""")


def test_resume_after_sigkill_matches_an_uninterrupted_run(make_clf, tiny_weights, image_folder, tmp_path):
    # engine by name: the child process resolves "auto" by its CPU, outside conftest's float32 pin
    settings = dict(finetune_epochs=4, views=2, batch_size=8, engine="fp32")
    params = make_clf(**settings).get_params()
    params.pop("backbone"), params.pop("weights")
    ckpt = tmp_path / "killed" / "checkpoint"
    code = _KILLED_RUN.format(backbone=TINY_BACKBONE, params=params)
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_weights), str(image_folder), str(ckpt)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (ckpt / "state.json").exists():
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.communicate()}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and b"finished" not in out
    epoch_done = json.loads((ckpt / "state.json").read_text())["epoch"]
    assert epoch_done < settings["finetune_epochs"] - 1

    files = _images(image_folder)
    with pytest.MonkeyPatch.context() as mp:
        calls = _interrupt_at_validation(mp, call=-1)  # counts only
        resumed = make_clf(**settings).fit(image_folder, checkpoint_dir=ckpt, resume=True)
    assert calls[0] == settings["finetune_epochs"] - (epoch_done + 1)  # only the epochs the kill cost
    whole = make_clf(**settings).fit(image_folder, checkpoint_dir=tmp_path / "whole")
    assert resumed.decision_.stage2.history == whole.decision_.stage2.history
    np.testing.assert_allclose(resumed.predict_proba(files), whole.predict_proba(files), atol=1e-6, rtol=0)
