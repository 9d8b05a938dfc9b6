"""Static int8 quantization of an exported backbone with ONNX Runtime: activation ranges calibrated on real photos
(MinMax: Percentile and Entropy gave the same features' error), QDQ format (as fast as QOperator here),
per-channel weights re-quantized to full 8 bits that AVX2 cannot saturate, biases corrected for the weights'
rounding (`int8_weights`), uint8 activations, the convolutions at the top resolution (the stem and the first
blocks) left in float32.

One calibration per exported backbone (architecture, weights, input size), measured on a fixed reference set
(`reference_batches`: crops of the two photos scikit-learn ships) and reused by every later run: calibrating
and quantizing cost ~14 s of CPU for Lite0 (bench/engine.py), a third of what int8 saves on a 3,500-photo set,
so per-set calibration would eat the gain. It used to be measured on the training photos of the first int8 run
in a cache, so a run's features (and elpv's balanced accuracy: 0.431 in one cache, 0.567 in another) depended on
what that cache had seen before (issue 26); the ranges of one set's photos served another within the accuracy
bench's margin, and a fixed set does the same without the history.

The calibration is two small JSON files beside the export: the ranges (ONNX Runtime's calibration cache) and the
float graph's mean input of each convolution (for the bias correction). The quantized graph is a pure function
of the float graph and those files, so it is cached under their digest (`quantized_path`), and the engine kind
names the digest (`int8_kind`): features computed with another calibration never share a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.paths import atomic_path
from headstart.runtime import int8_weights
from headstart.runtime.engines import Engine, OnnxEngine, ViewsEngine
from headstart.runtime.export import open_cached
from headstart.vision.preprocess import PreprocessConfig, eval_transform

log = logging.getLogger(__name__)

INT8_PREFIX = "onnxruntime-cpu-int8"
CALIBRATION_IMAGES = 64  # views of the reference photos the ranges are measured on


# Names the calibration set in the ranges' file name: a cache whose ranges were measured on a run's photos (before
# the fixed set) measures them again, once, instead of keeping its history.
REFERENCE_SET = "ref1"


def calibration_path(fp32: Path) -> Path:
    """Where the ranges of the float graph `fp32` are kept (one calibration per exported backbone)."""
    return fp32.with_name(f"{fp32.stem}-int8-calibration-{REFERENCE_SET}.json")


def means_path(calibration: Path) -> Path:
    """Where the mean inputs measured with the ranges in `calibration` are kept."""
    return calibration.with_name(f"{calibration.stem}-means.json")


def _calibrated(calibration: Path) -> bool:
    """Both halves of a calibration are there (a cache from before the bias correction has only the ranges)."""
    return calibration.exists() and means_path(calibration).exists()


def int8_kind(calibration: Path) -> str:
    """The engine kind of int8 graphs quantized with the ranges in `calibration`."""
    return f"{INT8_PREFIX}-{calibration_digest(calibration)}"


# What else the int8 graph depends on: a change of `quantize`'s recipe must change the kind and the file names.
RECIPE = "qdq-float-top-side-dw8-pairs127-bias-2"


def calibration_digest(calibration: Path) -> str:
    return hashlib.sha256(RECIPE.encode() + calibration.read_bytes()
                          + means_path(calibration).read_bytes()).hexdigest()[:12]


def quantized_path(fp32: Path, calibration: Path) -> Path:
    """Where the int8 twin of the float graph `fp32`, quantized with `calibration`'s ranges, is cached."""
    return fp32.with_name(f"{fp32.stem}-int8-{calibration_digest(calibration)}.onnx")


def expected_kind(fp32: Path) -> str:
    """The kind `int8_engine` will give, known without making it: int8 with the cached ranges, or with ranges
    still to be measured (a kind no cache holds: the features cache re-keys once the engine names them)."""
    calibration = calibration_path(fp32)
    return int8_kind(calibration) if _calibrated(calibration) else INT8_PREFIX


