"""What a run trains on: `Sample`s (a path, a label, a split) gathered in a `Dataset`, and the stratified split
that carves validation and test photos out of the training ones. Made by `scan` (class folders) and `manifest`
(listed files); read by everything above. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.records import DataSource

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # index into Dataset.classes
    split: str  # "train" | "val" | "test"


@dataclass(frozen=True)
class Dataset:
    root: Path
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]
    skipped: tuple[tuple[Path, str], ...]
    source: DataSource | None = None  # a folder, or the manifest the samples were listed in

    def subset(self, split: str) -> tuple[Sample, ...]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return tuple(s for s in self.samples if s.split == split)

    def paths(self, split: str) -> list[Path]:
        return [s.path for s in self.subset(split)]

    def labels(self, split: str) -> np.ndarray:
        return np.fromiter((s.label for s in self.subset(split)), dtype=np.int64)

    def class_counts(self, split: str | None = None) -> dict[str, int]:
        """Images per class (every class present, zeros included), in class order; split=None counts all splits."""
        samples = self.samples if split is None else self.subset(split)
        counts = dict.fromkeys(self.classes, 0)
        for s in samples:
            counts[self.classes[s.label]] += 1
        return counts


def assemble(found: dict[str, dict[str, list[Path]]], classes: tuple[str, ...], carve_val: float,
             carve_test: float, seed: int) -> tuple[Sample, ...]:
    """The samples of {split: {class: sorted paths}}, with val/test carved out of train per class (stratified) by
    one np.random.default_rng(seed), ordered by (split, label, path)."""
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    for label, cls in enumerate(classes):
        train_files = found["train"].get(cls, [])
        if carve_val > 0 or carve_test > 0:
            train_files, val_files, test_files = _split_class(train_files, carve_val, carve_test, rng)
            samples += [Sample(p, label, "val") for p in val_files]
            samples += [Sample(p, label, "test") for p in test_files]
        samples += [Sample(p, label, "train") for p in train_files]
        for split in ("val", "test"):
            samples += [Sample(p, label, split) for p in found.get(split, {}).get(cls, [])]
    samples.sort(key=lambda s: (s.split, s.label, s.path))
    return tuple(samples)


def split_rows(splits: np.ndarray) -> dict[str, slice]:
    """Each split's block of rows in arrays ordered split by split: slices, so a memory-mapped array is viewed,
    never copied."""
    rows, start = {}, 0
    for split in SPLITS:
        n = int((splits == split).sum())
        rows[split] = slice(start, start + n)
        start += n
    if not all((splits[rows[s]] == s).all() for s in SPLITS):
        raise AssertionError("features are not ordered split by split")
    return rows


def _split_counts(n: int, val_frac: float, test_frac: float) -> tuple[int, int]:
    n_test, n_val = round(n * test_frac), round(n * val_frac)
    if val_frac > 0 and n >= 2:
        n_val = max(n_val, 1)  # a class absent from val would go unmeasured
    # Every class keeps at least one training image; test gives way first, then val.
    excess = n_test + n_val - max(n - 1, 0)
    take = min(excess, n_test) if excess > 0 else 0
    n_test -= take
    excess -= take
    if excess > 0:
        n_val -= excess
    return n_val, n_test


def _split_class(
    files: list[Path], val_frac: float, test_frac: float, rng: np.random.Generator
) -> tuple[list[Path], list[Path], list[Path]]:
    """(train, val, test) from one class's sorted files, shuffled by the shared rng."""
    n_val, n_test = _split_counts(len(files), val_frac, test_frac)
    shuffled = [files[i] for i in rng.permutation(len(files))]
    return shuffled[n_test + n_val :], shuffled[n_test : n_test + n_val], shuffled[:n_test]
