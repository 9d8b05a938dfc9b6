"""Test-time augmentation for `evaluate --tta`: each image and its mirror image (left-right) are predicted, and
their probabilities averaged. What it gained is measured, not assumed: accuracy and log loss with and without.

The mirrored images' features are cached like the others, under a key of their own (the view is part of it), so
a second `evaluate --tta` costs no extraction. torch-free, like predicting.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from headstart.cache.features import CachedFeatures
from headstart.cache.oriented import oriented_features
from headstart.progress import Progress
from headstart.records import TTAEvaluation
from headstart.runtime.frozen import FrozenBackbone

log = logging.getLogger(__name__)

__all__ = ["TTAEvaluation", "averaged", "flipped_features"]


def averaged(proba: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """The mean of the two views' probabilities (rows still sum to 1)."""
    return (np.asarray(proba, np.float64) + np.asarray(flipped, np.float64)) / 2.0


def flipped_features(paths: list[Path], frozen: FrozenBackbone, device: str, progress: Progress) -> CachedFeatures:
    """The mirrored images' features of `paths` (cached, or extracted now and cached)."""
    return oriented_features(paths, frozen, "hflip", device, progress, "features of the mirrored images")
