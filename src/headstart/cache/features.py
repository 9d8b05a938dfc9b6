"""Frozen-backbone features, computed once and cached on disk by content.

The cache is a folder per (backbone, weights, preprocessing), named by `paths.store_key`, holding shards:
`NAME.keys.npy` (16-byte content digests as uint8 rows: numpy's bytes dtype would strip trailing NULs) and
`NAME.feats.npy` (float32 rows), each written atomically, keys last, so a shard is either complete or invisible.
A kill mid-extraction loses at most the shard being filled.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.cache.pipeline import Advance, extract
from headstart.paths import atomic_path, cache_root, store_path
from headstart.runtime.engines import Engine
from headstart.runtime.frozen import FrozenBackbone

log = logging.getLogger(__name__)

SHARD_ROWS = 512  # rows per shard: small enough that an interrupted run loses little


def content_key(path: Path) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()[:16]


@dataclass(frozen=True, eq=False)  # eq=False: comparing records field by field would compare arrays
class CachedFeatures:
    """What `FeatureCache.features_for` found: the features of the readable paths in order, their indices into
    the paths asked for, the unreadable ones as (path, reason), and how many images were already cached."""

    features: np.ndarray
    readable: list[int]
    failures: list[tuple[Path, str]]
    hits: int


class FeatureCache:
    def __init__(self, backbone: FrozenBackbone, root: Path | None = None) -> None:
        self.dir = store_path("features", backbone.feature_key_parts(), root=root)
        self.backbone = backbone

    def _shards(self) -> list[tuple[np.ndarray, Path]]:
        if not self.dir.exists():
            return []
        shards = []
        for keys_file in sorted(self.dir.glob("*.keys.npy")):
            feats_file = keys_file.with_name(keys_file.name.replace(".keys.npy", ".feats.npy"))
            if feats_file.exists():
                shards.append((np.load(keys_file), feats_file))
        return shards

    def index(self) -> tuple[dict[bytes, tuple[int, int]], list[Path]]:
        """content key -> (shard number, row), and the shards' feature files."""
        shards = self._shards()
        out: dict[bytes, tuple[int, int]] = {}
        for s, (keys, _) in enumerate(shards):
            for row, k in enumerate(map(bytes, keys)):
                out[k] = (s, row)
        return out, [f for _, f in shards]

    def write_shard(self, keys: list[bytes], feats: np.ndarray) -> None:
        name = uuid.uuid4().hex[:12]
        feats_path, keys_path = self.dir / f"{name}.feats.npy", self.dir / f"{name}.keys.npy"
        key_rows = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16)
        for path, arr in ((feats_path, feats.astype(np.float32)), (keys_path, key_rows)):
            with atomic_path(path) as tmp, open(tmp, "wb") as f:  # features first, keys last: keys make it visible
                np.save(f, arr)

    def features_for(
        self, paths: Sequence[Path], engine_factory: Callable[[], Engine], progress: Advance | None = None,
        batch_size: int = 32,
    ) -> CachedFeatures:
        """Features for every readable path (cached or extracted now), with what could not be read."""
        keys = [content_key(p) for p in paths]
        index, files = self.index()
        missing = [i for i, k in enumerate(keys) if k not in index]
        hits = len(paths) - len(missing)
        if progress and hits:
            progress(hits)
        failures: dict[int, str] = {}
        if missing:
            log.info("extracting features for %d of %d images", len(missing), len(paths))
            engine = engine_factory()
            buf_keys: list[bytes] = []
            buf_feats: list[np.ndarray] = []
            for idx, feats, fails in extract([paths[i] for i in missing], self.backbone.spec.preprocess, engine,
                                             batch_size, progress=progress):
                failures.update({missing[i]: reason for i, reason in fails})
                if not idx:
                    continue  # a batch of unreadable files only: nothing to store
                buf_keys += [keys[missing[i]] for i in idx]
                buf_feats.append(feats)
                if len(buf_keys) >= SHARD_ROWS:
                    self.write_shard(buf_keys, np.concatenate(buf_feats))
                    buf_keys, buf_feats = [], []
            if buf_keys:
                self.write_shard(buf_keys, np.concatenate(buf_feats))
            index, files = self.index()
        readable = [i for i in range(len(paths)) if i not in failures]
        return CachedFeatures(_gather([keys[i] for i in readable], index, files), readable,
                              [(paths[i], r) for i, r in failures.items()], hits)


def _gather(
    keys: list[bytes], index: dict[bytes, tuple[int, int]], files: list[Path], in_ram_bytes: int = 256 << 20
) -> np.ndarray:
    """The rows for `keys`, in order. Beyond `in_ram_bytes` they go to an anonymous temporary file, memory-mapped
    (unlinked at once, so nothing is left behind), and memory does not grow with the data set."""
    mmaps = [np.load(f, mmap_mode="r") for f in files]
    dim = mmaps[0].shape[1] if mmaps else 0
    if len(keys) * dim * 4 > in_ram_bytes:
        scratch = cache_root() / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=scratch) as backing:
            out = np.memmap(backing, np.float32, "w+", shape=(len(keys), dim))
    else:
        out = np.empty((len(keys), dim), np.float32)
    for j, k in enumerate(keys):
        s, row = index[k]
        out[j] = mmaps[s][row]
    return out
