"""data.imageio: load_rgb turns every mode into RGB (transparency onto white, 16-bit scaled, first GIF frame,
EXIF orientation, JPEG draft), refuses what is not an image, and is thread-safe; plus a check that the generated
fixture's classes really differ. Torch-free."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_images import make_image_folder, noise_pixels
from headstart.data.imageio import IMAGE_EXTENSIONS, ImageDecodeError, load_rgb


def test_extensions_are_lower_case_with_dot():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == IMAGE_EXTENSIONS


def _rgba_with_clear_corner() -> Image.Image:
    arr = np.dstack([noise_pixels(24, 32), np.full((24, 32), 255, np.uint8)])
    arr[:4, :4, 3] = 0
    return Image.fromarray(arr, "RGBA")


def _palette_with_transparency() -> Image.Image:
    img = Image.fromarray(noise_pixels(24, 32)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = int(np.asarray(img)[0, 0])
    return img


def _animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


_MODE_CASES = {
    "L.png": lambda: Image.fromarray(noise_pixels(24, 32, 1)[..., 0], "L"),
    "LA.png": lambda: Image.fromarray(noise_pixels(24, 32, 2), "LA"),
    "P.png": lambda: Image.fromarray(noise_pixels(24, 32)).convert("P", palette=Image.Palette.ADAPTIVE),
    "P_transparent.png": _palette_with_transparency,
    "RGBA.png": _rgba_with_clear_corner,
    "CMYK.jpg": lambda: Image.fromarray(noise_pixels(24, 32, 4), "CMYK"),
    "CMYK.tiff": lambda: Image.fromarray(noise_pixels(24, 32, 4), "CMYK"),
    "1.png": lambda: Image.fromarray(noise_pixels(24, 32, 1)[..., 0] > 127),
    "1.bmp": lambda: Image.fromarray(noise_pixels(24, 32, 1)[..., 0] > 127),
    "RGB.gif": lambda: Image.fromarray(noise_pixels(24, 32)),
    "RGB.webp": lambda: Image.fromarray(noise_pixels(24, 32)),
    "RGBA.webp": _rgba_with_clear_corner,
    "RGB.bmp": lambda: Image.fromarray(noise_pixels(24, 32)),
    "RGB.tif": lambda: Image.fromarray(noise_pixels(24, 32)),
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
    img = Image.fromarray(noise_pixels(40, 60))  # 60 wide, 40 high
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    assert Image.open(path).size == (60, 40)
    assert load_rgb(path).size == (40, 60)


def test_large_jpeg_uses_draft(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(noise_pixels(1500, 2000)).save(path, quality=80)
    img = load_rgb(path, target_short_side=256)
    assert 256 <= min(img.size) < 1500
    assert load_rgb(path).size == (2000, 1500)


def test_truncated_jpeg_raises(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(noise_pixels(256, 256)).save(good)
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


# --- hostile files: permissions, pipes, links, sizes, formats, Pillow's warnings (issue 12) ------------------------


def _jpeg_with_corrupt_exif(path: Path) -> Path:
    """A JPEG whose EXIF block says a tag holds more bytes than it does: Pillow warns while reading it."""
    img = Image.fromarray(noise_pixels(20, 30))
    exif = img.getexif()
    exif[0x010E] = "x" * 100  # ImageDescription, stored out of line
    img.save(path, exif=exif.tobytes()[:-60])
    return path


def test_permission_denied_is_named_not_called_corrupt(tmp_path, monkeypatch):
    """As root no file is unreadable, so open() is made to refuse this one path (tests/test_hostile_corpus.py
    also checks a real chmod 000 file as an unprivileged user)."""
    import os

    path = tmp_path / "locked.jpg"
    Image.fromarray(noise_pixels(8, 8)).save(path)
    real_open = os.open

    def refuse(p, *args, **kwargs):
        if Path(p) == path:
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ImageDecodeError) as err:
        load_rgb(path)
    assert err.value.reason == "permission denied"


def test_named_pipe_is_refused_without_reading_it(tmp_path):
    import os
    import signal

    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    signal.alarm(10)  # opening a FIFO for reading blocks until a writer comes: never wait for one
    try:
        with pytest.raises(ImageDecodeError) as err:
            load_rgb(pipe)
    finally:
        signal.alarm(0)
    assert err.value.reason == "not a regular file (named pipe)"


def test_links_are_named_for_what_they_are(tmp_path):
    import os

    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    os.symlink("nowhere.jpg", tmp_path / "dangling.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    reasons = {}
    for name in ("loop.jpg", "dangling.jpg", "zero.jpg"):
        with pytest.raises(ImageDecodeError) as err:
            load_rgb(tmp_path / name)
        reasons[name] = err.value.reason
    assert reasons == {"loop.jpg": "symlink loop", "dangling.jpg": "broken link (points to nowhere.jpg)",
                       "zero.jpg": "not a regular file (device)"}


def test_a_folder_is_not_an_image(tmp_path):
    (tmp_path / "album.jpg").mkdir()
    with pytest.raises(ImageDecodeError, match="is a folder"):
        load_rgb(tmp_path / "album.jpg")


@pytest.mark.parametrize(("size", "reason"), [((10000, 1), "image too thin"), ((1, 10000), "image too thin"),
                                              ((40000, 1), "image too thin"), ((101, 1), "image too thin")])
def test_absurd_aspect_ratios_are_refused(tmp_path, size, reason):
    from headstart.data.imageio import MAX_ASPECT_RATIO

    path = tmp_path / "thin.png"
    Image.new("RGB", size).save(path)
    with pytest.raises(ImageDecodeError) as err:
        load_rgb(path)
    assert err.value.reason.startswith(reason) and f"{MAX_ASPECT_RATIO}:1" in err.value.reason


def test_an_aspect_ratio_at_the_limit_is_an_image(tmp_path):
    path = tmp_path / "line.png"
    Image.fromarray(noise_pixels(1, 100)).save(path)
    assert load_rgb(path).size == (100, 1)


def test_over_pillows_pixel_limit_is_refused_from_the_header(tmp_path):
    """10000x10000 is over Image.MAX_IMAGE_PIXELS but under twice it, where Pillow itself only warns and decodes
    (300 MB); the header alone is enough to refuse it, and the refusal says so instead of a printed warning."""
    import struct
    import warnings
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path = tmp_path / "big.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError) as err:
            load_rgb(path)
    assert err.value.reason.startswith("image too large (10000x10000 pixels, over Pillow's limit")
    assert not caught


def test_only_the_supported_decoders_are_tried(tmp_path):
    """An EPS named .jpg was handed to Pillow's EPS plugin, which runs Ghostscript; an .avif was labelled by
    predict though train skips it. One rule now: the supported formats, whatever the name says."""
    eps = tmp_path / "script.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageDecodeError) as err:
        load_rgb(eps)
    assert err.value.reason == "cannot identify image file"
    avif = tmp_path / "photo.avif"
    avif.write_bytes(b"\0\0\0\x1cftypavif" + b"\0" * 64)
    with pytest.raises(ImageDecodeError, match=r"unsupported image format \(\.avif\)"):
        load_rgb(avif)
    png_as_jpg = tmp_path / "really_png.jpg"
    Image.fromarray(noise_pixels(8, 8)).save(png_as_jpg, "PNG")
    assert load_rgb(png_as_jpg).size == (8, 8)


def test_pillow_warnings_are_logged_with_the_file_not_printed(tmp_path, caplog):
    import warnings

    path = _jpeg_with_corrupt_exif(tmp_path / "exif.jpg")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", "headstart"):
        warnings.simplefilter("always")
        for _ in range(2):  # every time, not only the first: each run's log names its files
            assert load_rgb(path).size == (30, 20)
    assert not caught
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and all(m.startswith(f"{path}: ") for m in logged), logged


def test_pillow_warnings_reach_the_right_file_from_many_threads(tmp_path, caplog):
    import warnings

    bad = [_jpeg_with_corrupt_exif(tmp_path / f"exif{i}.jpg") for i in range(8)]
    good = sorted(make_image_folder(tmp_path / "good", classes=("g",), per_class=8).rglob("*.jpg"))
    before = (warnings.showwarning, list(warnings.filters))
    with caplog.at_level("WARNING", "headstart"), ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(load_rgb, [p for pair in zip(bad, good, strict=True) for p in pair] * 3))
    named = sorted(r.getMessage().split(": ")[0] for r in caplog.records)
    assert named == sorted(str(p) for p in bad * 3)
    assert (warnings.showwarning, list(warnings.filters)) == before  # the hook is gone with the last decoder


def test_decoding_a_thin_image_costs_little_memory(tmp_path):
    """Resizing a 10000x1 strip's short side to 256 before cropping cost 2.6 GiB; the crop alone is resampled now,
    and the loader refuses such a strip anyway. Peak RSS is measured in a fresh interpreter."""
    import subprocess
    import sys

    script = (
        "import resource, sys\n"
        "from PIL import Image\n"
        "from headstart.vision.preprocess import PreprocessConfig, eval_transform\n"
        "img = Image.new('RGB', (3000, 1), (200, 10, 10))\n"
        "eval_transform(Image.new('RGB', (300, 200)), PreprocessConfig())\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = eval_transform(img, PreprocessConfig())\n"
        "assert out.shape == (3, 224, 224)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 50  # MiB; resizing the whole 3000x1 strip first took ~590 MiB


def test_cropping_first_matches_resizing_first(tmp_path):
    """The crop-only resample gives the pixels the whole-image resize gave (to a rounding step)."""
    from headstart.vision.preprocess import PreprocessConfig, resize_and_crop

    for size in ((64, 48), (500, 375), (333, 777), (3000, 2000)):
        img = Image.fromarray(noise_pixels(size[1], size[0]))
        for cfg in (PreprocessConfig(), PreprocessConfig(input_size=48)):
            w, h = img.size
            scale = cfg.resize_size / min(w, h)
            nw, nh = max(cfg.input_size, round(w * scale)), max(cfg.input_size, round(h * scale))
            left, top = (nw - cfg.input_size) // 2, (nh - cfg.input_size) // 2
            old = img.resize((nw, nh), Image.Resampling.BICUBIC).crop(
                (left, top, left + cfg.input_size, top + cfg.input_size))
            diff = np.abs(np.asarray(old, np.int16) - np.asarray(resize_and_crop(img, cfg), np.int16))
            assert diff.max() <= 1, (size, cfg.input_size)
