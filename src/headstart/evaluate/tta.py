"""Test-time augmentation for `evaluate --tta`: each image and its mirror image (left-right) are predicted, and
their probabilities averaged. What it gained is measured, not assumed: accuracy and log loss with and without.

The mirrored images' features are cached like the others, under a key of their own (the view is part of it), so
a second `evaluate --tta` costs no extraction. torch-free, like predicting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.cache.features import SHARD_ROWS, CachedFeatures, FeatureCache
from headstart.cache.pipeline import decoded_batches, default_workers
from headstart.evaluate.metrics import Evaluation
from headstart.paths import store_path
from headstart.progress import Progress
from headstart.runtime.frozen import FrozenBackbone
from headstart.vision.preprocess import load_views

log = logging.getLogger(__name__)

__all__ = ["FlippedFeatureCache", "TTAEvaluation", "averaged", "flipped_features"]

FLIP_VIEW = "hflip"  # added to the cache key of mirrored images' features


@dataclass(frozen=True, eq=False)
class TTAEvaluation:
    """The same images scored as they are (`plain`) and with their mirror image averaged in (`tta`)."""

    plain: Evaluation
    tta: Evaluation

    @property
    def accuracy_gain(self) -> float:
        return self.tta.accuracy - self.plain.accuracy

    @property
    def log_loss_gain(self) -> float:
        """How much lower the log loss is with TTA (positive: better)."""
        return self.plain.log_loss - self.tta.log_loss


def averaged(proba: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """The mean of the two views' probabilities (rows still sum to 1)."""
    return (np.asarray(proba, np.float64) + np.asarray(flipped, np.float64)) / 2.0


def _mirrored(views: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    # CHW arrays: the last axis is the width. The centre crop is symmetric, so mirroring the crop is cropping the
    # mirrored photo (to within one pixel where the margins are odd).
    return tuple(np.ascontiguousarray(v[..., ::-1]) for v in views)


class FlippedFeatureCache(FeatureCache):
    """`FeatureCache` of the mirrored images: its own folder (the key names the view), its own extraction."""

    def _key_by(self, engine_kind: str) -> None:
        self.engine_kind = engine_kind
        parts = {**self.backbone.feature_key_parts(engine_kind), "view": FLIP_VIEW}
        self.dir = store_path("features", parts, root=self.root)

    def _extract(self, paths: Sequence[Path], keys: list[bytes | None], missing: list[int], engine, batch_size: int,
                 progress) -> dict[int, str]:
        cfg = self.backbone.spec.preprocess
        failures: dict[int, str] = {}
        done_keys: list[bytes] = []
        done: list[np.ndarray] = []
        load = lambda i: _mirrored(load_views(paths[missing[i]], cfg))  # noqa: E731
        for idx, views, fails in decoded_batches(len(missing), load, batch_size, default_workers()):
            failures.update({missing[i]: reason for i, reason in fails})
            if progress:
                progress(len(idx) + len(fails))
            if idx:
                done.append(np.concatenate([engine(v) for v in views], 1))
                done_keys += [keys[missing[i]] for i in idx]  # type: ignore[misc]
            if len(done_keys) >= SHARD_ROWS:
                self.write_shard(done_keys, np.concatenate(done))
                done_keys, done = [], []
        if done_keys:
            self.write_shard(done_keys, np.concatenate(done))
        return failures


def flipped_features(paths: list[Path], frozen: FrozenBackbone, device: str, progress: Progress) -> CachedFeatures:
    """The mirrored images' features of `paths` (cached, or extracted now and cached)."""
    progress.start("features of the mirrored images", len(paths))
    cache = FlippedFeatureCache(frozen, engine_kind=frozen.engine_kind(device))
    got = cache.features_for(paths, lambda: frozen.engine(device), progress.advance)
    progress.finish()
    return got
