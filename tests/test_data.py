from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_folder
from headstart.data.imageio import IMAGE_EXTENSIONS, ImageDecodeError, load_rgb
from headstart.errors import DataError
from headstart.data.scan import Dataset, list_images, scan_folder
from headstart.vision.preprocess import load_for_model
from headstart.vision.preprocess import PreprocessConfig


def _val_paths(ds: Dataset) -> set[Path]:
    return set(ds.paths("val"))


def _assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# --- scan_folder: layouts and splits -----------------------------------------------------------------


def test_extensions_are_lower_case_with_dot():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == IMAGE_EXTENSIONS


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


# --- scan_folder: errors ----------------------------------------------------------------------------


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


# --- list_images ------------------------------------------------------------------------------------


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


# --- load_rgb -----------------------------------------------------------------------------------------


def _noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, channels), dtype=np.uint8)


def _rgba_with_clear_corner() -> Image.Image:
    arr = np.dstack([_noise(24, 32), np.full((24, 32), 255, np.uint8)])
    arr[:4, :4, 3] = 0
    return Image.fromarray(arr, "RGBA")


def _palette_with_transparency() -> Image.Image:
    img = Image.fromarray(_noise(24, 32)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = int(np.asarray(img)[0, 0])
    return img


def _animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


_MODE_CASES = {
    "L.png": lambda: Image.fromarray(_noise(24, 32, 1)[..., 0], "L"),
    "LA.png": lambda: Image.fromarray(_noise(24, 32, 2), "LA"),
    "P.png": lambda: Image.fromarray(_noise(24, 32)).convert("P", palette=Image.Palette.ADAPTIVE),
    "P_transparent.png": _palette_with_transparency,
    "RGBA.png": _rgba_with_clear_corner,
    "CMYK.jpg": lambda: Image.fromarray(_noise(24, 32, 4), "CMYK"),
    "CMYK.tiff": lambda: Image.fromarray(_noise(24, 32, 4), "CMYK"),
    "1.png": lambda: Image.fromarray(_noise(24, 32, 1)[..., 0] > 127),
    "1.bmp": lambda: Image.fromarray(_noise(24, 32, 1)[..., 0] > 127),
    "RGB.gif": lambda: Image.fromarray(_noise(24, 32)),
    "RGB.webp": lambda: Image.fromarray(_noise(24, 32)),
    "RGBA.webp": _rgba_with_clear_corner,
    "RGB.bmp": lambda: Image.fromarray(_noise(24, 32)),
    "RGB.tif": lambda: Image.fromarray(_noise(24, 32)),
    "F.tiff": lambda: Image.fromarray(np.linspace(0, 1, 24 * 32, dtype=np.float32).reshape(24, 32), "F"),
    "I.tiff": lambda: Image.fromarray(np.linspace(0, 4000, 24 * 32).astype(np.int32).reshape(24, 32), "I"),
}


@pytest.mark.parametrize("name", sorted(_MODE_CASES))
def test_every_mode_becomes_rgb(tmp_path, name):
    path = tmp_path / name
    _MODE_CASES[name]().save(path)
    img = load_rgb(path)
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.shape == (24, 32, 3) and arr.dtype == np.uint8
    assert arr.std() > 0  # not collapsed to a single colour


def test_transparent_pixels_composite_onto_white(tmp_path):
    path = tmp_path / "rgba.png"
    _rgba_with_clear_corner().save(path)
    arr = np.asarray(load_rgb(path))
    assert (arr[:4, :4] == 255).all()


def test_palette_transparency_composites_onto_white(tmp_path):
    path = tmp_path / "p.png"
    img = _palette_with_transparency()
    img.save(path, transparency=img.info["transparency"])
    assert tuple(np.asarray(load_rgb(path))[0, 0]) == (255, 255, 255)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    arr = np.asarray(load_rgb(path))
    assert arr.shape == (48, 64, 3)
    assert arr.min() == 0 and arr.max() == 255
    assert 100 < np.median(arr) < 155  # a clipping conversion would put the median at 255


def test_animated_gif_uses_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    _animated_gif(path)
    assert tuple(np.asarray(load_rgb(path))[5, 5]) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(_noise(40, 60))  # 60 wide, 40 high
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    assert Image.open(path).size == (60, 40)
    assert load_rgb(path).size == (40, 60)


def test_large_jpeg_uses_draft(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(_noise(1500, 2000)).save(path, quality=80)
    img = load_rgb(path, target_short_side=256)
    assert 256 <= min(img.size) < 1500
    assert load_rgb(path).size == (2000, 1500)


def test_truncated_jpeg_raises(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_noise(256, 256)).save(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError) as err:
        load_rgb(bad)
    assert str(err.value) == "truncated image"
    assert err.value.path == bad


@pytest.mark.parametrize(
    ("content", "reason"), [(b"this is not a jpeg\n", "cannot identify image file"), (b"", "empty file")]
)
def test_non_image_content_raises(tmp_path, content, reason):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as err:
        load_rgb(path)
    assert str(err.value) == reason


def test_missing_file_raises_decode_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="no such file"):
        load_rgb(tmp_path / "nope.jpg")


def test_load_rgb_is_thread_safe(tmp_path):
    root = make_image_folder(tmp_path / "p", per_class=8)
    paths = sorted(root.rglob("*.jpg"))
    serial = [np.asarray(load_rgb(p, 32)) for p in paths]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda p: np.asarray(load_rgb(p, 32)), paths))
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_load_for_model_shape_and_dtype(tmp_path):
    path = tmp_path / "x.jpg"
    Image.fromarray(_noise(300, 500)).save(path)
    arr = load_for_model(path, PreprocessConfig())
    assert arr.dtype == np.float32 and arr.shape == (3, 224, 224)


def test_fixture_classes_are_visually_distinct(image_folder):
    means = {
        d.name: np.mean([np.asarray(load_rgb(p), np.float32).mean(axis=(0, 1)) for p in d.iterdir()], axis=0)
        for d in image_folder.iterdir()
    }
    names = sorted(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 60
