"""data.scan: scan_folder's layouts, splits and errors, list_images, split_rows and typical_short_side. Torch-free."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from helpers_images import make_image_folder
from headstart.data.inputs import list_images
from headstart.data.scan import scan_folder, typical_short_side
from headstart.data.dataset import Dataset
from headstart.errors import DataError


def _val_paths(ds: Dataset) -> set[Path]:
    return set(ds.paths("val"))


def _assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_classes_sorted_and_samples_ordered(tmp_path):
    root = make_image_folder(tmp_path / "p", classes=("zebra", "ant", "mole"), per_class=5)
    ds = scan_folder(root)
    assert ds.classes == ("ant", "mole", "zebra")
    assert ds.root == root
    keys = [(s.split, s.label, s.path) for s in ds.samples]
    assert keys == sorted(keys)
    for s in ds.samples:
        assert s.path.parent.name == ds.classes[s.label]


def test_stratified_split_proportions(tmp_path):
    root = make_image_folder(tmp_path / "p", per_class=10)
    ds = scan_folder(root, val_split=0.2, test_split=0.1)
    assert ds.class_counts("train") == {"cat": 7, "dog": 7, "fish": 7}
    assert ds.class_counts("val") == {"cat": 2, "dog": 2, "fish": 2}
    assert ds.class_counts("test") == {"cat": 1, "dog": 1, "fish": 1}
    assert ds.class_counts() == {"cat": 10, "dog": 10, "fish": 10}
    splits = [set(ds.paths(s)) for s in ("train", "val", "test")]
    assert sum(len(s) for s in splits) == len(set().union(*splits)) == 30


def test_split_is_deterministic_per_seed(tmp_path):
    root = make_image_folder(tmp_path / "p", per_class=10)
    a, b = scan_folder(root, seed=3), scan_folder(root, seed=3)
    assert a == b


def test_different_seed_changes_split(tmp_path):
    root = make_image_folder(tmp_path / "p", per_class=10)
    assert _val_paths(scan_folder(root, seed=0)) != _val_paths(scan_folder(root, seed=1))


def test_small_classes_get_one_val_image_and_keep_one_train_image(tmp_path):
    root = make_image_folder(tmp_path / "p", classes=("a", "b"), per_class=2)
    make_image_folder(tmp_path / "p", classes=("c",), per_class=1)
    ds = scan_folder(root, val_split=0.1)
    assert ds.class_counts("val") == {"a": 1, "b": 1, "c": 0}
    assert ds.class_counts("train") == {"a": 1, "b": 1, "c": 1}


def test_zero_val_split_means_no_val(image_folder):
    ds = scan_folder(image_folder, val_split=0.0)
    assert ds.subset("val") == ()
    assert len(ds.subset("train")) == 18
    assert ds.labels("val").dtype == np.int64 and ds.labels("val").shape == (0,)


def test_dataset_accessors(image_folder):
    ds = scan_folder(image_folder)
    train = ds.subset("train")
    assert ds.paths("train") == [s.path for s in train]
    labels = ds.labels("train")
    assert labels.dtype == np.int64
    assert labels.tolist() == [s.label for s in train]
    with pytest.raises(ValueError):
        ds.subset("training")


def test_train_val_layout_is_used_as_is(split_folder):
    ds = scan_folder(split_folder, val_split=0.5)
    assert ds.classes == ("cat", "dog", "fish")
    assert ds.class_counts("train") == {"cat": 6, "dog": 6, "fish": 6}
    assert ds.class_counts("val") == {"cat": 2, "dog": 2, "fish": 2}
    assert all(p.parts[-3] == "val" for p in ds.paths("val"))


@pytest.mark.parametrize("val_name", ["valid", "validation", "Val"])
def test_train_val_layout_accepts_val_aliases(tmp_path, val_name):
    root = tmp_path / "p"
    make_image_folder(root / "train", per_class=4)
    make_image_folder(root / val_name, classes=("cat", "dog"), per_class=1)  # fish missing from val is fine
    ds = scan_folder(root)
    assert ds.classes == ("cat", "dog", "fish")
    assert ds.class_counts("val") == {"cat": 1, "dog": 1, "fish": 0}
    assert ds.class_counts("train") == {"cat": 4, "dog": 4, "fish": 4}


def test_train_test_layout_carves_val_from_train(tmp_path):
    root = tmp_path / "p"
    make_image_folder(root / "train", per_class=5)
    make_image_folder(root / "test", per_class=2)
    ds = scan_folder(root, val_split=0.2, test_split=0.3)
    assert ds.class_counts("test") == {"cat": 2, "dog": 2, "fish": 2}  # test folder wins over test_split
    assert ds.class_counts("val") == {"cat": 1, "dog": 1, "fish": 1}
    assert all("train" in p.parts for p in ds.paths("val"))


def test_train_only_layout_is_split_like_class_folders(tmp_path):
    root = tmp_path / "p"
    make_image_folder(root / "train", per_class=10)
    ds = scan_folder(root, val_split=0.2)
    assert ds.classes == ("cat", "dog", "fish")
    assert ds.class_counts("val") == {"cat": 2, "dog": 2, "fish": 2}
    assert scan_folder(root, val_split=0.0).class_counts("train") == {"cat": 10, "dog": 10, "fish": 10}


def test_train_alongside_class_folders_is_a_class(tmp_path):
    root = make_image_folder(tmp_path / "p", classes=("train", "other"), per_class=3)
    assert scan_folder(root).classes == ("other", "train")


def test_class_only_in_val_is_an_error(tmp_path):
    root = tmp_path / "p"
    make_image_folder(root / "train", classes=("cat", "dog"), per_class=3)
    make_image_folder(root / "val", classes=("cat", "dog", "eel"), per_class=1)
    with pytest.raises(DataError) as err:
        scan_folder(root)
    _assert_one_line(err, "'eel'", "train")


def test_nested_images_hidden_entries_and_skipped_files(tmp_path):
    root = make_image_folder(tmp_path / "p", classes=("cat", "dog"), per_class=2)
    make_image_folder(root / "cat" / "2023" / "summer", classes=("deep",), per_class=2)
    make_image_folder(root / "cat" / ".thumbnails", classes=("x",), per_class=2)
    make_image_folder(root / ".hidden", classes=("x",), per_class=2)
    (root / "cat" / ".DS_Store").write_bytes(b"junk")
    (root / "cat" / "._cat_000.jpg").write_bytes(b"resource fork")
    (root / "dog" / "notes.txt").write_text("hi")
    (root / "dog" / "README").write_text("hi")
    (root / "dog" / "empty.jpg").touch()
    (root / "loose.jpg").write_bytes((root / "dog" / "dog_000.jpg").read_bytes())

    ds = scan_folder(root, val_split=0.0)
    assert ds.classes == ("cat", "dog")
    assert ds.class_counts() == {"cat": 4, "dog": 2}
    assert root / "cat" / "2023" / "summer" / "deep" / "deep_001.jpg" in ds.paths("train")
    assert all(not part.startswith(".") for p in ds.paths("train") for part in p.relative_to(root).parts)
    assert dict(ds.skipped) == {
        root / "dog" / "notes.txt": "not an image (.txt)",
        root / "dog" / "README": "not an image (no extension)",
        root / "dog" / "empty.jpg": "empty file",
    }


def test_upper_case_extensions_are_images(tmp_path):
    root = make_image_folder(tmp_path / "p", classes=("a", "b"), per_class=2)
    (root / "a" / "a_000.jpg").rename(root / "a" / "SHOUT.JPG")
    assert scan_folder(root).class_counts() == {"a": 2, "b": 2}


def test_missing_root(tmp_path):
    with pytest.raises(DataError) as err:
        scan_folder(tmp_path / "nope")
    _assert_one_line(err, str(tmp_path / "nope"), "no such folder")


def test_root_is_a_file(tmp_path):
    f = tmp_path / "x.jpg"
    f.write_bytes(b"x")
    with pytest.raises(DataError) as err:
        scan_folder(f)
    _assert_one_line(err, str(f))


def test_no_class_folders(tmp_path):
    with pytest.raises(DataError) as err:
        scan_folder(tmp_path)
    _assert_one_line(err, str(tmp_path), "no class folders", "<class>")


def test_loose_images_without_class_folders(tmp_path):
    make_image_folder(tmp_path, classes=("a",), per_class=2)
    for p in (tmp_path / "a").iterdir():
        p.rename(tmp_path / p.name)
    (tmp_path / "a").rmdir()
    with pytest.raises(DataError) as err:
        scan_folder(tmp_path)
    _assert_one_line(err, str(tmp_path), "2 images", "no class folders")


def test_class_folders_without_images(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "notes.txt").write_text("x")
    with pytest.raises(DataError) as err:
        scan_folder(tmp_path)
    _assert_one_line(err, str(tmp_path), "no images")


def test_only_one_class(tmp_path):
    root = make_image_folder(tmp_path / "p", classes=("cats",), per_class=3)
    with pytest.raises(DataError) as err:
        scan_folder(root)
    _assert_one_line(err, "found only one class ('cats'); a classifier needs at least two class folders")


def test_empty_class_folders_are_named(tmp_path):
    root = make_image_folder(tmp_path / "p", classes=("cat", "dog"), per_class=3)
    (root / "eel").mkdir()
    (root / "yak").mkdir()
    (root / "yak" / "empty.png").touch()
    with pytest.raises(DataError) as err:
        scan_folder(root)
    _assert_one_line(err, "'eel'", "'yak'", "no usable images")


@pytest.mark.parametrize(
    ("val_split", "test_split", "needle"),
    [(-0.1, 0.0, "val_split=-0.1"), (1.0, 0.0, "val_split=1.0"), (0.2, 1.5, "test_split=1.5"),
     (math.nan, 0.0, "val_split=nan"), (0.6, 0.4, "below 1")],
)
def test_bad_split_fractions(image_folder, val_split, test_split, needle):
    with pytest.raises(DataError) as err:
        scan_folder(image_folder, val_split=val_split, test_split=test_split)
    msg = _assert_one_line(err, needle)
    assert "[0, 1)" in msg or "below 1" in msg


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_list_images_recurses_and_reports_missing(tmp_path):
    root = make_image_folder(tmp_path / "p", classes=("a", "b"), per_class=2)
    make_image_folder(root / "a" / ".cache", classes=("x",), per_class=1)
    (root / "b" / "notes.txt").write_text("x")
    odd = tmp_path / "odd.dat"
    odd.write_bytes(b"x")
    missing = tmp_path / "missing.jpg"
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()

    paths, problems = list_images([root, odd, missing, str(root / "a" / "a_000.jpg"), empty_dir])
    assert paths == [
        root / "a" / "a_000.jpg", root / "a" / "a_001.jpg", root / "b" / "b_000.jpg", root / "b" / "b_001.jpg", odd,
    ]
    assert (missing, "no such file") in problems
    assert any(p == empty_dir for p, _ in problems)


def test_list_images_accepts_a_single_path(tmp_path):
    root = make_image_folder(tmp_path / "p", classes=("a",), per_class=2)
    assert list_images(str(root))[0] == [root / "a" / "a_000.jpg", root / "a" / "a_001.jpg"]


# --- split_rows and typical_short_side ------------------------------------------------------------------------


def test_split_rows_are_blocks_and_disorder_is_caught():
    from headstart.data.dataset import split_rows

    rows = split_rows(np.array(["train"] * 3 + ["val"] * 2))
    assert rows == {"train": slice(0, 3), "val": slice(3, 5), "test": slice(5, 5)}
    with pytest.raises(AssertionError):
        split_rows(np.array(["train", "val", "train"]))


def test_typical_short_side_reads_headers_and_ignores_unreadable_files(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "p", classes=("a",), per_class=5, size=(64, 48))
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    make_image_folder(tmp_path / "p", classes=("b",), per_class=2, size=(300, 400))
    paths = sorted(root.rglob("*.jpg"))
    assert typical_short_side(paths) == 48  # 5 of 7 readable photos are 48 px on their short side
    assert typical_short_side([root / "a" / "broken.jpg"]) is None


# --- hostile folders: links, permissions, DATA that is not a folder, surprises worth a warning (issue 12) ----------


def test_root_is_a_file_says_so_and_what_to_pass(tmp_path):
    root = make_image_folder(tmp_path / "photos", classes=("a", "b"), per_class=2)
    with pytest.raises(DataError) as err:
        scan_folder(root / "a" / "a_000.jpg")
    msg = _assert_one_line(err, "is a file, not a folder", "one sub-folder per class", str(root))
    assert "no such folder" not in msg


def test_a_symlink_loop_as_data_is_named(tmp_path):
    import os

    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(DataError) as err:
        scan_folder(tmp_path / "loop")
    _assert_one_line(err, "symlink loop")


def test_links_out_of_a_class_folder_are_skipped_and_named(tmp_path):
    """A link from cats/ up to the data folder, or into dogs/, trained the dogs' photos as cats."""
    import os

    root = make_image_folder(tmp_path / "p", classes=("cat", "dog"), per_class=3)
    os.symlink(root, root / "cat" / "everything")
    os.symlink("../dog", root / "cat" / "dogs")
    os.symlink(root / "dog" / "dog_000.jpg", root / "cat" / "borrowed.jpg")
    os.symlink("cat_000.jpg", root / "cat" / "again.jpg")  # inside the class folder: fine
    ds = scan_folder(root, val_split=0.0)
    assert ds.class_counts() == {"cat": 4, "dog": 3}
    skipped = dict(ds.skipped)
    for name in ("everything", "dogs", "borrowed.jpg"):
        assert skipped[root / "cat" / name].startswith("link leaves the class folder"), skipped
    assert root / "cat" / "again.jpg" in ds.paths("train")


