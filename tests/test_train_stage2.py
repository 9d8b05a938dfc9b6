"""train.stage2: the auto strategy's decision (its reasons, too few images, a backbone that cannot be fine-tuned)
and the head refitted after stage 2, kept only when it validates better."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from helpers_images import make_image_folder

torch = pytest.importorskip("torch")

from headstart import ImageClassifier  # noqa: E402
from headstart.train import policy, stage2 as strategy  # noqa: E402
from helpers_finetune import finetune_classifier  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest: the tiny model's steps, one thread


@pytest.fixture
def make_clf(tiny_weights, ft_cache):
    """finetune_classifier (helpers_finetune) with this run's tiny weights, in a cache holding both exports."""
    return functools.partial(finetune_classifier, tiny_weights)


def _scored(y, picks):
    from headstart.evaluate.metrics import evaluate

    proba = np.full((len(y), 2), 0.2)
    proba[np.arange(len(y)), picks] = 0.8
    return evaluate(np.array(y), proba, ["a", "b"])


def test_decide_auto_reasons():
    n = policy.AUTO_MIN_TRAIN_IMAGES
    weak, good = _scored([0, 0, 0, 0, 1], [0, 0, 0, 0, 0]), _scored([0, 1, 0, 1], [0, 1, 0, 1])
    run, why = policy.decide_auto(n + 20, False, None)
    assert not run and "no validation" in why
    run, why = policy.decide_auto(n - 1, True, weak)
    assert not run and f"only {n - 1} training images" in why
    run, why = policy.decide_auto(n, True, good)
    assert not run and "validates well enough" in why
    run, why = policy.decide_auto(n, True, weak)
    assert run and "poorly" in why and "balanced 0.500" in why


def test_auto_keeps_the_head_when_there_are_too_few_images(make_clf, image_folder, tiny_weights, monkeypatch):
    def no_stage2(*args, **kwargs):
        raise AssertionError("stage 2 ran")

    monkeypatch.setattr(strategy, "run_finetune", no_stage2)
    clf = make_clf(strategy="auto").fit(image_folder)
    assert clf.decision_.strategy == "auto" and clf.decision_.kept == "head"
    assert f"only 15 training images (< {policy.AUTO_MIN_TRAIN_IMAGES})" in clf.decision_.reason
    assert clf.frozen_.weights == Path(tiny_weights)


@pytest.mark.parametrize("refit_better", [True, False])
def test_a_refitted_head_is_kept_only_when_it_validates_better(make_clf, image_folder, monkeypatch, refit_better):
    """After stage 2 a new head is fitted on the tuned backbone's features; the lower validation log loss wins."""
    real = strategy.refit_head
    made = {}

    def refit(*args, **kwargs):
        out = real(*args, **kwargs)
        proba, y = out.val
        sure = np.full(proba.shape, 0.01 / (proba.shape[1] - 1))
        sure[np.arange(len(y)), y] = 0.99
        out.val = (sure if refit_better else np.roll(sure, 1, axis=1), y)  # all right, or all wrong
        made["refit"] = out
        return out

    monkeypatch.setattr(strategy, "refit_head", refit)
    clf = make_clf().fit(image_folder)
    out, decision = made["refit"], clf.decision_
    assert decision.kept == "finetune" and decision.stage2.refit.kept is refit_better
    assert [list(c.hidden) for c in decision.stage2.refit.candidates] == [[]]  # 15 photos: too few for a hidden layer
    if refit_better:
        assert clf.val_metrics_.log_loss == pytest.approx(-np.log(0.99))
    else:
        assert clf.val_metrics_.log_loss < decision.stage2.refit.val_log_loss == pytest.approx(-np.log(0.005))
    assert decision.stage2.val_accuracy == clf.val_metrics_.accuracy
    same_head = all(np.array_equal(v, clf.head_state_[k]) for k, v in out.head_state.items())
    assert same_head is refit_better


def test_auto_keeps_the_head_when_the_backbone_cannot_be_fine_tuned(tmp_path, monkeypatch):
    """A ResNet has no EfficientNet stage layout: auto says so and keeps the head; finetune refuses in one line."""
    import timm
    from safetensors.torch import save_file

    from headstart.errors import FinetuneError

    monkeypatch.setattr(policy, "AUTO_MIN_TRAIN_IMAGES", 1)
    monkeypatch.setattr(policy, "AUTO_WEAK_BALANCED", 1.01)  # stage 2 would run if the backbone allowed it
    monkeypatch.setattr(policy, "keep_oriented", lambda *a: False)  # (after the oriented head, which loses here)
    weights = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(weights))
    data = make_image_folder(tmp_path / "photos", per_class=6)
    clf = ImageClassifier(backbone="test_resnet", weights=weights, strategy="auto", epochs=3).fit(data)
    assert clf.decision_.kept == "head"
    assert "cannot be fine-tuned" in clf.decision_.reason
    with pytest.raises(FinetuneError) as err:
        ImageClassifier(backbone="test_resnet", weights=weights, strategy="finetune", epochs=3).fit(data)
    assert "\n" not in str(err.value)
