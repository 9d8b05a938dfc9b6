"""Reading a /predict request's images without letting one request, or a crowd of them, take the server down.

Every limit is checked at the cheapest point that can see it, and refused with what was wrong:
- the body: its declared and its counted size (413), a total upload time and a silence between chunks (408); a
  client that goes away mid-upload is one log line, not a traceback;
- the multipart parts: files only in the field `file`, at most `max_images` of them (413); a file part in another
  field, too many text fields, or a body that ends before its closing boundary are 400s that say so;
- the pixels: each upload's size is read from its header (nothing decoded; a JPEG's size is the reduced one
  `load_rgb` will decode it at) and the request's sum is held to `max_request_pixels` (413) before any decoding;
- decoding itself: at most `decoders` images at once, and at most `max_request_pixels` decoded pixels in flight
  across all requests (`PixelBudget`), so a burst of large images queues instead of multiplying memory.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from headstart.data.imageio import IMAGE_FORMATS, ImageDecodeError, load_rgb

log = logging.getLogger(__name__)

FIELD = "file"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 20 * MiB  # the whole request body
    max_images: int = 16  # files per request
    max_pixels: int = 50_000_000  # per image, read from its header before decoding (a 50 kB PNG can hold 1 GP)
    max_request_pixels: int = 64_000_000  # the sum over a request's images, and what all requests decode at once
    max_batch: int = 1  # images one inference call may gather from waiting requests (see --max-batch)
    max_top_k: int = 20
    decoders: int = 4  # uploads decoded at once, across requests
    max_fields: int = 20  # text fields a request may carry (the service reads none)
    upload_timeout_s: float = 30.0  # the whole body must arrive within this
    idle_timeout_s: float = 10.0  # nor may the client fall silent longer than this mid-body


class Refusal(Exception):
    """A request refused with `status`; `files` names the uploads at fault. `close`: refused before its body was
    read to the end, so the answer closes the connection (otherwise uvicorn would keep reading what a slow or huge
    upload still sends, holding the connection for as long as the client cares to)."""

    def __init__(self, status: int, message: str, files: list[dict] | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.files, self.close = status, message, files, close


class Disconnected(Exception):
    """The client went away before its request was read: nobody is left to answer."""


@dataclass(frozen=True)
class Upload:
    name: str  # as the client gave it, only ever echoed back
    data: bytes
    pixels: int  # what decoding it will hold (0: not an image Pillow recognises from its header)
    size: tuple[int, int]


class PixelBudget:
    """At most `total` decoded pixels held at once by all requests together; a request waits for its share."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._free = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        pixels = min(pixels, self.total)  # never more than all of it, so a request cannot wait forever
        async with self._free:
            await self._free.wait_for(lambda: self.used + pixels <= self.total)
            self.used += pixels
        try:
            yield
        finally:
            async with self._free:
                self.used -= pixels
                self._free.notify_all()


class _Parser(MultiPartParser):
    """Starlette's parser, counting file parts per field (images only in `file`) and noting the closing boundary
    (python-multipart calls `on_end` only when it sees it; a truncated body otherwise parses without error)."""

    def __init__(self, *args, max_images: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_images, self.images, self.ended = max_images, 0, False

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._current_part.content_disposition)
        name = options.get(b"name", b"").decode("latin-1")
        if b"filename" in options:
            if name != FIELD:
                raise MultiPartException(f"a file part in the field {_shown(name)}: images go in the field '{FIELD}'")
            self.images += 1
            if self.images > self.max_images:
                raise _TooManyImages()
        elif self._current_fields >= self.max_fields:
            raise MultiPartException(f"more than {self.max_fields} text fields (the last named {_shown(name)}); "
                                     f"the service reads only files in the field '{FIELD}'")
        super().on_headers_finished()

    def on_end(self) -> None:
        self.ended = True


class _TooManyImages(MultiPartException):
    def __init__(self) -> None:
        super().__init__("too many images")


