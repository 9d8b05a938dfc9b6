"""`check_folder`: each kind of problem planted in a folder is found, names its files, and blocks or not."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE
from headstart.tasks.check import ERROR, WARNING, check_folder, near_duplicate_findings


def _kinds(report) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in report.findings:
        out.setdefault(f.kind, []).append(f)
    return out


@pytest.fixture
def salted(tmp_path: Path) -> Path:
    """photos/train + photos/val with one of each problem planted."""
    root = tmp_path / "photos"
    make_image_folder(root / "train", classes=("cat", "dog"), per_class=8, seed=1)
    make_image_folder(root / "val", classes=("cat", "dog"), per_class=2, seed=2)
    make_image_folder(root / "train", classes=("eel",), per_class=2, seed=3)  # 2 against 8: imbalanced
    train = root / "train"
    shutil.copy(train / "cat/cat_000.jpg", train / "cat/cat_copy.jpg")  # duplicate within a class
    shutil.copy(train / "cat/cat_001.jpg", train / "dog/dog_is_a_cat.jpg")  # one photo, two labels
    shutil.copy(train / "dog/dog_002.jpg", root / "val/dog/dog_leaked.jpg")  # train and val
    Image.new("RGB", (20, 20), (200, 10, 10)).save(train / "cat/tiny.jpg")  # tiny, and blank
    arr = np.random.default_rng(0).integers(0, 255, (40, 200, 3), np.uint8)
    Image.fromarray(arr).save(train / "dog/wide.jpg")
    Image.fromarray(arr[:, :60, 0]).save(train / "dog/grey.jpg")  # mode L
    Image.fromarray(arr[:, :60]).save(train / "dog/png_inside.jpg", "PNG")
    (train / "cat/empty.jpg").write_bytes(b"")
    (train / "cat/notes.txt").write_text("not a photo")
    return root


def test_planted_problems_are_found_with_their_files(salted: Path) -> None:
    report = check_folder(salted, backbone=None)
    kinds = _kinds(report)
    train = salted / "train"
    assert {f.files for f in kinds["duplicate"]} == {(train / "cat/cat_000.jpg", train / "cat/cat_copy.jpg")}
    (conflict,) = kinds["conflicting_labels"]
    assert set(conflict.files) == {train / "cat/cat_001.jpg", train / "dog/dog_is_a_cat.jpg"}
    assert "cat" in conflict.message and "dog" in conflict.message
    leaks = [f for f in kinds["leakage"] if salted / "val/dog/dog_leaked.jpg" in f.files]
    assert len(leaks) == 1 and "train and val" in leaks[0].message
    assert [f.files for f in kinds["unreadable"]] == [(train / "cat/empty.jpg",)]
    assert [f.files for f in kinds["not_an_image"]] == [(train / "cat/notes.txt",)]
    assert [f.files for f in kinds["tiny"]] == [(train / "cat/tiny.jpg",)]
    assert (train / "cat/tiny.jpg",) in [f.files for f in kinds["low_information"]]
    assert [f.files for f in kinds["extreme_aspect"]] == [(train / "dog/wide.jpg",)]
    assert [f.files for f in kinds["wrong_format"]] == [(train / "dog/png_inside.jpg",)]
    (modes,) = kinds["mixed_modes"]
    assert modes.files == (train / "dog/grey.jpg",) and "all in class dog" in modes.message
    (imbalance,) = kinds["imbalance"]
    assert imbalance.files == (train / "eel",) and "eel" in imbalance.message
    blocking = {f.kind for f in report.blocking}
    assert blocking == {"unreadable", "conflicting_labels", "leakage"}
    assert all(f.severity == WARNING for f in report.findings if f.kind not in blocking)
    assert report.backbone is None
    as_json = report.to_dict()
    assert as_json["blocking"] == len(report.blocking) and all(isinstance(p, str) for f in as_json["findings"]
                                                                for p in f["files"])


def test_a_clean_folder_has_no_blocking_finding(image_folder: Path) -> None:
    report = check_folder(image_folder, backbone=None)
    assert report.blocking == () and report.counts["train"]["cat"] + report.counts["val"]["cat"] == 6


def test_near_duplicates_group_close_features_and_flag_crossing_splits() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 64)).astype(np.float32)
    feats[5] = feats[4] + rng.normal(0, 0.05, 64)  # a near copy in the same split
    feats[20] = feats[3] + rng.normal(0, 0.05, 64)  # and one in another split
    feats[10] = feats[11]  # an exact duplicate: equal content keys, reported elsewhere
    paths = [Path(f"{i}.jpg") for i in range(30)]
    splits = np.array(["train"] * 15 + ["val"] * 15)
    keys = {p: bytes([i]) for i, p in enumerate(paths)}
    keys[paths[10]] = keys[paths[11]]
    found = {f.files: f for f in near_duplicate_findings(paths, feats, splits, keys)}
    assert set(found) == {(paths[4], paths[5]), (paths[3], paths[20])}
    assert found[(paths[3], paths[20])].kind == "near_duplicate_leakage"
    assert found[(paths[4], paths[5])].kind == "near_duplicate" and found[(paths[4], paths[5])].score > 0.95


def test_features_are_used_only_when_cached_or_deep(image_folder: Path, tiny_weights: Path, tiny_cache: Path) -> None:
    shallow = check_folder(image_folder, backbone=TINY_BACKBONE, weights=tiny_weights, device="cpu")
    assert shallow.backbone is None and any("--deep" in n for n in shallow.notes)
    deep = check_folder(image_folder, backbone=TINY_BACKBONE, weights=tiny_weights, device="cpu", deep=True)
    assert deep.backbone == TINY_BACKBONE and not deep.notes
    again = check_folder(image_folder, backbone=TINY_BACKBONE, weights=tiny_weights, device="cpu")  # now cached
    assert again.backbone == TINY_BACKBONE
    assert all(f.severity in (ERROR, WARNING) for f in again.findings)


def test_near_duplicates_are_the_same_whatever_the_chunk() -> None:
    """Each chunk compares its rows with the rows from its own first one on (each pair once): groups spanning
    chunk boundaries are found as with one chunk."""
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(40, 32)).astype(np.float32)
    for a, b in ((0, 39), (7, 8), (8, 30), (15, 16)):
        feats[b] = feats[a] + rng.normal(0, 0.05, 32)
    paths = [Path(f"{i}.jpg") for i in range(40)]
    splits = np.array(["train"] * 30 + ["val"] * 10)
    keys = {p: bytes([i]) for i, p in enumerate(paths)}
    whole = {(f.files, f.kind, round(f.score, 6)) for f in near_duplicate_findings(paths, feats, splits, keys, chunk=4096)}
    for chunk in (1, 3, 7):
        assert {(f.files, f.kind, round(f.score, 6))
                for f in near_duplicate_findings(paths, feats, splits, keys, chunk=chunk)} == whole
    assert (paths[7], paths[8], paths[30]) in {files for files, _, _ in whole}
