"""Multi-label manifests: rows that carry any number of labels, and their seeded, stratified split.

A CSV manifest is multi-label when its label column is headed `labels`, or when any row's `label` holds several
names separated by `;`; a JSON Lines manifest when any row's `labels` (or `label`) is a list. An empty label field
is an image with none of the labels: it is kept, since it teaches every label's negatives. Rows are checked as
single-label manifests are (`data.manifest`): an empty name inside a list (`a;;b`), a name repeated in a row, a name
with surrounding spaces or an unknown split is one `DataError` naming `file:line`; a missing or unreadable file is
skipped and named.

Splits that have no rows of their own are carved out of the train rows by iterative stratification (Sechidis et
al. 2011, `stratified_pick`), so that each label's positives are spread over the splits in proportion, rare labels
included; seeded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.data.dataset import SPLITS
from headstart.data.manifest import SPLIT_NAMES, ManifestRow, _csv_rows, _json_rows, check_path
from headstart.errors import DataError
from headstart.paths import file_sha256
from headstart.records import DataSource

log = logging.getLogger(__name__)

SEPARATOR = ";"
_FORMAT = "path,labels[,split] (labels separated by ';', empty for an image with none)"


@dataclass(frozen=True, eq=False)  # eq=False: the targets are an array
class MultiLabelData:
    """The readable rows of a multi-label manifest, ordered split by split (train, val, test; by path within),
    with their 0/1 targets [rows, labels] in `classes` order."""

    root: Path
    classes: tuple[str, ...]
    paths: tuple[Path, ...]
    targets: np.ndarray  # uint8 [rows, labels]
    splits: np.ndarray  # "train" | "val" | "test" per row
    skipped: tuple[tuple[Path, str], ...] = ()
    source: DataSource | None = None

    def part(self, split: str) -> np.ndarray:
        return self.targets[self.splits == split]

    def counts(self) -> dict[str, dict[str, int]]:
        """Positives per label in each split that has rows."""
        return {s: dict(zip(self.classes, self.part(s).sum(0).astype(int).tolist()))
                for s in SPLITS if (self.splits == s).any()}


def is_multilabel_manifest(manifest: str | Path) -> bool:
    """Whether a manifest's rows carry label lists: a `labels` column or key, a `;` in a CSV label, or a JSON list.
    Only reads the text (a malformed file is left for the reader to refuse)."""
    manifest = Path(manifest).expanduser()
    try:
        with open(manifest, encoding="utf-8-sig", newline="") as f:
            if manifest.suffix.lower() in (".jsonl", ".ndjson"):
                return any("labels" in fields or isinstance(fields.get("label"), list)
                           for _, fields in _json_rows(f, manifest))
            rows = _csv_rows(f, manifest, need_label=False)
            return any("labels" in fields or SEPARATOR in (fields.get("label") or "") for _, fields in rows)
    except (OSError, UnicodeDecodeError, DataError):
        return False


def iter_multilabel_rows(manifest: Path):
    """(row, its label names) in file order; the first malformed row is a DataError naming `file:line`."""
    base = manifest.parent
    try:
        f = open(manifest, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DataError(f"{manifest}: cannot open the manifest ({e.strerror}) — give a CSV or JSON Lines file of "
                        f"{_FORMAT} rows") from None
    with f:
        is_json = manifest.suffix.lower() in (".jsonl", ".ndjson")
        raw = _json_rows(f, manifest) if is_json else _csv_rows(f, manifest, need_label=False)
        for line, fields in raw:
            where = f"{manifest}:{line}"
            key = "labels" if "labels" in fields else "label"
            if key not in fields:
                raise DataError(f"{where}: no 'labels' {'key' if is_json else 'column'} — every row needs {_FORMAT}")
            path = fields.get("path")
            if not isinstance(path, str) or not path:
                raise DataError(f"{where}: empty path — give every row the image's path (relative to the "
                                "manifest's folder)")
            names = _names(fields[key], where)
            split = fields.get("split") or None
            if split is not None and split not in SPLIT_NAMES:
                raise DataError(f"{where}: unknown split {split!r} — use train, val or test, or leave it empty to "
                                "split the row off by --val-split/--test-split")
            yield ManifestRow(base / os.path.expanduser(path), None, split, where), names


def _names(value: object, where: str) -> tuple[str, ...]:
    """A row's label names: a `;`-separated text (empty: none) or a JSON list of texts."""
    if value is None or value == "":
        return ()
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        names = str(value).split(SEPARATOR)
    elif isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        names = [str(v) for v in value]
    else:
        raise DataError(f"{where}: labels must be text like 'sea;sunset' or a JSON list of texts, not "
                        f"{type(value).__name__}")
    for name in names:
        if not name.strip():
            raise DataError(f"{where}: an empty label name in {value!r} — separate names by one ';' with none "
                            "empty (an image with no label has an empty labels field)")
        if name != name.strip():
            raise DataError(f"{where}: label {name!r} has surrounding spaces — remove them (labels are compared "
                            "exactly)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{where}: label {repeated[0]!r} is listed twice in one row — list each label once")
    return tuple(names)