def test_links_to_photos_outside_the_data_folder_are_followed(tmp_path):
    """A data folder of links into a photo library (what acceptance.sh's split80 builds) trains as before."""
    import os

    library = make_image_folder(tmp_path / "library", classes=("cat", "dog"), per_class=3)
    root = tmp_path / "links"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for f in sorted((library / cls).iterdir()):
            os.symlink(f, root / cls / f.name)
    os.symlink(library / "cat", root / "cat" / "more")  # a folder link out of the data folder, too
    ds = scan_folder(root, val_split=0.0)
    assert ds.class_counts() == {"cat": 6, "dog": 3} and ds.skipped == ()


def test_folder_loops_inside_a_class_are_named(tmp_path):
    import os

    root = make_image_folder(tmp_path / "p", classes=("cat", "dog"), per_class=2)
    (root / "cat" / "sub").mkdir()
    os.symlink("..", root / "cat" / "sub" / "back")
    os.symlink("pong.jpg", root / "cat" / "ping.jpg")
    os.symlink("ping.jpg", root / "cat" / "pong.jpg")
    ds = scan_folder(root, val_split=0.0)
    skipped = dict(ds.skipped)
    assert skipped[root / "cat" / "sub" / "back"].startswith("symlink loop")
    assert skipped[root / "cat" / "ping.jpg"] == skipped[root / "cat" / "pong.jpg"] == "symlink loop"
    assert ds.class_counts() == {"cat": 2, "dog": 2}


