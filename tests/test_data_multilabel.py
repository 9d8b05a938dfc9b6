"""Multi-label manifests: detection, rows with label lists (CSV and JSON Lines), the one-line errors naming
file:line, images with no label kept, and the seeded iterative stratification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers_images import make_image
from headstart.data.multilabel import is_multilabel_manifest, read_multilabel, stratified_pick
from headstart.errors import DataError


def _images(root: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image((200, 60, 60), (24, 24), rng).save(root / "img" / f"{i:03d}.jpg")
    return [f"img/{i:03d}.jpg" for i in range(n)]


def _csv(root: Path, header: str, rows: list[str], name: str = "tags.csv") -> Path:
    path = root / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_label_lists_become_targets_and_an_empty_field_is_an_image_with_none(tmp_path: Path) -> None:
    paths = _images(tmp_path, 4)
    manifest = _csv(tmp_path, "path,labels", [f"{paths[0]},sea;sunset", f"{paths[1]},sea", f"{paths[2]},",
                                               f"{paths[3]},sunset;boat"])
    data = read_multilabel(manifest, val_split=0.0)
    assert data.classes == ("boat", "sea", "sunset")
    by_name = {p.name: row.tolist() for p, row in zip(data.paths, data.targets)}
    assert by_name == {"000.jpg": [0, 1, 1], "001.jpg": [0, 1, 0], "002.jpg": [0, 0, 0], "003.jpg": [1, 0, 1]}
    assert is_multilabel_manifest(manifest)


def test_json_lists_and_a_label_column_with_separators_are_multi_label(tmp_path: Path) -> None:
    paths = _images(tmp_path, 2)
    jsonl = tmp_path / "tags.jsonl"
    jsonl.write_text("\n".join(json.dumps({"path": p, "labels": labels})
                               for p, labels in zip(paths, (["a", "b"], []))) + "\n")
    data = read_multilabel(jsonl, val_split=0.0)
    assert data.classes == ("a", "b") and data.targets.tolist() == [[1, 1], [0, 0]]
    assert is_multilabel_manifest(jsonl)
    assert is_multilabel_manifest(_csv(tmp_path, "path,label", [f"{paths[0]},a;b", f"{paths[1]},a"], "l.csv"))
    assert not is_multilabel_manifest(_csv(tmp_path, "path,label", [f"{paths[0]},a", f"{paths[1]},b"], "s.csv"))


@pytest.mark.parametrize("labels, words", [
    ("sea;;sunset", "empty label name"), ("sea;sea", "listed twice"), ("sea; sunset", "surrounding spaces"),
])
def test_a_malformed_row_is_one_error_naming_file_and_line(tmp_path: Path, labels: str, words: str) -> None:
    paths = _images(tmp_path, 2)
    manifest = _csv(tmp_path, "path,labels", [f"{paths[0]},sea", f"{paths[1]},{labels}"])
    with pytest.raises(DataError, match=f"tags.csv:3: .*{words}"):
        read_multilabel(manifest)


def test_unknown_split_and_a_repeated_path_are_refused(tmp_path: Path) -> None:
    paths = _images(tmp_path, 2)
    with pytest.raises(DataError, match="tags.csv:2: unknown split 'dev'"):
        read_multilabel(_csv(tmp_path, "path,labels,split", [f"{paths[0]},a,dev"]))
    with pytest.raises(DataError, match="listed again"):
        read_multilabel(_csv(tmp_path, "path,labels", [f"{paths[0]},a", f"{paths[0]},b"], "twice.csv"))


def test_missing_files_are_skipped_and_named(tmp_path: Path) -> None:
    paths = _images(tmp_path, 2)
    data = read_multilabel(_csv(tmp_path, "path,labels", [f"{paths[0]},a", "img/gone.jpg,b", f"{paths[1]},b"]),
                           val_split=0.0)
    assert len(data.paths) == 2 and [p.name for p, _ in data.skipped] == ["gone.jpg"]


def test_the_split_is_seeded_and_spreads_every_label() -> None:
    rng = np.random.default_rng(1)
    targets = (rng.random((400, 6)) < [0.5, 0.3, 0.1, 0.05, 0.03, 0.9]).astype(np.uint8)
    picked = stratified_pick(targets, 0.25, seed=3)
    assert np.array_equal(picked, stratified_pick(targets, 0.25, seed=3))
    assert len(picked) == 100
    # iterative stratification: every label's positives within one of its quota, rare labels included
    assert np.all(np.abs(targets[picked].sum(0) - 0.25 * targets.sum(0)) <= 1.0), targets[picked].sum(0)


def test_a_label_carved_out_entirely_gets_a_training_row_back(tmp_path: Path) -> None:
    paths = _images(tmp_path, 12)
    rows = [f"{p},common" for p in paths[:-1]] + [f"{paths[-1]},rare;common"]
    data = read_multilabel(_csv(tmp_path, "path,labels", rows), val_split=0.5, seed=0)
    rare = data.classes.index("rare")
    assert data.part("train")[:, rare].sum() == 1
