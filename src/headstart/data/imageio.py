"""Decoding one image file into an 8-bit RGB PIL image, with every failure turned into ImageDecodeError.

Kept free of torch and of global Pillow state (no ImageFile.LOAD_TRUNCATED_IMAGES, no MAX_IMAGE_PIXELS
changes) so it is safe to call from a thread pool and from an exported-model predictor.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_MAX_REASON_LEN = 120


class ImageDecodeError(Exception):
    """An image file that cannot be decoded; str(e) is a short human reason such as "truncated image"."""

    def __init__(self, reason: str, path: Path | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def load_rgb(path: Path | str, target_short_side: int | None = None) -> Image.Image:
    """Fully decode `path` into an RGB image with EXIF orientation applied.

    With target_short_side, JPEGs are decoded at a reduced DCT scale whose width and height both stay
    >= target_short_side, which makes large photos several times cheaper to load. Other formats are
    returned at full size; resizing is the caller's job.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageDecodeError("no such file", path) from None
    except OSError as e:
        raise ImageDecodeError(f"unreadable file ({e.strerror or type(e).__name__})", path) from e
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError("is a folder, not an image file", path)
    if st.st_size == 0:
        raise ImageDecodeError("empty file", path)

    try:
        with Image.open(path) as img:
            if target_short_side and img.format == "JPEG":
                img.draft("RGB", (target_short_side, target_short_side))
            # Decode now, inside the try, so corrupt or truncated data fails here rather than later
            # in a resize far from the file name.
            img.load()
            return _to_rgb(_apply_exif_orientation(img, path))
    except ImageDecodeError as e:
        e.path = path
        raise
    except Exception as e:  # Pillow signals bad data with many exception types; all mean "bad file".
        raise ImageDecodeError(_reason(e), path) from e


def _apply_exif_orientation(img: Image.Image, path: Path) -> Image.Image:
    try:
        rotated = ImageOps.exif_transpose(img)
    except Exception as e:
        # A broken EXIF block should not cost us an otherwise decodable image.
        logger.debug("%s: ignoring unreadable EXIF orientation (%s)", path, e)
        return img
    return rotated if rotated is not None else img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _UINT16_MODES or mode in ("I", "F"):
        # Pillow's own convert("L") clips wide values at 255, turning most 16-bit images white.
        return Image.fromarray(_wide_to_uint8(np.asarray(img), mode)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # Transparent pixels often hold arbitrary (commonly black) colour; white is what a viewer shows.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageDecodeError(f"unsupported colour mode {mode}") from e


def _wide_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16-bit, 32-bit-int or float single-channel array onto 0..255."""
    arr = arr.astype(np.float64)
    if mode in _UINT16_MODES:
        scaled = arr / 257.0  # 65535 -> 255 exactly
    else:
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = arr * 255.0  # float images conventionally live in [0, 1]
        elif lo >= 0.0 and hi <= 255.0:
            scaled = arr  # 8-bit data stored in a wide mode
        elif lo >= 0.0 and hi <= 65535.0:
            scaled = arr / 257.0  # 16-bit data: older Pillow opens 16-bit PNG/TIFF as mode "I"
        else:
            scaled = (arr - lo) * (255.0 / (hi - lo))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _reason(e: Exception) -> str:
    """A short, human reason for a decode failure, without Pillow's stack-trace vocabulary."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    low = msg.lower()
    if isinstance(e, Image.DecompressionBombError):
        return "image too large (exceeds Pillow's decompression-bomb pixel limit)"
    if isinstance(e, UnidentifiedImageError):
        return "cannot identify image file"
    if "truncated" in low or "broken data stream" in low or "premature end" in low:
        return "truncated image"
    if isinstance(e, MemoryError):
        return "out of memory while decoding"
    reason = f"corrupt image ({msg})" if msg else f"corrupt image ({type(e).__name__})"
    return reason if len(reason) <= _MAX_REASON_LEN else reason[: _MAX_REASON_LEN - 1] + "…"
