"""train.loop: the head's AdamW and plateau schedule match torch's own."""

from __future__ import annotations

import pytest
import torch

from headstart.train import loop as train


def test_head_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = train.HeadAdamW(ours, weight_decay=0.05)
    ref = torch.optim.AdamW(theirs, lr=1.0, weight_decay=0.05)
    for step, lr in enumerate([1e-3, 3e-3, 2e-3, 5e-4, 1e-4]):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step(lr)
        ref.param_groups[0]["lr"] = lr
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert opt.steps == 5


def test_plateau_matches_torch_reduce_on_plateau():
    losses = [1.0, 0.9, 0.95, 0.93, 0.91, 0.92, 0.94, 0.5, 0.6, 0.6, 0.6, 0.6, 0.49999, 0.6]
    ours = train.Plateau(1e-3, factor=0.3, patience=2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=2)
    for loss in losses:
        ours.step(loss)
        ref.step(loss)
        assert ours.lr == pytest.approx(opt.param_groups[0]["lr"])
    assert ours.lr < 1e-3 * 0.3 * 0.9  # it did reduce, twice


def test_an_absurd_rate_makes_the_step_non_finite_instead_of_overflowing():
    """lr=1e38 over a first step's bias correction (0.1) is beyond float32: the step clamps, the weights go
    non-finite, and the loop reports the divergence (train.fit_head) rather than a RuntimeError here."""
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 0.5)
    opt = train.HeadAdamW([w], weight_decay=0.0)
    opt.step(1e38)
    assert not torch.isfinite(w).all() or w.abs().max() > 1e37