def read_multilabel(manifest: str | Path, val_split: float = 0.2, test_split: float = 0.0, seed: int = 0,
                    carve: bool = True) -> MultiLabelData:
    """A multi-label manifest's readable rows and targets. Rows marked train or unmarked are the train pool; a split
    without rows of its own is carved out of it (`carve`) by iterative stratification with `seed`."""
    manifest = Path(manifest).expanduser()
    rows: list[tuple[Path, tuple[str, ...], str]] = []
    skipped: list[tuple[Path, str]] = []
    first_seen: dict[Path, str] = {}
    n_rows = 0
    for row, names in iter_multilabel_rows(manifest):
        n_rows += 1
        if row.path in first_seen:
            raise DataError(f"{row.where}: {row.path} is listed again (first at {first_seen[row.path]}) — list "
                            "each image once")
        first_seen[row.path] = row.where
        reason = check_path(row)
        if reason is None:
            rows.append((row.path, names, row.split or "train"))
        else:
            skipped.append((row.path, reason))
    if n_rows == 0:
        raise DataError(f"{manifest}: lists no images — add one {_FORMAT} row per image after the header")
    if not rows:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"{manifest}: none of the {len(skipped)} listed files can be used{first} — check that the "
                        "paths are relative to the manifest's folder, or absolute")
    classes = tuple(sorted({n for _, names, _ in rows for n in names}))
    if not classes:
        raise DataError(f"{manifest}: no row names a label — give at least one image its labels")
    index = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(rows), len(classes)), np.uint8)
    for r, (_, names, _) in enumerate(rows):
        targets[r, [index[n] for n in names]] = 1
    splits = np.array([s for _, _, s in rows], dtype="<U5")
    if carve:
        _carve(splits, targets, val_split if not (splits == "val").any() else 0.0,
               test_split if not (splits == "test").any() else 0.0, seed)
    order = sorted(range(len(rows)), key=lambda r: (SPLITS.index(splits[r]), rows[r][0]))
    source = DataSource("manifest", str(Path(os.path.abspath(manifest))), n_rows, file_sha256(manifest))
    return MultiLabelData(manifest, classes, tuple(rows[r][0] for r in order), targets[order], splits[order],
                          tuple(sorted(skipped)), source)


def _carve(splits: np.ndarray, targets: np.ndarray, val: float, test: float, seed: int) -> None:
    """Mark test then val rows among the train rows, in place, label-stratified. A label whose every positive was
    carved away gets one back in train (the lowest row), since a label never trained on cannot be learnt."""
    pool = np.flatnonzero(splits == "train")
    for name, fraction in (("test", test), ("val", val / (1 - test) if test else val)):
        if fraction <= 0 or len(pool) < 2:
            continue
        taken = stratified_pick(targets[pool], fraction, seed)
        splits[pool[taken]] = name
        pool = np.flatnonzero(splits == "train")
    for label in np.flatnonzero(targets.any(0) & ~targets[splits == "train"].any(0)):
        carved = np.flatnonzero((splits != "train") & (targets[:, label] == 1))
        if len(carved) and (splits == "train").sum() > 0:
            splits[carved[0]] = "train"


