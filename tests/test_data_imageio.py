"""data.imageio: load_rgb turns every mode into RGB (transparency onto white, 16-bit scaled, first GIF frame,
EXIF orientation, JPEG draft), refuses what is not an image, and is thread-safe; plus a check that the generated
fixture's classes really differ. Torch-free."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import _noise, make_image_folder
from headstart.data.imageio import IMAGE_EXTENSIONS, ImageDecodeError, load_rgb


def test_extensions_are_lower_case_with_dot():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == IMAGE_EXTENSIONS


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


def test_fixture_classes_are_visually_distinct(image_folder):
    means = {
        d.name: np.mean([np.asarray(load_rgb(p), np.float32).mean(axis=(0, 1)) for p in d.iterdir()], axis=0)
        for d in image_folder.iterdir()
    }
    names = sorted(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 60