def test_unreadable_files_are_skipped_as_permission_denied(tmp_path, monkeypatch):
    """Root reads any file, so open() refuses this one path (the corpus also runs a real chmod 000 unprivileged)."""
    import os

    root = make_image_folder(tmp_path / "p", classes=("cat", "dog"), per_class=2)
    locked = root / "cat" / "cat_001.jpg"
    real_open = os.open

    def refuse(p, *args, **kwargs):
        if Path(p) == locked:
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    ds = scan_folder(root, val_split=0.0)
    assert dict(ds.skipped) == {locked: "permission denied"}
    assert locked not in ds.paths("train")


def test_named_pipes_are_skipped_without_being_read(tmp_path):
    import os

    root = make_image_folder(tmp_path / "p", classes=("cat", "dog"), per_class=2)
    os.mkfifo(root / "cat" / "pipe.jpg")
    assert dict(scan_folder(root).skipped) == {root / "cat" / "pipe.jpg": "not a regular file (named pipe)"}


def test_system_files_and_folders_are_ignored(tmp_path):
    root = make_image_folder(tmp_path / "p", classes=("cat", "dog"), per_class=2)
    make_image_folder(root / "cat" / "@eaDir", classes=("thumbs",), per_class=2)
    make_image_folder(root, classes=("__MACOSX",), per_class=1)
    (root / "dog" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "dog" / "desktop.ini").write_text("[.ShellClassInfo]")
    ds = scan_folder(root, val_split=0.0)
    assert ds.classes == ("cat", "dog") and ds.class_counts() == {"cat": 2, "dog": 2} and ds.skipped == ()


