"""The hostile-input corpus (tests/hostile_kinds.py): every kind of bad file, name, link and layout, generated on
the fly, behaves as its row of the table says: converted, skipped and named, ignored, or one DataError line.
Never a traceback, never a hang (each check runs under an alarm), never a photo trained under the wrong class.

Per kind: scan_folder on a small data folder holding it, then the decoder predict and training use (load_views)
on the file itself. Then one fit through the API on a salted folder holding every file kind at once, with evaluate
and predict_table on the files named explicitly. Kinds about file permissions run as an unprivileged user:
directly when the tests are not root, in a forked child that drops to uid 65534 when they are.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE
from hostile_kinds import (
    BY_NAME,
    CONVERTED,
    ERROR,
    FILE,
    IGNORED,
    KINDS,
    SKIPPED,
    Kind,
    make,
)

from headstart.data.imageio import ImageDecodeError
from headstart.data.scan import scan_folder
from headstart.errors import DataError
from headstart.vision.preprocess import PreprocessConfig, load_views
from hostile_kinds import time_limit

CFG = PreprocessConfig(input_size=32)
TIME_LIMIT_S = 30  # per kind; the slowest takes well under a second
PER_CLASS = 4
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534


@dataclass
class Observed:
    train: str
    detail: str = ""
    warnings: list[str] = field(default_factory=list)
    predict: str | None = None





@contextmanager
def logged_warnings() -> Iterator[list[str]]:
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("headstart")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def data_folder(workdir: Path) -> Path:
    return make_image_folder(workdir / "data", classes=("a", "b"), per_class=PER_CLASS)


def observe(kind: Kind, workdir: Path) -> Observed:
    """What scan_folder and the decoder do with `kind`, made in a fresh data folder under `workdir`."""
    root = data_folder(workdir)
    made = make(kind, root / "a" if kind.scope == FILE else root)
    with logged_warnings() as warned:
        try:
            ds = scan_folder(made if kind.data_is_made else root)
        except DataError as e:
            return Observed(ERROR, str(e), warned)
        if kind.scope == FILE:
            assert_no_mislabel(ds, root)
        skipped = dict(ds.skipped)
        if made in skipped:
            obs = Observed(SKIPPED, skipped[made], warned)
        elif made in {s.path for s in ds.samples}:
            decoded = decode(made)
            obs = Observed(CONVERTED, "", warned) if decoded == CONVERTED else Observed(SKIPPED, decoded, warned)
        else:
            obs = Observed(IGNORED, "", warned)
        if kind.predict is not None:
            obs.predict = decode(made)
    return obs


def decode(path: Path) -> str:
    """CONVERTED, or the reason the decoder gives: what training skips and what predict's row says."""
    try:
        views = load_views(path, CFG)
    except ImageDecodeError as e:
        return e.reason
    assert views[0].shape == (3, 32, 32)
    return CONVERTED


def assert_no_mislabel(ds, root: Path) -> None:
    """Class b is untouched by whatever was put in a, and every photo, links followed, is either outside the data
    folder or inside its own class's folder (a link from a/ into b/ would train b's photo as an a)."""
    assert ds.class_counts()["b"] == PER_CLASS
    real_root = Path(os.path.realpath(root))
    for s in ds.samples:
        real = Path(os.path.realpath(s.path))
        if real.is_relative_to(real_root):
            assert real.relative_to(real_root).parts[0] == ds.classes[s.label], (s.path, real)


