"""Frozen-backbone features, computed once and cached on disk by content.

The cache is a folder per (backbone, weights, preprocessing, engine kind), named by `paths.store_key`, holding
shards: `NAME.keys.npy` (16-byte content digests as uint8 rows: numpy's bytes dtype would strip trailing NULs)
and `NAME.feats.npy` (float32 rows), each written atomically, keys last, so a shard is either complete or
invisible. A kill mid-extraction loses at most the shard being filled; what it leaves (a features file without
its keys, a temporary file) is swept once it is old enough that no live writer can own it. A shard damaged on
disk (unreadable, truncated, keys and features of different lengths) is dropped with a warning and its images
are extracted again.

Features are keyed by the engine that computed them (`FrozenBackbone.engine_kind`): CUDA's bfloat16 features
are ~2% off the CPU's and are never mixed with them.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.cache.pipeline import Advance, extract
from headstart.data.imageio import unreadable_reason
from headstart.paths import allocate, atomic_path, cache_root, disk_space, store_path
from headstart.runtime.engines import Engine
from headstart.runtime.frozen import FrozenBackbone

log = logging.getLogger(__name__)

SHARD_ROWS = 512  # rows per shard: small enough that an interrupted run loses little
KEY_BYTES = 16
LEFTOVER_AGE_S = 3600.0  # a leftover this old belongs to no live writer (one shard takes seconds to write)


def content_key(path: Path) -> bytes:
    """The first 16 bytes of the sha256 of the file's content. Raises OSError for a file that cannot be read,
    and for one that is not a regular file (reading a named pipe would wait for a writer forever)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)  # a pipe opens without waiting
    fd = os.open(path, flags)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()[:KEY_BYTES]


def content_keys(paths: Sequence[Path]) -> tuple[list[bytes | None], dict[int, str]]:
    """Each path's `content_key`, None where it cannot be read, and those as {index: reason}."""
    keys: list[bytes | None] = []
    failures: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            keys.append(content_key(path))
        except OSError as exc:  # in load_rgb's words (permission denied, symlink loop, not a regular file...)
            keys.append(None)
            failures[i] = unreadable_reason(path) or f"unreadable file ({exc.strerror or type(exc).__name__})"
    return keys, failures


@dataclass(frozen=True, eq=False)  # eq=False: comparing records field by field would compare arrays
class CachedFeatures:
    """What `FeatureCache.features_for` found: the features of the readable paths in order, their indices into
    the paths asked for, the unreadable ones as (path, reason), and how many images were already cached."""

    features: np.ndarray
    readable: list[int]
    failures: list[tuple[Path, str]]
    hits: int


