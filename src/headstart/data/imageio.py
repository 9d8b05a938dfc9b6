"""Decoding one image file into an 8-bit RGB PIL image, with every failure turned into ImageDecodeError.

Kept free of torch and of global Pillow state (no ImageFile.LOAD_TRUNCATED_IMAGES, no MAX_IMAGE_PIXELS
changes) so it is safe to call from a thread pool and from an exported-model predictor.

The rule for which files are images lives here, once: a name whose extension is in IMAGE_EXTENSIONS
(`is_image_path`, used by the class-folder scan and by predict's folder listing), holding data in one of
IMAGE_FORMATS (`load_rgb` lets Pillow try only those decoders, whatever the extension, so a PNG named .jpg
works while an EPS named .jpg is never handed to Ghostscript).

Work per image is bounded before any pixel is decoded: more pixels than Pillow's own limit
(Image.MAX_IMAGE_PIXELS, read at call time) or an aspect ratio beyond MAX_ASPECT_RATIO is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
# The decoders behind those extensions (JPEG also opens camera MPO files, PNG also APNG).
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
# Longer side over shorter side beyond which a picture is a line, not a photo: a 10000x1 strip centre-cropped
# to a square is one pixel stretched, and resizing its short side to the model's size costs gigabytes.
MAX_ASPECT_RATIO = 100

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_MAX_REASON_LEN = 120
_NOT_REGULAR = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"),
                (stat.S_ISBLK, "device"))


class ImageDecodeError(Exception):
    """An image file that cannot be decoded; str(e) is a short human reason such as "truncated image"."""

    def __init__(self, reason: str, path: Path | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


def is_image_path(path: Path | str) -> bool:
    """Whether a name is one headstart treats as an image (the one rule for scan and predict's folders)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def unreadable_reason(path: Path | str) -> str | None:
    """Why `path` cannot be read as an image file (the reason load_rgb would give before decoding), or None.

    Opens and closes the file without reading it: cheap enough for a folder scan, and it sees what a mere
    stat cannot (no read permission, a symlink loop)."""
    try:
        os.close(_open_regular(path))
    except ImageDecodeError as e:
        return e.reason
    return None


def load_rgb(path: Path | str, target_short_side: int | None = None) -> Image.Image:
    """Fully decode `path` into an RGB image with EXIF orientation applied.

    With target_short_side, JPEGs are decoded at a reduced DCT scale whose width and height both stay
    >= target_short_side, which makes large photos several times cheaper to load. Other formats are
    returned at full size; resizing is the caller's job. Pillow's warnings about the file are logged with
    its path rather than printed.
    """
    path = Path(path)
    fd = _open_regular(path)
    with _PILLOW_WARNINGS.capture(path), os.fdopen(fd, "rb") as f:
        try:
            with Image.open(f, formats=IMAGE_FORMATS) as img:
                _check_size(img.size)
                if target_short_side and img.format in ("JPEG", "MPO"):
                    img.draft("RGB", (target_short_side, target_short_side))
                # Decode now, inside the try, so corrupt or truncated data fails here rather than later
                # in a resize far from the file name.
                img.load()
                return _to_rgb(_apply_exif_orientation(img, path))
        except ImageDecodeError as e:
            e.path = path
            raise
        except Exception as e:  # Pillow signals bad data with many exception types; all mean "bad file".
            raise ImageDecodeError(_reason(e, path), path) from e


def is_decoded(item: object) -> bool:
    """Whether `item` is an image already in memory (a PIL image or a numpy array) rather than a path."""
    return isinstance(item, (Image.Image, np.ndarray))


def decoded_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """An image already in memory as `load_rgb` would return it from a file: a PIL image (any mode; its EXIF
    orientation applied) or a uint8 array of H x W x 3 (RGB) or H x W (grey), under the same size rules.
    ImageDecodeError says what is wrong with anything else."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ImageDecodeError(f"an image array must be uint8 of shape (H, W, 3) or (H, W), not "
                                   f"{image.dtype} of shape {image.shape}")
        _check_size((image.shape[1], image.shape[0]))
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    _check_size(image.size)
    try:
        image.load()  # a lazily opened image decodes here, its errors named like a file's
        return _to_rgb(_apply_exif_orientation(image, Path(getattr(image, "filename", "") or "<image>")))
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001  Pillow signals bad data with many exception types
        raise ImageDecodeError(_reason(e, Path("<image>"))) from e


def read_size(path: Path | str) -> tuple[int, int]:
    """(width, height) from the file's header, nothing decoded; ImageDecodeError as load_rgb would raise."""
    path = Path(path)
    fd = _open_regular(path)
    with _PILLOW_WARNINGS.capture(path), os.fdopen(fd, "rb") as f:
        try:
            with Image.open(f, formats=IMAGE_FORMATS) as img:
                return img.size
        except Exception as e:
            raise ImageDecodeError(_reason(e, path), path) from e


def _open_regular(path: Path | str) -> int:
    """A read-only descriptor on `path`, which must be a non-empty regular file.

    O_NONBLOCK makes opening a named pipe return at once instead of waiting for a writer; the fstat after
    it then refuses anything but a regular file, so no pipe or device is ever read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageDecodeError(describe_os_error(e, path), Path(path)) from None
    try:
        st = os.fstat(fd)
        problem = _file_type_problem(st)
        if problem is None and st.st_size == 0:
            problem = "empty file"
    except OSError as e:
        problem = describe_os_error(e, path)
    if problem is not None:
        os.close(fd)
        raise ImageDecodeError(problem, Path(path))
    return fd


def _file_type_problem(st: os.stat_result) -> str | None:
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not an image file"
    kind = next((name for test, name in _NOT_REGULAR if test(st.st_mode)), "special file")
    return f"not a regular file ({kind})"


def describe_os_error(e: OSError, path: Path | str) -> str:
    """A short reason for a failed open, stat or folder listing, in the same words wherever files are read."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno == errno.ENOENT:
        if os.path.islink(path):
            try:
                return f"broken link (points to {os.readlink(path)})"
            except OSError:
                return "broken link"
        return "no such file"
    if e.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return f"unreadable file ({e.strerror or type(e).__name__})"


def _check_size(size: tuple[int, int]) -> None:
    """Refuse, from the header alone, images whose decoding or resizing would cost absurd memory."""
    w, h = size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"corrupt image ({w}x{h} pixels)")
    limit = Image.MAX_IMAGE_PIXELS  # Pillow itself only warns between 1x and 2x this limit
    if limit and w * h > limit:
        raise ImageDecodeError(f"image too large ({w}x{h} pixels, over Pillow's limit of {limit})")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageDecodeError(f"image too thin ({w}x{h} pixels, aspect ratio over {MAX_ASPECT_RATIO}:1)")


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


