"""Near-duplicate groups kept on one side of the split (issue 26): honest validation on photos that come in groups.

Inspection photos often come in near-identical groups (the same part under several lights, the same cell
re-shot). A split that puts one member of a group in training and another in validation scores the copy, not
the model: on a grouped set the summary said 86 % balanced accuracy where held-out photos scored 25 %. So, before
the head trains, the photos of each group are moved to the side most of them were on, and validation scores
groups the model never saw.

A group is what a manifest's `group` column (CSV) or key (JSON Lines) says (the user knows the parts) or,
else, photos whose backbone features are near-duplicates: centred, L2-normalised features with a cosine
similarity of at least `GROUP_COSINE`, joined transitively up to `GROUP_MAX` photos a group, like `headstart
check`'s near-duplicate findings (same measure and threshold: JPEG re-encodes of one hymenoptera photo scored a
median 0.935 against it, brightened copies 0.986, no two distinct photos 0.85). Only splits headstart carved
itself move: a validation folder or a manifest's `split` column is the user's choice, kept as given.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from headstart.data.dataset import Dataset
from headstart.records import DataSource

log = logging.getLogger(__name__)

GROUP_COSINE = 0.85  # data.check's NEAR_DUPLICATE_COSINE: see the module's doc
# The most photos one feature group holds: copies of one thing are a few shots (the bench's grouped set: 5). On
# elpv's solar cells, where defect-free cells look alike, joining every pair at 0.85 chained 1,432 of 1,843
# photos into 72 groups, the largest 321: a class of look-alikes, not copies, and a split that lost its balance.
GROUP_MAX = 8
# A pair is a copy only when it is this much more alike than either photo is to its `GROUP_MAX`-th nearest
# neighbour. On natural photos that neighbour is a distinct photo (hymenoptera: distinct pairs at most 0.80, copies
# under other lights or JPEG qualities 0.85-0.98, median 0.93-0.98); on elpv's cells it is a look-alike at
# ~0.9, and without this rule feature groups held 1,244 of 1,843 photos: validation (0.670 / 0.481 balanced)
# fell 13 points below the held-out photos (0.738 / 0.611), which are split by name, groups or not.
GROUP_MARGIN = 0.05
GROUP_COLUMN = "group"
VAL_DIR_NAMES = ("val", "valid", "validation")  # data.scan's: a folder of these holds the user's own split


@dataclass(frozen=True)
class Grouping:
    """What keeping groups together did: the groups of two or more photos in the carved splits, the photos in
    them, and the photos that changed split for it."""

    groups: int = 0
    photos: int = 0
    moved: int = 0
    source: str = ""  # "manifest" (the user's group column) or "features" (near-duplicates)
    to: tuple[tuple[str, str], ...] = ()  # (photo, its new split) for each photo moved: `apply_moves` replays them


def near_duplicate_groups(features: np.ndarray, labels: np.ndarray | None = None, threshold: float = GROUP_COSINE,
                          most: int = GROUP_MAX, chunk: int = 1024) -> np.ndarray:
    """A group id for every row of `features` (a row alone is its own group; the id is the group's first row):
    rows whose centred, normalised features reach `threshold` cosine similarity (and, given `labels`, that share
    a label) and are `GROUP_MARGIN` more alike than either is to its `most`-th nearest neighbour are joined, the
    most similar pairs first, while a group stays within `most` photos.

    Only photos of one label: a copy in validation leaks its training twin's label, a look-alike of another class
    leaks nothing. On elpv the groups mixed labels (cells of the four classes look alike), so a group's class was
    no class, and keeping them together moved validation photos between classes."""
    unit = np.asarray(features, np.float32) - np.asarray(features, np.float32).mean(0)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    n, k = len(unit), min(most, len(unit) - 1)
    pairs, kth = [], np.full(n, -1.0)  # kth: each row's similarity to its `most`-th nearest other row
    for start in range(0, n if k > 0 else 0, chunk):
        sims = unit[start:start + chunk] @ unit.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -1.0  # not a row with itself
        near = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        kth[start:start + len(sims)] = np.partition(sims, -k, axis=1)[:, -k] if k < n - 1 else -1.0
        for r, cols in enumerate(near):
            pairs += [(float(sims[r, c]), start + r, int(c)) for c in cols if sims[r, c] >= threshold
                      and (labels is None or labels[start + r] == labels[c])]
    parent, size = np.arange(n), np.ones(n, int)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for sim, i, j in sorted(pairs, key=lambda p: (-p[0], min(p[1], p[2]), max(p[1], p[2]))):
        if sim < max(kth[i], kth[j]) + GROUP_MARGIN:  # no closer than the crowd of look-alikes around them
            continue
        a, b = root(i), root(j)
        if a != b and size[a] + size[b] <= most:
            parent[max(a, b)], size[min(a, b)] = min(a, b), size[a] + size[b]
    return np.array([root(i) for i in range(n)])


def _csv_columns(manifest: Path) -> list[dict[str, str]]:
    """A CSV manifest's rows with lower-cased column names (as `data.manifest` reads them); [] for JSON Lines."""
    if manifest.suffix.lower() != ".csv":
        return []
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        return [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]


def _json_columns(manifest: Path) -> list[dict[str, str]]:
    """A JSON Lines manifest's objects with lower-cased keys and text values (as `data.manifest` reads them; it
    has checked every line by the time groups are read); [] for CSV."""
    if manifest.suffix.lower() not in (".jsonl", ".ndjson"):
        return []
    with open(manifest, encoding="utf-8-sig") as f:
        objects = [json.loads(line) for line in f if line.strip()]
    return [{str(k).strip().lower(): "" if v is None else str(v).strip() for k, v in obj.items()}
            for obj in objects if isinstance(obj, dict)]


def manifest_groups(manifest: Path) -> dict[Path, str]:
    """{resolved photo path: group} from a manifest's `group` column (CSV) or key (JSON Lines), paths relative to
    the manifest's folder, as `data.manifest` reads them; empty when no row names a group."""
    out = {}
    for row in _csv_columns(manifest) or _json_columns(manifest):
        if row.get("path") and row.get(GROUP_COLUMN):
            out[(manifest.parent / os.path.expanduser(row["path"])).resolve()] = row[GROUP_COLUMN]
    return out


def user_split(source_kind: str, root: Path) -> bool:
    """Whether the validation split is the user's own (a val/ folder, a manifest's split column), not carved."""
    if source_kind == "folder":
        return any((root / name).is_dir() for name in VAL_DIR_NAMES)
    return any(row.get("split") for row in _csv_columns(root))


def keep_together(splits: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, Grouping]:
    """`splits` with every group of carved train/val rows on one side, each class keeping as many validation
    photos as before (within one group's size). Per class (a group's most common label), the groups most in
    validation already fill it first, so few photos move; rows of the test split stay where they are.

    A vote (each group to the side most of it was on) shrank elpv's validation split from 369 photos to 104:
    with a fifth of each group in validation, nearly every group voted train."""
    out = splits.copy()
    pool = np.flatnonzero(np.isin(splits, ("train", "val")))
    members: dict[int, list[int]] = {}
    for i in pool:
        members.setdefault(int(groups[i]), []).append(int(i))
    by_class: dict[int, list[list[int]]] = {}
    for rows in members.values():
        by_class.setdefault(Counter(labels[rows].tolist()).most_common(1)[0][0], []).append(rows)
    for label, class_groups in by_class.items():
        room = int(((splits == "val") & (labels == label)).sum())
        class_groups.sort(key=lambda rows: (-float(np.mean(splits[rows] == "val")), rows[0]))
        for rows in class_groups:
            side = "val" if room > 0 and len(rows) <= max(room, 1) + len(rows) // 2 else "train"
            room -= len(rows) if side == "val" else 0
            out[rows] = side
    for label in by_class:  # a class left without training photos could not be learned, nor one without
        rows = pool[labels[pool] == label]  # validation photos judged: its split stays as it was
        if not (out[rows] == "train").any() or ((splits[rows] == "val").any() and not (out[rows] == "val").any()):
            out[rows] = splits[rows]
    sizes = [len(rows) for rows in members.values() if len(rows) > 1]
    return out, Grouping(len(sizes), sum(sizes), int((out != splits).sum()))


def group_ids(paths: list[Path], features: np.ndarray, labels: np.ndarray, named: dict[Path, str]
              ) -> tuple[np.ndarray, str]:
    """Group ids for `paths`: the manifest's groups when it names any (photos it leaves out are alone), else the
    features' near-duplicate groups of photos with one label."""
    if named:
        index = {g: i for i, g in enumerate(sorted(set(named.values())))}
        ids = [index[named[p.resolve()]] if p.resolve() in named else len(index) + k for k, p in enumerate(paths)]
        return np.array(ids), "manifest"
    return near_duplicate_groups(features, labels), "features"


def row_groups(source: DataSource | None, paths: list[Path], features: np.ndarray, labels: np.ndarray
               ) -> tuple[np.ndarray, str]:
    """`group_ids` of the rows `paths` of a dataset read from `source`: its manifest's groups, if it names any."""
    named = manifest_groups(Path(source.path)) if source is not None and source.kind == "manifest" else {}
    return group_ids(paths, features, labels, named)


def regroup(dataset: Dataset, paths: list[Path], features: np.ndarray, splits: np.ndarray, labels: np.ndarray
            ) -> tuple[Dataset, Grouping]:
    """`dataset` with the groups of its carved train/val split each on one side (`keep_together`), given its
    features (rows: `paths`, `splits`, `labels`); `dataset` itself when its validation split is the user's, or
    when no photo moves."""
    source = dataset.source
    if source is None or source.kind == "files" or user_split(source.kind, Path(source.path)) \
            or "val" not in set(splits.tolist()):
        return dataset, Grouping()
    ids, how = row_groups(source, paths, features, labels)
    new, grouping = keep_together(splits, labels, ids)
    grouping = replace(grouping, source=how)
    if not grouping.moved:
        return dataset, grouping
    grouping = replace(grouping, to=tuple((str(p), str(b)) for p, a, b in zip(paths, splits, new) if a != b))
    return apply_moves(dataset, grouping.to), grouping


def apply_moves(dataset: Dataset, moved: tuple[tuple[str, str], ...]) -> Dataset:
    """`dataset` with the photos a training run's groups moved (`Decision.moved`) in their new splits: the split
    that run validated on, carved again (a report on the training folder's validation split needs it)."""
    if not moved:
        return dataset
    split_of = dict(moved)
    samples = [replace(s, split=split_of.get(str(s.path), s.split)) for s in dataset.samples]
    samples.sort(key=lambda s: (s.split, s.label, s.path))  # as `Dataset` orders them
    return replace(dataset, samples=tuple(samples))


def describe(grouping: Grouping) -> str:
    """The summary's line: how many groups were kept on one side, and how they were found."""
    if not grouping.groups:
        return ""
    how = "from the manifest's group column" if grouping.source == "manifest" else "near-duplicates by features"
    return (f"{grouping.groups} groups of {grouping.photos} photos ({how}) kept on one side of the split; "
            f"{grouping.moved} photos moved for it")


def log_grouping(grouping: Grouping) -> None:
    if grouping.groups:
        log.info("validation: %s", describe(grouping))
