"""Using a trained backbone and head: labels and probabilities for image files, and metrics on a labelled folder.

torch-free: the backbone runs through its cached ONNX export (exported once, with torch, when the cache is cold),
the head in numpy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from headstart.cache.dataset import dataset_features
from headstart.cache.pipeline import extract
from headstart.data.dataset import Dataset
from headstart.data.imageio import is_decoded
from headstart.data.inputs import InputImage, expand_inputs
from headstart.data.scan import scan_folder
from headstart.errors import DataError
from headstart.evaluate.metrics import evaluate
from headstart.heads.config import HeadConfig, head_proba
from headstart.progress import NoProgress, Progress
from headstart.records import Evaluation
from headstart.runtime.frozen import FrozenBackbone

if TYPE_CHECKING:
    from headstart.records import TTAEvaluation

HEAD_BATCH_ROWS = 512  # images gathered before the head runs while predicting
_USE_TABLE = "use predict_table for one row per input, unreadable ones included"


# What predict_proba takes: paths and folders, and images already decoded (PIL images, uint8 arrays).
Images = Sequence[str | Path | Image.Image | np.ndarray] | str | Path | Image.Image | np.ndarray


def _as_items(images: Images) -> list:
    """The inputs one by one: a lone path or image is one input (a path is not iterated character by character),
    a 4-D array is a batch of H x W x 3 images."""
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


@dataclass
class Prediction:
    path: Path
    label: str | None
    confidence: float | None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


STREAM_ROWS = 4096  # inputs predicted before their rows are handed on


class AlignedOutputs:
    """Results that line up with the inputs, for any predictor with `classes` and `_batches(paths, advance)`
    yielding (indices, probabilities, failures): the backbone's engine + numpy head here, model.onnx in
    `serve.onnx_predictor`."""

    classes: tuple[str, ...]

    def _batches(self, paths: list, progress: Callable[[int], None] | None = None
                 ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
        raise NotImplementedError

    def predict_table(self, images: Sequence[str | Path] | str | Path, top_k: int = 3,
                      progress: Progress | None = None) -> list[Prediction]:
        """One row per input file, in input order (a folder expands in place, sorted, to its images); inputs that
        yield no image (missing, unreadable, an empty folder) are rows with an error, where they were given."""
        return list(self.iter_table(images, top_k, progress))

    def iter_table(self, images: Sequence[str | Path] | str | Path, top_k: int = 3,
                   progress: Progress | None = None) -> Iterator[Prediction]:
        """`predict_table`'s rows as they are ready, `STREAM_ROWS` inputs at a time: memory stays flat and the
        first rows of a 100,000-file folder come out within seconds."""
        items = expand_inputs(images)
        k = max(1, min(top_k, len(self.classes)))
        progress = progress or NoProgress()
        progress.start("predicting", sum(i.problem is None for i in items))
        for start in range(0, len(items), STREAM_ROWS):
            chunk = items[start:start + STREAM_ROWS]
            results = self._by_path([i.path for i in chunk if i.problem is None], progress.advance)
            for item in chunk:
                result = item.problem if item.problem is not None else results[item.path]
                if isinstance(result, str):
                    yield Prediction(item.path, None, None, error=result)
                    continue
                top = [(self.classes[j], float(result[j])) for j in np.argsort(-result)[:k]]
                yield Prediction(item.path, top[0][0], top[0][1], top)
        progress.finish()

    def predict_proba(self, images: Images) -> np.ndarray:
        """Class probabilities, one row per input in input order: a file, a folder (expanded in place, sorted, to
        its images), or an image already in memory (a PIL image, a uint8 H x W x 3 array; a 4-D array is a batch
        of them), which goes through the same conversion and preprocessing as a file. Any input without a result
        (missing, unreadable, an empty folder) is a DataError naming the first one: rows always line up."""
        rows: list[InputImage | int] = []  # an expanded path, or the index of an image in memory
        decoded: list = []
        for item in _as_items(images):
            if is_decoded(item):
                rows.append(len(decoded))
                decoded.append(item)
            else:
                rows += expand_inputs(item)
        bad = next((r for r in rows if isinstance(r, InputImage) and r.problem is not None), None)
        if bad is not None:  # before any work: nothing is extracted for a list that cannot line up
            raise DataError(f"{bad.path}: {bad.problem}; {_USE_TABLE}")
        by_path = self._by_path([r.path for r in rows if isinstance(r, InputImage)], None, stop_at_failure=True)
        in_memory = self._decoded_proba(decoded)
        out = np.zeros((len(rows), len(self.classes)), np.float32)
        for n, row in enumerate(rows):
            out[n] = in_memory[row] if isinstance(row, int) else by_path[row.path]
        return out

    def _decoded_proba(self, images: list) -> np.ndarray:
        out = np.zeros((len(images), len(self.classes)), np.float32)
        if not images:
            return out
        for idx, proba, fails in self._batches(images):
            if fails:
                raise DataError(f"image {fails[0][0] + 1} of those given in memory: {fails[0][1]}")
            out[idx] = proba
        return out

    def _labelled(self, folder: str | Path, seed: int) -> tuple[Dataset, np.ndarray]:
        """A class-folder set to evaluate on (all its images, whatever split folders it has), and the model's
        index of each of its classes; a class the model does not know is one line."""
        dataset = scan_folder(folder, val_split=0.0, seed=seed)
        unknown = [c for c in dataset.classes if c not in self.classes]
        if unknown:
            raise DataError(f"{folder}: classes {unknown} are not among the model's {list(self.classes)}; "
                            "evaluate on folders named like the training classes")
        return dataset, np.array([self.classes.index(c) for c in dataset.classes])

    def _by_path(self, paths: list[Path], advance: Callable[[int], None] | None, stop_at_failure: bool = False
                 ) -> dict[Path, np.ndarray | str]:
        """Each distinct path's probabilities, or the reason it could not be read. A path given twice is read once."""
        unique = list(dict.fromkeys(paths))
        results: dict[Path, np.ndarray | str] = {}
        if not unique:
            return results
        for idx, proba, fails in self._batches(unique, advance):
            if fails and stop_at_failure:
                path, reason = unique[fails[0][0]], fails[0][1]
                raise DataError(f"{path}: {reason}; {_USE_TABLE}")
            results.update({unique[i]: reason for i, reason in fails})
            results.update({unique[i]: p for i, p in zip(idx, proba)})
        return results