def stratified_pick(targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Row indices forming about `fraction` of the rows, iteratively stratified over the labels (Sechidis, Tsoumakas
    and Vlahavas 2011, for two subsets): the label with the fewest rows left is placed first, each of its rows
    going to the subset that still wants most of that label (then most rows; then a seeded draw), so rare labels
    are spread before common ones fill the subsets; rows without labels fill what each subset still wants.
    Written out rather than taken from `iterstrat`, whose scikit-learn import cost ~1.5 s of a ~3 s warm train."""
    rng = np.random.default_rng(seed)
    y = np.asarray(targets, bool)
    n = len(y)
    n_take = min(n - 1, max(1, round(fraction * n)))
    want_rows = np.array([n_take, n - n_take], np.float64)
    want_labels = np.outer(want_rows / n, y.sum(0))  # [2 subsets, labels]
    subset = np.full(n, -1)
    left = y.copy()  # the labels of the rows not yet placed
    while True:
        counts = left.sum(0)
        if not counts.any():
            break
        fewest = np.flatnonzero(counts == counts[counts > 0].min())
        label = int(rng.choice(fewest))
        rows = np.flatnonzero(left[:, label])
        for row in rng.permutation(rows):
            best = _best(want_labels[:, label], want_rows, rng)
            subset[row] = best
            want_labels[best] -= y[row]
            want_rows[best] -= 1
            left[row] = False
    for row in rng.permutation(np.flatnonzero(subset < 0)):  # rows with no label
        best = _best(want_rows, want_rows, rng)
        subset[row] = best
        want_rows[best] -= 1
    return np.flatnonzero(subset == 0)


def _best(wanted: np.ndarray, rows_wanted: np.ndarray, rng: np.random.Generator) -> int:
    """The subset that wants most (ties: the one that wants most rows; then a seeded draw)."""
    top = np.flatnonzero(wanted == wanted.max())
    if len(top) > 1:
        top = top[rows_wanted[top] == rows_wanted[top].max()]
    return int(top[0] if len(top) == 1 else rng.choice(top))


@dataclass(frozen=True)
class MultiLabelSummary:
    """What `headstart check` says of a multi-label manifest: images per split, each label's positives per split,
    the labels that occur in no training image or in every one, images with no label, and the label pairs that
    occur together most (co-occurrence: images holding both)."""

    root: Path
    classes: tuple[str, ...]
    images: dict[str, int]
    positives: dict[str, dict[str, int]]
    never: tuple[str, ...]  # no training image has it: it cannot be learnt
    always: tuple[str, ...]  # every training image has it: nothing to tell apart
    unlabelled: int  # images with none of the labels (kept: they teach the negatives)
    pairs: tuple[tuple[str, str, int], ...]  # most frequent co-occurrences, most first
    skipped: tuple[tuple[Path, str], ...] = ()

    def to_dict(self) -> dict:
        return {"root": str(self.root), "multi_label": True, "classes": list(self.classes), "images": self.images,
                "positives": self.positives, "never": list(self.never), "always": list(self.always),
                "unlabelled": self.unlabelled, "co_occurrence": [{"labels": [a, b], "images": n}
                                                                 for a, b, n in self.pairs],
                "skipped": [{"path": str(p), "reason": r} for p, r in self.skipped]}


def summarize(data: MultiLabelData, top_pairs: int = 10) -> MultiLabelSummary:
    """The check's figures for a read manifest."""
    y = data.targets.astype(np.int64)
    train = data.part("train")
    both = y.T @ y  # [labels, labels]: images holding both
    pairs = [(data.classes[i], data.classes[j], int(both[i, j])) for i in range(len(data.classes))
             for j in range(i + 1, len(data.classes)) if both[i, j]]
    pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
    return MultiLabelSummary(
        data.root, data.classes, {s: int((data.splits == s).sum()) for s in SPLITS if (data.splits == s).any()},
        data.counts(), tuple(c for c, n in zip(data.classes, train.sum(0)) if n == 0),
        tuple(c for c, n in zip(data.classes, train.sum(0)) if len(train) and n == len(train)),
        int((y.sum(1) == 0).sum()), tuple(pairs[:top_pairs]), data.skipped)