class FeatureCache:
    def __init__(self, backbone: FrozenBackbone, root: Path | None = None, engine_kind: str | None = None) -> None:
        """The cache of `backbone`'s features as computed by `engine_kind` (default: what it computes on the
        CPU); `root` replaces the features folder in `cache_root()`."""
        self.backbone = backbone
        self.root = root
        self._key_by(engine_kind or backbone.engine_kind("cpu"))

    def _key_by(self, engine_kind: str) -> None:
        self.engine_kind = engine_kind
        self.dir = store_path("features", self.backbone.feature_key_parts(engine_kind), root=self.root)

    def _shards(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every complete shard as (keys, memory-mapped features); damaged ones are dropped, leftovers swept."""
        if not self.dir.exists():
            return []
        self._sweep_leftovers()
        shards = []
        for keys_file in sorted(self.dir.glob("*.keys.npy")):
            feats_file = keys_file.with_name(keys_file.name.replace(".keys.npy", ".feats.npy"))
            try:
                shards.append(_read_shard(keys_file, feats_file))
            except FileNotFoundError:
                continue  # dropped by another process just now
            except (OSError, ValueError, EOFError) as exc:  # numpy's words for a truncated or garbled file
                log.warning("%s: dropping a damaged feature shard (%s); its images will be extracted again",
                            keys_file, exc)
                for file in (keys_file, feats_file):
                    _unlink_quietly(file)
        return shards

    def _sweep_leftovers(self) -> None:
        """Remove what killed writers left: temporary files, and features files whose keys never landed."""
        old = time.time() - LEFTOVER_AGE_S
        for file in [*self.dir.glob(".*.tmp"), *self.dir.glob("*.feats.npy")]:
            orphan = file.name.endswith(".tmp") or not file.with_name(
                file.name.replace(".feats.npy", ".keys.npy")).exists()
            try:
                if orphan and file.stat().st_mtime < old:
                    log.debug("removing %s, left by an interrupted extraction", file)
                    file.unlink()
            except OSError:
                continue

    def index(self) -> tuple[dict[bytes, tuple[int, int]], list[np.ndarray]]:
        """content key -> (shard number, row), and the shards' features."""
        shards = self._shards()
        out: dict[bytes, tuple[int, int]] = {}
        for s, (keys, _) in enumerate(shards):
            for row, k in enumerate(map(bytes, keys)):
                out[k] = (s, row)
        return out, [f for _, f in shards]

    def write_shard(self, keys: list[bytes], feats: np.ndarray) -> None:
        name = uuid.uuid4().hex[:12]
        feats_path, keys_path = self.dir / f"{name}.feats.npy", self.dir / f"{name}.keys.npy"
        key_rows = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, KEY_BYTES)
        for path, arr in ((feats_path, feats.astype(np.float32)), (keys_path, key_rows)):
            encoded = io.BytesIO()  # np.save into a file reports a short write without its errno (a full disk)
            np.save(encoded, arr)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:  # features first, keys last: keys make it visible
                f.write(encoded.getbuffer())

    def features_for(
        self, paths: Sequence[Path], engine_factory: Callable[[], Engine], progress: Advance | None = None,
        batch_size: int = 32,
    ) -> CachedFeatures:
        """Features for every readable path (cached or extracted now), with what could not be read: a file that
        cannot even be read for its key (no permission, a pipe) is a failure row like an undecodable one."""
        keys, failures = content_keys(paths)
        index, files = self.index()
        missing = [i for i, k in enumerate(keys) if k is not None and k not in index]
        engine = None
        if missing:
            engine = engine_factory()
            kind = getattr(engine, "kind", self.engine_kind)  # a failed export falls back to another engine
            if kind != self.engine_kind:
                log.info("features computed by %s, not %s: cached apart", kind, self.engine_kind)
                self._key_by(kind)
                index, files = self.index()
                missing = [i for i, k in enumerate(keys) if k is not None and k not in index]
        hits = len(paths) - len(missing) - len(failures)
        if progress and hits + len(failures):
            progress(hits + len(failures))
        if missing:
            log.info("extracting features for %d of %d images", len(missing), len(paths))
            failures.update(self._extract(paths, keys, missing, engine, batch_size, progress))
            index, files = self.index()
        readable = [i for i in range(len(paths)) if i not in failures]
        return CachedFeatures(_gather([keys[i] for i in readable], index, files),
                              readable, [(paths[i], failures[i]) for i in sorted(failures)], hits)

    def _views_of(self):
        """How a photo becomes the network's inputs, if not as `load_views` makes them (a subclass's own view)."""
        return None

    def _extract(self, paths: Sequence[Path], keys: list[bytes | None], missing: list[int], engine: Engine,
                 batch_size: int, progress: Advance | None) -> dict[int, str]:
        """Extract and store the features of `paths[missing]`, a shard at a time; the unreadable as {index: reason}."""
        failures: dict[int, str] = {}
        buf_keys: list[bytes] = []
        buf_feats: list[np.ndarray] = []
        for idx, feats, fails in extract([paths[i] for i in missing], self.backbone.spec.preprocess, engine,
                                         batch_size, progress=progress, views_of=self._views_of()):
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
        return failures


def _read_shard(keys_file: Path, feats_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, memory-mapped features) of one shard, or ValueError saying how the pair is damaged."""
    keys = np.load(keys_file)
    feats = np.load(feats_file, mmap_mode="r")  # reads the header; numpy checks the file holds the rows it says
    if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != KEY_BYTES:
        raise ValueError(f"keys of shape {keys.shape} and type {keys.dtype}")
    if feats.dtype != np.float32 or feats.ndim != 2 or len(feats) != len(keys):
        raise ValueError(f"{len(keys)} keys but features of shape {feats.shape} and type {feats.dtype}")
    return keys, feats


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # a read-only cache: the shard stays, and is dropped again next time
        log.debug("could not remove %s: %s", path, exc)


def _gather(
    keys: list[bytes], index: dict[bytes, tuple[int, int]], shards: list[np.ndarray], in_ram_bytes: int = 256 << 20
) -> np.ndarray:
    """The rows for `keys`, in order. Beyond `in_ram_bytes` they go to an anonymous temporary file, memory-mapped
    (unlinked at once, so nothing is left behind), and memory does not grow with the data set."""
    dim = shards[0].shape[1] if shards else 0
    nbytes = len(keys) * dim * 4
    if nbytes > in_ram_bytes:
        scratch = cache_root() / "tmp"
        with disk_space(scratch / "features"):
            scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=scratch) as backing:
            allocate(backing.fileno(), nbytes, scratch / "features")  # not a SIGBUS mid-copy on a full disk
            out = np.memmap(backing, np.float32, "w+", shape=(len(keys), dim))
    else:
        out = np.empty((len(keys), dim), np.float32)
    for j, k in enumerate(keys):
        s, row = index[k]
        out[j] = shards[s][row]
    return out
