"""Manifests: a CSV or JSON Lines file of `path,label[,split]` rows, for photos that do not live in class folders.

A manifest becomes the same `data.scan.Dataset` a folder scan makes, so the cache, check, report and resume work
unchanged. Paths are relative to the manifest's folder (absolute ones are kept). A row whose file is missing or
cannot be opened is skipped and named, like any bad file; a row that is malformed (an empty or space-padded label,
an unknown split, a missing column, a line that is not JSON) is one `DataError` naming `file:line` and what to do,
raised while reading, before any image is touched.

Rows are read one at a time (`iter_rows`): memory holds the per-image index the Dataset needs, never the text.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from headstart.data import surprises
from headstart.data.dataset import Dataset, assemble
from headstart.data.imageio import describe_os_error, unreadable_reason
from headstart.errors import DataError
from headstart.paths import file_sha256
from headstart.records import DataSource

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
SPLIT_NAMES = ("train", "val", "test")
_FORMAT = "path,label[,split] (split one of train, val, test)"
_JSON_EXAMPLE = '{"path": "photos/a.jpg", "label": "cat"}'


@dataclass(frozen=True)
class ManifestRow:
    """One row: the image's path (resolved against the manifest's folder), its label (None when the manifest has
    no label column and none was required), its split (None: split by val_split/test_split), and where it is."""

    path: Path
    label: str | None
    split: str | None
    where: str  # "labels.csv:7", for messages


def is_manifest(path: str | Path) -> bool:
    """Whether `path` names a manifest file rather than a folder: a .csv/.jsonl/.ndjson name that is no folder."""
    p = Path(path)
    return p.suffix.lower() in MANIFEST_SUFFIXES and not p.is_dir()


def iter_rows(manifest: str | Path, need_label: bool = True) -> Iterator[ManifestRow]:
    """The manifest's rows in file order, one at a time; blank lines are skipped. Raises DataError naming the
    row for the first malformed one. With need_label=False (inputs for predict) only a path is required and a
    label, if present, is read as given, unchecked."""
    manifest = Path(manifest).expanduser()
    base = manifest.parent
    try:
        f = open(manifest, encoding="utf-8-sig", newline="")  # -sig: spreadsheet exports often begin with a BOM
    except OSError as e:
        raise DataError(f"{manifest}: cannot open the manifest ({describe_os_error(e, manifest)}) — give the path of "
                        f"a CSV or JSON Lines file of {_FORMAT} rows") from None
    with f:
        is_json = manifest.suffix.lower() in (".jsonl", ".ndjson")
        raw = _json_rows(f, manifest) if is_json else _csv_rows(f, manifest, need_label)
        kind = "key" if is_json else "column"
        try:
            for line, fields in raw:
                yield _row(fields, f"{manifest}:{line}", base, need_label, kind)
        except UnicodeDecodeError as e:
            raise DataError(f"{manifest}: is not UTF-8 text ({e.reason} at byte {e.start} of a line) — save it as "
                            "UTF-8 (in a spreadsheet: CSV UTF-8)") from None


def _csv_rows(f, manifest: Path, need_label: bool) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.reader(f, strict=True)  # strict: a stray quote is an error naming the row, not a silent label
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"{manifest}:1: unreadable CSV header ({e}) — the first line must name the columns "
                        f"{_FORMAT}") from None
    if not header:
        raise DataError(f"{manifest}: is empty — its first line must name the columns {_FORMAT}, one row per image "
                        "after it")
    names = [h.strip().lower() for h in header]
    for column in ("path", "label") if need_label else ("path",):
        if column == "label" and "labels" in names:
            raise DataError(f"{manifest}:1: a 'labels' column makes a multi-label manifest, which `train`, "
                            "`evaluate`, `report` and `check` read; this command takes single-label rows (path,label)")
        if column not in names:
            shown = ", ".join(repr(h) for h in header)
            raise DataError(f"{manifest}:1: no {column!r} column in the header ({shown}) — the first line must name "
                            f"the columns {_FORMAT}")
    line = reader.line_num
    while True:
        start = line + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{manifest}:{start}: malformed CSV ({e}) — quote fields that hold commas or quotes") \
                from None
        line = reader.line_num
        if not values or (len(values) == 1 and not values[0].strip()):
            continue
        if len(values) != len(names):
            raise DataError(f"{manifest}:{start}: {len(values)} field(s) where the header names {len(names)} "
                            f"({','.join(names)}) — give every row the same columns (quote a path holding a comma)")
        yield start, dict(zip(names, values))


def _json_rows(f, manifest: Path) -> Iterator[tuple[int, dict[str, object]]]:
    for line, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest}:{line}: not valid JSON ({e.msg}, column {e.colno}) — each line must be one "
                            f"object like {_JSON_EXAMPLE}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{manifest}:{line}: a JSON {type(obj).__name__}, not an object — each line must be one "
                            f"object like {_JSON_EXAMPLE}")
        yield line, {str(k).strip().lower(): v for k, v in obj.items()}


def _row(fields: dict[str, object], where: str, base: Path, need_label: bool, kind: str) -> ManifestRow:
    path = _text(fields, "path", where, kind, required=True)
    if not path:
        raise DataError(f"{where}: empty path — give every row the image's path (relative to the manifest's folder)")
    label = _text(fields, "label", where, kind, required=need_label)
    if need_label:
        if not label or not label.strip():
            raise DataError(f"{where}: empty label for {path!r} — give every row a label, or remove the row")
        if label != label.strip():
            raise DataError(f"{where}: label {label!r} has surrounding spaces — remove them (labels are compared "
                            f"exactly, so {label!r} and {label.strip()!r} would be two classes)")
    split = _text(fields, "split", where, kind, required=False) or None
    if need_label and split is not None and split not in SPLIT_NAMES:
        raise DataError(f"{where}: unknown split {split!r} — use train, val or test, or leave it empty to split "
                        "the row off by --val-split/--test-split")
    return ManifestRow(base / os.path.expanduser(path), label, split, where)


def _text(fields: dict[str, object], key: str, where: str, kind: str, required: bool) -> str | None:
    """A field as text: JSON numbers are labels too (3 -> '3'); anything else that is not a string is refused."""
    if key not in fields:
        if not required:
            return None
        raise DataError(f"{where}: no {key!r} {kind} — every row needs {_FORMAT}")
    value = fields[key]
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: {key} is a JSON {type(value).__name__}, not text — write it as a string")
    return str(value)


def check_path(row: ManifestRow) -> str | None:
    """Why the row's file cannot be used (named like any bad file, with the row), or None. Opens, never reads."""
    if not os.path.lexists(row.path):
        hint = " (the path has surrounding spaces)" if str(row.path.name) != str(row.path.name).strip() else ""
        return f"no such file{hint} (listed at {row.where})"
    reason = unreadable_reason(row.path)
    return None if reason is None else f"{reason} (listed at {row.where})"


