"""The corpus of hostile inputs: each kind of bad file or folder, how it is made (generated: nothing binary is
committed), and what train/evaluate and predict do with it. Used by tests/test_hostile_corpus.py and importable
by a bench (bench/hostile.py): `for kind in KINDS: path = make(kind, class_folder)`.

Outcomes for train/evaluate (`train`):
- CONVERTED: the file is used (decoded to RGB, first frame of an animation).
- SKIPPED:   the file is left out and named in the run's skipped list with `reason` (found by the scan, or by
             the decoder, which reports it with the failed extraction).
- IGNORED:   left out without a line (hidden and system files, the contents of hidden folders).
- ERROR:     the command stops before any work with one DataError line containing `reason`.
`warning`, when set, is a substring of the logging warning the scan gives (for a kind that still trains).
`predict` is what predict does with the file named explicitly: CONVERTED (a label) or the error text of its
row; None for kinds that are folders or layouts rather than one file.
Kinds with `unprivileged` only show their outcome to a user without root's override of file permissions.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CONVERTED, SKIPPED, IGNORED, ERROR = "converted", "skipped and named", "ignored", "one DataError line"
FILE, LAYOUT = "file", "layout"  # a kind made inside one class folder / one that reshapes the whole data folder


@dataclass(frozen=True)
class Kind:
    name: str
    made: str  # how the input is made, for the README table
    train: str  # CONVERTED, SKIPPED, IGNORED or ERROR
    reason: str = ""  # substring of the skip reason or of the error line
    predict: str | None = CONVERTED  # CONVERTED or a substring of the error row; None: not a single file
    scope: str = FILE
    warning: str = ""
    unprivileged: bool = False
    build: Callable[[Path], Path] | None = None
    data_is_made: bool = False  # LAYOUT kinds whose made path is what is passed as DATA


def make(kind: Kind, folder: Path) -> Path:
    """Create `kind` in `folder` (a class folder for FILE kinds, the data folder for LAYOUT ones) and return the
    path that train and predict should report (the file, link or folder made)."""
    assert kind.build is not None
    return kind.build(Path(folder))


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """A hang becomes a failure: SIGALRM interrupts even a blocking open() of a pipe."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- building blocks ---------------------------------------------------------------------------------------

_FORMATS = {"jpg": "JPEG", "png": "PNG", "bmp": "BMP", "gif": "GIF", "webp": "WEBP", "tiff": "TIFF"}


