"""data.groups: near-duplicate groups (by features, or a manifest's `group` column) kept on one side of the
carved validation split (issue 26), and the summary saying so."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers_images import make_image_folder
from headstart.data import groups
from headstart.data.scan import scan_folder


def _copies(n_groups: int, per_group: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Features of `n_groups` distinct photos, each with `per_group` near-copies (a shot under several lights)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_groups, dim))
    return np.repeat(base, per_group, axis=0) + 0.05 * rng.normal(size=(n_groups * per_group, dim))


def test_near_copies_form_groups_and_distinct_photos_stay_alone():
    feats = np.concatenate([_copies(6, 5), np.random.default_rng(1).normal(size=(20, 32))])
    ids = groups.near_duplicate_groups(feats)
    assert [len(set(ids[g * 5:(g + 1) * 5])) for g in range(6)] == [1] * 6
    assert len(set(ids[:30])) == 6 and len(set(ids[30:])) == 20  # the distinct photos: each its own group
    labels = np.zeros(len(feats), int)
    labels[2] = 1  # a look-alike of another class is no copy: it leaks no label
    apart = groups.near_duplicate_groups(feats, labels)
    assert apart[2] != apart[0] and len(set(apart[[0, 1, 3, 4]])) == 1


def test_a_crowd_of_look_alikes_is_no_group_but_a_copy_among_them_is():
    # elpv: defect-free cells all look alike (~0.9); only a pair far closer than the crowd is a copy
    rng = np.random.default_rng(2)
    centre, spread = rng.normal(size=(1, 32)), rng.normal(size=(6, 32))
    crowd = np.tile(centre, (40, 1)) + 0.15 * rng.normal(size=(40, 32))
    feats = np.concatenate([crowd, crowd[:1] + 0.01 * rng.normal(size=(1, 32)), 6 * spread])
    ids = groups.near_duplicate_groups(feats)
    assert ids[40] == ids[0] and len(set(ids[1:40])) == 39


def test_a_group_never_grows_past_its_cap():
    # elpv's look-alike solar cells chained 1,432 photos into groups of up to 321 before the cap
    ids = groups.near_duplicate_groups(_copies(1, 30), most=8)
    assert np.bincount(ids).max() <= 8


def test_groups_stay_on_one_side_and_each_class_keeps_its_validation_share():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], [200, 60])
    ids = np.arange(260) // 5  # groups of five photos, one label each
    splits = np.where(rng.random(260) < 0.2, "val", "train")
    splits[-3:] = "test"
    new, grouping = groups.keep_together(splits, labels, ids)
    pool = np.flatnonzero(splits != "test")
    assert all(len(set(new[pool][ids[pool] == g])) == 1 for g in np.unique(ids[pool]))
    assert list(new[-3:]) == ["test"] * 3  # the test split never moves
    for label in (0, 1):  # a vote per group would have sent most groups, and so most of validation, to train
        before, after = ((s[pool] == "val") & (labels[pool] == label) for s in (splits, new))
        assert abs(int(after.sum()) - int(before.sum())) <= 3
    assert grouping.groups == 52 and grouping.photos == 257 and grouping.moved > 0


def test_a_class_keeps_training_and_validation_photos_whatever_its_groups():
    splits, labels = np.array(["val", "train", "train", "train"]), np.array([0, 0, 1, 1])
    new, _ = groups.keep_together(splits, labels, np.array([0, 0, 2, 3]))
    assert (new[labels == 0] == "train").any()
    # one group of six photos, one of them in validation: all to train would leave the class unjudged
    splits, labels = np.array(["val"] + ["train"] * 5 + ["val", "train"]), np.array([0] * 6 + [1, 1])
    new, _ = groups.keep_together(splits, labels, np.array([0] * 6 + [6, 7]))
    assert list(new) == list(splits)


def _manifest(tmp_path: Path, split_column: bool = False) -> Path:
    folder = make_image_folder(tmp_path / "photos", ("ok", "bad"), per_class=12)
    rows = ["path,label,group" + (",split" if split_column else "")]
    for cls in ("ok", "bad"):
        for i, p in enumerate(sorted((folder / cls).iterdir())):
            rows.append(f"photos/{cls}/{p.name},{cls},{cls}-part{i // 4}" + (",train" if split_column else ""))
    path = tmp_path / "photos.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_manifests_group_column_keeps_each_part_on_one_side(tmp_path):
    ds = scan_folder(_manifest(tmp_path), val_split=0.3, seed=3)
    paths = [s.path for s in ds.samples]
    splits, labels = np.array([s.split for s in ds.samples]), np.array([s.label for s in ds.samples])
    out, grouping = groups.regroup(ds, paths, np.zeros((len(paths), 4)), splits, labels)
    assert grouping.source == "manifest" and grouping.groups == 6 and grouping.moved > 0
    side = {}
    for s in out.samples:
        side.setdefault(f"{s.label}-{int(s.path.stem.rsplit('_', 1)[-1]) // 4}", set()).add(s.split)
    assert all(len(v) == 1 for v in side.values()) and any(s.split == "val" for s in out.samples)
    assert "6 groups of 24 photos (from the manifest's group column)" in groups.describe(grouping)


def test_the_users_own_split_is_left_as_given(tmp_path, split_folder):
    ds = scan_folder(split_folder)
    paths = [s.path for s in ds.samples]
    splits, labels = np.array([s.split for s in ds.samples]), np.array([s.label for s in ds.samples])
    assert groups.regroup(ds, paths, _copies(1, len(paths)), splits, labels) == (ds, groups.Grouping())
    assert groups.user_split("manifest", _manifest(tmp_path / "m", split_column=True))


def test_training_says_how_many_groups_it_kept_together(tmp_path, tiny_weights, tiny_cache):
    from headstart import ImageClassifier
    from helpers_models import TINY_BACKBONE

    clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=3, device="cpu", strategy="head")
    clf.fit(_manifest(tmp_path))
    assert "groups of 24 photos (from the manifest's group column) kept on one side" in clf.decision_.groups
    assert clf.decision_.to_dict()["groups"] == clf.decision_.groups
    # the split it validated on can be carved again (a report on the training folder's validation split)
    again = groups.apply_moves(scan_folder(_manifest(tmp_path / "again"), val_split=0.2, seed=clf.seed),
                               tuple((p.replace(str(tmp_path), str(tmp_path / "again")), s)
                                     for p, s in clf.decision_.moved))
    assert clf.decision_.moved and sum(s.split == "val" for s in again.samples) == clf.val_metrics_.n


def test_a_json_lines_manifests_group_key_counts_like_a_csv_column(tmp_path):
    import json

    rows = [line.split(",") for line in _manifest(tmp_path).read_text().splitlines()[1:]]
    jsonl = tmp_path / "photos.jsonl"
    jsonl.write_text("".join(json.dumps({"path": p, "label": lab, "Group": g}) + "\n" for p, lab, g in rows))
    named = groups.manifest_groups(jsonl)
    assert len(named) == 24 and len(set(named.values())) == 6
    assert named == groups.manifest_groups(tmp_path / "photos.csv")
    ds = scan_folder(jsonl, val_split=0.3, seed=3)
    paths = [s.path for s in ds.samples]
    splits, labels = np.array([s.split for s in ds.samples]), np.array([s.label for s in ds.samples])
    _, grouping = groups.regroup(ds, paths, np.zeros((len(paths), 4)), splits, labels)
    assert grouping.source == "manifest" and grouping.groups == 6


def test_cross_validation_keeps_each_group_in_one_fold_and_says_so(tmp_path, tiny_weights, tiny_cache):
    from headstart import ImageClassifier
    from headstart.records import CrossValidation
    from helpers_models import TINY_BACKBONE

    clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=3, device="cpu", strategy="head", cv=3)
    clf.fit(_manifest(tmp_path))
    assert clf.cv_ is not None and clf.cv_.folds == 3 and clf.cv_.groups == 6
    assert CrossValidation.from_dict(clf.cv_.to_dict()) == clf.cv_
