"""Predicting from an exported `model.onnx` alone: ONNX Runtime, numpy and Pillow, never torch or timm.

The file's metadata (written by `serve.export`) says everything: the class names and, for each graph input, the
resize-and-crop that makes its uint8 pixels; the graph normalises and ends in a softmax. Photos are decoded in
parallel with inference (`cache.pipeline.decoded_batches`) and predicted batch by batch, so a folder of 100k
photos streams through in flat memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from headstart.cache.pipeline import decoded_batches, default_workers
from headstart.data.imageio import decoded_rgb, is_decoded, load_rgb
from headstart.errors import ArtifactError, DataError
from headstart.evaluate.metrics import evaluate
from headstart.paths import file_sha256
from headstart.progress import NoProgress, Progress
from headstart.records import Evaluation
from headstart.runtime.device import cpu_threads
from headstart.serve.predictor import AlignedOutputs
from headstart.vision.preprocess import PreprocessConfig, resize_and_crop

if TYPE_CHECKING:
    from headstart.records import TTAEvaluation

log = logging.getLogger(__name__)

EXPORT_FILE = "model.onnx"  # beside headstart.json in a model directory
EXPORT_KEY = "headstart"  # the metadata entry holding the JSON description
EXPORT_FORMAT = "headstart-onnx"
BATCH = 32  # images per inference call

@dataclass(frozen=True)
class View:
    """One graph input: resize the short side to `resize`, centre-crop `size` x `size`, uint8 RGB NHWC.
    `crop_pct` (size / resize, as the backbone's config states it) rebuilds the exact `PreprocessConfig`."""

    name: str
    size: int
    resize: int
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "resize": self.resize, "interpolation": self.interpolation,
                "crop_pct": self.crop_pct}

    @classmethod
    def from_dict(cls, d: dict) -> "View":
        return cls(str(d["name"]), int(d["size"]), int(d["resize"]), str(d.get("interpolation", "bicubic")),
                   float(d.get("crop_pct", int(d["size"]) / int(d["resize"]))))

    def config(self) -> PreprocessConfig:
        cfg = PreprocessConfig(input_size=self.size, crop_pct=self.crop_pct, interpolation=self.interpolation)
        if cfg.resize_size != self.resize:
            raise ValueError(f"input '{self.name}': crop_pct {self.crop_pct} does not give resize {self.resize}")
        return cfg


def crop_pixels(img: Image.Image, view: View) -> np.ndarray:
    """The view's uint8 HWC pixels, through headstart's own eval resize and crop, so an export sees exactly the
    pixels the cached-graph path and training saw."""
    return np.asarray(resize_and_crop(img, view.config()), dtype=np.uint8)


@dataclass(frozen=True)
class ExportInfo:
    """What an exported model's metadata says about it."""

    classes: tuple[str, ...]
    views: tuple[View, ...]
    backbone: str
    headstart_version: str
    quantization: str
    weights_sha256: str
    metrics: dict
    multi_label: bool = False  # sigmoid outputs, each label on at or above its threshold
    thresholds: tuple[float, ...] = ()

    @classmethod
    def from_meta(cls, meta: dict, where: Path) -> "ExportInfo":
        try:
            if meta.get("format") != EXPORT_FORMAT:
                raise ValueError("not a headstart export")
            views = tuple(View.from_dict(v) for v in meta["inputs"])
            for v in views:
                v.config()
            return cls(tuple(str(c) for c in meta["classes"]), views,
                       str(meta.get("backbone", "")), str(meta.get("headstart_version", "")),
                       str(meta.get("quantization", "float32")), str(meta.get("weights_sha256", "")),
                       dict(meta.get("metrics") or {}), bool(meta.get("multi_label", False)),
                       tuple(float(t) for t in meta.get("thresholds") or ()))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"{where}: not a headstart ONNX export ({exc}); run `headstart export MODEL`") from None


