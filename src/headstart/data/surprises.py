"""Warnings about a scanned dataset that trains, but not as the user probably expects.

Each warning names what it found and what to do: a class left without validation images, a val/ folder
missing a class, images lying loose next to the class folders (ignored), the same photo in two classes or
in both train/ and val/. Only files of equal size are hashed, first their opening and closing 4 KiB, so a scan
stays cheap (4,317 flowers: 0.1 s, with warm disk caches).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from headstart.data.dataset import Dataset
from headstart.data.imageio import is_image_path

logger = logging.getLogger("headstart.data.scan")  # the warnings are the scan's, wherever they are worked out

MAX_LISTED = 5  # duplicate groups named one by one; the rest are counted
MAX_LISTED_COPIES = 10  # files named in one duplicate group; the rest are counted
_ENDS_BYTES = 4096  # of each end: the opening bytes of photos from one camera are often identical, not the last
_CHUNK = 1 << 20

Where = tuple[str, str]  # (split, class)


def warn_all(
    dataset: Dataset, found: dict[str, dict[str, list[Path]]], class_parents: Sequence[Path], validating: bool
) -> None:
    """Log every surprise in a scan; `class_parents` are the folders that hold class folders."""
    warn_unvalidated(dataset, found, validating)
    warn_loose_images(class_parents)
    warn_duplicates(found)


def warn_unvalidated(dataset: Dataset, found: dict[str, dict[str, list[Path]]], validating: bool) -> None:
    if not validating:
        return  # no validation asked for (val_split=0 and no val/ folder): nothing goes unmeasured by surprise
    counts = dataset.class_counts("val")
    missing = [c for c, n in counts.items() if n == 0]
    if not missing:
        return
    if "val" in found:
        folder = dataset.root / _val_folder_name(found, dataset)
        logger.warning(
            "%s: the validation folder has no images of class(es) %s, so their accuracy is not measured — "
            "add some to %s", folder, _quote(missing), ", ".join(str(folder / c) for c in missing),
        )
        return
    totals = dataset.class_counts()
    for cls in missing:
        logger.warning(
            "%s: class %r has only %d image(s): none is left to validate it, so its accuracy is not measured "
            "— add more images to its folder", dataset.root, cls, totals[cls],
        )


def _val_folder_name(found: dict[str, dict[str, list[Path]]], dataset: Dataset) -> str:
    for files in found["val"].values():
        if files:
            return files[0].relative_to(dataset.root).parts[0]
    return "val"


def warn_loose_images(class_parents: Iterable[Path]) -> None:
    """Images lying directly in a folder of class folders belong to no class and are left out."""
    for folder in class_parents:
        try:
            loose = sorted(e.name for e in os.scandir(folder)
                           if not e.name.startswith(".") and is_image_path(e.name) and _is_file(e))
        except OSError:
            continue  # an unreadable folder was reported by the scan itself
        if loose:
            logger.warning(
                "%s: %d image(s) lie directly in this folder, next to the class folders (%s), and are ignored "
                "— move them into the folder of their class", folder, len(loose), _sample(loose),
            )


def warn_duplicates(found: dict[str, dict[str, list[Path]]]) -> None:
    groups = duplicate_groups((p, (split, cls)) for split, per_class in found.items()
                              for cls, files in per_class.items() for p in files)
    for group in groups[:MAX_LISTED]:
        classes = sorted({cls for _, (_, cls) in group})
        # A group is two or three copies as a rule; thousands of identical files (placeholders, a blank frame
        # exported again and again) made one warning of megabytes.
        listed = _sample([str(p) for p, _ in group], most=MAX_LISTED_COPIES)
        if len(classes) > 1:
            logger.warning("the same photo is in classes %s: %s — keep it only in the class it belongs to",
                           _quote(classes), listed)
        else:
            logger.warning("the same photo is in both %s: %s — validation counts a photo the model trained on; "
                           "keep it in one of them", " and ".join(sorted({f"{s}/" for _, (s, _) in group})), listed)
    if len(groups) > MAX_LISTED:
        logger.warning("... and %d more photo(s) found under two labels or splits", len(groups) - MAX_LISTED)


def duplicate_groups(files: Iterable[tuple[Path, Where]]) -> list[list[tuple[Path, Where]]]:
    """Groups of files with the same bytes filed under more than one (split, class)."""
    by_size: dict[int, list[tuple[Path, Where]]] = defaultdict(list)
    for path, where in files:
        try:
            by_size[os.stat(path).st_size].append((path, where))
        except OSError:
            continue
    groups = []
    for same_size in by_size.values():
        for same_ends in _split_by(same_size, _ends_digest):
            groups += _split_by(same_ends, _digest)
    return sorted(groups, key=lambda g: g[0][0])


def _split_by(files: list[tuple[Path, Where]], key) -> list[list[tuple[Path, Where]]]:
    """Sub-groups of equal key that span several (split, class); a group within one is no surprise."""
    if len({where for _, where in files}) < 2:
        return []
    by_key: dict[bytes, list[tuple[Path, Where]]] = defaultdict(list)
    for path, where in files:
        digest = key(path)
        if digest is not None:
            by_key[digest].append((path, where))
    return [g for g in by_key.values() if len({where for _, where in g}) > 1]


def _ends_digest(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # scanned files are regular, but never wait
        try:
            size = os.fstat(fd).st_size
            ends = os.pread(fd, _ENDS_BYTES, 0) + os.pread(fd, _ENDS_BYTES, max(size - _ENDS_BYTES, 0))
        finally:
            os.close(fd)
    except OSError:
        return None
    return hashlib.blake2b(ends, digest_size=16).digest()


def _digest(path: Path) -> bytes | None:
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError:
        return None  # unreadable files are named by the scan and the decoder
    return h.digest()


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _sample(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _quote(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)
