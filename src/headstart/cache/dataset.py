"""A scanned dataset's features, split by split: what stage 1, the refit and `evaluate` read."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from headstart.cache.features import CachedFeatures, FeatureCache
from headstart.data.dataset import SPLITS, Dataset, split_rows
from headstart.progress import Progress
from headstart.runtime import distributed
from headstart.runtime.frozen import FrozenBackbone


@dataclass(frozen=True, eq=False)  # eq=False: comparing records field by field would compare arrays
class DatasetFeatures:
    """The readable images of a dataset, ordered split by split so that each split is one block of rows (a view,
    never a copy, of what may be a memory-mapped matrix), with their features, labels and splits."""

    paths: list[Path]
    features: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    failures: list[tuple[Path, str]]  # images that could not be read, and why
    cached: int  # how many came from the cache

    def part(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of one split."""
        rows = split_rows(self.splits)[split]
        return self.features[rows], self.labels[rows]

    def counts(self, classes: tuple[str, ...] | list[str]) -> dict[str, dict[str, int]]:
        """Images per class in each split that has any, counting only those that could be read."""
        return {
            split: dict(zip(classes, np.bincount(self.labels[self.splits == split], minlength=len(classes)).tolist()))
            for split in SPLITS if (self.splits == split).any()
        }


def dataset_features(dataset: Dataset, frozen: FrozenBackbone, device: str, progress: Progress,
                     task: str = "extracting features") -> DatasetFeatures:
    """Every sample's features from the cache, extracting what is missing."""
    samples = sorted(dataset.samples, key=lambda sample: SPLITS.index(sample.split))
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return path_features([s.path for s in samples], labels, np.array([s.split for s in samples]), frozen, device,
                         progress, task)


def path_features(paths: list[Path], labels: np.ndarray, splits: np.ndarray, frozen: FrozenBackbone, device: str,
                  progress: Progress, task: str) -> DatasetFeatures:
    """The features of `paths` (ordered split by split, with their labels and splits), the unreadable left out."""
    cache = FeatureCache(frozen, engine_kind=frozen.engine_kind(device))  # CUDA's features are kept apart
    got = distributed_features(cache, paths, lambda: frozen.engine(device), progress, task)
    keep = np.asarray(got.readable, dtype=np.int64)
    return DatasetFeatures([paths[i] for i in got.readable], got.features, labels[keep], splits[keep], got.failures,
                           got.hits)


def distributed_features(cache: FeatureCache, paths: list[Path], engine_factory, progress: Progress,
                         task: str) -> CachedFeatures:
    """`cache.features_for(paths)`; under torchrun each rank first fills its share of the cache (every
    world_size-th image), then, once all have, reads the whole of it: no rank extracts another's images."""
    if not distributed.joined().active:
        progress.start(task, len(paths))
        got = cache.features_for(paths, engine_factory, progress.advance)
        progress.finish()
        return got
    mine = [paths[i] for i in distributed.share(len(paths))]
    with distributed.main_first():  # rank 0 exports (and calibrates) the engine; the others open what it wrote
        engine = engine_factory()
    progress.start(task, len(mine))
    own = cache.features_for(mine, lambda: engine, progress.advance)
    progress.finish()
    distributed.barrier()
    got = cache.features_for(paths, lambda: engine)  # all cached now, but for the unreadable
    hits = int(distributed.sum_over_ranks(own.hits)[0])
    return replace(got, hits=hits)