def test_an_unreadable_class_folder_says_why_it_is_empty(tmp_path, monkeypatch):
    import os

    root = make_image_folder(tmp_path / "p", classes=("cat", "dog", "eel"), per_class=2)
    real_scandir = os.scandir

    def refuse(p="."):
        if Path(p) == root / "eel":
            raise PermissionError(13, "Permission denied", str(p))
        return real_scandir(p)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(DataError) as err:
        scan_folder(root)
    _assert_one_line(err, "'eel'", "no usable images", "permission denied")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_a_clean_folder_gives_no_warning(image_folder, tmp_path, caplog):
    split = tmp_path / "split"
    make_image_folder(split / "train", per_class=6, seed=1)
    make_image_folder(split / "val", per_class=2, seed=2)
    with caplog.at_level("WARNING", "headstart"):
        scan_folder(image_folder)
        scan_folder(split)
    assert _warnings(caplog) == []


def test_a_class_left_without_validation_images_is_warned_about(tmp_path, caplog):
    root = make_image_folder(tmp_path / "p", classes=("cat", "dog"), per_class=4)
    make_image_folder(root, classes=("eel",), per_class=1, seed=1)
    with caplog.at_level("WARNING", "headstart"):
        scan_folder(root, val_split=0.2)
    (msg,) = _warnings(caplog)
    assert "'eel' has only 1 image" in msg and "add more images" in msg
    caplog.clear()
    with caplog.at_level("WARNING", "headstart"):
        scan_folder(root, val_split=0.0)  # no validation asked for: nothing goes unmeasured by surprise
    assert _warnings(caplog) == []


