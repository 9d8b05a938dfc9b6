"""Activations at the freeze boundary, so fine-tuning never pays for the frozen bottom twice.

The frozen stem and stages run once (ONNX Runtime on CPU) over a fixed number of augmented views per training
image and one eval view per validation image; their outputs are stored as memory-mapped float16 arrays on disk.
Each epoch then trains the top on one stored view per image. When every stage trains, the stem trains with them
and nothing below is frozen: the store holds the augmented pixels themselves (`PixelViews`), which are also
smaller than the stem's output (32 channels at half the input's side), as the 8-bit values they were before
normalisation (`StoreArray` normalises each batch as it is read): half a float16 store, the same numbers.

Pages of a memory-mapped file count in the process's resident memory once touched, and stay there while it is
mapped: filling the flowers store (2,763 images x 8 views) and then reading every view put all of it in the
peak RSS. The fill drops its pages after each chunk is flushed, and training after each pass (`release`), so the
store's share of RSS is about one chunk or one view, whatever its size; the kernel's page cache keeps them.

Arrays are filled in chunks and
`progress.json`, rewritten atomically after each chunk is flushed, says how many images are complete: a killed
run resumes from there and never trusts a half-written row. A `progress.json` that cannot be read, or arrays
that do not hold what it claims (truncated, missing, of another shape), are dropped with a warning and the
split is filled again from its first image. The arrays are allocated on disk when created, so a full disk is
one clear error then, not a SIGBUS halfway through the fill.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from headstart.cache.pipeline import decoded_batches, default_workers
from headstart.data.imageio import load_rgb
from headstart.errors import ConfigError
from headstart.paths import allocate, atomic_write_bytes, disk_space, store_path
from headstart.runtime import distributed
from headstart.runtime.engines import OnnxEngine
from headstart.runtime.export import export_onnx, open_cached
from headstart.vision.augment import (
    augmented_pixels,
    augmented_view,
    normalize_pixels,
    view_seed,
)
from headstart.vision.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

STORE_FORMAT = 2  # in the store's key: 2 holds pixel views as uint8 (1 held them as float16)


class PixelViews:
    """The "engine" of a store that holds pixels: the views themselves, and no taps."""

    def run_all(self, pixels: np.ndarray) -> list[np.ndarray]:
        return [pixels, np.zeros((len(pixels), 0), np.float32)]


def stores_pixels(boundary: int) -> bool:
    return boundary == 0


class StoreArray:
    """A stored array as training reads it: rows picked by index (a subset of the stored rows when some images
    were unreadable, without copying the rest), uint8 pixel views normalised to float32 as they are read."""

    def __init__(self, raw: np.ndarray, pixels: PreprocessConfig | None = None, rows: np.ndarray | None = None):
        self.raw, self.pixels, self.rows = raw, pixels, rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.raw.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.pixels else self.raw.dtype

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.raw)

    def __getitem__(self, key) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if self.rows is not None:
            first = self.rows[first]
        out = self.raw[(first, *rest)]
        return normalize_pixels(out, self.pixels) if self.pixels else np.asarray(out)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def view_rows(self, rows: np.ndarray | slice, view: int) -> np.ndarray:
        """`self[rows, view]`, read from the file with plain reads when the store is a file on disk: unlike a
        read through the mapping, that maps no page of the file into this process (see `read_view`)."""
        picked = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows)
        stored = self.rows[picked] if self.rows is not None else picked
        raw = self.raw
        if not (isinstance(raw, np.memmap) and isinstance(raw.base, mmap.mmap) and raw.flags.c_contiguous
                and raw.ndim >= 2):
            return self[rows, view]
        out = np.empty((len(stored), *raw.shape[2:]), raw.dtype)
        size = out[0].nbytes if len(out) else 0
        fd = os.open(raw.filename, os.O_RDONLY)
        try:
            for i, row in enumerate(stored.tolist()):
                start = raw.offset + (row * raw.shape[1] + view) * size
                if size and os.preadv(fd, [memoryview(out[i]).cast("B")], start) != size:
                    raise OSError(f"{raw.filename}: shorter than its header says")
        finally:
            os.close(fd)
        return normalize_pixels(out, self.pixels) if self.pixels else out

    def take(self, keep: np.ndarray) -> StoreArray:
        """The rows `keep` (indices into this array's rows), still read from the store."""
        rows = np.asarray(keep) if self.rows is None else self.rows[keep]
        return StoreArray(self.raw, self.pixels, rows)


def read_view(arr, rows: np.ndarray | slice, view: int) -> np.ndarray:
    """Rows `rows` of stored view `view`, as float32 or float16, from a store's array or any in-memory array.

    Reading a memory-mapped file maps its pages into the process, and the kernel maps the cached pages around
    each one touched too (fault-around), so an epoch reading one view of each image had most of the store's file
    resident, every view of it: about 1 GB of the flowers run's peak RSS with 8 views. Plain reads copy the view
    alone into memory this process owns, and map nothing."""
    if isinstance(arr, StoreArray):
        return arr.view_rows(rows, view)
    return np.asarray(arr[rows, view])


def release(arr) -> None:
    """Drop a memory-mapped array's pages from this process's resident memory (see the module's docstring); the
    data stays in the file and the page cache, and the next read maps it in again. Anything else: nothing."""
    arr = getattr(arr, "raw", arr)
    mapped = getattr(arr, "_mmap", None)
    if mapped is not None and hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_DONTNEED)


