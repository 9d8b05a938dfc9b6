"""What `predict` is given: files and folders expanded, in order, into image paths, with a reason for each input
that yields none."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from headstart.data.imageio import is_image_path
from headstart.data.walk import walk_files


@dataclass(frozen=True)
class InputImage:
    """One entry of the expanded inputs: an image path to predict, or (with `problem`) an input that yields none
    (a missing file, a folder without images, an unreadable sub-folder)."""

    path: Path
    problem: str | None = None


def expand_inputs(inputs: Iterable[str | Path] | str | Path) -> list[InputImage]:
    """Files and folders given to predict, expanded in place and in order: one entry per file named, a folder's
    images (searched recursively, sorted, hidden entries skipped) where the folder was, and an entry with a
    problem for whatever yields no image. Files named explicitly are kept whatever their extension, since
    decoding is the real test. Nothing is dropped, duplicates included: callers line their results up with it."""
    if isinstance(inputs, (str, bytes, os.PathLike)):  # a lone path would otherwise be iterated character by character
        inputs = [inputs]
    out: list[InputImage] = []
    for raw in inputs:
        p = Path(os.fsdecode(raw)).expanduser()
        if p.is_dir():
            out += _folder_images(p)
        elif os.path.lexists(p):  # links that loop or dangle too: decoding names what is wrong with them
            out.append(InputImage(p))
        else:
            out.append(InputImage(p, "no such file"))
    return out


def _folder_images(folder: Path) -> list[InputImage]:
    """A folder's images in walk order, with the problems (unreadable sub-folders) where the walk met them."""
    problems: list[tuple[Path, str]] = []
    out: list[InputImage] = []
    seen_problems = 0
    for entry in walk_files(folder, problems):
        # walk_files appends a problem when it meets it, before yielding the entries that follow it.
        out += [InputImage(p, reason) for p, reason in problems[seen_problems:]]
        seen_problems = len(problems)
        if is_image_path(Path(entry.name)):
            out.append(InputImage(Path(entry.path)))
    out += [InputImage(p, reason) for p, reason in problems[seen_problems:]]
    if not any(item.problem is None for item in out):
        out.append(InputImage(folder, "no images found in folder"))
    return out


def list_images(inputs: Iterable[str | Path] | str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The distinct image paths of `expand_inputs` (first occurrence kept), plus (path, reason) for the inputs
    that yield none."""
    paths: dict[Path, None] = {}
    problems: list[tuple[Path, str]] = []
    for item in expand_inputs(inputs):
        if item.problem is not None:
            problems.append((item.path, item.problem))
        else:
            paths.setdefault(item.path)
    return list(paths), problems
