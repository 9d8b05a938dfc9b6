"""Test-time augmentation for `evaluate --tta`: each image and its mirror image (left-right) are predicted, and
their probabilities averaged. What it gained is measured, not assumed: accuracy and log loss with and without.

The mirrored images' features are cached like the others, under a key of their own (the view is part of it), so
a second `evaluate --tta` costs no extraction. torch-free, like predicting.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from headstart.cache.features import CachedFeatures, FeatureCache
from headstart.paths import store_path
from headstart.progress import Progress
from headstart.records import TTAEvaluation
from headstart.runtime.frozen import FrozenBackbone
from headstart.vision.preprocess import load_views

log = logging.getLogger(__name__)

__all__ = ["FlippedFeatureCache", "TTAEvaluation", "averaged", "flipped_features"]

FLIP_VIEW = "hflip"  # added to the cache key of mirrored images' features


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

    def _views_of(self):
        cfg = self.backbone.spec.preprocess
        return lambda path: _mirrored(load_views(path, cfg))


def flipped_features(paths: list[Path], frozen: FrozenBackbone, device: str, progress: Progress) -> CachedFeatures:
    """The mirrored images' features of `paths` (cached, or extracted now and cached)."""
    progress.start("features of the mirrored images", len(paths))
    cache = FlippedFeatureCache(frozen, engine_kind=frozen.engine_kind(device))
    got = cache.features_for(paths, lambda: frozen.engine(device), progress.advance)
    progress.finish()
    return got