def _reason(e: BaseException, path: Path) -> str:
    """A short, human reason for a decode failure, without Pillow's stack-trace vocabulary."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    low = msg.lower()
    if isinstance(e, Image.DecompressionBombError):
        return "image too large (exceeds Pillow's decompression-bomb pixel limit)"
    if isinstance(e, UnidentifiedImageError):
        suffix = path.suffix.lower()
        if suffix and suffix not in IMAGE_EXTENSIONS and suffix in Image.registered_extensions():
            return f"unsupported image format ({suffix}) — convert it to JPEG or PNG"
        return "cannot identify image file"
    if isinstance(e, PermissionError):
        return "permission denied"
    if "truncated" in low or "broken data stream" in low or "premature end" in low:
        return "truncated image"
    if isinstance(e, MemoryError):
        return "out of memory while decoding"
    reason = f"corrupt image ({msg})" if msg else f"corrupt image ({type(e).__name__})"
    return reason if len(reason) <= _MAX_REASON_LEN else reason[: _MAX_REASON_LEN - 1] + "…"


class _WarningRouter:
    """Pillow's warnings about a file, logged with that file's path instead of printed without it.

    warnings.catch_warnings swaps process-wide state and is not thread-safe, while load_rgb runs in a thread
    pool. So the first decoding thread in installs one hook (and an "always" filter for PIL, or only the first
    file with a given warning would be named), the last one out restores what was there, and the hook sends
    each warning to the list of the thread that raised it; warnings from other threads pass through."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: warnings.catch_warnings | None = None
        self._previous = warnings.showwarning
        self._local = threading.local()

    @contextmanager
    def capture(self, path: Path) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = warnings.catch_warnings()
                self._saved.__enter__()
                warnings.filterwarnings("always", module=r"PIL\.")
                self._previous = warnings.showwarning
                warnings.showwarning = self._show
            self._users += 1
        caught: list[tuple[type[Warning], str]] = []
        self._local.caught = caught
        try:
            yield
        finally:
            self._local.caught = None
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._saved is not None:
                    self._saved.__exit__(None, None, None)
                    self._saved = None
            _log_warnings(path, caught)

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        caught = getattr(self._local, "caught", None)
        if caught is None:
            self._previous(message, category, filename, lineno, file, line)
        else:
            caught.append((category, str(message)))


def _log_warnings(path: Path, caught: list[tuple[type[Warning], str]]) -> None:
    for category, message in dict.fromkeys(caught):  # once each, in order
        # Pillow warns of a decompression bomb exactly when _check_size refuses the file: the skip says it.
        if not issubclass(category, Image.DecompressionBombWarning):
            logger.warning("%s: %s", path, message)


_PILLOW_WARNINGS = _WarningRouter()
