"""Decoding in parallel with inference: the one pipeline every extraction (features, boundary store) runs through."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from headstart.data.imageio import ImageDecodeError
from headstart.runtime.engines import Engine
from headstart.vision.preprocess import PreprocessConfig, load_views

Advance = Callable[[int], None]  # told how many more items are done


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
    workers: int | None = None, progress: Advance | None = None,
    views_of: Callable[[Path], tuple[np.ndarray, ...]] | None = None,
) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Features for `paths`, batch by batch: (indices, features, failures). With several views, each view's
    features are computed apart and concatenated. `views_of`: a photo's input arrays, if not `load_views`' (the
    mirrored ones for test-time augmentation)."""
    workers = workers or default_workers()
    views_of = views_of or (lambda path: load_views(path, cfg))
    for indices, views, failures in decoded_batches(len(paths), lambda i: views_of(paths[i]), batch_size, workers):
        feats = np.concatenate([engine(v) for v in views], 1) if indices else np.empty((0, 0), np.float32)
        if progress:
            progress(len(indices) + len(failures))
        yield indices, feats, failures


def default_workers() -> int:
    """Decoding threads: this process's cores (its share of them under torchrun), at least two."""
    from headstart.runtime.device import cpu_threads

    return max(2, cpu_threads())