def input_paths(manifest: str | Path) -> list[Path]:
    """The paths of a manifest of inputs (for predict), in file order, duplicates kept: one result per row.
    Every row is parsed before the list is returned, so a malformed one costs nothing."""
    return [row.path for row in iter_rows(manifest, need_label=False)]


def scan_manifest(manifest: str | Path, val_split: float = 0.2, test_split: float = 0.0, seed: int = 0) -> Dataset:
    """The Dataset of a manifest's rows, as `scan_folder` makes one of a folder: rows marked train or with no split
    are the train pool, and a split without rows of its own is carved out of it per class by val_split/test_split
    (a folder without val/ is split the same way). Rows whose file is missing or cannot be opened are skipped and
    named; a path listed twice is refused, since it would be trained (or validated) on twice."""
    manifest = Path(manifest).expanduser()
    counted = _Counted(iter_rows(manifest))
    return _rows_dataset(counted, manifest, val_split, test_split, seed,
                         lambda: DataSource("manifest", str(Path(os.path.abspath(manifest))), counted.n,
                                            file_sha256(manifest)))


def scan_pairs(paths: Sequence[str | Path], labels: Sequence[object], val_split: float = 0.2,
               test_split: float = 0.0, seed: int = 0) -> Dataset:
    """The Dataset of image paths and their labels given as two lists (scikit-learn's X and y), under a manifest's
    rules: a path given twice is refused, a missing or unopenable file skipped and named, val/test carved per class."""
    if len(paths) != len(labels):
        raise DataError(f"{len(paths)} images but {len(labels)} labels: give one label per image")
    rows = (ManifestRow(Path(os.fsdecode(p)).expanduser(), str(label), None, f"image {n + 1} of those given")
            for n, (p, label) in enumerate(zip(paths, labels)))
    where = Path(f"<{len(paths)} images given as a list>")
    return _rows_dataset(rows, where, val_split, test_split, seed, lambda: DataSource("files", str(where), len(paths)))