def test_a_val_folder_missing_a_class_is_warned_about(tmp_path, caplog):
    root = tmp_path / "p"
    make_image_folder(root / "train", per_class=4)
    make_image_folder(root / "val", classes=("cat", "dog"), per_class=1, seed=1)
    with caplog.at_level("WARNING", "headstart"):
        scan_folder(root)
    (msg,) = _warnings(caplog)
    assert "'fish'" in msg and str(root / "val" / "fish") in msg


def test_loose_images_next_to_class_folders_are_warned_about(tmp_path, caplog):
    root = make_image_folder(tmp_path / "p", classes=("cat", "dog"), per_class=2)
    (root / "stray.jpg").write_bytes((root / "cat" / "cat_000.jpg").read_bytes()[::-1])
    with caplog.at_level("WARNING", "headstart"):
        ds = scan_folder(root)
    (msg,) = _warnings(caplog)
    assert str(root) in msg and "stray.jpg" in msg and "ignored" in msg
    assert ds.class_counts() == {"cat": 2, "dog": 2}


def test_the_same_photo_in_two_classes_is_warned_about(tmp_path, caplog):
    root = make_image_folder(tmp_path / "p", classes=("cat", "dog"), per_class=3)
    (root / "dog" / "copy.jpg").write_bytes((root / "cat" / "cat_002.jpg").read_bytes())
    with caplog.at_level("WARNING", "headstart"):
        scan_folder(root)
    (msg,) = _warnings(caplog)
    assert "same photo" in msg and str(root / "cat" / "cat_002.jpg") in msg and str(root / "dog" / "copy.jpg") in msg


def test_duplicates_are_looked_for_only_among_files_of_equal_size(tmp_path, monkeypatch):
    from headstart.data import surprises

    root = make_image_folder(tmp_path / "p", classes=("cat", "dog"), per_class=5)
    (root / "cat" / "odd.jpg").write_bytes(b"x" * 7)
    (root / "dog" / "odd.jpg").write_bytes(b"y" * 7)  # same size, other bytes: read, and no warning
    by_size: dict[int, set[str]] = {}
    for p in root.rglob("*.jpg"):
        by_size.setdefault(p.stat().st_size, set()).add(p.parent.name)
    shared = {p for p in root.rglob("*.jpg") if len(by_size[p.stat().st_size]) > 1}
    ends, whole = [], []
    real_ends, real_whole = surprises._ends_digest, surprises._digest
    monkeypatch.setattr(surprises, "_ends_digest", lambda p: ends.append(p) or real_ends(p))
    monkeypatch.setattr(surprises, "_digest", lambda p: whole.append(p) or real_whole(p))
    surprises.warn_duplicates({"train": {c: sorted((root / c).glob("*.jpg")) for c in ("cat", "dog")}})
    assert set(ends) == shared and len(ends) == len(shared)
    assert whole == []  # their ends differ: never read whole


def test_a_photo_copied_thousands_of_times_is_one_short_warning(tmp_path, caplog):
    """A blank frame exported 400 times into two classes: one warning naming ten copies and counting the rest,
    not one line of every path (with 100,000 placeholders that line was megabytes)."""
    from headstart.data import surprises

    root = tmp_path / "p"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(200):
            (root / c / f"{i:03d}.jpg").write_bytes(b"blank")
    with caplog.at_level("WARNING", "headstart"):
        surprises.warn_duplicates({"train": {c: sorted((root / c).glob("*.jpg")) for c in ("cat", "dog")}})
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "same photo is in classes 'cat', 'dog'" in msg and "and 390 more" in msg
    assert msg.count(".jpg") == surprises.MAX_LISTED_COPIES
