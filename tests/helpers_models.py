"""The tiny backbone the tests train on, and data shaped like its features: its name and layout, seeding a cache
with its ONNX export, its features straight from torch, and synthetic feature blobs.

Not a test file (pytest collects only test_*.py); imported as `from helpers_models import ...`. Torch-free at
import: whatever needs torch or headstart's torch-using modules imports it when it runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

TINY_BACKBONE = "test_efficientnet"  # timm's ~100k-parameter EfficientNet: 160 px input, conv_stem/blocks/conv_head
N_STAGES = 5  # TINY_BACKBONE's stages: blocks.0 .. blocks.4
TINY_DIM = 32 + 48 + 64 + 256  # TINY_BACKBONE's pooled features: last three stages' channels + the final features


def seed_tiny_export(tiny_onnx: tuple[Path, Path], cache: Path) -> Path:
    """`cache` with the tiny backbone's ONNX export copied in (what conftest's `tiny_onnx`, or `tiny_bottom`, made
    once), so a module's or a test's own cache starts without paying for an export; returns `cache`."""
    root, rel = tiny_onnx
    (cache / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / rel, cache / rel)
    return cache


def direct_features(frozen, paths: list[Path]) -> np.ndarray:
    """The frozen backbone's features for these photos, straight from torch (no engine, no cache)."""
    import torch

    from headstart.vision.preprocess import load_for_model

    batch = np.stack([load_for_model(p, frozen.spec.preprocess) for p in paths])
    with torch.no_grad():
        return frozen.build_torch()(torch.from_numpy(batch)).numpy()


def blobs(n_per_class: int, n_classes: int = 3, dim: int = 24, spread: float = 1.0, seed: int = 0):
    """Gaussian blobs around well-separated class centres, on features of very different scales (as stage
    outputs are)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3.0, size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + rng.normal(0, spread, size=(len(y), dim))
    x *= np.logspace(-2, 2, dim)  # scales from 0.01 to 100: standardisation must handle it
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm].astype(np.int64)


class CountingEngine:
    """An engine wrapper that counts its `run_all` calls (a boundary store's fill); with `fail_after`, the call
    after that many raises, as a crash mid-fill would."""

    def __init__(self, engine, fail_after: int | None = None) -> None:
        self.engine, self.fail_after, self.calls = engine, fail_after, 0

    def run_all(self, batch):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.engine.run_all(batch)