class _Counted:
    """An iterator of rows that counts what it yielded."""

    def __init__(self, rows: Iterator[ManifestRow]) -> None:
        self.rows, self.n = rows, 0

    def __iter__(self) -> Iterator[ManifestRow]:
        for row in self.rows:
            self.n += 1
            yield row


def _rows_dataset(rows: Iterable[ManifestRow], manifest: Path, val_split: float, test_split: float, seed: int,
                  source: Callable[[], DataSource]) -> Dataset:
    found: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}, "test": {}}
    skipped: list[tuple[Path, str]] = []
    first_seen: dict[Path, str] = {}  # the per-image index: path -> where it was listed
    n_rows = 0
    for row in rows:
        n_rows += 1
        if row.path in first_seen:
            raise DataError(f"{row.where}: {row.path} is listed again (first at {first_seen[row.path]}) — list "
                            "each image once")
        first_seen[row.path] = row.where
        per_class = found[row.split or "train"].setdefault(row.label, [])
        reason = check_path(row)
        if reason is None:
            per_class.append(row.path)
        else:
            skipped.append((row.path, reason))
    del first_seen
    if n_rows == 0:
        raise DataError(f"{manifest}: lists no images — add one {_FORMAT} row per image after the header")
    for per_class in found.values():
        for files in per_class.values():
            files.sort()
    classes = tuple(sorted({c for per_class in found.values() for c in per_class}))
    _check_labels(manifest, found, classes, skipped)
    carve_val, carve_test = (0.0 if found["val"] else val_split), (0.0 if found["test"] else test_split)
    samples = assemble({s: c for s, c in found.items() if c}, classes, carve_val, carve_test, seed)
    dataset = Dataset(root=manifest, classes=classes, samples=samples, skipped=tuple(sorted(skipped)),
                      source=source())
    _warn_unvalidated(dataset, validating=carve_val > 0 or bool(found["val"]))
    surprises.warn_duplicates({s: c for s, c in found.items() if c})
    return dataset


def _check_labels(manifest: Path, found: dict[str, dict[str, list[Path]]], classes: tuple[str, ...],
                  skipped: list[tuple[Path, str]]) -> None:
    """What scan_folder refuses in a folder, in a manifest's words: no usable image at all, a label whose every
    image is unusable, a label with no training rows, fewer than two labels."""
    totals = {c: sum(len(per_class.get(c, [])) for per_class in found.values()) for c in classes}
    if not any(totals.values()):
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"{manifest}: none of the {len(skipped)} listed files can be used{first} — check that the "
                        "paths are relative to the manifest's folder, or absolute")
    empty = [c for c in classes if totals[c] == 0]
    if empty:
        raise DataError(f"{manifest}: label(s) {', '.join(map(repr, empty))} have no usable images (every file listed "
                        "for them is missing or unreadable) — fix their paths or remove their rows")
    untrained = [c for c in classes if not found["train"].get(c)]
    if untrained:
        raise DataError(f"{manifest}: label(s) {', '.join(map(repr, untrained))} have no train rows — mark some of "
                        "their rows train (or leave the split empty), or remove them")
    if len(classes) < 2:
        raise DataError(f"{manifest}: lists only one label ({classes[0]!r}); a classifier needs at least two")


def _warn_unvalidated(dataset: Dataset, validating: bool) -> None:
    if not validating:
        return
    for cls, n in dataset.class_counts("val").items():
        if n == 0:
            log.warning("%s: label %r has no validation image, so its accuracy is not measured — add val rows for "
                        "it, or more rows to split from", dataset.root, cls)
