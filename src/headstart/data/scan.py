"""Finding the images: class-folder scanning, train/val/test splitting, and input expansion for predict.

Scanning never decodes an image (that happens later, in parallel, via load_rgb); it only looks at names,
extensions and file sizes, so a folder of thousands of photos is scanned in well under a second.
"""

from __future__ import annotations

import errno
import logging
import numbers
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from headstart.data import manifest, surprises
from headstart.data.dataset import Dataset, assemble
from headstart.data.imageio import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    describe_os_error,
    is_image_path,
    read_size,
    unreadable_reason,
)
from headstart.data.walk import LEAVES_CLASS_FOLDER, ignored, inside, is_dir, walk_files
from headstart.errors import DataError
from headstart.records import DataSource

__all__ = ["check_root", "scan_folder", "typical_short_side"]

logger = logging.getLogger(__name__)

_VAL_DIR_NAMES = ("val", "valid", "validation")
_EXPECTED_LAYOUT = (
    "expected photos/<class>/*.jpg (one sub-folder per class) or photos/train/<class>/ + photos/val/<class>/"
)


def scan_folder(
    root: str | Path, val_split: float = 0.2, test_split: float = 0.0, seed: int = 0
) -> Dataset:
    """Index a folder of images laid out as root/<class>/** or root/train|val|test/<class>/**, or the rows of a
    manifest (a .csv/.jsonl file of path,label[,split]: `data.manifest`).

    Splits that have no folder of their own are carved out of train per class (stratified), using
    val_split/test_split and one np.random.default_rng(seed) for the whole call.
    """
    root = Path(root).expanduser()
    check_root(root)
    _check_fractions(val_split, test_split)
    if manifest.is_manifest(root):
        return manifest.scan_manifest(root, val_split, test_split, seed)

    skipped: list[tuple[Path, str]] = []
    split_dirs = _detect_split_dirs(root)
    real_root = Path(os.path.realpath(root))
    if split_dirs is None:
        found = {"train": _scan_class_dirs(root, skipped, real_root)}
    else:
        found = {split: _scan_class_dirs(d, skipped, real_root) for split, d in split_dirs.items()}
        for split in ("val", "test"):
            # An empty val/ or test/ folder is treated as absent, so that split is carved from train.
            if split in found and not any(found[split].values()):
                logger.info("%s: %s/ holds no images; splitting it off train instead", root, split_dirs[split].name)
                del found[split]

    classes = tuple(sorted({c for per_class in found.values() for c in per_class}))
    _check_classes(root, found, classes, skipped)

    carve_val = val_split if "val" not in found else 0.0
    carve_test = test_split if "test" not in found else 0.0
    samples = assemble(found, classes, carve_val, carve_test, seed)
    dataset = Dataset(root=root, classes=classes, samples=samples, skipped=tuple(sorted(skipped)),
                      source=DataSource("folder", str(Path(os.path.abspath(root)))))
    surprises.warn_all(dataset, found, [root] if split_dirs is None else [root, *split_dirs.values()],
                       validating=carve_val > 0 or "val" in found)
    return dataset