class OnnxPredictor(AlignedOutputs):
    """Labels and probabilities for images from one exported file; safe to share between threads."""

    def __init__(self, path: str | Path, threads: int | None = None, workers: int | None = None,
                 batch_size: int = BATCH) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: no exported model; run `headstart export MODEL` first")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or cpu_threads()
        # The decoding threads share the cores: pool threads spinning while they wait would take them.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for unreadable or invalid files
            raise ArtifactError(f"{self.path}: unreadable ONNX model ({type(exc).__name__}); export it again") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get(EXPORT_KEY)
        try:
            parsed = json.loads(meta) if meta else {}
        except json.JSONDecodeError:
            parsed = {}
        self.info = ExportInfo.from_meta(parsed, self.path)
        names = [i.name for i in self.session.get_inputs()]
        if names != [v.name for v in self.info.views]:
            raise ArtifactError(f"{self.path}: graph inputs {names} disagree with its metadata; export it again")
        self.workers = workers or default_workers()
        self.batch_size = batch_size

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    # --- arrays and decoded images -------------------------------------------------------------------------------

    def views(self, img: Image.Image) -> tuple[np.ndarray, ...]:
        return tuple(crop_pixels(img, v) for v in self.info.views)

    def load(self, path: str | Path | Image.Image | np.ndarray) -> tuple[np.ndarray, ...]:
        """Decode one file (JPEGs at a reduced scale that still covers the first view) into the graph's inputs;
        an image already in memory (PIL, uint8 array) goes through the same conversion and crop."""
        if is_decoded(path):
            return self.views(decoded_rgb(path))
        return self.views(load_rgb(path, self.info.views[0].resize))

    def run(self, views: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities for stacked inputs, one array per view, in at most `batch_size` rows per call."""
        n = len(views[0])
        out = [self.session.run(None, {v.name: arr[i:i + self.batch_size] for v, arr in zip(self.info.views, views)})[0]
               for i in range(0, n, self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def proba_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Probabilities for decoded RGB images."""
        if not images:
            return np.zeros((0, len(self.classes)), np.float32)
        per_image = [self.views(im) for im in images]
        return self.run([np.stack(view) for view in zip(*per_image)])

    def feeds_paths(self, paths: Sequence[Path]) -> dict[str, np.ndarray] | None:
        """The graph's feed dict for the readable ones among `paths` (None when none is), for calibration."""
        for _, stacked, _ in decoded_batches(len(paths), lambda i: self.load(paths[i]), len(paths), self.workers):
            if stacked is not None:
                return {v.name: arr for v, arr in zip(self.info.views, stacked)}
        return None

    # --- files -----------------------------------------------------------------------------------------------------

    def batches(self, paths: Sequence[Path], progress: Callable[[int], None] | None = None
                ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
        """(indices, probabilities, failures) batch by batch, in order; decoding overlaps inference."""
        load = lambda i: self.load(paths[i])  # noqa: E731
        for idx, stacked, fails in decoded_batches(len(paths), load, self.batch_size, self.workers):
            proba = self.run(stacked) if idx else np.zeros((0, len(self.classes)), np.float32)
            if progress:
                progress(len(idx) + len(fails))
            yield idx, proba, fails

    def proba_paths(self, paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities of the readable ones among `paths`, and the boolean mask of which were readable."""
        out = np.zeros((len(paths), len(self.classes)), np.float32)
        ok = np.zeros(len(paths), bool)
        for idx, proba, _ in self.batches(list(paths)):
            out[idx], ok[idx] = proba, True
        return out[ok], ok

    def _batches(self, paths: list, progress: Callable[[int], None] | None = None
                 ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
        return self.batches(paths, progress)  # what `AlignedOutputs` lines results up from

    def evaluate(self, folder: str | Path, seed: int = 0, progress: Progress | None = None
                 ) -> tuple[Evaluation, list[tuple[Path, str]]]:
        """Metrics on a class-folder set (all its images), and the files skipped."""
        y, proba, _, skipped = self._scored(folder, seed, progress, mirrored=False)
        return evaluate(y, proba, self.classes), skipped

    def evaluate_tta(self, folder: str | Path, seed: int = 0, progress: Progress | None = None
                     ) -> tuple["TTAEvaluation", list[tuple[Path, str]]]:
        """`evaluate`, and again with each image's mirror image averaged in: the graph's uint8 NHWC inputs are
        mirrored along their width, in the same decoded batch."""
        from headstart.evaluate.tta import averaged
        from headstart.records import TTAEvaluation

        y, proba, flipped, skipped = self._scored(folder, seed, progress, mirrored=True)
        return TTAEvaluation(evaluate(y, proba, self.classes),
                             evaluate(y, averaged(proba, flipped), self.classes)), skipped

    def _scored(self, folder: str | Path, seed: int, progress: Progress | None, mirrored: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[tuple[Path, str]]]:
        """(labels in the model's order, probabilities, those of the mirrored images or None, files skipped)."""
        dataset, to_model = self._labelled(folder, seed)
        paths = [s.path for s in dataset.samples]
        labels = np.array([s.label for s in dataset.samples])
        progress = progress or NoProgress()
        progress.start("evaluating", len(paths))
        ok = np.zeros(len(paths), bool)
        parts: list[np.ndarray] = []
        flips: list[np.ndarray] = []
        failures: list[tuple[Path, str]] = []
        load = lambda i: self.load(paths[i])  # noqa: E731
        for idx, stacked, fails in decoded_batches(len(paths), load, self.batch_size, self.workers):
            if idx:
                parts.append(self.run(stacked))
                if mirrored:
                    flips.append(self.run([np.ascontiguousarray(v[:, :, ::-1]) for v in stacked]))
            ok[idx] = True
            failures += [(paths[i], reason) for i, reason in fails]
            progress.advance(len(idx) + len(fails))
        progress.finish()
        if not ok.any():
            raise DataError(f"{folder}: none of the {len(paths)} images could be read")
        return (to_model[labels[ok]], np.concatenate(parts), np.concatenate(flips) if mirrored else None,
                list(dataset.skipped) + failures)


def load_export(model_dir: str | Path, **kwargs) -> OnnxPredictor | None:
    """The predictor of `model_dir/model.onnx` when it exists and was exported from the weights now in
    `model_dir`; None otherwise. A model trained again into the same folder makes an older export stale: it is
    then ignored, with a warning, and the saved weights predict."""
    d = Path(model_dir)
    path, weights = d / EXPORT_FILE, d / "model.safetensors"
    if not path.is_file():
        return None
    predictor = OnnxPredictor(path, **kwargs)
    if weights.is_file() and predictor.info.weights_sha256 != file_sha256(weights):
        log.warning("%s was exported from other weights (trained again since?); ignored: run `headstart export %s`",
                    path, d)
        return None
    return predictor
