"""Backbones side by side on one folder of photos: extraction speed, cross-validated head accuracy with its
95 % interval, model size and single-image latency.

Each backbone's features go through the feature cache, so a second `compare` (or a `train` after it) extracts
nothing already extracted. Throughput is timed once per backbone, on up to THROUGHPUT_IMAGES of the photos
through the extraction pipeline (decoding in parallel with inference, as `train` extracts), and remembered
beside the feature cache: a figure timed during a first extraction would include the one-off ONNX export.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.data.dataset import Dataset
from headstart.data.groups import row_groups
from headstart.data.scan import scan_folder
from headstart.errors import ConfigError, DataError
from headstart.evaluate.crossval import FOLDS
from headstart.progress import NoProgress, Progress
from headstart.records import CrossValidation
from headstart.tasks.check import sized_spec
from headstart.train.crossval import cross_validate

log = logging.getLogger(__name__)

THROUGHPUT_IMAGES = 64
LATENCY_RUNS = 10  # median of this many single-image predictions, after two warm-up runs


@dataclass(frozen=True)
class BackboneResult:
    backbone: str
    images: int  # images cross-validated (train and val splits; a test split stays untouched)
    extracted: int  # images whose features this run extracted (the rest were cached)
    images_per_s: float  # feature extraction throughput, decoding included
    cv: CrossValidation
    params_m: float  # backbone parameters, millions
    size_mb: float  # the backbone's weights as a saved model holds them (float32), MB
    latency_ms: float  # one image: decode, preprocess, backbone and pooling


def compare_backbones(data: str | Path, backbones: list[str], weights: Path | None = None, device: str = "auto",
                      val_split: float = 0.2, seed: int = 0, folds: int = FOLDS,
                      progress: Progress | None = None, engine: str = "auto") -> list[BackboneResult]:
    """One `BackboneResult` per backbone, in the order given."""
    if not backbones:
        raise ConfigError("--backbones names no backbone; give a comma list, e.g. "
                          "efficientnet_lite0,efficientnet_lite1")
    if weights is not None and len(backbones) > 1:
        raise ConfigError("--weights is one backbone's file: compare one backbone with it, or drop --weights")
    dataset = scan_folder(data, val_split=val_split, seed=seed)
    from headstart.backbones.registry import resolve

    for name in backbones:
        resolve(name)  # an unknown name fails now, before the first backbone's extraction
    return [compare_one(dataset, name, weights, device, seed, folds, progress or NoProgress(), engine)
            for name in backbones]


def compare_one(dataset: Dataset, name: str, weights: Path | None, device: str, seed: int, folds: int,
                progress: Progress, engine: str = "auto") -> BackboneResult:
    from headstart.cache.dataset import dataset_features
    from headstart.runtime.frozen import FrozenBackbone

    # The engine as `train` resolves it, so that the features it cached are found and --pick trains on the same.
    frozen = FrozenBackbone.pretrained(sized_spec(name, dataset), weights).with_engine(engine, device)
    feats = dataset_features(dataset, frozen, device, progress, task=f"extracting features ({name})")
    extracted = len(feats.paths) - feats.cached
    rows = np.flatnonzero(feats.splits != "test")
    if len(rows) < 4:
        raise DataError(f"{dataset.root}: {len(rows)} readable images; cross-validation needs at least 4")
    labels = feats.labels[rows]
    progress.start(f"cross-validating ({name})", None)
    x = np.asarray(feats.features[rows], np.float32)
    ids = row_groups(dataset.source, [feats.paths[i] for i in rows], x, labels)[0]  # near-duplicates: one fold
    cv = cross_validate(x, labels, len(dataset.classes), folds, seed, groups=ids)
    progress.finish()
    engine = frozen.engine(device)
    sample = [feats.paths[i] for i in np.linspace(0, len(feats.paths) - 1, min(THROUGHPUT_IMAGES,
                                                                               len(feats.paths))).astype(int)]
    ips = throughput(frozen, engine, sample, device)
    # The registry's count leaves out the ImageNet classifier the weights file still holds; other names: counted.
    params = frozen.spec.params_m * 1e6 if np.isfinite(frozen.spec.params_m) else weights_params(frozen.weights)
    result = BackboneResult(name, len(rows), extracted, ips, cv, params / 1e6, 4 * params / 1e6,
                            1000 * latency(frozen, engine, sample[0]))
    log.info("%s: %s", name, result)
    return result


def throughput(frozen, engine, sample: list[Path], device: str) -> float:
    """Images per second of the extraction pipeline, as remembered for this backbone, or timed now on `sample`."""
    from headstart.cache.pipeline import extract
    from headstart.paths import atomic_write_bytes, cache_root

    path = cache_root() / "compare" / f"{frozen.cache_key(frozen.engine_kind(device))}.json"
    try:
        return float(json.loads(path.read_text())["images_per_s"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # never timed, or a damaged file: time it (again)
    next(iter(extract(sample[:8], frozen.spec.preprocess, engine)), None)  # warm-up: first runs allocate
    t0 = time.perf_counter()
    done = sum(len(idx) for idx, _, _ in extract(sample, frozen.spec.preprocess, engine))
    ips = done / max(time.perf_counter() - t0, 1e-9)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"images_per_s": ips, "images": done}).encode())
    except OSError as exc:  # a read-only cache: the figure is only timed again next time
        log.info("could not remember the throughput in %s: %s", path, exc)
    return ips


def latency(frozen, engine, path: Path) -> float:
    """Median seconds to turn one image file into its features."""
    from headstart.vision.preprocess import load_views

    def once() -> float:
        t0 = time.perf_counter()
        views = load_views(path, frozen.spec.preprocess)
        np.concatenate([engine(v[None]) for v in views], 1)
        return time.perf_counter() - t0

    once(), once()
    return float(np.median([once() for _ in range(LATENCY_RUNS)]))


def weights_params(path: Path) -> int:
    """Parameters in a safetensors file, read from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return int(sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()))


def best(results: list[BackboneResult]) -> BackboneResult:
    """The highest cross-validated accuracy; a tie goes to the smaller backbone."""
    return max(results, key=lambda r: (r.cv.accuracy, -r.params_m))