async def read_uploads(request: Request, limits: Limits, resize: int) -> list[Upload]:
    """Each upload in field `file`, its header read, refused whole when the request breaks a limit. `resize`: the
    short side JPEGs are decoded down to (the model's first view)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise Refusal(415, f"send images as multipart/form-data in the field '{FIELD}' (got "
                           f"{ctype.split(';')[0] or 'no content type'}), e.g. curl -F {FIELD}=@photo.jpg URL/predict",
                      close=True)
    too_big = f"the upload is larger than {limits.max_upload_bytes / MiB:g} MiB; send fewer or smaller images"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_upload_bytes:
        raise Refusal(413, too_big, close=True)
    received = [0]

    async def capped() -> AsyncIterator[bytes]:
        # A body without Content-Length (chunked) is counted as it arrives; a silent client is let go.
        chunks = request.stream().__aiter__()
        while True:
            with anyio.move_on_after(limits.idle_timeout_s) as idle:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            if idle.cancelled_caught:
                raise Refusal(408, f"the upload stalled: nothing arrived for {limits.idle_timeout_s:g} s", close=True)
            received[0] += len(chunk)
            if received[0] > limits.max_upload_bytes:
                raise Refusal(413, too_big, close=True)
            yield chunk

    parser = _Parser(request.headers, capped(), max_images=limits.max_images, max_files=limits.max_images,
                     max_fields=limits.max_fields)
    try:
        with anyio.fail_after(limits.upload_timeout_s):
            form = await parser.parse()
    except TimeoutError:
        raise Refusal(408, f"the upload took longer than {limits.upload_timeout_s:g} s "
                           f"({received[0]} bytes arrived); send it faster or in smaller requests", close=True) from None
    except ClientDisconnect:
        raise Disconnected(f"{received[0]} bytes received") from None
    except _TooManyImages:
        raise Refusal(413, f"more than {limits.max_images} images in one request; send them in several",
                      close=True) from None
    except MultiPartException as exc:
        raise Refusal(400, f"unreadable multipart body: {exc.message}", close=True) from None
    try:
        if not parser.ended:
            raise Refusal(400, "the multipart body ends before its closing boundary (--BOUNDARY--): the upload was "
                               f"cut short or badly formed ({received[0]} bytes arrived)")
        files = [f for f in form.getlist(FIELD) if isinstance(f, UploadFile)]
        if not files:
            other = ", ".join(sorted(_shown(k) for k in set(form.keys()))) or "none"
            raise Refusal(400, f"no images: send them as files in the multipart field '{FIELD}' (fields sent: {other})")
        named = [(_display_name(f.filename, n), await f.read()) for n, f in enumerate(files)]
    finally:
        await form.close()
    uploads = await anyio.to_thread.run_sync(_probe_all, named, resize)
    total = sum(u.pixels for u in uploads)
    if total > limits.max_request_pixels:
        raise Refusal(413, f"the {len(uploads)} images hold {total / 1e6:.0f} megapixels once decoded, over the "
                           f"{limits.max_request_pixels / 1e6:g} a request may; send fewer or smaller images")
    return uploads


def _probe_all(named: list[tuple[str, bytes]], resize: int) -> list[Upload]:
    return [_probe(name, data, resize) for name, data in named]


def _probe(name: str, data: bytes, resize: int) -> Upload:
    """The upload with its size and the pixels decoding it will hold, read from its header alone: a JPEG is
    decoded at the reduced scale `load_rgb` picks, which Pillow's `draft` states without decoding."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            size = img.size
            if img.format in ("JPEG", "MPO"):
                img.draft("RGB", (resize, resize))
            pixels = img.size[0] * img.size[1]
    except Exception:  # noqa: BLE001  not an image Pillow knows from its header: decoding says why
        return Upload(name, data, 0, (0, 0))
    return Upload(name, data, pixels, size)


def decode(upload: Upload, resize: int, limits: Limits, scratch: Path) -> tuple[Image.Image | None, str | None]:
    """One upload as an RGB image, or why it is not a readable one. The bytes go to a file the server names in
    its own folder, so they decode exactly as `headstart predict` decodes files."""
    if not upload.data:
        return None, "empty file"
    w, h = upload.size
    if w * h > limits.max_pixels:
        return None, f"image too large ({w} x {h} pixels; at most {limits.max_pixels // 1_000_000} megapixels)"
    with tempfile.NamedTemporaryFile(dir=scratch, suffix=".upload") as tmp:
        tmp.write(upload.data)
        tmp.flush()
        try:
            return load_rgb(tmp.name, resize), None
        except ImageDecodeError as exc:
            return None, str(exc)


def views_or_reason(upload: Upload, predictor, limits: Limits, scratch: Path
                    ) -> tuple[tuple[np.ndarray, ...] | None, str | None]:
    """The graph's inputs for one upload, or why there are none."""
    img, reason = decode(upload, predictor.info.views[0].resize, limits, scratch)
    return (predictor.views(img), None) if img is not None else (None, reason)


def _display_name(filename: str | None, n: int) -> str:
    """The name a client gave, only ever echoed back (never used as a path), cut to a sane length."""
    name = "".join(ch for ch in (filename or "") if ch.isprintable())[:255]
    return name or f"upload-{n + 1}"


def _shown(name: str) -> str:
    return repr("".join(ch for ch in name if ch.isprintable())[:60])
