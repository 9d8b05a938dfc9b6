"""Features of photos turned or mirrored (`vision.preprocess.ORIENTATIONS`), cached like the others under a key
that names the orientation: what `evaluate --tta` (mirrored) and oriented training (`train.oriented`, all eight)
read, so that a second run extracts nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headstart.cache.dataset import distributed_features
from headstart.cache.features import CachedFeatures, FeatureCache
from headstart.errors import DataError
from headstart.paths import store_path
from headstart.progress import Progress
from headstart.runtime.frozen import FrozenBackbone
from headstart.vision.preprocess import load_views, oriented


class OrientedFeatureCache(FeatureCache):
    """`FeatureCache` of one orientation of the photos: its own folder (the key names the view), its own
    extraction. The key's "view" is the orientation's name ("hflip" for the mirror image `evaluate --tta` has
    always cached under)."""

    def __init__(self, backbone: FrozenBackbone, orientation: str, root: Path | None = None,
                 engine_kind: str | None = None) -> None:
        self.orientation = orientation
        super().__init__(backbone, root, engine_kind)

    def _key_by(self, engine_kind: str) -> None:
        self.engine_kind = engine_kind
        parts = {**self.backbone.feature_key_parts(engine_kind), "view": self.orientation}
        self.dir = store_path("features", parts, root=self.root)

    def _views_of(self):
        cfg, name = self.backbone.spec.preprocess, self.orientation
        return lambda path: tuple(oriented(view, name) for view in load_views(path, cfg))


def oriented_features(paths: list[Path], frozen: FrozenBackbone, orientation: str, device: str,
                      progress: Progress, task: str) -> CachedFeatures:
    """The features of `paths` turned or mirrored as `orientation` names (cached, or extracted now and cached);
    under torchrun each rank extracts its share (`distributed_features`)."""
    cache = OrientedFeatureCache(frozen, orientation, engine_kind=frozen.engine_kind(device))
    return distributed_features(cache, paths, lambda: frozen.engine(device), progress, task)


def reread_features(paths: list[Path], frozen: FrozenBackbone, orientation: str, device: str, progress: Progress,
                    task: str) -> np.ndarray:
    """`oriented_features` of photos that were all read once already (their upright features are in hand): the
    float32 rows in order; should one fail now, the run stops with its name."""
    got = oriented_features(paths, frozen, orientation, device, progress, task)
    if got.failures:
        path, why = got.failures[0]
        raise DataError(f"{path} could be read once but not again ({why}); check the disk and run again")
    return np.asarray(got.features, np.float32)
