"""Using a multi-label model: label lists from probabilities and thresholds, and its figures on a manifest.
torch-free, like the rest of the prediction path."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headstart.data.multilabel import read_multilabel
from headstart.errors import DataError
from headstart.evaluate.multilabel import decide, evaluate_multilabel
from headstart.records import MultiLabelEvaluation, MultiLabelScored
from headstart.serve.predictor import AlignedOutputs, Prediction


@dataclass(frozen=True)
class LabelledRow:
    """One input's multi-label result: the labels that are on, every label's probability and threshold (in class
    order), or the error that kept it from being read."""

    path: Path
    labels: tuple[str, ...]
    probabilities: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def labelled_rows(predictions: Iterable[Prediction], classes: Sequence[str], thresholds: Sequence[float]
                  ) -> Iterator[LabelledRow]:
    """`Prediction` rows holding every label's probability (top_k = all) as multi-label rows, in their order."""
    cuts = {c: float(t) for c, t in zip(classes, thresholds)}
    for p in predictions:
        if p.error is not None:
            yield LabelledRow(p.path, (), {}, cuts, p.error)
            continue
        probs = dict(p.top_k)
        ordered = {c: float(probs[c]) for c in classes}
        on = tuple(c for c in classes if np.float32(ordered[c]) >= np.float32(cuts[c]))  # as `decide` compares
        yield LabelledRow(p.path, on, ordered, cuts)


def thresholds_for(stored: Sequence[float], override: float | None) -> tuple[float, ...]:
    """The thresholds to apply: the model's own, or one value for every label."""
    return tuple(stored) if override is None else (float(override),) * len(stored)


def label_lists(proba: np.ndarray, thresholds: Sequence[float], classes: Sequence[str]) -> list[list[str]]:
    """Each row's labels at or above their thresholds, in class order (possibly none)."""
    return [[c for c, on in zip(classes, row) if on] for row in decide(proba, thresholds)]


def evaluate_manifest(predictor: AlignedOutputs, manifest: str | Path, thresholds: Sequence[float],
                      progress=None) -> tuple[MultiLabelEvaluation, list[tuple[Path, str]]]:
    """Every figure of the model on a multi-label manifest's rows (all of them, whatever their split), and the
    files skipped. A label the model does not know is one line; the model's labels absent from the manifest count
    as negatives everywhere (and, having no positive, do not enter mAP or macro F1)."""
    scored, skipped = scored_manifest(predictor, manifest, progress)
    return evaluate_multilabel(scored.targets, scored.proba, thresholds, predictor.classes), skipped


def scored_manifest(predictor: AlignedOutputs, manifest: str | Path, progress=None
                    ) -> tuple[MultiLabelScored, list[tuple[Path, str]]]:
    """The readable rows of a multi-label manifest with their targets (in the model's label order) and the model's
    probabilities, and the files skipped."""
    data = read_multilabel(manifest, carve=False)
    classes = tuple(predictor.classes)
    unknown = [c for c in data.classes if c not in classes]
    if unknown:
        raise DataError(f"{manifest}: labels {unknown} are not among the model's {list(classes)}; evaluate on a "
                        "manifest of the labels it was trained on")
    results = predictor._by_path(list(data.paths), progress.advance if progress else None)
    ok = [i for i, p in enumerate(data.paths) if not isinstance(results.get(p), str)]
    skipped = list(data.skipped) + [(p, results[p]) for p in data.paths if isinstance(results.get(p), str)]
    if not ok:
        raise DataError(f"{manifest}: none of the {len(data.paths)} images could be read")
    targets = np.zeros((len(ok), len(classes)), np.uint8)
    for j, c in enumerate(data.classes):
        targets[:, classes.index(c)] = data.targets[ok, j]
    proba = np.stack([results[data.paths[i]] for i in ok])
    return MultiLabelScored([data.paths[i] for i in ok], targets, proba), skipped