def int8_engine(fp32: Path, any_size: Path | None, pre: PreprocessConfig) -> Engine:
    """The int8 engine of the exported float graph `fp32` (and of its any-size twin when `pre` has a native
    view): calibrated on `reference_batches` when this backbone has no ranges yet, quantized once per ranges.
    Both graphs are quantized at once, whichever this run needs, as the float export makes both at once: the twin
    took ~2 s of the first cold train on small photos after a standard-size one had quantized the fixed graph
    alone. Whatever the cache has seen, the same graph gives the same ranges, so the same int8 graph."""
    calibration = calibration_path(fp32)
    if not _calibrated(calibration):
        log.info("calibrating int8 on %d views of a fixed reference set (once per backbone; kept in %s)",
                 CALIBRATION_IMAGES, calibration.parent)
        calibrate(fp32, reference_batches(pre), calibration)
    kind = int8_kind(calibration)
    fixed = quantized_path(fp32, calibration)
    # The twin is the fixed graph with symbolic sizes (or one traced at a native size, by the same exporter from
    # the same modules): the same tensor names, so the same ranges. Should it fail, the caller falls back to fp32.
    twin = quantized_path(any_size, calibration) if any_size is not None else None

    def make() -> None:
        keep = int8_weights.float_weights(fp32)  # from the fixed graph; the twin's weights have the same names
        for src, dst in ((fp32, fixed), (any_size, twin)):
            if src is not None and dst is not None and not dst.exists():
                quantize(src, calibration, dst, keep)

    def open_engine() -> Engine:
        if twin is None or not pre.native_size:
            return OnnxEngine(fixed, kind=kind)
        return ViewsEngine(fixed, pre.input_size, any_size=twin, kind=kind)

    return open_cached(fixed, open_engine, make, (twin,) if twin is not None else ())


def reference_photos() -> list[Image.Image]:
    """`CALIBRATION_IMAGES` fixed views for calibration, the same on every machine: crops at four scales over
    the two photos scikit-learn ships (a Chinese temple and a flower, 640 x 427), flipped or not, every fourth
    in grayscale (grayscale sets such as elpv's solar cells must fall inside the ranges too)."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in load_sample_images().images]
    views = []
    for i in range(CALIBRATION_IMAGES):
        img = photos[i % len(photos)]
        w, h = img.size
        side = int(min(w, h) * (1.0, 0.75, 0.5, 0.35)[(i // 2) % 4])
        x, y = (w - side) * ((i * 37) % 11) // 10, (h - side) * ((i * 53) % 7) // 6  # spread over the photo
        view = img.crop((x, y, x + side, y + side))
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if (i // 8) % 2 else view
        views.append(view.convert("L").convert("RGB") if i % 4 == 3 else view)
    return views


def reference_batches(pre: PreprocessConfig, batch: int = 16) -> list[np.ndarray]:
    """The standard views of `reference_photos` as `pre` preprocesses them, in batches."""
    views = [eval_transform(photo, pre) for photo in reference_photos()]
    return [np.stack(views[i:i + batch]) for i in range(0, len(views), batch)]


def calibrate(fp32: Path, batches: Iterable[np.ndarray], target: Path) -> Path:
    """Measure the activation ranges of the float graph `fp32` on `batches` of preprocessed pixels, and its mean
    convolution inputs, and write them to `target` and `means_path(target)` (JSON, written atomically; the
    ranges last, as they say that a calibration exists)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    batches = list(batches)
    with atomic_path(means_path(target)) as out:
        Path(out).write_text(json.dumps(int8_weights.input_means(fp32, batches)))
    name = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="headstart-calib-") as tmp:
        calibrator = create_calibrator(fp32, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax,
                                       providers=["CPUExecutionProvider"])
        calibrator.collect_data(_Reader(name, batches))
        ranges = calibrator.compute_data()
    with atomic_path(target) as out:
        save_tensors_data(ranges, out)
    return target


def quantize(fp32: Path, calibration: Path, target: Path, keep_float: set[str] | None = None) -> Path:
    """The int8 graph of `fp32` with the calibration in `calibration`, written atomically to `target`; the
    convolutions whose weights are named in `keep_float` (default: `int8_weights.float_weights`) stay float32."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    keep = int8_weights.float_weights(fp32) if keep_float is None else keep_float
    graph = onnx.load(str(fp32)).graph
    # The stem reads the normalised pixels and the first blocks run at the top resolution: in float32 they cut
    # the features' error by a third (0.13 -> 0.10 on Lite0) for a tenth of the work. ONNX Runtime's 7-bit
    # weights (reduce_range) are only a start: `int8_weights.requantize` writes the final weights and biases.
    excluded = [n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in keep]
    means = json.loads(means_path(calibration).read_text())
    with tempfile.TemporaryDirectory(prefix="headstart-int8-") as tmp, atomic_path(target) as out, _quiet("root"):
        draft = Path(tmp) / "qdq.onnx"
        quantize_static(fp32, draft, None, quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                        calibration_cache_path=calibration)
        int8_weights.requantize(draft, fp32, means, Path(out))
    log.info("quantized %s to int8 (%s)", fp32.name, target.name)
    return target


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over an iterable of batches."""

    def __init__(self, name: str, batches: Iterable[np.ndarray]) -> None:
        self.name = name
        self.batches = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.name: np.ascontiguousarray(batch, dtype=np.float32)}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


class _quiet:
    """ONNX Runtime's quantizer warns through the root logger about pre-processing; its advice does not apply."""

    def __init__(self, *names: str) -> None:
        self.loggers = [logging.getLogger(n if n != "root" else None) for n in names]

    def __enter__(self) -> None:
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc) -> None:
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
