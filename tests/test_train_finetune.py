"""train.finetune on the tiny random-weight backbone: which weights train (frozen stages, BatchNorm statistics,
whole stages, the stem with --unfreeze all), per-stage rates, refused --unfreeze values, patience and early
stopping against the stage-1 model, and resuming from a checkpoint inside `finetune`."""

from __future__ import annotations

import dataclasses

import json

import numpy as np
import pytest

from helpers_cli import assert_one_line
from helpers_models import N_STAGES

torch = pytest.importorskip("torch")

from headstart.backbones.pooled import PooledFeatures  # noqa: E402
from headstart.errors import UserError  # noqa: E402
from headstart.train import checkpoint  # noqa: E402
from headstart.train import finetune as ft  # noqa: E402
from helpers_finetune import (  # noqa: E402
    _always_improving, _head_for, _interrupt_at_validation, _is_bn_stat, _is_conv_weight, _net, _stage_of, _state,
    _synthetic_split,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest: the tiny model's steps, one thread


# --- BatchNorm and frozen stages -----------------------------------------------------------------------------


@pytest.mark.parametrize("train_bn", [False, True])
def test_frozen_stages_never_change_and_bn_statistics_follow_train_bn(tiny_weights, train_bn, monkeypatch):
    _always_improving(monkeypatch)
    net = _net(tiny_weights)
    boundary = ft.boundary_for(net, 2)
    assert boundary == N_STAGES - 2
    data = _synthetic_split(net, boundary, 12, seed=0)
    head = _head_for(net)
    before = _state(net)
    cfg = ft.FinetuneConfig(unfreeze=2, epochs=3, views=1, lr=1e-2, head_lr=1e-2, batch_size=4, patience=10,
                            train_bn=train_bn)
    history = ft.finetune(net, head, cfg, data, data).history
    assert history.best_epoch == 2  # the kept weights are the last epoch's, not the start's
    after = net.state_dict()
    assert set(after) == set(before)

    frozen = [k for k in before if _stage_of(k) < boundary]
    assert any("conv_stem" in k for k in frozen) and any(k.endswith("running_var") for k in frozen)
    for k in frozen:
        assert torch.equal(after[k], before[k]), k

    unfrozen = [k for k in before if _stage_of(k) >= boundary]
    stats = [k for k in unfrozen if _is_bn_stat(k)]
    convs = [k for k in unfrozen if _is_conv_weight(k)]
    assert stats and convs
    for k in convs:
        assert not torch.equal(after[k], before[k]), f"{k} did not train"
    for k in stats:
        if train_bn:
            assert not torch.equal(after[k], before[k]), f"{k} kept its statistics with train_bn"
        else:
            assert torch.equal(after[k], before[k]), f"{k} changed without train_bn"
    assert not net.training and not head.training  # left in inference mode


# --- whole stages train --------------------------------------------------------------------------------------


@pytest.mark.parametrize("unfreeze", [1, 2, N_STAGES, "all"])
def test_set_trainable_unfreezes_exactly_the_top_stages_and_they_all_get_gradients(tiny_weights, unfreeze):
    net = _net(tiny_weights)
    boundary = ft.boundary_for(net, unfreeze)
    assert boundary == (0 if unfreeze == "all" else N_STAGES - unfreeze)
    units = ft.set_trainable(net, boundary)
    everything = boundary == 0  # every stage: the stem trains too
    assert len(units) == everything + N_STAGES - boundary + 1  # (the stem), the stages, then conv_head + bn2
    names = dict(net.named_parameters())
    expect = {k for k in names if _stage_of(k) >= boundary or everything}
    assert {k for k, p in names.items() if p.requires_grad} == expect
    assert any(_stage_of(k) == -1 for k in expect) == everything

    head = _head_for(net)
    ft.set_modes(net, head, units, train_bn=False)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(head(net(x)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for k, p in names.items():
        if k in expect:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{k} got no gradient"
        else:
            assert p.grad is None, f"frozen {k} got a gradient"


def test_unfreeze_all_trains_every_layer_the_stem_too_and_keeps_batchnorm_statistics(tiny_weights, monkeypatch):
    _always_improving(monkeypatch)
    net = _net(tiny_weights)
    data = _synthetic_split(net, 0, 9, seed=0)
    before = _state(net)
    cfg = ft.FinetuneConfig(unfreeze="all", epochs=2, views=1, lr=1e-2, head_lr=1e-2, batch_size=4, patience=10)
    assert ft.finetune(net, _head_for(net), cfg, data, data).history.best_epoch == 1
    after = net.state_dict()
    assert "backbone.conv_stem.weight" in before
    for k in before:
        if _is_bn_stat(k):
            assert torch.equal(after[k], before[k]), k
        elif _is_conv_weight(k):
            assert not torch.equal(after[k], before[k]), f"{k} did not train"


@pytest.mark.parametrize("n_units, per_unit", [(3, 0.35 ** 0.5), (8, 0.35 ** (1 / 7)), (2, 0.35), (1, 1.0)])
def test_rates_fall_from_the_top_to_a_fixed_fraction_at_the_lowest_trained_stage(n_units, per_unit):
    cfg = ft.FinetuneConfig(lr=1e-3, lowest_rate=0.35)
    decay = ft.layer_decay(cfg, n_units)
    assert decay == pytest.approx(per_unit)  # so the lowest of n units trains at 0.35 x lr


@pytest.mark.parametrize("unfreeze", [0, -1, N_STAGES + 1, "banana"])
def test_out_of_range_unfreeze_is_refused(tiny_weights, unfreeze):
    net = _net(tiny_weights)
    with pytest.raises(ValueError) as err:
        ft.boundary_for(net, unfreeze)
    assert isinstance(err.value, UserError)  # the CLI prints it as one line and exits 2
    assert_one_line(str(err.value), "--unfreeze", f"1..{N_STAGES}", str(unfreeze))


def test_a_backbone_without_stages_cannot_be_fine_tuned():
    with pytest.raises(ValueError, match="--strategy head") as err:
        ft.boundary_for(PooledFeatures(torch.nn.Linear(2, 2)), 1)
    assert isinstance(err.value, UserError)


# --- patience, early stopping, resuming -----------------------------------------------------------------------


class EpochCounter:
    """A progress sink that knows which fine-tuning epoch runs, and can die after a given number of them."""

    def __init__(self, die_after: int | None = None) -> None:
        self.started, self.epoch, self.die_after = False, 0, die_after

    def start(self, task, total):
        self.started = True

    def advance(self, n=1):
        self.epoch += n
        if self.die_after is not None and self.epoch >= self.die_after:
            raise KeyboardInterrupt

    def finish(self):
        pass


def _scripted_validation(monkeypatch, sink: EpochCounter, losses: dict) -> None:
    """Validation losses by epoch ("base" before training), so the best epoch and early stopping are chosen."""
    real = ft._validate

    def validate(*args, **kwargs):
        _, acc, logits = real(*args, **kwargs)
        return losses[sink.epoch if sink.started else "base"], acc, logits

    monkeypatch.setattr(ft, "_validate", validate)


@pytest.mark.parametrize("epochs, patience, expected", [(8, None, 3), (20, None, 5), (40, None, 10), (20, 2, 2)])
def test_patience_grows_with_the_run_unless_given(epochs, patience, expected):
    assert ft.FinetuneConfig(epochs=epochs, patience=patience).stop_after == expected


def test_a_long_run_survives_a_slow_start_against_the_stage1_model(tiny_weights, monkeypatch):
    """Epochs 0-2 score below the stage-1 model, epoch 3 beats it: a 16-epoch run (patience 4) goes on to it and
    stops 4 epochs after it."""
    losses = {"base": 1.0, 0: 1.2, 1: 1.1, 2: 1.05, 3: 0.5, **{e: 0.6 for e in range(4, 16)}}
    _, history = _scripted_run(tiny_weights, monkeypatch, losses, epochs=16)
    assert history.best_epoch == 3
    assert history.stopped_early and len(history.val_loss) == 8  # stopped 4 epochs after the best


def test_patience_follows_stage2_own_progress_but_the_stage1_model_stays_the_one_to_beat(tiny_weights, monkeypatch):
    """Epochs 0-3 score below the stage-1 model but improve on each other: no epoch counts as bad, and epoch 4
    beats it. Epochs that stop improving end the run (patience 3); a run that never beats the stage-1 model keeps it."""
    losses = {"base": 1.0, 0: 1.3, 1: 1.2, 2: 1.1, 3: 1.05, 4: 0.5, 5: 0.6, 6: 0.6, 7: 0.6}
    _, history = _scripted_run(tiny_weights, monkeypatch, losses, epochs=8)
    assert history.best_epoch == 4 and len(history.val_loss) == 8 and history.stopped_early

    monkeypatch.undo()  # the scripted validation wraps the real one, not the first script
    worse = {"base": 1.0, 0: 1.3, 1: 1.2, 2: 1.25, 3: 1.25, 4: 1.25, 5: 0.1}
    before = _state(_net(tiny_weights))
    net, history = _scripted_run(tiny_weights, monkeypatch, worse, epochs=8)
    assert len(history.val_loss) == 5 and history.stopped_early  # three epochs without bettering epoch 1
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the stage-1 weights are kept


def _scripted_run(tiny_weights, monkeypatch, losses: dict, epochs: int):
    """Fine-tune the tiny net's top 2 stages on synthetic data, with validation losses scripted by epoch."""
    cfg = ft.FinetuneConfig(unfreeze=2, epochs=epochs, views=1, lr=1e-2, head_lr=1e-2, batch_size=4)
    net = _net(tiny_weights)
    data = _synthetic_split(net, N_STAGES - 2, 6, seed=0)
    sink = EpochCounter()
    _scripted_validation(monkeypatch, sink, losses)
    return net, ft.finetune(net, _head_for(net), cfg, data, data, checkpoint_dir=None, resume=False,
                            progress=sink).history


def test_resume_restores_best_weights_and_early_stopping_state(tiny_weights, tmp_path, monkeypatch):
    """The best epoch (0) lies before the interruption (after epoch 1) and patience runs out after it (epoch 2):
    the resumed run must end with epoch 0's weights, stop where the uninterrupted run stopped, and train its
    remaining epoch on the same batches (several per epoch, so the shuffling RNG matters)."""
    losses = {"base": 1.0, 0: 0.5, 1: 0.9, 2: 0.8, 3: 0.1}
    cfg = ft.FinetuneConfig(unfreeze=2, epochs=4, views=2, lr=1e-2, head_lr=1e-2, batch_size=4, patience=2)

    def run(sink, ckpt, resume=False):
        net = _net(tiny_weights)
        data = _synthetic_split(net, N_STAGES - 2, 10, seed=0)
        data = dataclasses.replace(data, acts=np.concatenate([data.acts, data.acts[::-1]], 1),  # two "views"
                                   taps=np.concatenate([data.taps, data.taps[::-1]], 1))
        head = _head_for(net)
        with monkeypatch.context() as mp:
            _scripted_validation(mp, sink, losses)
            history = ft.finetune(net, head, cfg, data, data, checkpoint_dir=ckpt, resume=resume,
                                  progress=sink).history
        return history, {**net.state_dict(), **{f"head.{k}": v for k, v in head.state_dict().items()}}

    whole_history, whole = run(EpochCounter(), tmp_path / "A")
    assert whole_history.best_epoch == 0 and whole_history.stopped_early and len(whole_history.val_loss) == 3
    with pytest.raises(KeyboardInterrupt):
        run(EpochCounter(die_after=2), tmp_path / "B")
    assert json.loads((tmp_path / "B" / "state.json").read_text())["epoch"] == 1
    sink = EpochCounter()
    history, resumed = run(sink, tmp_path / "B", resume=True)
    assert sink.epoch == 3  # resumed at epoch 2 and stopped after it, as the uninterrupted run did
    assert history.to_dict() == whole_history.to_dict()
    for k, v in whole.items():
        assert torch.equal(resumed[k], v), k


def test_resume_refuses_a_checkpoint_made_with_other_settings(tiny_weights, tmp_path, monkeypatch):
    net = _net(tiny_weights)
    data = _synthetic_split(net, N_STAGES - 1, 6, seed=0)
    cfg = ft.FinetuneConfig(unfreeze=1, epochs=2, views=1, batch_size=4)
    with monkeypatch.context() as mp:
        _interrupt_at_validation(mp, call=3)
        with pytest.raises(KeyboardInterrupt):
            ft.finetune(net, _head_for(net), cfg, data, data, checkpoint_dir=tmp_path / "ck")
    net = _net(tiny_weights)
    other = ft.FinetuneConfig(unfreeze=1, epochs=2, views=1, batch_size=4, lr=1e-3)
    with pytest.raises(checkpoint.CheckpointError) as err:
        ft.finetune(net, _head_for(net), other, data, data, checkpoint_dir=tmp_path / "ck", resume=True)
    assert_one_line(" ".join(str(err.value).split()), "--resume")
