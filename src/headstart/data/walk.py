"""Walking a folder's files for the scan and for predict: hidden and system names skipped, symlinked folders
followed unless they loop or, within a data folder, lead out of the class folder into another part of it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from headstart.data.imageio import describe_os_error

# Names that operating systems and photo tools leave in folders: never photos of a class, never worth a line.
_SYSTEM_NAMES = frozenset({"__macosx", "@eadir", "thumbs.db", "ehthumbs.db", "desktop.ini", "$recycle.bin",
                           "system volume information"})
LEAVES_CLASS_FOLDER = "link leaves the class folder"
SYMLINK_LOOP = "symlink loop"


def ignored(name: str) -> bool:
    """Hidden entries (.DS_Store, ._AppleDouble, .thumbnails) and the system files and folders of _SYSTEM_NAMES."""
    return name.startswith(".") or name.lower() in _SYSTEM_NAMES


def is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def walk_files(
    folder: Path, problems: list[tuple[Path, str]], *, data_root: Path | None = None
) -> Iterator[os.DirEntry]:
    """Non-folder entries under `folder`, depth first in name order, skipping hidden names and system files.

    Links to folders are followed, except (named in `problems`) those that loop back to a folder enclosing
    them, and, given `data_root`, those that leave `folder` for elsewhere in data_root or for a folder
    enclosing it: a link from one class folder into another, or up to the data folder, would train the other
    class's photos under this one. Links out to folders beyond data_root (a tree of links into a photo
    library) are followed."""
    top = os.path.realpath(folder)
    fence = os.path.realpath(data_root) if data_root is not None else None
    visited: set[tuple[int, int]] = set()

    def walk(d: Path, real_d: str) -> Iterator[os.DirEntry]:
        try:
            st = d.stat()
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            problems.append((d, f"unreadable folder ({describe_os_error(e, d)})"))
            return
        key = (st.st_dev, st.st_ino)
        if key in visited:  # the same folder reached again through a second link
            problems.append((d, f"folder already scanned through another path ({real_d})"))
            return
        visited.add(key)
        for entry in entries:
            if ignored(entry.name):
                continue
            if not is_dir(entry):
                yield entry
                continue
            sub = Path(entry.path)
            real_sub = os.path.realpath(sub) if entry.is_symlink() else os.path.join(real_d, entry.name)
            reason = _folder_link_problem(real_d, real_sub, top, fence) if entry.is_symlink() else None
            if reason is None:
                yield from walk(sub, real_sub)
            else:
                problems.append((sub, reason))

    return walk(Path(folder), top)


def _folder_link_problem(real_parent: str, target: str, top: str, fence: str | None) -> str | None:
    if inside(real_parent, target):  # the link points at a folder that holds it
        if fence is not None and not inside(target, top):
            return f"{LEAVES_CLASS_FOLDER} (points to {target})"
        return f"{SYMLINK_LOOP} (points to {target}, which holds the link)"
    if fence is not None and not inside(target, top) and (inside(target, fence) or inside(fence, target)):
        return f"{LEAVES_CLASS_FOLDER} (points to {target})"
    return None


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether real path `path` is `folder` or lies under it (both already resolved)."""
    path, folder = str(path), str(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
