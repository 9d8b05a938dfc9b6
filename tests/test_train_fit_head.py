"""train.fit_head: the head learns, stops early with the best weights restored, trains every parameter, weights
classes on request, is reproducible, and the candidate heads (which are tried, the one kept) are chosen by
validation loss."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import blobs
from headstart.train import fit_head as train
from headstart.heads.config import HeadConfig, head_logits_numpy, softmax
from headstart.heads.module import Head
from headstart.train.config import TrainConfig
from headstart.train.fit_head import class_weights, fit_head


def val_loss_of(head: Head, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return F.cross_entropy(head.eval()(torch.from_numpy(x)), torch.from_numpy(y)).item()


def test_head_learns_separable_features():
    x, y = blobs(40, seed=0)
    x_train, y_train, x_val, y_val = x[:90], y[:90], x[90:], y[90:]
    cfg = TrainConfig(epochs=30, batch_size=16, lr=3e-3, patience=30)
    head, history = fit_head(HeadConfig(x.shape[1], 3), cfg, x_train, y_train, x_val, y_val)
    assert len(history.train_loss) == len(history.val_loss) == len(history.val_accuracy) == 30
    assert history.train_loss[-1] < 0.6 * history.train_loss[0]
    assert history.val_accuracy[history.best_epoch] >= 0.95
    assert not head.training
    # The numpy inference used for prediction agrees with the torch head.
    state = {k: v.numpy() for k, v in head.state_dict().items()}
    with torch.no_grad():
        expected = head(torch.from_numpy(x_val)).softmax(1).numpy()
    np.testing.assert_allclose(softmax(head_logits_numpy(state, head.cfg, x_val)), expected, atol=1e-5)
    assert (expected.argmax(1) == y_val).mean() >= 0.95


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_early_stopping_restores_best_weights(schedule):
    # Few noisy training points in many dimensions, a big learning rate and no regularisation: validation loss
    # falls briefly, then climbs as the head memorises noise.
    rng = np.random.default_rng(3)
    dim = 64
    signal = rng.normal(size=dim)

    def noisy(n):
        y = rng.integers(0, 2, size=n)
        x = rng.normal(size=(n, dim)) * 2.0 + np.outer(2 * y - 1, signal) * 0.3
        return x.astype(np.float32), y.astype(np.int64)

    x_train, y_train = noisy(24)
    x_val, y_val = noisy(200)
    epochs = 200
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=1e-2, weight_decay=0.0, label_smoothing=0.0,
                      patience=5, schedule=schedule)
    head, history = fit_head(HeadConfig(dim, 2, hidden=(64,), dropout=0.0), cfg, x_train, y_train, x_val, y_val)

    assert history.stopped_early
    assert len(history.val_loss) < epochs
    assert len(history.val_loss) == history.best_epoch + 1 + cfg.patience
    assert history.best_epoch == int(np.argmin(history.val_loss))
    assert history.val_loss[-1] > min(history.val_loss) + 1e-3  # the last weights are worse than the best
    assert val_loss_of(head, x_val, y_val) == pytest.approx(min(history.val_loss), abs=1e-5)


def test_without_validation_trains_all_epochs_and_keeps_last():
    x, y = blobs(10, seed=4)
    threads = torch.get_num_threads()
    _, history = fit_head(HeadConfig(x.shape[1], 3), TrainConfig(epochs=7, patience=1), x, y)
    assert torch.get_num_threads() == threads  # training's own thread setting does not leak out
    assert len(history.train_loss) == 7
    assert history.val_loss == [] and not history.stopped_early and history.best_epoch == 6


def test_every_trainable_parameter_gets_a_gradient(monkeypatch):
    seen: dict[int, bool] = {}
    managed: list[torch.nn.Parameter] = []

    class RecordingAdamW(train.HeadAdamW):
        def __init__(self, params, *args, **kwargs):
            params = list(params)
            managed.extend(params)
            super().__init__(params, *args, **kwargs)

        def step(self, lr):
            for p in self.params:
                got = p.grad is not None and bool(torch.any(p.grad != 0))
                seen[id(p)] = seen.get(id(p), False) or got
            return super().step(lr)

    monkeypatch.setattr(train, "HeadAdamW", RecordingAdamW)
    x, y = blobs(10, seed=5)
    head, _ = fit_head(HeadConfig(x.shape[1], 3, hidden=(12,), dropout=0.1), TrainConfig(epochs=2, batch_size=8),
                       x, y, x[:6], y[:6])
    params = dict(head.named_parameters())
    assert len(params) == 4  # two linear layers, weight and bias each
    assert {id(p) for p in managed} == {id(p) for p in params.values()}
    assert all(seen[id(p)] for p in params.values()), [n for n, p in params.items() if not seen[id(p)]]
    # The standardisation statistics are fixed from the training features, not trained.
    assert {n for n, _ in head.named_buffers()} == {"mean", "std"}
    np.testing.assert_allclose(head.mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-5)


def test_class_weights_are_inverse_to_frequency():
    y = np.array([0] * 30 + [1] * 10 + [2] * 5)
    w = class_weights(y, 4).numpy()
    counts = np.array([30, 10, 5])
    np.testing.assert_allclose(w[:3] * counts, len(y) / 4, rtol=1e-6)  # weight x count is the same for all
    assert w[0] < w[1] < w[2]
    assert w[3] == 0  # a class with no examples gets no weight rather than infinity


@pytest.mark.parametrize("balance", [True, False])
def test_balance_weights_the_training_loss(balance, monkeypatch):
    weights_used = []
    real_step = train._train_forward  # the training loss (by hand: F.cross_entropy's, see the gradient test)

    def spy(head, x, y, weight, *args, **kwargs):
        weights_used.append(weight)
        return real_step(head, x, y, weight, *args, **kwargs)

    monkeypatch.setattr(train, "_train_forward", spy)
    x, y = blobs(10, seed=6)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:4], np.flatnonzero(y == 2)[:2]])
    x, y = x[keep], y[keep]
    fit_head(HeadConfig(x.shape[1], 3), TrainConfig(epochs=2, balance=balance), x, y)
    assert weights_used
    if balance:
        expected = class_weights(y, 3)
        assert all(w is not None and torch.allclose(w, expected) for w in weights_used)
    else:
        assert all(w is None for w in weights_used)


def test_balanced_training_helps_the_minority_class():
    rng = np.random.default_rng(0)

    def overlapping(n0, n1):
        y = np.array([0] * n0 + [1] * n1)
        x = rng.normal(size=(len(y), 8)) + y[:, None]
        return x.astype(np.float32), y

    x, y = overlapping(300, 15)
    x_test, y_test = overlapping(300, 300)
    recall = {}
    for balance in (False, True):
        cfg = TrainConfig(epochs=30, balance=balance, label_smoothing=0.0)
        head, _ = fit_head(HeadConfig(8, 2, dropout=0.0), cfg, x, y)
        with torch.no_grad():
            pred = head(torch.from_numpy(x_test)).argmax(1).numpy()
        recall[balance] = (pred[y_test == 1] == 1).mean()
    assert recall[True] > recall[False] + 0.2


def test_training_is_reproducible():
    x, y = blobs(15, seed=9)
    runs = [fit_head(HeadConfig(x.shape[1], 3, hidden=(8,)), TrainConfig(epochs=4, seed=1), x, y, x[:9], y[:9])
            for _ in range(2)]
    assert runs[0][1].val_loss == runs[1][1].val_loss
    for (k, a), b in zip(runs[0][0].state_dict().items(), runs[1][0].state_dict().values()):
        assert torch.equal(a, b), k


def test_dropout_keeps_the_expected_fraction_and_scale():
    rng = np.random.default_rng(0)
    x = torch.ones(400, 500)
    out = train._dropout(x, 0.6, rng)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.4) < 0.01
    assert abs(out.mean().item() - 1.0) < 0.03  # inverted dropout: the expectation is unchanged
    assert torch.equal(train._dropout(x, 0.0, rng), x)


def test_fitting_a_head_does_not_import_dynamo():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from headstart.heads.config import HeadConfig\n"
        "from headstart.train.config import TrainConfig\nfrom headstart.train.fit_head import fit_head\n"
        "x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32); y = np.arange(40) % 2\n"
        "fit_head(HeadConfig(6, 2), TrainConfig(epochs=2), x, y, x, y)\n"
        "fit_head(HeadConfig(6, 2), TrainConfig(epochs=2, schedule='plateau'), x, y, x, y)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_memory_mapped_feature_matrix_trains_the_same_head(tmp_path):
    x, y = blobs(30, seed=4)
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float32, x.shape)
    mapped[:] = x
    mapped.flush()
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    cfg = TrainConfig(epochs=5, batch_size=16)
    ram_head, ram_history = fit_head(HeadConfig(x.shape[1], 3, hidden=(8,)), cfg, x[:70], y[:70], x[70:], y[70:])
    map_head, map_history = fit_head(HeadConfig(x.shape[1], 3, hidden=(8,)), cfg, mapped[:70], y[:70],
                                     mapped[70:], y[70:])
    assert map_history.val_loss == ram_history.val_loss
    for (k, a), b in zip(ram_head.state_dict().items(), map_head.state_dict().values()):
        assert torch.equal(a, b), k


def test_candidate_heads_train_with_one_torch_thread_each(monkeypatch):
    """fit_best_head runs its candidates side by side with one intra-op thread: two torch threads per tiny head
    spin-wait on each other (60 epochs on 300 x 1500 features, one core busy: 30 s against 0.5 s)."""
    x, y = blobs(20, seed=5)
    seen: list[int] = []
    real = train._train_forward
    monkeypatch.setattr(train, "_train_forward", lambda *a: (seen.append(torch.get_num_threads()), real(*a))[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = TrainConfig(epochs=2)
        candidates = [(HeadConfig(x.shape[1], 3), cfg), (HeadConfig(x.shape[1], 3, hidden=(8,)), cfg)]
        train.fit_best_head(candidates, x[::2], y[::2], x[1::2], y[1::2])
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(threads)


# --- choosing the head -------------------------------------------------------------------------------------


def _xor(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes that no linear head separates (the sign of x0 * x1) and one hidden layer does."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] * x[:, 1] > 0).astype(np.int64)


def test_best_head_is_the_one_with_the_lowest_validation_loss() -> None:
    from headstart.heads.config import HeadConfig
    from headstart.train.config import TrainConfig
    from headstart.train.fit_head import fit_best_head, fit_head

    (xt, yt), (xv, yv) = _xor(600, 0), _xor(200, 1)
    cfg = TrainConfig(epochs=40, lr=1e-2, seed=3)
    candidates = [(HeadConfig(6, 2, (), 0.0), cfg), (HeadConfig(6, 2, (32,), 0.0), cfg)]
    fitted = fit_best_head(candidates, xt, yt, xv, yv)
    head, history, kept_cfg = fitted.head, fitted.history, fitted.train_config
    losses = [c.val_loss for c in fitted.candidates]
    assert head.cfg.hidden == (32,) and kept_cfg == cfg
    assert losses[1] < losses[0] and min(history.val_loss) == losses[1]
    # Fitting side by side gives exactly what fitting that candidate alone gives.
    alone, _ = fit_head(HeadConfig(6, 2, (32,), 0.0), cfg, xt, yt, xv, yv)
    for name, value in alone.state_dict().items():
        assert np.array_equal(value.numpy(), head.state_dict()[name].numpy()), name


# --- the step by hand, the refit ----------------------------------------------------------------------------


@pytest.mark.parametrize("hidden,dropout,balance", [((), 0.2, False), ((16, 8), 0.3, True), ((12,), 0.0, True)])
def test_the_step_by_hand_is_what_autograd_computes(hidden, dropout, balance):
    """_train_forward's loss and gradients against autograd through the same layers, the same dropout masks (the
    same numpy stream), class weights, label smoothing and a distributed share."""
    from headstart.heads.module import Head

    torch.manual_seed(0)
    head = Head(HeadConfig(20, 4, hidden, dropout))
    x, y = torch.randn(33, 20), torch.randint(0, 4, (33,))
    weight = class_weights(y.numpy(), 4) if balance else None
    loss = train._train_forward(head, x, y, weight, 0.1, np.random.default_rng(5), 0.7)
    ours = {name: p.grad.clone() for name, p in head.named_parameters()}
    for p in head.parameters():
        p.grad = None
    rng, a = np.random.default_rng(5), x
    for layer in head.layers:
        a = train._dropout(a, layer.p, rng) if isinstance(layer, torch.nn.Dropout) else layer(a)
    ref = F.cross_entropy(a, y, weight=weight, label_smoothing=0.1) * 0.7
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    for name, p in head.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-5, atol=1e-6)


def test_refit_full_trains_a_fresh_head_on_every_row_for_the_epochs_given():
    x, y = blobs(30, seed=2)
    cfg = TrainConfig(epochs=12, seed=4)
    head, history = train.refit_full(HeadConfig(x.shape[1], 3, (8,)), cfg, x, y, epochs=5)
    assert len(history.train_loss) == 5 and history.best_epoch == 4 and not history.val_loss
    np.testing.assert_allclose(head.mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-5)  # standardised for all rows
    # Not the head trained on part of the rows: the refit did something.
    part, _ = fit_head(HeadConfig(x.shape[1], 3, (8,)), replace(cfg, epochs=5), x[:60], y[:60])
    assert not torch.equal(part.layers[1].weight, head.layers[1].weight)
    # The schedule is the chosen run's (cosine over cfg.epochs), not one squeezed into the 5 epochs.
    squeezed, _ = fit_head(HeadConfig(x.shape[1], 3, (8,)), replace(cfg, epochs=5), x, y)
    assert not torch.equal(squeezed.layers[1].weight, head.layers[1].weight)


def test_the_shadow_refit_beside_the_candidates_is_refit_full_at_the_chosen_epoch():
    """fit_best_head(x_full=...) refits each candidate beside the candidates (before their stopping epoch is
    known): the kept one's refit is bit for bit what refit_full gives once the epoch count is known."""
    x, y = blobs(40, seed=3)
    xt, yt, xv, yv = x[::2], y[::2], x[1::2], y[1::2]
    cfg = TrainConfig(epochs=30, patience=3, seed=2)
    candidates = [(HeadConfig(x.shape[1], 3), cfg), (HeadConfig(x.shape[1], 3, (16,), 0.3), replace(cfg, epochs=10))]
    fitted = train.fit_best_head(candidates, xt, yt, xv, yv, x_full=x, y_full=y)
    assert fitted.refit is not None
    want, _ = train.refit_full(fitted.head.cfg, fitted.train_config, x, y, fitted.history.best_epoch + 1)
    for name, value in want.state_dict().items():
        assert torch.equal(value, fitted.refit.state_dict()[name]), name
    without = train.fit_best_head(candidates, xt, yt, xv, yv)
    assert without.refit is None
    for name, value in without.head.state_dict().items():  # the refit changes nothing about the choice
        assert torch.equal(value, fitted.head.state_dict()[name]), name


def test_a_plateau_refit_replays_the_rates_the_chosen_run_used():
    x, y = blobs(30, seed=1)
    cfg = TrainConfig(epochs=20, patience=6, schedule="plateau", lr=3e-2, seed=1)
    fitted = train.fit_best_head([(HeadConfig(x.shape[1], 3), cfg)], x[::2], y[::2], x[1::2], y[1::2])
    assert len(fitted.epoch_lrs) == len(fitted.history.train_loss)
    epochs = fitted.history.best_epoch + 1
    replayed, _ = train.refit_full(fitted.head.cfg, cfg, x, y, epochs, fitted.epoch_lrs)
    constant, _ = train.refit_full(fitted.head.cfg, cfg, x, y, epochs, (cfg.lr,))
    assert (not torch.equal(replayed.layers[1].weight, constant.layers[1].weight)) == (min(fitted.epoch_lrs[:epochs])
                                                                                       < cfg.lr)
