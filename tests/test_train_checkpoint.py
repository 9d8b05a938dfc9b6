"""train.checkpoint: pickle-free tensor/JSON pairs that check each other, and optimizer state (channels_last
moments included) that round-trips so the next step matches."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from headstart.train import checkpoint  # noqa: E402
from helpers_finetune import _assert_safetensors_layout  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest: the tiny model's steps, one thread


def test_checkpoint_is_pickle_free_and_checks_its_pair(tmp_path):
    assert checkpoint.load(tmp_path / "none") is None
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "rng.torch": torch.get_rng_state()}
    checkpoint.save(tmp_path / "ck", tensors, {"epoch": 3, "history": {"val_loss": [0.5]}})
    meta = json.loads((tmp_path / "ck" / checkpoint.META).read_text())
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([meta["tensors"], checkpoint.META])
    _assert_safetensors_layout(tmp_path / "ck" / meta["tensors"])
    assert meta["epoch"] == 3 and len(meta["tensors_sha256"]) == 64
    loaded, meta = checkpoint.load(tmp_path / "ck")
    assert torch.equal(loaded["w"], tensors["w"]) and torch.equal(loaded["rng.torch"], tensors["rng.torch"])

    # Killed after the next tensor file landed but before its JSON: the previous pair still loads.
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 3)}, str(tmp_path / "ck" / "state-ffffffffffffffff.safetensors"))
    loaded, meta = checkpoint.load(tmp_path / "ck")
    assert meta["epoch"] == 3 and torch.equal(loaded["w"], tensors["w"])

    # A tensor file that no longer matches the digest its JSON names is refused, with what to do.
    save_file({"w": torch.ones(2, 3)}, str(tmp_path / "ck" / meta["tensors"]))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(tmp_path / "ck")
    assert "--resume" in str(err.value)


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01}])
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = checkpoint.optimizer_state(opt)
    checkpoint.save(tmp_path, tensors, {"optimizer": meta})
    loaded, meta = checkpoint.load(tmp_path)
    fresh = torch.optim.AdamW([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01}])
    checkpoint.restore_optimizer(fresh, loaded, meta["optimizer"])
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for name, v in a["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][name])), (pid, name)


def test_restored_moments_take_their_channels_last_parameter_layout_and_the_next_step_matches(tmp_path):
    """A 3x3 convolution over 3 channels (the stem) in channels_last: its moments come back from safetensors
    contiguous, and the fused step pairs elements by memory order, so the layout must be restored."""
    def step(conv, opt):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(len(opt.state))).contiguous(
            memory_format=torch.channels_last)
        conv(x).square().sum().backward()
        opt.step()
        opt.zero_grad()

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1, fused=True)
    step(conv, opt)
    tensors, meta = checkpoint.optimizer_state(opt)
    checkpoint.save(tmp_path, tensors, {"optimizer": meta})
    twin = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    twin.load_state_dict(conv.state_dict())
    fresh = torch.optim.AdamW(twin.parameters(), lr=0.1, fused=True)
    loaded, meta = checkpoint.load(tmp_path)
    checkpoint.restore_optimizer(fresh, loaded, meta["optimizer"])
    assert fresh.state[twin.weight]["exp_avg"].stride() == twin.weight.stride()
    step(conv, opt)
    step(twin, fresh)
    assert torch.equal(conv.weight, twin.weight) and torch.equal(conv.bias, twin.bias)