def observe_unprivileged(kind: Kind) -> Observed:
    """`observe` as a user whom file permissions bind: a forked child that drops root, reporting back in JSON."""
    workdir = Path(tempfile.mkdtemp(prefix="hostile-"))
    workdir.chmod(0o777)  # the child, uid 65534, builds the kind inside it
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with time_limit(TIME_LIMIT_S):
                payload = json.dumps(asdict(observe(kind, workdir / "w")))
            os.write(write_end, payload.encode())
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent as the failure it is
            os.write(write_end, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        chunks = []
        while select.select([read_end], [], [], TIME_LIMIT_S + 5)[0]:
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    finally:
        os.close(read_end)
        shutil.rmtree(workdir, ignore_errors=True)
    result = json.loads(b"".join(chunks) or b'{"error": "no answer from the child"}')
    assert "error" not in result, result["error"]
    return Observed(**result)


def check(kind: Kind, obs: Observed) -> None:
    assert obs.train == kind.train, (obs.train, obs.detail)
    if kind.train in (SKIPPED, ERROR):
        assert kind.reason in obs.detail, obs.detail
    if kind.train == ERROR:
        assert "\n" not in obs.detail
    if kind.warning:
        assert any(kind.warning in w for w in obs.warnings), obs.warnings
    if kind.predict == CONVERTED:
        assert obs.predict == CONVERTED, obs.predict
    elif kind.predict is not None:
        assert obs.predict is not None and kind.predict in obs.predict, obs.predict


def test_the_corpus_has_every_kind_the_issue_names():
    assert len(KINDS) >= 40
    for fmt in ("jpg", "png", "bmp", "gif", "webp", "tiff"):
        assert f"truncated_{fmt}" in BY_NAME and f"header_only_{fmt}" in BY_NAME
    for name in ("png_named_jpg", "text_named_jpg", "mode_1", "mode_L", "mode_LA", "mode_P_transparent_png",
                 "mode_CMYK", "mode_I16", "mode_I", "mode_F", "mode_RGBA", "animated_gif", "animated_webp",
                 "multipage_tiff", "tiny_1x1", "wide_10000x1", "tall_1x10000", "bomb_png", "name_spaces",
                 "name_unicode", "name_leading_dash", "name_newline", "name_not_utf8", "name_long", "ds_store",
                 "thumbs_db", "apple_double", "dangling_link", "self_loop_link", "link_up_to_root",
                 "unreadable_file", "unreadable_folder", "empty_class", "one_image_class"):
        assert name in BY_NAME, name
    assert {k.train for k in KINDS} == {CONVERTED, SKIPPED, IGNORED, ERROR}


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_each_kind_behaves_as_its_row_says(kind: Kind, tmp_path: Path) -> None:
    if kind.unprivileged and IS_ROOT:
        obs = observe_unprivileged(kind)
    else:
        with time_limit(TIME_LIMIT_S):
            obs = observe(kind, tmp_path)
    check(kind, obs)


def test_layout_kinds_leave_the_good_photos_trainable(tmp_path: Path) -> None:
    """A warned-about layout still trains on everything good: nothing is lost to a warning."""
    for name, extra_in_b in (("one_image_class", 0), ("loose_images", 0), ("same_photo_two_classes", 1)):
        root = data_folder(tmp_path / name)
        make(BY_NAME[name], root)
        counts = scan_folder(root).class_counts()
        assert (counts["a"], counts["b"]) == (PER_CLASS, PER_CLASS + extra_in_b), (name, counts)


def _salted(workdir: Path) -> tuple[Path, dict[str, Path]]:
    """One data folder holding every file kind at once (in class a; b stays clean), and the path each made."""
    root = make_image_folder(workdir / "salted", classes=("a", "b"), per_class=8)
    made = {}
    for kind in KINDS:
        if kind.scope == FILE and not (kind.unprivileged and IS_ROOT):
            made[kind.name] = make(kind, root / "a")
    return root, made


def test_salted_folder_trains_evaluates_and_predicts(tmp_path: Path, tiny_weights: Path, tiny_cache: Path) -> None:
    from headstart import ImageClassifier

    root, made = _salted(tmp_path)
    with time_limit(240):
        clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=3, device="cpu").fit(root)
        eval_skipped = list(clf.evaluate(root).skipped)
        explicit = [made[n] for n in made if BY_NAME[n].predict is not None]
        rows = clf.predict_table(explicit)
    for skipped in (dict(clf.skipped_), dict(eval_skipped)):
        for name, path in made.items():
            kind = BY_NAME[name]
            if kind.train == SKIPPED:
                assert path in skipped and kind.reason in skipped[path], (name, skipped.get(path))
            else:
                assert path not in skipped, (name, skipped[path])
    assert set(clf.classes_) == {"a", "b"}
    assert [r.path for r in rows] == explicit  # one row per input, in input order
    for row in rows:
        kind = next(BY_NAME[n] for n, p in made.items() if p == row.path)
        assert (row.error is None) == (kind.predict == CONVERTED), (kind.name, row.error)
        assert row.error is None or "\n" not in row.error


def test_readme_table_has_a_row_per_kind() -> None:
    from hostile_kinds import readme_table

    lines = readme_table().splitlines()
    assert lines[0].startswith("| kind of bad input | train/evaluate | predict")
    assert len(lines) == 2 + len(KINDS)
    assert all(line.count("|") == 4 for line in lines)

