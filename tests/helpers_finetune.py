"""Helpers shared by the stage-2 (fine-tuning) test files: the tiny random-weight backbone's stage layout,
synthetic boundary data, validation scripted for speed, and the classifier factory behind those files' own
`make_clf` fixtures.

Not a test file (pytest collects only test_*.py); imported as `from helpers_finetune import ...`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from helpers_models import N_STAGES, TINY_BACKBONE
from headstart import ImageClassifier
from headstart.backbones.pooled import PooledFeatures
from headstart.backbones.registry import resolve
from headstart.cache.boundary import stores_pixels
from headstart.heads.config import HeadConfig
from headstart.heads.module import Head
from headstart.runtime.frozen import FrozenBackbone
from headstart.train import finetune as ft
from headstart.train.finetune import StoredViews


PRE = resolve(TINY_BACKBONE).preprocess  # 160 px


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _frozen(weights: Path) -> FrozenBackbone:
    return FrozenBackbone.pretrained(resolve(TINY_BACKBONE), weights)


def _net(weights: Path) -> PooledFeatures:
    return _frozen(weights).build_torch()


def _stage_of(key: str) -> int | None:
    """Stage index of a backbone state key: -1 for the stem, 0.. for blocks, N_STAGES for conv_head/bn2."""
    key = key.removeprefix("backbone.")
    if key.startswith(("conv_stem.", "bn1.")):
        return -1
    if key.startswith("blocks."):
        return int(key.split(".")[1])
    if key.startswith(("conv_head.", "bn2.")):
        return N_STAGES
    return None


def _is_bn_stat(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in BN_STATS


def _is_conv_weight(key: str) -> bool:
    return key.endswith(".weight") and key.rsplit(".", 2)[-2].startswith("conv")


def finetune_classifier(tiny_weights, **kwargs) -> ImageClassifier:
    """The tiny backbone, fine-tuned briefly (the top two stages, two epochs, one view); kwargs override."""
    params = dict(epochs=5, device="cpu", strategy="finetune", unfreeze=2, finetune_epochs=2, views=1)
    return ImageClassifier(TINY_BACKBONE, weights=tiny_weights, **{**params, **kwargs})


def _synthetic_split(net: PooledFeatures, boundary: int, n: int, seed: int, size: int = 64) -> StoredViews:
    """Boundary activations of small random images whose class is a colour shift, as `finetune` takes them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    x[torch.arange(n), labels] += 1.5
    if stores_pixels(boundary):  # every stage trains: the store holds the pixels and the stem runs per batch
        h, taps = x, x.new_zeros(n, 0)
    else:
        with torch.no_grad():
            h, taps = net.eval().forward_bottom(x, boundary)
    return StoredViews(h[:, None].numpy().astype(np.float16), taps[:, None].numpy(), labels.numpy())


def _head_for(net: PooledFeatures) -> Head:
    torch.manual_seed(1)
    with torch.no_grad():
        dim = net.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
    return Head(HeadConfig(dim, 3))


def _always_improving(monkeypatch) -> None:
    """Each validation reports a lower loss than the last (accuracy stays real), so every epoch is the best one and
    the weights kept are the last epoch's: tests of what trains then do not hang on how well it trains."""
    real, calls = ft._validate, [0]

    def validate(*args, **kwargs):
        _, acc, logits = real(*args, **kwargs)
        calls[0] += 1
        return 0.01 * 0.5 ** calls[0], acc, logits  # below any real model's loss (a fit starts from stage 1's)

    monkeypatch.setattr(ft, "_validate", validate)


def _state(net: PooledFeatures) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _images(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


def _interrupt_at_validation(monkeypatch, call: int) -> list[int]:
    """Make `_validate`'s `call`-th call raise KeyboardInterrupt (called directly, `finetune`'s call 1 is the
    pre-training baseline and call k+1 ends epoch k, before its checkpoint; through a fit, which gives it the
    stage-1 loss, call k ends epoch k); returns the call counter."""
    calls = [0]
    real = ft._validate

    def validate(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "_validate", validate)
    return calls


def _assert_safetensors_layout(path: Path) -> None:
    """The file is nothing but safetensors: an 8-byte header length, a JSON header, raw tensor bytes (no pickle)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    assert len(raw) == 8 + n + max(ends, default=0)