def typical_short_side(paths: Sequence[Path], sample: int = 64) -> int | None:
    """The median short side of up to `sample` evenly spaced images, read from their headers (nothing is
    decoded); None when none of them can be opened."""
    step = max(1, len(paths) // sample)
    sides = []
    for path in list(paths)[::step][:sample]:
        try:
            sides.append(min(read_size(path)))
        except ImageDecodeError:  # unreadable files are reported later, by the decoder; here they only don't count
            continue
    return int(np.median(sides)) if sides else None


# --- scanning helpers -------------------------------------------------------------------------------


def _check_fractions(val_split: float, test_split: float) -> None:
    for name, value in (("val_split", val_split), ("test_split", test_split)):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= value < 1.0
        if not ok:
            raise DataError(f"{name}={value!r} is out of range — use a fraction in [0, 1), e.g. 0.2")
    if val_split + test_split >= 1.0:
        raise DataError(
            f"val_split + test_split = {val_split + test_split:g} leaves nothing to train on — "
            "keep the sum below 1 (e.g. val_split=0.2, test_split=0.1)"
        )


def check_root(root: Path) -> None:
    """One line saying what DATA is when it is not a folder, and what to pass instead."""
    hint = "point headstart at a folder of class sub-folders (photos/<class>/*.jpg)"
    if root.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        hint = "give the path of a manifest (a CSV or JSON Lines file of path,label[,split] rows)"
    try:
        st = root.stat()
    except OSError as e:
        if e.errno == errno.ENOENT and not os.path.islink(root) and root.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
            raise DataError(f"{root}: no such file — {hint}") from None
        if e.errno == errno.ENOENT and not os.path.islink(root):
            raise DataError(f"{root}: no such folder — {hint}") from None
        raise DataError(f"{root}: cannot open the folder ({describe_os_error(e, root)}) — {hint}") from None
    if stat.S_ISDIR(st.st_mode):
        return
    if stat.S_ISREG(st.st_mode) and root.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        return  # a manifest (data.manifest)
    if stat.S_ISREG(st.st_mode):
        guess = f" (for this image probably {root.parent.parent})" if is_image_path(root) else ""
        raise DataError(
            f"{root}: is a file, not a folder — pass the folder that holds one sub-folder per class{guess}"
        )
    raise DataError(f"{root}: is not a folder — {hint}")


def _subdirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{folder}: cannot read folder ({describe_os_error(e, folder)}) — check its permissions") from e
    return [Path(e.path) for e in entries if not ignored(e.name) and is_dir(e)]


def _detect_split_dirs(root: Path) -> dict[str, Path] | None:
    """{split: folder} for a train/val/test layout, or None for a plain class-folder layout."""
    by_name: dict[str, list[Path]] = {}
    for d in _subdirs(root):
        by_name.setdefault(d.name.lower(), []).append(d)
    train = by_name.get("train", [])
    vals = [d for name in _VAL_DIR_NAMES for d in by_name.get(name, [])]
    tests = by_name.get("test", [])
    if len(train) != 1:
        return None  # no train/ (or Train/ and train/ both, which only makes sense as class names)
    others = [d for name, ds in by_name.items() if name not in ("train", "test", *_VAL_DIR_NAMES) for d in ds]
    if not vals and not tests and others:
        return None  # "train" is just one class folder among others
    if len(vals) > 1:
        names = ", ".join(f"{d.name}/" for d in vals)
        raise DataError(f"{root}: found several validation folders ({names}) — keep only one of them")
    if len(tests) > 1:
        raise DataError(f"{root}: found several test folders ({', '.join(d.name for d in tests)}) — keep only one")
    if others:
        logger.warning(
            "%s: ignoring folders outside train/val/test: %s", root, ", ".join(d.name for d in others)
        )
    dirs = {"train": train[0]}
    if vals:
        dirs["val"] = vals[0]
    if tests:
        dirs["test"] = tests[0]
    return dirs


def _scan_class_dirs(folder: Path, skipped: list[tuple[Path, str]], real_root: Path) -> dict[str, list[Path]]:
    """{class name: sorted usable image paths} for every class sub-folder of `folder`, empty ones included."""
    found: dict[str, list[Path]] = {}
    for class_dir in _subdirs(folder):
        real_class = Path(os.path.realpath(class_dir))
        if class_dir.is_symlink() and inside(real_class, real_root):
            # Another folder of the data under a second name: its photos would count for two classes.
            skipped.append((class_dir, f"class folder is a link to {real_class}, inside the data folder"))
            continue
        images = found.setdefault(class_dir.name, [])
        for entry in walk_files(class_dir, skipped, data_root=real_root):
            reason = _unusable_reason(entry, real_class, real_root)
            if reason is None:
                images.append(Path(entry.path))
            else:
                skipped.append((Path(entry.path), reason))
        images.sort()
    return found


def _unusable_reason(entry: os.DirEntry, real_class: Path, real_root: Path) -> str | None:
    suffix = Path(entry.name).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        return f"not an image ({suffix})" if suffix else "not an image (no extension)"
    # Opening (not reading) the file finds what stat cannot: no read permission, a symlink loop.
    reason = unreadable_reason(entry.path)
    if reason is None and entry.is_symlink():
        target = os.path.realpath(entry.path)
        if inside(target, real_root) and not inside(target, real_class):
            return f"{LEAVES_CLASS_FOLDER} (points to {target})"
    return reason


def _check_classes(
    root: Path,
    found: dict[str, dict[str, list[Path]]],
    classes: tuple[str, ...],
    skipped: list[tuple[Path, str]],
) -> None:
    n_images = sum(len(files) for per_class in found.values() for files in per_class.values())
    if not classes:
        loose = [p for p in root.iterdir() if p.is_file() and is_image_path(p)]
        if loose:
            raise DataError(
                f"{root}: found {len(loose)} images but no class folders — "
                f"move them into one sub-folder per class; {_EXPECTED_LAYOUT}"
            )
        raise DataError(f"{root}: no class folders found — {_EXPECTED_LAYOUT}")
    if n_images == 0:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        extra = f"; skipped {len(skipped)} non-image or empty file(s)" if skipped else ""
        raise DataError(
            f"{root}: no images found in the class folders (looked for {exts}{extra}) — {_EXPECTED_LAYOUT}"
        )

    totals = {c: sum(len(per_class.get(c, [])) for per_class in found.values()) for c in classes}
    empty = [c for c in classes if totals[c] == 0]
    if empty:
        why = _first_reason(root, empty, skipped)
        raise DataError(
            f"{root}: class folder(s) {_quote(empty)} contain no usable images{why} — "
            "add images or remove the folder(s)"
        )
    untrained = [c for c in classes if not found["train"].get(c)]
    if untrained:
        raise DataError(
            f"{root}: class(es) {_quote(untrained)} have no images under train/ — add training images or remove them"
        )
    if len(classes) < 2:
        raise DataError(
            f"{root}: found only one class ({_quote(classes)}); a classifier needs at least two class folders"
        )


def _first_reason(root: Path, classes: list[str], skipped: list[tuple[Path, str]]) -> str:
    """' (first skipped file: reason)' for the first skipped entry under one of `classes`, or ''."""
    for path, reason in sorted(skipped):
        rel = path.relative_to(root).parts if path.is_relative_to(root) else ()
        if any(part in classes for part in rel[:2]):
            return f" ({path}: {reason})"
    return ""


def _quote(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


