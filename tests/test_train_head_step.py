"""train.head_step: the head's step by hand is what torch's autograd computes, its AdamW is torch.optim.AdamW, and
its dropout keeps what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from headstart.heads.config import HeadConfig
from headstart.heads.module import Head
from headstart.heads.params import HeadParams
from headstart.train.head_step import AdamW, class_weights, keep_mask, train_step


def _twins(cfg: HeadConfig) -> tuple[Head, HeadParams]:
    """The torch Head (seeded) and our numpy head holding the same weights."""
    torch.manual_seed(0)
    head = Head(cfg)
    ours = HeadParams.fresh(cfg, 0)
    ours.load_state_dict({k: v.detach().numpy() for k, v in head.state_dict().items()})
    return head, ours


def _torch_forward(head: Head, x: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """The torch Head's training forward of `x`, its dropout drawing the masks `train_step` draws from `rng`."""
    a = torch.from_numpy(x)
    for layer in head.layers:
        if isinstance(layer, torch.nn.Dropout):
            keep, scale = keep_mask(tuple(a.shape), layer.p, rng)
            a = a if keep is None else a * torch.from_numpy(keep) * scale
        else:
            a = layer(a)
    return a


@pytest.mark.parametrize("hidden,p,balance", [((), 0.2, False), ((16, 8), 0.3, True), ((12,), 0.0, True)])
def test_the_step_by_hand_is_what_autograd_computes(hidden, p, balance):
    """train_step's loss and gradients against autograd through the torch Head's layers, with the same weights,
    the same dropout masks (the same numpy stream), class weights, label smoothing and a distributed share."""
    head, ours = _twins(HeadConfig(20, 4, hidden, p))
    x, y = np.random.default_rng(1).normal(size=(33, 20)).astype(np.float32), np.arange(33) % 4
    weight = class_weights(y, 4) if balance else None
    loss, grads = train_step(ours, x, y, weight, 0.1, np.random.default_rng(5), 0.7)
    a = _torch_forward(head, x, np.random.default_rng(5))
    ref = F.cross_entropy(a, torch.from_numpy(y), weight=None if weight is None else torch.from_numpy(weight),
                          label_smoothing=0.1) * 0.7
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    linears = [m for m in head.layers if isinstance(m, torch.nn.Linear)]
    expected = [t.grad.numpy() for m in linears for t in (m.weight, m.bias)]
    assert len(grads) == len(expected)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_adamw_matches_torch_adamw():
    rng = np.random.default_rng(0)
    ours = [rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
    theirs = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in ours]
    opt = AdamW(ours, weight_decay=0.05)
    ref = torch.optim.AdamW(theirs, lr=1.0, weight_decay=0.05)
    for lr in [1e-3, 3e-3, 2e-3, 5e-4, 1e-4]:
        grads = [rng.normal(size=p.shape).astype(np.float32) for p in ours]
        opt.step(grads, lr)
        for q, g in zip(theirs, grads):
            q.grad = torch.from_numpy(g.copy())
        ref.param_groups[0]["lr"] = lr
        ref.step()
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p, q.detach().numpy(), rtol=1e-5, atol=1e-7)
    assert opt.steps == 5


def test_an_absurd_rate_makes_the_weights_non_finite_without_an_error_or_a_warning():
    """lr=1e38 over a first step's bias correction (0.1) is beyond float32: the step clamps, the weights go
    non-finite (or huge), and the loop reports the divergence (train.fit_head) rather than an error here."""
    w = np.ones(3, np.float32)
    opt = AdamW([w], weight_decay=0.0)
    with np.errstate(all="raise"):  # an overflow warning would be an error here
        opt.step([np.full(3, 0.5, np.float32)], 1e38)
    assert not np.isfinite(w).all() or np.abs(w).max() > 1e37


def test_dropout_keeps_the_expected_fraction_and_scale():
    """The mask and scale train_step applies: x * keep, its product with the weights times the scale."""
    rng = np.random.default_rng(0)
    x = np.ones((400, 500), np.float32)
    keep, scale = keep_mask(x.shape, 0.6, rng)
    out = x * keep * np.float32(scale)
    assert abs((out != 0).mean() - 0.4) < 0.01
    assert abs(out.mean() - 1.0) < 0.03  # inverted dropout: the expectation is unchanged
    assert out.dtype == np.float32
    assert keep_mask(x.shape, 0.0, rng) == (None, 1.0)


@pytest.mark.parametrize("hidden,p,weighted", [((), 0.2, False), ((16,), 0.3, True)])
def test_the_multi_label_step_is_binary_cross_entropy_by_autograd(hidden, p, weighted):
    """A multi-label head's step: torch's binary_cross_entropy_with_logits (mean over every entry, positive
    weights), with the same dropout masks, and its gradients."""
    from headstart.train.head_step import bce_loss, positive_weights

    head, ours = _twins(HeadConfig(20, 5, hidden, p, multi_label=True))
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(31, 20)).astype(np.float32), (rng.random((31, 5)) < 0.3).astype(np.float32)
    weight = positive_weights(y) if weighted else None
    loss, grads = train_step(ours, x, y, weight, 0.0, np.random.default_rng(5), 0.7)
    a = _torch_forward(head, x, np.random.default_rng(5))
    ref = F.binary_cross_entropy_with_logits(
        a, torch.from_numpy(y), pos_weight=None if weight is None else torch.from_numpy(weight)) * 0.7
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    expected = [t.grad.numpy() for m in head.layers if isinstance(m, torch.nn.Linear) for t in (m.weight, m.bias)]
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    logits = np.random.default_rng(3).normal(size=(7, 5)) * 30
    assert bce_loss(logits, y[:7]) == pytest.approx(
        F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(y[:7]).double()).item())
    if weighted:
        assert weight.min() >= 1.0 and weight.max() <= 10.0