@dataclass(frozen=True, eq=False)
class Predictor(AlignedOutputs):
    classes: tuple[str, ...]
    frozen: FrozenBackbone
    head_config: HeadConfig
    head_state: dict[str, np.ndarray]
    device: str = "auto"

    def proba(self, feats: np.ndarray) -> np.ndarray:
        return head_proba(self.head_config, self.head_state, feats)

    def evaluate(self, folder: str | Path, seed: int = 0, progress: Progress | None = None
                 ) -> tuple[Evaluation, list[tuple[Path, str]]]:
        """Metrics on a class-folder set (all its images, whatever split folders it has), and the files skipped."""
        dataset, to_model = self._labelled(folder, seed)
        feats = dataset_features(dataset, self.frozen, self.device, progress or NoProgress())
        ev = evaluate(to_model[feats.labels], self.proba(feats.features), self.classes)
        return ev, list(dataset.skipped) + list(feats.failures)

    def evaluate_tta(self, folder: str | Path, seed: int = 0, progress: Progress | None = None
                     ) -> tuple[TTAEvaluation, list[tuple[Path, str]]]:
        """`evaluate`, and again with each image's mirror image averaged in (`evaluate.tta`)."""
        from headstart.evaluate.tta import averaged, flipped_features
        from headstart.records import TTAEvaluation

        progress = progress or NoProgress()
        dataset, to_model = self._labelled(folder, seed)
        feats = dataset_features(dataset, self.frozen, self.device, progress)
        mirrored = flipped_features(feats.paths, self.frozen, self.device, progress)
        keep = np.asarray(mirrored.readable, np.int64)  # a file gone since its first read is left out of both
        y, proba = to_model[feats.labels[keep]], self.proba(np.asarray(feats.features)[keep])
        both = TTAEvaluation(evaluate(y, proba, self.classes),
                             evaluate(y, averaged(proba, self.proba(mirrored.features)), self.classes))
        return both, list(dataset.skipped) + list(feats.failures) + list(mirrored.failures)

    def _batches(self, paths: list, progress: Callable[[int], None] | None = None
                 ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
        """(indices, probabilities, failures) for `paths` (files, or images in memory), a few hundred at a time.
        The head runs on gathered batches, not on each inference batch: a hidden layer's matrix product is big
        enough for BLAS to start its threads, which then fight ONNX Runtime's for the cores (1.2 s more on 3,400
        photos)."""
        engine = self.frozen.engine(self.device)
        idx: list[int] = []
        feats: list[np.ndarray] = []
        fails: list[tuple[int, str]] = []
        for batch_idx, batch_feats, batch_fails in extract(paths, self.frozen.spec.preprocess, engine,
                                                           progress=progress):
            idx += batch_idx
            fails += batch_fails
            feats += [batch_feats] if batch_idx else []
            if len(idx) >= HEAD_BATCH_ROWS:
                yield idx, self.proba(np.concatenate(feats)), fails
                idx, feats, fails = [], [], []
        if idx or fails:
            yield idx, self.proba(np.concatenate(feats)) if idx else np.empty((0, len(self.classes))), fails
