"""train.loop: the plateau schedule matches torch's own (the head's AdamW: test_train_head_step)."""

from __future__ import annotations

import pytest
import torch

from headstart.train import loop as train


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
