"""Frozen-backbone features: computed once, cached on disk by content, decoded in parallel with inference.

The cache is a folder per (backbone, weights, preprocessing) holding shards: `NAME.keys.npy` (16-byte content
digests as uint8 rows: numpy's bytes dtype would strip trailing NULs) and `NAME.feats.npy` (float32 rows), each written to a temporary name and renamed, keys last, so a shard
is either complete or invisible. A kill mid-extraction loses at most the shard being filled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.backbones import BackboneSpec, create_model, pretrained_weights_path, weights_fingerprint
from headstart.data import ImageDecodeError, load_views
from headstart.engines import (
    Engine, OnnxEngine, TorchEngine, ViewsEngine, any_size_path, export_onnx, onnx_path_for, pick_device,
)
from headstart.paths import cache_root, temp_path_beside
from headstart.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

FEATURE_VERSION = 2  # 2: multi-scale pooled features
NATIVE_SIZE_PROBES = (64, 160)  # input sizes a graph that takes any size must also agree with torch at
SHARD_ROWS = 512  # rows per shard: small enough that an interrupted run loses little
Progress = Callable[[int], None]


@dataclass(frozen=True)
class FrozenBackbone:
    """A backbone with definite weights: what a feature cache is keyed by."""

    spec: BackboneSpec
    weights: Path  # timm-layout safetensors
    weights_id: str
    weights_prefix: str = ""  # key prefix inside the weights file (a saved model stores "backbone.")

    @classmethod
    def pretrained(cls, spec: BackboneSpec, weights: Path | None = None) -> "FrozenBackbone":
        weights = Path(weights) if weights else pretrained_weights_path(spec)
        return cls(spec, weights, weights_fingerprint(weights))

    def build_torch(self):
        """The feature network as torch: the backbone with its multi-scale pooling."""
        from headstart.model import PooledFeatures

        return PooledFeatures(create_model(self.spec, self.weights, prefix=self.weights_prefix)).eval()

    def engine(self, device: str = "auto") -> Engine:
        device = pick_device(device)
        if device != "cpu":
            return TorchEngine(self.build_torch(), device)
        path = onnx_path_for(self.spec, self.weights_id)
        any_size = self.spec.any_input_size
        if not path.exists() or (any_size and not any_size_path(path).exists()):
            log.info("exporting %s to ONNX once (cached in %s)", self.spec.name, path.parent)
            try:
                export_onnx(self.build_torch(), self.spec.preprocess.input_size, path,
                            other_sizes=NATIVE_SIZE_PROBES if any_size else ())
            except RuntimeError as exc:  # a network the exporter cannot reproduce: slower, but right
                log.warning("%s: %s; extracting features with PyTorch instead of ONNX Runtime", self.spec.name, exc)
                return TorchEngine(self.build_torch(), device)
        if self.spec.preprocess.native_size:
            return ViewsEngine(path, self.spec.preprocess.input_size)
        return OnnxEngine(path)

    def cache_key(self) -> str:
        desc = dict(v=FEATURE_VERSION, timm=self.spec.timm_name, w=self.weights_id, pre=self.spec.preprocess.to_dict())
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def content_key(path: Path) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()[:16]


# --- decoding in parallel with inference ---------------------------------------------------------------------

def decoded_batches(
    n: int, load: Callable[[int], np.ndarray], batch_size: int, workers: int
) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Yield (indices, stacked arrays, failures) per batch, where `load(i)` decodes item i. Pillow releases
    the GIL while decoding and resizing, so threads overlap with each other and with inference; a bounded
    look-ahead keeps memory flat."""

    def decode(i: int):
        try:
            return i, load(i), None
        except ImageDecodeError as exc:
            return i, None, str(exc)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list = []
        next_index = 0
        lookahead = batch_size * 3
        while pending or next_index < n:
            while next_index < n and len(pending) < lookahead:
                pending.append(pool.submit(decode, next_index))
                next_index += 1
            ready, pending = pending[:batch_size], pending[batch_size:]
            results = [f.result() for f in ready]
            good = [(i, arr) for i, arr, err in results if err is None]
            failures = [(i, err) for i, _, err in results if err is not None]
            yield [i for i, _ in good], _stack([arr for _, arr in good]) if good else None, failures


def _stack(items: list):
    """One batch array, or one per view when each item is a tuple of views."""
    if isinstance(items[0], tuple):
        return tuple(np.stack(view) for view in zip(*items))
    return np.stack(items)


def extract(
    paths: Sequence[Path], cfg: PreprocessConfig, engine: Engine, batch_size: int = 32,
    workers: int | None = None, progress: Progress | None = None,
) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Features for `paths`, batch by batch: (indices, features, failures). With several views, each view's
    features are computed apart and concatenated."""
    workers = workers or default_workers()
    load = lambda i: load_views(paths[i], cfg)  # noqa: E731
    for indices, views, failures in decoded_batches(len(paths), load, batch_size, workers):
        feats = np.concatenate([engine(v) for v in views], 1) if indices else np.empty((0, 0), np.float32)
        if progress:
            progress(len(indices) + len(failures))
        yield indices, feats, failures


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


# --- the on-disk cache ---------------------------------------------------------------------------------------

class FeatureCache:
    def __init__(self, backbone: FrozenBackbone, root: Path | None = None) -> None:
        self.dir = (root or cache_root() / "features") / backbone.cache_key()
        self.backbone = backbone
        self.last_hits = 0  # how many images the last features_for call found cached

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
            tmp = temp_path_beside(path)
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, path)  # features first, keys last: keys make the shard visible

    def features_for(
        self, paths: Sequence[Path], engine_factory: Callable[[], Engine], progress: Progress | None = None,
        batch_size: int = 32,
    ) -> tuple[np.ndarray, list[int], list[tuple[Path, str]]]:
        """Features for every readable path (cached or extracted now). Returns (features of the readable
        paths in order, their indices into `paths`, failures as (path, reason))."""
        keys = [content_key(p) for p in paths]
        index, files = self.index()
        missing = [i for i, k in enumerate(keys) if k not in index]
        self.last_hits = len(paths) - len(missing)
        if progress and len(paths) - len(missing):
            progress(len(paths) - len(missing))
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
        return _gather([keys[i] for i in readable], index, files), readable, [(paths[i], r) for i, r in failures.items()]


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
