"""Generated images for the tests: small photos whose classes differ by dominant colour, folders of them, and
plain noise pixels.

Not a test file (pytest collects only test_*.py); imported as `from helpers_images import ...`. Torch-free, so
data-only tests stay fast to collect.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "webp": "WEBP", "tif": "TIFF", "tiff": "TIFF"}
_BASE_COLOURS = [(220, 40, 40), (40, 190, 60), (40, 70, 220), (230, 210, 40), (200, 60, 200), (40, 200, 210)]


def class_colour(index: int) -> tuple[int, int, int]:
    """A distinct RGB colour per class index; beyond the fixed palette, hues are spread by the golden ratio."""
    if index < len(_BASE_COLOURS):
        return _BASE_COLOURS[index]
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.8, 0.85)
    return round(r * 255), round(g * 255), round(b * 255)


def make_image(colour: Sequence[int], size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A (width, height) RGB image: the colour plus per-pixel noise and a random darker blob, so no two are equal."""
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.float32)
    arr[:] = np.asarray(colour, dtype=np.float32) * rng.uniform(0.8, 1.1)
    arr += rng.normal(0.0, 18.0, size=arr.shape)
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    yy, xx = np.ogrid[:h, :w]
    blob = (yy - cy) ** 2 + (xx - cx) ** 2 < (min(w, h) // 4) ** 2
    arr[blob] *= 0.6
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_image_folder(
    root: Path | str,
    classes: Sequence[str] = ("cat", "dog", "fish"),
    per_class: int = 6,
    size: tuple[int, int] = (64, 48),
    fmt: str = "jpg",
    seed: int = 0,
) -> Path:
    """Write root/<class>/<class>_NNN.<fmt> images (per_class each) and return root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for index, cls in enumerate(classes):
        class_dir = root / cls
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = make_image(class_colour(index), size, rng)
            img.save(class_dir / f"{cls}_{i:03d}.{fmt}", _FORMATS[fmt.lower()])
    return root


def noise_pixels(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """(h, w, channels) uniform random uint8 pixels, seeded."""
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, channels), dtype=np.uint8)