def bottom_engine(features_net, boundary: int, weights_id: str, cfg: PreprocessConfig) -> OnnxEngine | PixelViews:
    """The frozen bottom as an ONNX Runtime session, exported once per (weights, boundary, input size, export
    version) and cached; at boundary 0 the pixels themselves (see the module's docstring)."""
    if stores_pixels(boundary):
        return PixelViews()
    parts = dict(graph="bottom", w=weights_id, boundary=boundary, size=cfg.input_size)
    path = store_path("export", parts, label=f"bottom-{weights_id}-b{boundary}-{cfg.input_size}px", suffix=".onnx")

    def export() -> None:
        from headstart.backbones.pooled import FrozenBottom

        export_onnx(FrozenBottom(features_net, boundary), cfg.input_size, path, ("activations", "taps"))

    return open_cached(path, lambda: OnnxEngine(path), export)


class BoundaryStore:
    def __init__(self, key_parts: dict, root: Path | None = None) -> None:
        """A store in a folder named by everything its content depends on (`key_parts`) and the store's version;
        `root` replaces the boundary folder in `cache_root()`."""
        self.dir = store_path("boundary", {**key_parts, "format": STORE_FORMAT}, root=root)
        with disk_space(self.dir / "progress.json"):
            self.dir.mkdir(parents=True, exist_ok=True)

    def _progress_file(self, name: str) -> Path:
        """A split's progress lives in progress.json; a rank's part of one (`_part`) in a file of its own, so
        that ranks filling their parts at once never overwrite each other's records."""
        return self.dir / ("progress.json" if "@" not in name else f"progress.{name}.json")

    def _progress(self, name: str = "") -> dict:
        path = self._progress_file(name)
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
            log.warning("%s: unreadable (%s); filling the boundary store again", path, exc)
            return {}
        if not isinstance(state, dict):
            log.warning("%s: not a progress record; filling the boundary store again", path)
            return {}
        return state

    def _entry(self, state: dict, name: str, n: int, views: int) -> dict:
        """Split `name`'s progress, checked against the arrays on disk; a fresh one when they disagree."""
        fresh = {"done": 0, "ok": [True] * n}
        entry = state.get(name)
        if entry is None:
            return fresh
        done, ok = (entry.get("done"), entry.get("ok")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(done, int) and 0 <= done <= n and isinstance(ok, list) and len(ok) == n):
            log.warning("%s: progress of '%s' does not fit its %d images; filling it again",
                        self.dir / "progress.json", name, n)
            return fresh
        if done and (problem := self._arrays_problem(name, n, views)):
            log.warning("%s: %s; filling '%s' again", self.dir, problem, name)
            return fresh
        return {"done": done, "ok": [bool(v) for v in ok]}

    def _arrays_problem(self, name: str, n: int, views: int) -> str | None:
        """Why split `name`'s arrays cannot hold the rows progress.json claims, or None when they can."""
        for suffix in ("acts", "taps"):
            path = self.dir / f"{name}.{suffix}.npy"
            try:
                arr = np.load(path, mmap_mode="r")  # numpy checks the file is as long as its header says
            except (OSError, ValueError, EOFError) as exc:
                return f"{path.name} is unreadable ({exc})"
            if arr.shape[:2] != (n, views):
                return f"{path.name} holds {arr.shape[:2]} (images, views), not {(n, views)}"
        return None

    def arrays(self, name: str, cfg: PreprocessConfig | None = None) -> tuple[StoreArray, StoreArray, np.ndarray]:
        """(activations [n, views, C, H, W], taps [n, views, T] float32, readable mask [n]), memory-mapped. The
        activations are float16, or uint8 pixels read as float32 normalised by `cfg` (which they need)."""
        meta = self._progress()[name]
        acts = np.load(self.dir / f"{name}.acts.npy", mmap_mode="r")
        taps = np.load(self.dir / f"{name}.taps.npy", mmap_mode="r")
        if acts.dtype == np.uint8 and cfg is None:
            raise ValueError("a store of pixel views is read with the preprocessing config that normalises them")
        return (StoreArray(acts, cfg if acts.dtype == np.uint8 else None), StoreArray(taps),
                np.array(meta["ok"], dtype=bool))

    def fill(
        self, name: str, paths: Sequence[Path], views: int, augment: str, seed: int, cfg: PreprocessConfig,
        engine: OnnxEngine | PixelViews, progress: Callable[[int], None] | None = None, batch_images: int = 16,
    ) -> list[tuple[int, str]]:
        """Compute what is missing of split `name`; return failures as (index, reason). Under torchrun each rank
        fills a contiguous block of the split as a part of its own, then rank 0 joins the parts into the split,
        which is then the same complete store a one-process run makes (same views, same rows)."""
        run = distributed.joined()
        n = len(paths)
        if not run.active or distributed.all_agree(self._is_complete(name, n, views)):
            return self._fill(name, paths, 0, views, augment, seed, cfg, engine, progress, batch_images)
        lo, hi = distributed.block(n)
        self._fill(_part(name, lo, hi), paths[lo:hi], lo, views, augment, seed, cfg, engine, progress, batch_images)
        distributed.barrier()
        if run.is_main:
            self._join(name, n, views, [(n * r // run.world_size, n * (r + 1) // run.world_size)
                                        for r in range(run.world_size)])
        distributed.barrier()
        joined = self._progress().get(name)
        if not isinstance(joined, dict) or joined.get("done") != n:  # rank 0 joined the parts in another cache
            raise ConfigError(f"{self.dir}: the '{name}' split was joined in another machine's cache; a torchrun "
                              "over several machines needs HEADSTART_CACHE on storage they all share")
        return [(i, "unreadable") for i, ok in enumerate(joined["ok"]) if not ok]

    def _is_complete(self, name: str, n: int, views: int) -> bool:
        return self._entry(self._progress(name), name, n, views)["done"] >= n

    def _fill(self, name: str, paths: Sequence[Path], offset: int, views: int, augment: str, seed: int,
              cfg: PreprocessConfig, engine, progress, batch_images: int) -> list[tuple[int, str]]:
        """Fill `name` with `paths`, the rows from `offset` of their split (which seed their augmented views)."""
        state = self._progress(name)
        entry = self._entry(state, name, len(paths), views)
        done = entry["done"]
        if progress and done:
            progress(done)
        if done >= len(paths):
            return [(i, "unreadable") for i, ok in enumerate(entry["ok"]) if not ok]

        view = augmented_pixels if isinstance(engine, PixelViews) else augmented_view

        def load(i: int) -> np.ndarray:
            img = load_rgb(paths[done + i], cfg.resize_size if augment == "none" else None)
            return np.stack([view(img, cfg, augment, view_seed(seed, offset + done + i, v)) for v in range(views)])

        acts = taps = None
        for idx, pixels, fails in decoded_batches(len(paths) - done, load, batch_images, default_workers()):
            if pixels is not None:
                out = engine.run_all(pixels.reshape(-1, *pixels.shape[2:]))
                a, t = out[0], (out[1] if len(out) > 1 else np.zeros((len(out[0]), 0), np.float32))
                if acts is None:
                    acts, taps = self._open(name, len(paths), views, a.shape[1:], t.shape[1], create=done == 0,
                                            dtype=_stored_dtype(a))
                rows = [done + i for i in idx]
                acts[rows] = a.reshape(len(idx), views, *a.shape[1:]).astype(acts.dtype)
                taps[rows] = t.reshape(len(idx), views, -1)
            for i, _ in fails:
                entry["ok"][done + i] = False
            # Commit a chunk: flush the arrays, then record progress (atomically) up to the last finished image.
            finished = done + max([*idx, *(i for i, _ in fails)]) + 1
            if acts is not None:
                acts.flush()
                taps.flush()
                release(acts)  # written and flushed: the page cache holds it, this process need not
            if acts is not None or finished == len(paths):
                entry["done"] = finished
                state[name] = entry
                atomic_write_bytes(self._progress_file(name), json.dumps(state).encode())
            if progress:
                progress(len(idx) + len(fails))
        return [(i, "unreadable") for i, ok in enumerate(entry["ok"]) if not ok]

    def _join(self, name: str, n: int, views: int, blocks: list[tuple[int, int]]) -> None:
        """The ranks' parts of split `name`, copied block by block into the split's arrays, its progress recorded
        complete, the parts removed. A part missing here was filled in another machine's cache."""
        ok: list[bool] = []
        acts = taps = None
        for lo, hi in blocks:
            part = _part(name, lo, hi)
            entry = self._progress(part).get(part) if hi > lo else {"done": 0, "ok": []}
            if not isinstance(entry, dict) or entry.get("done") != hi - lo:
                raise ConfigError(f"{self.dir}: rows {lo}-{hi} of the '{name}' split were not filled here; a "
                                  "torchrun over several machines needs HEADSTART_CACHE on storage they all share")
            ok += [bool(v) for v in entry["ok"]]
            if not any(entry["ok"]):
                continue  # nothing readable: no arrays were made for this part
            p_acts = np.load(self.dir / f"{part}.acts.npy", mmap_mode="r")
            p_taps = np.load(self.dir / f"{part}.taps.npy", mmap_mode="r")
            if acts is None:
                acts, taps = self._open(name, n, views, p_acts.shape[2:], p_taps.shape[2], create=True,
                                        dtype=p_acts.dtype)
            for s in range(0, hi - lo, 64):  # a chunk at a time: memory stays flat whatever the split's size
                acts[lo + s:lo + min(s + 64, hi - lo)] = p_acts[s:s + 64]
                taps[lo + s:lo + min(s + 64, hi - lo)] = p_taps[s:s + 64]
        if acts is not None:
            acts.flush()
            taps.flush()
        state = self._progress()
        state[name] = {"done": n, "ok": ok}
        atomic_write_bytes(self.dir / "progress.json", json.dumps(state).encode())
        for lo, hi in blocks:
            part = _part(name, lo, hi)
            for file in (self._progress_file(part), self.dir / f"{part}.acts.npy", self.dir / f"{part}.taps.npy"):
                file.unlink(missing_ok=True)

    def _open(self, name: str, n: int, views: int, act_shape: tuple, taps_dim: int, create: bool, dtype=np.float16):
        acts_path, taps_path = self.dir / f"{name}.acts.npy", self.dir / f"{name}.taps.npy"
        if create or not acts_path.exists():
            return (_allocated(acts_path, dtype, (n, views, *act_shape)),
                    _allocated(taps_path, np.float32, (n, views, taps_dim)))
        return np.load(acts_path, mmap_mode="r+"), np.load(taps_path, mmap_mode="r+")


def _stored_dtype(out: np.ndarray):
    """uint8 pixel views stay 8-bit; activations are kept as float16."""
    return np.uint8 if out.dtype == np.uint8 else np.float16


def _part(name: str, lo: int, hi: int) -> str:
    """The name of rows [lo, hi) of split `name`, filled by one rank."""
    return f"{name}@{lo}-{hi}"


def _allocated(path: Path, dtype, shape: tuple) -> np.memmap:
    """A new .npy array memory-mapped for writing, its every byte allocated on disk first (see the docstring)."""
    with disk_space(path):
        arr = np.lib.format.open_memmap(path, "w+", dtype, shape)
        with open(path, "r+b") as f:
            allocate(f.fileno(), os.fstat(f.fileno()).st_size, path)
    return arr
