"""data.manifest: CSV / JSON Lines rows of path,label[,split] into the same Dataset a folder scan makes; every
malformed row is one DataError line naming file:line; missing files are skipped and named; rows stream."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest

from helpers_cli import assert_one_line
from helpers_images import make_image_folder
from headstart.data.manifest import input_paths, is_manifest, iter_rows, scan_manifest
from headstart.data.scan import check_root, scan_folder
from headstart.errors import DataError


def _images(root: Path, per_class: int = 5) -> list[Path]:
    make_image_folder(root / "imgs", per_class=per_class)
    return sorted((root / "imgs").rglob("*.jpg"))


def _csv(root: Path, lines: list[str], name: str = "labels.csv") -> Path:
    path = root / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rows_of(root: Path, images: list[Path], split: str = "") -> list[str]:
    return [f"{p.relative_to(root)},{p.parent.name},{split}" for p in images]


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return _csv(tmp_path, ["path,label,split", *_rows_of(tmp_path, _images(tmp_path))])


def test_a_csv_manifest_is_the_dataset_a_folder_scan_makes(manifest: Path, tmp_path: Path) -> None:
    from_folder = scan_folder(tmp_path / "imgs", val_split=0.2, seed=3)
    from_manifest = scan_folder(manifest, val_split=0.2, seed=3)  # scan_folder reads a manifest given as the data
    assert from_manifest.classes == from_folder.classes == ("cat", "dog", "fish")
    assert from_manifest.samples == from_folder.samples  # same paths, labels and carved splits
    assert from_manifest.skipped == ()
    assert from_manifest.source.kind == "manifest" and from_manifest.source.rows == 15
    assert len(from_manifest.source.sha256) == 64
    assert from_folder.source.kind == "folder"


def test_jsonl_absolute_paths_explicit_splits_and_numeric_labels(tmp_path: Path) -> None:
    images = _images(tmp_path, per_class=4)
    rows = [{"path": str(p), "label": i % 2, "split": "val" if n % 4 == 0 else "train"}
            for n, (i, p) in enumerate((int(p.parent.name == "dog"), p) for p in images)]
    path = tmp_path / "sub" / "labels.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a trailing blank line is fine
    ds = scan_manifest(path, val_split=0.2)
    assert ds.classes == ("0", "1")
    assert [s.split for s in ds.samples].count("val") == sum(r["split"] == "val" for r in rows)  # none carved
    assert {s.path for s in ds.samples} == set(images)


def test_rows_without_a_split_are_split_like_a_folder(tmp_path: Path) -> None:
    images = _images(tmp_path, per_class=10)
    test_rows = [f"{p.relative_to(tmp_path)},{p.parent.name},test" for p in images[::5]]
    rest = _rows_of(tmp_path, [p for p in images if p not in images[::5]])
    ds = scan_manifest(_csv(tmp_path, ["path,label,split", *test_rows, *rest]), val_split=0.25, test_split=0.5)
    counts = {split: len(ds.subset(split)) for split in ("train", "val", "test")}
    assert counts["test"] == len(test_rows)  # explicit test rows: nothing more is carved for test
    assert counts["val"] == 6 and counts["train"] == 30 - 6 - len(test_rows)  # val carved per class, 2 of 8 each


def test_missing_and_unreadable_files_are_skipped_and_named(manifest: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"not a jpeg")  # opens fine: the decoder names it later, as in a folder
    lines = manifest.read_text().splitlines() + ["gone.jpg,cat,", "empty.jpg,dog,", "imgs/cat,dog,", "imgs ,fish,",
                                                 "garbage.jpg,fish,"]
    ds = scan_manifest(_csv(tmp_path, lines))
    reasons = dict(ds.skipped)
    assert set(reasons) == {tmp_path / name for name in ("gone.jpg", "empty.jpg", "imgs/cat", "imgs ")}
    assert reasons[tmp_path / "gone.jpg"].startswith("no such file (listed at ")
    assert reasons[tmp_path / "gone.jpg"].endswith("labels.csv:17)")
    assert "empty" in reasons[tmp_path / "empty.jpg"] and "labels.csv:18" in reasons[tmp_path / "empty.jpg"]
    assert "labels.csv:19" in reasons[tmp_path / "imgs/cat"]
    assert "surrounding spaces" in reasons[tmp_path / "imgs "]
    assert tmp_path / "garbage.jpg" in {s.path for s in ds.samples}


@pytest.mark.parametrize("lines, where, needle", [
    (["path,label", "a.jpg, cat"], ":2", "surrounding spaces"),
    (["path,label", "a.jpg,cat ", "b.jpg,dog"], ":2", "surrounding spaces"),
    (["path,label", "a.jpg,cat", "b.jpg,"], ":3", "empty label"),
    (["path,label", "a.jpg,cat", "b.jpg,   "], ":3", "empty label"),
    (["path,label,split", "a.jpg,cat,training"], ":2", "unknown split 'training'"),
    (["path,label,split", "a.jpg,cat,Val"], ":2", "unknown split 'Val'"),
    (["path,class", "a.jpg,cat"], ":1", "no 'label' column"),
    (["file,label", "a.jpg,cat"], ":1", "no 'path' column"),
    (["a.jpg,cat", "b.jpg,dog"], ":1", "no 'path' column"),
    (["path,label", "a.jpg,cat", "b.jpg,dog,val"], ":3", "3 field(s) where the header names 2"),
    (["path,label", ",cat"], ":2", "empty path"),
    (["path,label", "a.jpg,cat", "", "a.jpg,dog"], ":4", "listed again (first at"),
    (["path,label", 'a.jpg,"ca"t"'], ":2", "malformed CSV"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_malformed_csv_row_is_one_line_naming_it(tmp_path: Path, lines: list[str], where: str,
                                                      needle: str) -> None:
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    path = _csv(tmp_path, lines)
    with pytest.raises(DataError) as err:
        scan_manifest(path)
    assert_one_line(str(err.value), f"{path}{where}:", needle)


@pytest.mark.parametrize("text, where, needle", [
    ('{"path": "a.jpg", "label": "cat"}\n{"path": "b.jpg", "label": "dog"\n', ":2", "not valid JSON"),
    ('["a.jpg", "cat"]\n', ":1", "not an object"),
    ('{"path": "a.jpg"}\n', ":1", "no 'label' key"),
    ('{"label": "cat"}\n', ":1", "no 'path' key"),
    ('{"path": "a.jpg", "label": null}\n', ":1", "empty label"),
    ('{"path": "a.jpg", "label": ["cat"]}\n', ":1", "label is a JSON list"),
    ('{"path": "a.jpg", "label": true}\n', ":1", "label is a JSON bool"),
    ('\n\n{"path": "a.jpg", "label": "cat", "split": "dev"}\n', ":3", "unknown split 'dev'"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_each_malformed_json_line_is_one_line_naming_it(tmp_path: Path, text: str, where: str, needle: str) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    path = tmp_path / "labels.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        scan_manifest(path)
    assert_one_line(str(err.value), f"{path}{where}:", needle)


@pytest.mark.parametrize("content, needle", [
    (b"", "is empty"),
    (b"path,label\n", "lists no images"),
    (b"path,label\n\xff\xfe,cat\n", "not UTF-8"),
])
def test_whole_file_problems_are_one_line(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        scan_manifest(path)
    assert_one_line(str(err.value), str(path), needle)


def test_label_problems_found_after_reading_are_one_line(manifest: Path, tmp_path: Path) -> None:
    lines = manifest.read_text().splitlines()
    cases = {
        "only one label": [lines[0], *[row for row in lines[1:] if ",cat," in row]],
        "have no usable images": [*lines, "nowhere/1.jpg,bird,", "nowhere/2.jpg,bird,"],
        "have no train rows": [*lines, *[row.replace(",dog,", ",owl,").rstrip(",") + ",val" for row in lines[1:]
                                         if ",dog," in row][:1]],
        "none of the": [lines[0], "x/1.jpg,a,", "x/2.jpg,b,"],
    }
    for needle, rows in cases.items():
        if needle == "have no train rows":  # a second row for owl's image would be a duplicate: copy the file
            src = tmp_path / rows[-1].split(",")[0]
            dst = src.with_name("owl.jpg")
            dst.write_bytes(src.read_bytes())
            rows[-1] = f"{dst.relative_to(tmp_path)},owl,val"
        with pytest.raises(DataError) as err:
            scan_manifest(_csv(tmp_path, rows, "case.csv"))
        assert_one_line(str(err.value), "case.csv", needle)


def test_a_bom_and_extra_columns_and_header_case_are_fine(tmp_path: Path) -> None:
    images = _images(tmp_path, per_class=3)
    text = "Path, Label ,notes\n" + "".join(f'"{p.relative_to(tmp_path)}",{p.parent.name},"a, b"\n' for p in images)
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert len(scan_manifest(path, val_split=0.0).samples) == len(images)


def test_predict_inputs_need_only_a_path_and_keep_order_and_duplicates(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["path,label", "b.jpg,", "a.jpg,whatever ", "b.jpg,dog"])  # labels unchecked
    assert input_paths(path) == [tmp_path / "b.jpg", tmp_path / "a.jpg", tmp_path / "b.jpg"]
    with pytest.raises(DataError) as err:
        input_paths(_csv(tmp_path, ["file", "a.jpg"], "bad.csv"))
    assert_one_line(str(err.value), "bad.csv:1", "no 'path' column")


def test_check_root_and_is_manifest(tmp_path: Path, manifest: Path) -> None:
    check_root(manifest)  # a manifest file is data
    assert is_manifest(manifest) and not is_manifest(tmp_path)
    (tmp_path / "odd.csv").mkdir()
    assert not is_manifest(tmp_path / "odd.csv")  # a folder named like a manifest stays a folder
    with pytest.raises(DataError) as err:
        check_root(tmp_path / "missing.csv")
    assert_one_line(str(err.value), "missing.csv: no such file", "manifest")


def test_rows_stream_without_holding_the_file(tmp_path: Path) -> None:
    """iter_rows hands rows on one at a time: reading 100,000 rows peaks at ~2 MB (the interpreter's table of
    interned strings, where pathlib puts every file name, among it), where a list of them would take ~40 MB and the file's text 6 MB. Bounded by
    count and time."""
    n = 100_000
    path = tmp_path / "big.csv"
    with open(path, "w") as f:
        f.write("path,label,split\n")
        f.writelines(f"photos/some/longish/folder/image_{i:07d}.jpg,class_{i % 7},train\n" for i in range(n))
    assert path.stat().st_size > 5 << 20
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_rows(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 5 << 20, f"reading the rows peaked at {peak / 1e6:.1f} MB: something holds all of them"
    assert time.perf_counter() - t0 < 60


def test_scan_memory_per_image_is_a_small_index(tmp_path: Path) -> None:
    """What a manifest scan keeps per image is the Dataset's index (a Sample and its Path), not rows or text:
    bounded per image, so 100,000 images stay in tens of MB."""
    n = 4000
    (tmp_path / "f").mkdir()
    for i in range(n):  # distinct bytes: identical files under two labels would be a (logged) finding of their own
        (tmp_path / "f" / f"{i:05d}.jpg").write_bytes(b"%d" % i)
    path = _csv(tmp_path, ["path,label", *(f"f/{i:05d}.jpg,c{i % 2}" for i in range(n))])
    tracemalloc.start()
    try:
        ds = scan_manifest(path, val_split=0.2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds.samples) == n
    assert peak / n < 2000, f"{peak / n:.0f} bytes per image"
