"""What `predict` is given: files and folders expanded into image paths, with a reason for each input that
yields none."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from headstart.data.imageio import is_image_path
from headstart.data.scan import walk_files


def list_images(inputs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders given to predict into image paths, plus (path, reason) for inputs that yield none.

    Folders are searched recursively (sorted, hidden entries skipped) for image extensions; files named
    explicitly are kept whatever their extension, since decoding is the real test. Duplicates are dropped.
    """
    if isinstance(inputs, (str, os.PathLike)):  # a lone path would otherwise be iterated character by character
        inputs = [inputs]
    paths: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        if p not in seen:
            seen.add(p)
            paths.append(p)

    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = [Path(e.path) for e in walk_files(p, problems) if is_image_path(Path(e.name))]
            if not found:
                problems.append((p, "no images found in folder"))
            for f in found:
                add(f)
        elif p.exists():
            add(p)
        else:
            problems.append((p, "no such file"))
    return paths, problems
