"""Fuzzing the image loader with Hypothesis: random bytes, random bytes behind each format's magic number, and
valid small images of every supported format with bytes flipped, cut, inserted, overwritten or repeated.
load_rgb must return an RGB image (that the eval transform accepts) or raise ImageDecodeError; any other
exception, or a hang, fails. Derandomized (the same cases every run, no example database) and bounded by
max_examples and an alarm, so the whole file runs in CI in well under 30 s. Torch-free.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headstart.data.imageio import ImageDecodeError, load_rgb
from headstart.vision.preprocess import PreprocessConfig, eval_transform
from hostile_kinds import time_limit

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FILE_LIMIT_S = 60  # for each test's whole run: a hang fails instead of stalling CI
CFG = PreprocessConfig(input_size=32)


def _noise(h: int, w: int, c: int = 3) -> np.ndarray:
    return np.random.default_rng(h * 31 + w).integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()


def _encode(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (12, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


# Valid seeds, small so that a mutation lands in a header as often as in the data: (extension, bytes).
SEEDS: list[tuple[str, bytes]] = [
    ("jpg", _encode(Image.fromarray(_noise(12, 16)), "JPEG", quality=70)),
    ("jpg", _encode(Image.fromarray(_noise(12, 16, 4), "CMYK"), "JPEG")),
    ("jpg", _encode(Image.fromarray(_noise(12, 16)), "JPEG", progressive=True)),
    ("png", _encode(Image.fromarray(_noise(12, 16)), "PNG")),
    ("png", _encode(Image.fromarray(_noise(12, 16, 1).astype(np.uint16) * 257), "PNG")),
    ("png", _encode(Image.fromarray(_noise(12, 16)).convert("P"), "PNG", transparency=0)),
    ("bmp", _encode(Image.fromarray(_noise(12, 16)), "BMP")),
    ("gif", _encode(Image.fromarray(_noise(12, 16)), "GIF")),
    ("gif", _animated("GIF")),
    ("webp", _encode(Image.fromarray(_noise(12, 16)), "WEBP")),
    ("webp", _encode(Image.fromarray(_noise(12, 16, 4), "RGBA"), "WEBP", lossless=True)),
    ("tiff", _encode(Image.fromarray(_noise(12, 16)), "TIFF")),
    ("tiff", _encode(Image.fromarray(_noise(12, 16)), "TIFF", compression="tiff_lzw")),
    ("tiff", _animated("TIFF")),
]
MAGIC = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 ", b"II*\0", b"MM\0*"]





@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def load_or_refuse(path: Path, data: bytes, target: int | None) -> None:
    """Write `data` to `path` and decode it: an RGB image the eval transform takes, or ImageDecodeError."""
    path.write_bytes(data)
    try:
        img = load_rgb(path, target)
    except ImageDecodeError as e:
        assert e.reason and "\n" not in e.reason and e.path == path
        return
    assert img.mode == "RGB" and min(img.size) >= 1
    assert eval_transform(img, CFG).shape == (3, 32, 32)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    ext, data = draw(st.sampled_from(SEEDS))
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "truncate", "insert", "overwrite", "repeat")))
        at = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[at] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "overwrite":
            patch = draw(st.binary(min_size=1, max_size=8))
            buf[at:at + len(patch)] = patch
        else:  # repeat a slice: duplicated chunks and markers
            buf[at:at] = buf[at:at + draw(st.integers(1, 64))]
    return ext, bytes(buf)


@FUZZ
@given(data=st.binary(max_size=2048), ext=st.sampled_from(["jpg", "png", "bmp", "gif", "webp", "tiff", "bin"]))
def test_random_bytes_decode_or_refuse(scratch: Path, data: bytes, ext: str) -> None:
    load_or_refuse(scratch / f"random.{ext}", data, None)


@FUZZ
@given(magic=st.sampled_from(MAGIC), tail=st.binary(max_size=512), ext=st.sampled_from(["jpg", "png", "tiff"]))
def test_magic_number_then_random_bytes_decode_or_refuse(scratch: Path, magic: bytes, tail: bytes, ext: str) -> None:
    load_or_refuse(scratch / f"magic.{ext}", magic + tail, None)


@settings(FUZZ, max_examples=1000)
@given(case=mutated(), target=st.sampled_from([None, 8, 32]))
def test_mutated_images_decode_or_refuse(scratch: Path, case: tuple[str, bytes], target: int | None) -> None:
    ext, data = case
    load_or_refuse(scratch / f"mutated.{ext}", data, target)


def test_seeds_are_valid_images_of_every_format(scratch: Path) -> None:
    """The mutations start from images that decode: otherwise the fuzzing would only ever test refusals."""
    assert {ext for ext, _ in SEEDS} == {"jpg", "png", "bmp", "gif", "webp", "tiff"}
    for i, (ext, data) in enumerate(SEEDS):
        path = scratch / f"seed{i}.{ext}"
        path.write_bytes(data)
        assert load_rgb(path).mode == "RGB"


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    with time_limit(FILE_LIMIT_S):
        yield
