"""train.fit_head: the head learns, stops early with the best weights restored, trains every parameter, weights
classes on request, is reproducible, and the candidate heads (which are tried, the one kept) are chosen by
validation loss. The head is numpy's (`heads.params`); its step and optimizer are checked against torch in
test_train_head_step."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from helpers_models import blobs
from headstart.train import fit_head as train
from headstart.heads.config import HeadConfig, head_logits_numpy, softmax
from headstart.heads.params import HeadParams
from headstart.records import TrainConfig
from headstart.train.head_step import cross_entropy
from headstart.train.fit_head import class_weights, fit_head


def _same(a: HeadParams, b: HeadParams) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def _blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def val_loss_of(head: HeadParams, x: np.ndarray, y: np.ndarray) -> float:
    return cross_entropy(head.logits(head.standardize(x)), y)


def test_head_learns_separable_features():
    x, y = blobs(40, seed=0)
    x_train, y_train, x_val, y_val = x[:90], y[:90], x[90:], y[90:]
    cfg = TrainConfig(epochs=30, batch_size=16, lr=3e-3, patience=30)
    head, history = fit_head(HeadConfig(x.shape[1], 3), cfg, x_train, y_train, x_val, y_val)
    assert len(history.train_loss) == len(history.val_loss) == len(history.val_accuracy) == 30
    assert history.train_loss[-1] < 0.6 * history.train_loss[0]
    assert history.val_accuracy[history.best_epoch] >= 0.95
    assert not head.training
    # The inference used for prediction (from the saved state) agrees with the fitted head.
    expected = softmax(head.logits(head.standardize(x_val)))
    np.testing.assert_allclose(softmax(head_logits_numpy(head.state_dict(), head.cfg, x_val)), expected, atol=1e-5)
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
    threads = _blas_threads()
    _, history = fit_head(HeadConfig(x.shape[1], 3), TrainConfig(epochs=7, patience=1), x, y)
    assert _blas_threads() == threads  # training's own thread setting does not leak out
    assert len(history.train_loss) == 7
    assert history.val_loss == [] and not history.stopped_early and history.best_epoch == 6


def test_every_trainable_parameter_gets_a_gradient(monkeypatch):
    seen: dict[int, bool] = {}
    managed: list[np.ndarray] = []

    class RecordingAdamW(train.AdamW):
        def __init__(self, params, *args, **kwargs):
            managed.extend(params)
            super().__init__(params, *args, **kwargs)

        def step(self, grads, lr):
            for p, g in zip(self.params, grads):
                assert g.shape == p.shape
                seen[id(p)] = seen.get(id(p), False) or bool(np.any(g != 0))
            return super().step(grads, lr)

    monkeypatch.setattr(train, "AdamW", RecordingAdamW)
    x, y = blobs(10, seed=5)
    head, _ = fit_head(HeadConfig(x.shape[1], 3, hidden=(12,), dropout=0.1), TrainConfig(epochs=2, batch_size=8),
                       x, y, x[:6], y[:6])
    assert len(head.tensors) == 4  # two linear layers, weight and bias each
    assert [id(p) for p in managed] == [id(p) for p in head.tensors]
    assert all(seen[id(p)] for p in head.tensors)
    # The standardisation statistics are fixed from the training features, not trained.
    assert not any(head.mean is p or head.std is p for p in managed)
    np.testing.assert_allclose(head.mean, x.mean(0), rtol=1e-5, atol=1e-5)


def test_class_weights_are_inverse_to_frequency():
    y = np.array([0] * 30 + [1] * 10 + [2] * 5)
    w = class_weights(y, 4)
    counts = np.array([30, 10, 5])
    np.testing.assert_allclose(w[:3] * counts, len(y) / 4, rtol=1e-6)  # weight x count is the same for all
    assert w[0] < w[1] < w[2]
    assert w[3] == 0  # a class with no examples gets no weight rather than infinity


@pytest.mark.parametrize("balance", [True, False])
def test_balance_weights_the_training_loss(balance, monkeypatch):
    weights_used = []
    real_step = train.train_step  # the training loss (by hand: F.cross_entropy's, see test_train_head_step)

    def spy(head, x, y, weight, *args, **kwargs):
        weights_used.append(weight)
        return real_step(head, x, y, weight, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", spy)
    x, y = blobs(10, seed=6)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:4], np.flatnonzero(y == 2)[:2]])
    x, y = x[keep], y[keep]
    fit_head(HeadConfig(x.shape[1], 3), TrainConfig(epochs=2, balance=balance), x, y)
    assert weights_used
    if balance:
        expected = class_weights(y, 3)
        assert all(w is not None and np.allclose(w, expected) for w in weights_used)
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
        pred = head.logits(head.standardize(x_test)).argmax(1)
        recall[balance] = (pred[y_test == 1] == 1).mean()
    assert recall[True] > recall[False] + 0.2


def test_training_is_reproducible():
    x, y = blobs(15, seed=9)
    runs = [fit_head(HeadConfig(x.shape[1], 3, hidden=(8,)), TrainConfig(epochs=4, seed=1), x, y, x[:9], y[:9])
            for _ in range(2)]
    assert runs[0][1].val_loss == runs[1][1].val_loss
    assert _same(runs[0][0], runs[1][0])


def test_fitting_a_head_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from headstart.heads.config import HeadConfig\n"
        "from headstart.records import TrainConfig\nfrom headstart.train.fit_head import fit_head\n"
        "x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32); y = np.arange(40) % 2\n"
        "fit_head(HeadConfig(6, 2), TrainConfig(epochs=2), x, y, x, y)\n"
        "fit_head(HeadConfig(6, 2), TrainConfig(epochs=2, schedule='plateau'), x, y, x, y)\n"
        "print('torch' in sys.modules)\n"
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
    assert _same(ram_head, map_head)


def test_candidate_heads_train_with_one_blas_thread_each(monkeypatch):
    """fit_best_head runs its candidates side by side, one per core, each with one BLAS thread: a tiny head's
    products gain nothing from more, and the threads would spin-wait on each other."""
    from threadpoolctl import threadpool_limits

    x, y = blobs(20, seed=5)
    seen: list[set[int]] = []
    real = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a: (seen.append(_blas_threads()), real(*a))[1])
    with threadpool_limits(2, user_api="blas"):
        cfg = TrainConfig(epochs=2)
        candidates = [(HeadConfig(x.shape[1], 3), cfg), (HeadConfig(x.shape[1], 3, hidden=(8,)), cfg)]
        train.fit_best_head(candidates, x[::2], y[::2], x[1::2], y[1::2])
        assert seen and all(threads == {1} for threads in seen)
        assert _blas_threads() == {2}  # restored afterwards


# --- choosing the head -------------------------------------------------------------------------------------


def _xor(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes that no linear head separates (the sign of x0 * x1) and one hidden layer does."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] * x[:, 1] > 0).astype(np.int64)


def test_best_head_is_the_one_with_the_lowest_validation_loss() -> None:
    from headstart.heads.config import HeadConfig
    from headstart.records import TrainConfig
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
    assert _same(alone, head)


# --- the refit ----------------------------------------------------------------------------------------------


def test_refit_full_trains_a_fresh_head_on_every_row_for_the_epochs_given():
    x, y = blobs(30, seed=2)
    cfg = TrainConfig(epochs=12, seed=4)
    head, history = train.refit_full(HeadConfig(x.shape[1], 3, (8,)), cfg, x, y, epochs=5)
    assert len(history.train_loss) == 5 and history.best_epoch == 4 and not history.val_loss
    np.testing.assert_allclose(head.mean, x.mean(0), rtol=1e-5, atol=1e-5)  # standardised for all rows
    # Not the head trained on part of the rows: the refit did something.
    part, _ = fit_head(HeadConfig(x.shape[1], 3, (8,)), replace(cfg, epochs=5), x[:60], y[:60])
    assert not np.array_equal(part.weights[0], head.weights[0])
    # The schedule is the chosen run's (cosine over cfg.epochs), not one squeezed into the 5 epochs.
    squeezed, _ = fit_head(HeadConfig(x.shape[1], 3, (8,)), replace(cfg, epochs=5), x, y)
    assert not np.array_equal(squeezed.weights[0], head.weights[0])


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
    assert _same(want, fitted.refit)
    without = train.fit_best_head(candidates, xt, yt, xv, yv)
    assert without.refit is None
    assert _same(without.head, fitted.head)  # the refit changes nothing about the choice


def test_a_plateau_refit_replays_the_rates_the_chosen_run_used():
    x, y = blobs(30, seed=1)
    cfg = TrainConfig(epochs=20, patience=6, schedule="plateau", lr=3e-2, seed=1)
    fitted = train.fit_best_head([(HeadConfig(x.shape[1], 3), cfg)], x[::2], y[::2], x[1::2], y[1::2])
    assert len(fitted.epoch_lrs) == len(fitted.history.train_loss)
    epochs = fitted.history.best_epoch + 1
    replayed, _ = train.refit_full(fitted.head.cfg, cfg, x, y, epochs, fitted.epoch_lrs)
    constant, _ = train.refit_full(fitted.head.cfg, cfg, x, y, epochs, (cfg.lr,))
    moved = not np.array_equal(replayed.weights[0], constant.weights[0])
    assert moved == (min(fitted.epoch_lrs[:epochs]) < cfg.lr)