def _noise(h: int = 48, w: int = 64, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()


def _encoded(fmt: str, img: Image.Image | None = None, **save) -> bytes:
    buf = io.BytesIO()
    (img if img is not None else Image.fromarray(_noise())).save(buf, _FORMATS[fmt], **save)
    return buf.getvalue()


def _write(name: str | bytes, data: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        raw = os.path.join(os.fsencode(folder), name if isinstance(name, bytes) else os.fsencode(name))
        with open(raw, "wb") as f:
            f.write(data)
        return Path(os.fsdecode(raw))
    return build


def _image(name: str, img: Callable[[], Image.Image], **save) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        img().save(path, **save)
        return path
    return build


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png_declaring(w: int, h: int) -> bytes:
    """A tiny PNG whose header declares w x h RGB pixels (its data holds almost none of them)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _gif_declaring(w: int, h: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
            + b"\x02\x02\x44\x01\x00;")


def _link(name: str, target: str | Callable[[Path], str]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        os.symlink(target(folder) if callable(target) else target, path)
        return path
    return build


def _two_links(folder: Path) -> Path:
    os.symlink("ping.jpg", folder / "pong.jpg")
    os.symlink("pong.jpg", folder / "ping.jpg")
    return folder / "ping.jpg"


def _outside_file(folder: Path) -> Path:
    """A link to a photo outside the data folder (a tree of links into a photo library)."""
    library = folder.parent.parent / (folder.parent.name + "-library")
    library.mkdir(exist_ok=True)
    target = library / f"{folder.name}-photo.jpg"
    Image.fromarray(_noise(seed=7)).save(target)
    os.symlink(target, folder / "library_link.jpg")
    return folder / "library_link.jpg"


def _same_class_link(folder: Path) -> Path:
    Image.fromarray(_noise(seed=8)).save(folder / "link_target.jpg")
    os.symlink("link_target.jpg", folder / "again.jpg")
    return folder / "again.jpg"


def _nested_loop(folder: Path) -> Path:
    (folder / "sub").mkdir()
    os.symlink("..", folder / "sub" / "back")
    return folder / "sub" / "back"


def _other_class(folder: Path) -> Path:
    return next(d for d in sorted(folder.parent.iterdir()) if d.is_dir() and d != folder and not d.is_symlink())


def _fifo(folder: Path) -> Path:
    os.mkfifo(folder / "pipe.jpg")
    return folder / "pipe.jpg"


def _folder_named_jpg(folder: Path) -> Path:
    (folder / "album.jpg").mkdir()
    return folder / "album.jpg"


def _in_subfolder(sub: str, name: str = "photo.jpg") -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        (folder / sub).mkdir()
        Image.fromarray(_noise(seed=3)).save(folder / sub / name)
        return folder / sub / name
    return build


def _unreadable_file(folder: Path) -> Path:
    path = folder / "locked.jpg"
    Image.fromarray(_noise(seed=4)).save(path)
    path.chmod(0)
    return path


def _unreadable_folder(folder: Path) -> Path:
    sub = folder / "locked"
    sub.mkdir()
    Image.fromarray(_noise(seed=5)).save(sub / "inside.jpg")
    sub.chmod(0)
    return sub


def _animated(fmt: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        frames = [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
        path = folder / f"animated.{fmt}"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        return path
    return build


def _palette_transparent(fmt: str) -> Callable[[], Image.Image]:
    def img() -> Image.Image:
        p = Image.fromarray(_noise()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        p.info["transparency"] = 0
        return p
    return img


# Layout kinds: `folder` is the data folder (holding classes a/ and b/ of good photos).

def _empty_class(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _one_image_class(root: Path) -> Path:
    (root / "single").mkdir()
    Image.fromarray(_noise(seed=9)).save(root / "single" / "only.jpg")
    return root / "single" / "only.jpg"


def _only_one_class(root: Path) -> Path:
    for d in sorted(root.iterdir())[1:]:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    return root


def _loose_images(root: Path) -> Path:
    Image.fromarray(_noise(seed=10)).save(root / "loose.jpg")
    return root / "loose.jpg"


def _no_class_folders(root: Path) -> Path:
    for d in sorted(root.iterdir()):
        for f in d.iterdir():
            f.rename(root / f"{d.name}-{f.name}")
        d.rmdir()
    return root


def _same_photo_two_classes(root: Path) -> Path:
    a, b = sorted(d for d in root.iterdir() if d.is_dir())[:2]
    first = sorted(a.iterdir())[0]
    (b / "copied.jpg").write_bytes(first.read_bytes())
    return b / "copied.jpg"


def _class_folder_link(root: Path) -> Path:
    os.symlink(sorted(root.iterdir())[0].name, root / "alias")
    return root / "alias"


def _val_missing_class(root: Path) -> Path:
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    (root / "train").mkdir()
    for d in classes:
        d.rename(root / "train" / d.name)
    (root / "val" / classes[0].name).mkdir(parents=True)
    Image.fromarray(_noise(seed=11)).save(root / "val" / classes[0].name / "v.jpg")
    return root / "val" / classes[0].name / "v.jpg"


def _data_is_a_file(root: Path) -> Path:
    return sorted(sorted(root.iterdir())[0].iterdir())[0]


def _data_missing(root: Path) -> Path:
    return root / "no-such-folder"


def _unreadable_class(root: Path) -> Path:
    (root / "locked").mkdir()
    Image.fromarray(_noise(seed=12)).save(root / "locked" / "x.jpg")
    (root / "locked").chmod(0)
    return root / "locked"


_TRUNCATED = {fmt: _encoded(fmt) for fmt in _FORMATS}

KINDS: list[Kind] = [
    # broken and truncated files of every supported format
    *[Kind(f"truncated_{fmt}", f"first half of a valid .{fmt}", SKIPPED,
           "corrupt image" if fmt == "webp" else "truncated image", predict="corrupt image" if fmt == "webp"
           else "truncated image", build=_write(f"truncated.{fmt}", data[: len(data) // 2]))
      for fmt, data in _TRUNCATED.items()],
    *[Kind(f"header_only_{fmt}", f"first 16 bytes of a valid .{fmt}", SKIPPED, reason,
           predict=reason, build=_write(f"header.{fmt}", data[:16]))
      for (fmt, data), reason in zip(_TRUNCATED.items(), ("truncated image", "truncated image",
                                                           "cannot identify image file", "cannot identify image file",
                                                           "corrupt image", "cannot identify image file"),
                                     strict=True)],
    Kind("empty_file", "a 0-byte .jpg", SKIPPED, "empty file", predict="empty file", build=_write("empty.jpg", b"")),
    Kind("random_bytes", "4 KiB of random bytes named .png", SKIPPED, "cannot identify image file",
         predict="cannot identify image file", build=_write("random.png", _noise(32, 32, 4).tobytes())),
    # wrong extensions
    Kind("png_named_jpg", "a PNG named .jpg", CONVERTED, build=_write("really_png.jpg", _encoded("png"))),
    Kind("jpeg_named_png", "a JPEG named .png", CONVERTED, build=_write("really_jpeg.png", _encoded("jpg"))),
    Kind("text_named_jpg", "a text file named .jpg", SKIPPED, "cannot identify image file",
         predict="cannot identify image file", build=_write("text.jpg", b"hello, not a photo\n")),
    Kind("eps_named_jpg", "a PostScript file named .jpg (never handed to Ghostscript)", SKIPPED,
         "cannot identify image file", predict="cannot identify image file",
         build=_write("script.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")),
    Kind("avif_file", "an .avif file (AVIF header)", SKIPPED, "not an image (.avif)",
         predict="unsupported image format (.avif)", build=_write("photo.avif", b"\0\0\0\x1cftypavif" + b"\0" * 64)),
    Kind("no_extension", "a JPEG without extension", SKIPPED, "not an image (no extension)",
         build=_write("photo", _encoded("jpg"))),
    Kind("text_file", "notes.txt", SKIPPED, "not an image (.txt)", predict="cannot identify image file",
         build=_write("notes.txt", b"notes\n")),
    Kind("upper_case_ext", "a JPEG named .JPG", CONVERTED, build=_write("SHOUT.JPG", _encoded("jpg"))),
    # odd modes and bit depths
    Kind("mode_1", "1-bit PNG", CONVERTED, build=_image("bits.png", lambda: Image.fromarray(_noise(c=1) > 127))),
    Kind("mode_L", "greyscale JPEG", CONVERTED, build=_image("grey.jpg", lambda: Image.fromarray(_noise(c=1), "L"))),
    Kind("mode_LA", "greyscale+alpha PNG", CONVERTED,
         build=_image("la.png", lambda: Image.fromarray(_noise(c=2), "LA"))),
    Kind("mode_P_transparent_png", "palette PNG with a transparent index", CONVERTED,
         build=_image("pal.png", _palette_transparent("png"), transparency=0)),
    Kind("mode_P_transparent_gif", "palette GIF with a transparent index", CONVERTED,
         build=_image("pal.gif", _palette_transparent("gif"), transparency=0)),
    Kind("mode_CMYK", "CMYK JPEG", CONVERTED, build=_image("cmyk.jpg", lambda: Image.fromarray(_noise(c=4), "CMYK"))),
    Kind("mode_I16", "16-bit greyscale PNG", CONVERTED, build=_image(
        "deep.png", lambda: Image.fromarray(_noise(c=1).astype(np.uint16) * 257))),
    Kind("mode_I", "32-bit integer TIFF", CONVERTED, build=_image(
        "int.tiff", lambda: Image.fromarray(_noise(c=1).astype(np.int32) * 1000, "I"))),
    Kind("mode_F", "32-bit float TIFF", CONVERTED, build=_image(
        "float.tiff", lambda: Image.fromarray(_noise(c=1).astype(np.float32) / 255, "F"))),
    Kind("mode_RGBA", "RGBA WebP", CONVERTED, build=_image("rgba.webp", lambda: Image.fromarray(_noise(c=4), "RGBA"))),
    # animation and multi-page
    Kind("animated_gif", "3-frame GIF", CONVERTED, build=_animated("gif")),
    Kind("animated_webp", "3-frame WebP", CONVERTED, build=_animated("webp")),
    Kind("multipage_tiff", "3-page TIFF", CONVERTED, build=_animated("tiff")),
    # extreme sizes and aspect ratios
    Kind("tiny_1x1", "1x1 PNG", CONVERTED, build=_image("dot.png", lambda: Image.new("RGB", (1, 1), (9, 9, 9)))),
    Kind("thin_100x1", "100x1 PNG (aspect ratio at the limit)", CONVERTED,
         build=_image("line100.png", lambda: Image.fromarray(_noise(1, 100)))),
    Kind("wide_10000x1", "10000x1 PNG", SKIPPED, "image too thin", predict="image too thin",
         build=_image("wide.png", lambda: Image.fromarray(_noise(1, 10000)))),
    Kind("tall_1x10000", "1x10000 PNG", SKIPPED, "image too thin", predict="image too thin",
         build=_image("tall.png", lambda: Image.fromarray(_noise(10000, 1)))),
    Kind("strip_40000x1", "40000x1 PNG (201 bytes)", SKIPPED, "image too thin", predict="image too thin",
         build=_image("strip.png", lambda: Image.new("RGB", (40000, 1)))),
    Kind("declared_10000x10000", "PNG header declaring 10000x10000 (over Pillow's limit, under its 2x error)",
         SKIPPED, "image too large", predict="image too large", build=_write("big.png", _png_declaring(10000, 10000))),
    Kind("bomb_png", "PNG header declaring 100000x100000", SKIPPED, "image too large", predict="image too large",
         build=_write("bomb.png", _png_declaring(100000, 100000))),
    Kind("bomb_gif", "GIF declaring a 65535x65535 screen", SKIPPED, "image too large", predict="image too large",
         build=_write("bomb.gif", _gif_declaring(65535, 65535))),
    # odd names
    Kind("name_spaces", "'my photo 1.jpg'", CONVERTED, build=_write("my photo 1.jpg", _encoded("jpg"))),
    Kind("name_unicode", "'ü日本 ☃.jpg'", CONVERTED, build=_write("ü日本 ☃.jpg", _encoded("jpg"))),
    Kind("name_leading_dash", "'-rf --help.jpg'", CONVERTED, build=_write("-rf --help.jpg", _encoded("jpg"))),
    Kind("name_newline", "a name with a newline", CONVERTED, build=_write("line\nbreak.jpg", _encoded("jpg"))),
    Kind("name_not_utf8", "a name with byte 0xE9 (Latin-1), via os.fsencode", CONVERTED,
         build=_write(b"caf\xe9.jpg", _encoded("jpg"))),
    Kind("name_long", "a 250-character name", CONVERTED, build=_write("x" * 246 + ".jpg", _encoded("jpg"))),
    # hidden and system files
    Kind("ds_store", ".DS_Store", IGNORED, predict="cannot identify image file",
         build=_write(".DS_Store", b"\0\0\0\1Bud1" + b"\0" * 32)),
    Kind("apple_double", "._photo.jpg (AppleDouble)", IGNORED, predict="cannot identify image file",
         build=_write("._photo.jpg", b"\0\x05\x16\x07\0\x02\0\0Mac OS X        ")),
    Kind("thumbs_db", "Thumbs.db", IGNORED, predict="cannot identify image file",
         build=_write("Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 32)),
    Kind("hidden_folder", ".thumbnails/ holding a photo", IGNORED, predict=CONVERTED,
         build=_in_subfolder(".thumbnails")),
    Kind("synology_eadir", "@eaDir/ holding a thumbnail", IGNORED, predict=CONVERTED, build=_in_subfolder("@eaDir")),
    Kind("macosx_folder", "__MACOSX/ holding a photo", IGNORED, predict=CONVERTED, build=_in_subfolder("__MACOSX")),
    Kind("nested_folder", "a photo two folders down", CONVERTED, build=_in_subfolder("2023")),
    Kind("folder_named_jpg", "an empty folder named album.jpg", IGNORED, predict="is a folder",
         build=_folder_named_jpg),
    # links and special files
    Kind("dangling_link", "a link to nothing", SKIPPED, "broken link", predict="broken link",
         build=_link("dangling.jpg", "nothing-here.jpg")),
    Kind("self_loop_link", "a link to itself", SKIPPED, "symlink loop", predict="symlink loop",
         build=_link("loop.jpg", "loop.jpg")),
    Kind("two_link_loop", "two links pointing at each other", SKIPPED, "symlink loop", predict="symlink loop",
         build=_two_links),
    Kind("folder_loop", "sub/back -> .. inside the class folder", SKIPPED, "symlink loop", predict=None,
         build=_nested_loop),
    Kind("link_up_to_root", "a folder link from a class up to the data folder", SKIPPED,
         "link leaves the class folder", predict=None, build=_link("everything", lambda f: str(f.parent))),
    Kind("link_to_other_class", "a folder link into another class", SKIPPED, "link leaves the class folder",
         predict=None, build=_link("others", lambda f: os.path.join("..", _other_class(f).name))),
    Kind("file_link_other_class", "a file link to another class's photo", SKIPPED, "link leaves the class folder",
         build=_link("borrowed.jpg", lambda f: str(sorted(_other_class(f).glob("*.jpg"))[0]))),
    Kind("file_link_same_class", "a file link to a photo of the same class", CONVERTED, build=_same_class_link),
    Kind("link_outside_data", "a file link to a photo outside the data folder", CONVERTED, build=_outside_file),
    Kind("device_link", "zero.jpg -> /dev/zero", SKIPPED, "not a regular file (device)",
         predict="not a regular file (device)", build=_link("zero.jpg", "/dev/zero")),
    Kind("named_pipe", "a FIFO named pipe.jpg (never opened for reading)", SKIPPED, "not a regular file (named pipe)",
         predict="not a regular file (named pipe)", build=_fifo),
    # unreadable files and folders
    Kind("unreadable_file", "chmod 000 photo", SKIPPED, "permission denied", predict="permission denied",
         unprivileged=True, build=_unreadable_file),
    Kind("unreadable_folder", "chmod 000 sub-folder of a class", SKIPPED, "permission denied", predict=None,
         unprivileged=True, build=_unreadable_folder),
    # layouts: empty and one-image classes, and other shapes of the data folder
    Kind("empty_class", "a class folder without images", ERROR, "contain no usable images", predict=None,
         scope=LAYOUT, build=_empty_class),
    Kind("one_image_class", "a class with one photo", CONVERTED, predict=None, scope=LAYOUT,
         warning="has only 1 image", build=_one_image_class),
    Kind("only_one_class", "a single class folder", ERROR, "found only one class", predict=None, scope=LAYOUT,
         build=_only_one_class),
    Kind("no_class_folders", "photos directly in DATA, no class folders", ERROR, "no class folders", predict=None,
         scope=LAYOUT, build=_no_class_folders),
    Kind("loose_images", "a photo in DATA next to the class folders", IGNORED, predict=None, scope=LAYOUT,
         warning="lie directly in this folder", build=_loose_images),
    Kind("same_photo_two_classes", "one photo copied into two classes", CONVERTED, predict=None, scope=LAYOUT,
         warning="same photo is in classes", build=_same_photo_two_classes),
    Kind("class_folder_link", "a class folder that is a link to another class", SKIPPED,
         "class folder is a link", predict=None, scope=LAYOUT, build=_class_folder_link),
    Kind("val_missing_class", "train/ + val/ with a class missing from val/", CONVERTED, predict=None,
         scope=LAYOUT, warning="has no images of class", build=_val_missing_class),
    Kind("data_is_a_file", "DATA names a photo, not a folder", ERROR, "is a file, not a folder", predict=None,
         scope=LAYOUT, build=_data_is_a_file, data_is_made=True),
    Kind("data_missing", "DATA does not exist", ERROR, "no such folder", predict=None, scope=LAYOUT,
         build=_data_missing, data_is_made=True),
    Kind("unreadable_class", "a chmod 000 class folder", ERROR, "permission denied", predict=None, scope=LAYOUT,
         unprivileged=True, build=_unreadable_class),
]

BY_NAME: dict[str, Kind] = {k.name: k for k in KINDS}


def readme_table() -> str:
    """The README's behaviour table, one row per kind."""
    rows = ["| kind of bad input | train/evaluate | predict (file named explicitly) |", "|---|---|---|"]
    for k in KINDS:
        train = k.train if k.train in (CONVERTED, IGNORED) else f"{k.train}: \"{k.reason}…\""
        if k.warning:
            train += f", with a warning (\"{k.warning}…\")"
        if k.predict is None:
            predict = "—"
        elif k.predict == CONVERTED:
            predict = "a label"
        else:
            predict = f"an error row: \"{k.predict}…\""
        rows.append(f"| {k.made.replace('|', '/')} | {train} | {predict} |")
    return "\n".join(rows)
assert len(BY_NAME) == len(KINDS), "kind names must be unique"
