"""Activations at the freeze boundary, so fine-tuning never pays for the frozen bottom twice.

The frozen stem and stages run once (ONNX Runtime on CPU) over a fixed number of augmented views per training
image and one eval view per validation image; their outputs are stored as memory-mapped float16 arrays on disk.
Each epoch then trains the top on one stored view per image. When every stage trains, the stem trains with them
and nothing below is frozen: the store holds the augmented pixels themselves (`PixelViews`), which are also
smaller than the stem's output (32 channels at half the input's side). Arrays are filled in chunks and
`progress.json`, rewritten atomically after each chunk is flushed, says how many images are complete: a killed
run resumes from there and never trusts a half-written row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from headstart.vision.augment import augmented_view, view_seed
from headstart.data.imageio import load_rgb
from headstart.runtime.engines import OnnxEngine
from headstart.runtime.export import export_onnx
from headstart.cache.pipeline import decoded_batches, default_workers
from headstart.paths import atomic_write_bytes, store_path
from headstart.vision.preprocess import PreprocessConfig

log = logging.getLogger(__name__)


class PixelViews:
    """The "engine" of a store that holds pixels: the views themselves, and no taps."""

    def run_all(self, pixels: np.ndarray) -> list[np.ndarray]:
        return [pixels, np.zeros((len(pixels), 0), np.float32)]


def stores_pixels(boundary: int) -> bool:
    return boundary == 0


def bottom_engine(features_net, boundary: int, weights_id: str, cfg: PreprocessConfig) -> OnnxEngine | PixelViews:
    """The frozen bottom as an ONNX Runtime session, exported once per (weights, boundary, input size, export
    version) and cached; at boundary 0 the pixels themselves (see the module's docstring)."""
    if stores_pixels(boundary):
        return PixelViews()
    parts = dict(graph="bottom", w=weights_id, boundary=boundary, size=cfg.input_size)
    path = store_path("export", parts, label=f"bottom-{weights_id}-b{boundary}-{cfg.input_size}px", suffix=".onnx")
    if not path.exists():
        from headstart.backbones.pooled import FrozenBottom

        export_onnx(FrozenBottom(features_net, boundary), cfg.input_size, path, ("activations", "taps"))
    return OnnxEngine(path)


class BoundaryStore:
    def __init__(self, key_parts: dict, root: Path | None = None) -> None:
        """A store in a folder named by everything its content depends on (`key_parts`) and the store's version;
        `root` replaces the boundary folder in `cache_root()`."""
        self.dir = store_path("boundary", key_parts, root=root)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _progress(self) -> dict:
        path = self.dir / "progress.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def arrays(self, name: str) -> tuple[np.memmap, np.memmap, np.ndarray]:
        """(activations [n, views, C, H, W] float16, taps [n, views, T] float32, readable mask [n])."""
        meta = self._progress()[name]
        acts = np.load(self.dir / f"{name}.acts.npy", mmap_mode="r")
        taps = np.load(self.dir / f"{name}.taps.npy", mmap_mode="r")
        return acts, taps, np.array(meta["ok"], dtype=bool)

    def fill(
        self, name: str, paths: Sequence[Path], views: int, augment: str, seed: int, cfg: PreprocessConfig,
        engine: OnnxEngine | PixelViews, progress: Callable[[int], None] | None = None, batch_images: int = 16,
    ) -> list[tuple[int, str]]:
        """Compute what is missing of split `name`; return failures as (index, reason)."""
        state = self._progress()
        entry = state.get(name, {"done": 0, "ok": [True] * len(paths)})
        done = entry["done"]
        if progress and done:
            progress(done)
        if done >= len(paths):
            return [(i, "unreadable") for i, ok in enumerate(entry["ok"]) if not ok]

        def load(i: int) -> np.ndarray:
            img = load_rgb(paths[done + i], cfg.resize_size if augment == "none" else None)
            return np.stack([augmented_view(img, cfg, augment, view_seed(seed, done + i, v)) for v in range(views)])

        acts = taps = None
        for idx, pixels, fails in decoded_batches(len(paths) - done, load, batch_images, default_workers()):
            if pixels is not None:
                out = engine.run_all(pixels.reshape(-1, *pixels.shape[2:]))
                a, t = out[0], (out[1] if len(out) > 1 else np.zeros((len(out[0]), 0), np.float32))
                if acts is None:
                    acts, taps = self._open(name, len(paths), views, a.shape[1:], t.shape[1], create=done == 0)
                rows = [done + i for i in idx]
                acts[rows] = a.reshape(len(idx), views, *a.shape[1:]).astype(np.float16)
                taps[rows] = t.reshape(len(idx), views, -1)
            for i, _ in fails:
                entry["ok"][done + i] = False
            # Commit a chunk: flush the arrays, then record progress (atomically) up to the last finished image.
            finished = done + max([*idx, *(i for i, _ in fails)]) + 1
            if acts is not None:
                acts.flush()
                taps.flush()
            if acts is not None or finished == len(paths):
                entry["done"] = finished
                state[name] = entry
                atomic_write_bytes(self.dir / "progress.json", json.dumps(state).encode())
            if progress:
                progress(len(idx) + len(fails))
        return [(i, "unreadable") for i, ok in enumerate(entry["ok"]) if not ok]

    def _open(self, name: str, n: int, views: int, act_shape: tuple, taps_dim: int, create: bool):
        acts_path, taps_path = self.dir / f"{name}.acts.npy", self.dir / f"{name}.taps.npy"
        if create or not acts_path.exists():
            acts = np.lib.format.open_memmap(acts_path, "w+", np.float16, (n, views, *act_shape))
            taps = np.lib.format.open_memmap(taps_path, "w+", np.float32, (n, views, taps_dim))
            return acts, taps
        return np.load(acts_path, mmap_mode="r+"), np.load(taps_path, mmap_mode="r+")
