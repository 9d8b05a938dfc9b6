"""The REST service and its page: FastAPI over one `OnnxPredictor`, loaded once.

    POST /predict   multipart/form-data, one or several images in the repeatable field `file` -> top-k per image;
                    a multi-label model also gives `labels` (those on) and `scores` (every label: probability,
                    threshold, on), highest probability first
    GET  /health    {"status": "ok"}
    GET  /model     classes, backbone, version, quantization, metrics, limits
    GET  /          the page (static/index.html, its script and style beside it; nothing from elsewhere)

Every refusal is JSON `{"error": "..."}` with its status: 413 a body over the upload limit or more images than a
request may carry, 415 a body that is not multipart/form-data, 400 a request without images or with an upload
that is not a readable image (the error names each such file; a request is answered whole or not at all).
No request names a path the server reads or writes: uploads are decoded from a private temporary folder under
names the server picks, and the page is served from the package's own folder.

Inference runs on one worker thread, off the event loop, one call at a time (calls competing for two cores only
slow each other). With `max_batch` > 1, requests that queued up while it was busy run together as one batch; on
this 2-core CPU that measured slower (bench/serve.py: 7.4 against 12.0 requests/s, 8 clients), so it is off.
"""

from __future__ import annotations

import asyncio
import io
import logging
import queue
import tempfile
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from headstart.data.imageio import ImageDecodeError, load_rgb
from headstart.serve.onnx_predictor import OnnxPredictor

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
FIELD = "file"
CSP = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; form-action 'self'"


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 20 * 1024 * 1024  # the whole request body
    max_images: int = 16  # files per request
    max_pixels: int = 50_000_000  # per image, read from its header before decoding (a 50 kB PNG can hold 1 GP)
    max_batch: int = 1  # images one inference call may gather from waiting requests (see --max-batch)
    max_top_k: int = 20
    decoders: int = 4  # uploads decoded at once, across requests: bounds the memory a burst of large images takes


class Refusal(Exception):
    def __init__(self, status: int, message: str, files: list[dict] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.files = status, message, files


class Batcher:
    """One worker thread runs every inference; what queued up while it ran goes in together as the next batch."""

    def __init__(self, predictor: OnnxPredictor, max_batch: int) -> None:
        self.predictor, self.max_batch = predictor, max_batch
        self.jobs: queue.Queue[tuple[list[tuple[np.ndarray, ...]], Future]] = queue.Queue()
        threading.Thread(target=self._work, name="headstart-inference", daemon=True).start()

    async def proba(self, views: list[tuple[np.ndarray, ...]]) -> np.ndarray:
        fut: Future = Future()
        self.jobs.put((views, fut))
        return await asyncio.wrap_future(fut)

    def _work(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            rows = len(jobs[0][0])
            while rows < self.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                jobs.append(job)
                rows += len(job[0])
            try:
                views = [v for job in jobs for v in job[0]]
                proba = self.predictor.run([np.stack(view) for view in zip(*views)])
            except Exception as exc:  # noqa: BLE001  handed to the waiting requests, which answer 500
                for _, fut in jobs:
                    fut.set_exception(exc)
                continue
            start = 0
            for job_views, fut in jobs:
                fut.set_result(proba[start:start + len(job_views)])
                start += len(job_views)


def create_app(predictor: OnnxPredictor, limits: Limits = Limits()) -> FastAPI:
    """The service around an already loaded predictor."""
    app = FastAPI(title="headstart", version=predictor.info.headstart_version, docs_url=None, redoc_url=None)
    batcher = Batcher(predictor, limits.max_batch)
    # Decoding threads, for all requests together: a decoded photo can take max_pixels x 3 bytes while resized.
    decoders = anyio.CapacityLimiter(limits.decoders)
    scratch = tempfile.TemporaryDirectory(prefix="headstart-serve-")
    app.state.scratch = scratch  # removed with the app
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        # The page loads nothing from elsewhere; the policy makes the browser hold it to that.
        return HTMLResponse(page, headers={"Content-Security-Policy": CSP})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model() -> dict:
        info = predictor.info
        return {"classes": list(info.classes), "backbone": info.backbone, "version": info.headstart_version,
                "quantization": info.quantization, "metrics": info.metrics,
                "inputs": [v.to_dict() for v in info.views], "bytes": predictor.path.stat().st_size,
                "limits": asdict(limits), "multi_label": info.multi_label,
                **({"thresholds": dict(zip(info.classes, info.thresholds))} if info.multi_label else {})}

    @app.post("/predict")
    async def predict(request: Request, top_k: int = 3) -> JSONResponse:
        k = max(1, min(top_k, limits.max_top_k, len(predictor.classes)))
        uploads = await _read_uploads(request, limits)
        decoded = await asyncio.gather(*(anyio.to_thread.run_sync(_decode, data, predictor, limits,
                                                                  Path(scratch.name), limiter=decoders)
                                         for _, data in uploads))
        bad = [{"file": name, "error": reason} for (name, _), (_, reason) in zip(uploads, decoded) if reason]
        if bad:
            names = ", ".join(f"{b['file']!r} ({b['error']})" for b in bad)
            raise Refusal(400, f"not a readable image: {names}", bad)
        proba = await batcher.proba([views for views, _ in decoded])
        results = []
        for (name, _), p in zip(uploads, proba):
            top = [{"label": predictor.classes[j], "probability": round(float(p[j]), 6)} for j in np.argsort(-p)[:k]]
            result = {"file": name, "label": top[0]["label"], "confidence": top[0]["probability"], "top_k": top}
            results.append(_multi_label(result, p, predictor) if predictor.info.multi_label else result)
        return JSONResponse({"results": results})

    return app


def _multi_label(result: dict, p: np.ndarray, predictor: OnnxPredictor) -> dict:
    """A multi-label answer: every label with its probability, its threshold and whether it is on (highest
    probability first), the labels on, and `label` the likeliest of those (null when none is on)."""
    cuts = np.asarray(predictor.info.thresholds, np.float32)
    scores = [{"label": predictor.classes[j], "probability": round(float(p[j]), 6),
               "threshold": round(float(cuts[j]), 6), "on": bool(p[j] >= cuts[j])} for j in np.argsort(-p)]
    on = [s for s in scores if s["on"]]
    return {**result, "label": on[0]["label"] if on else None, "confidence": on[0]["probability"] if on else None,
            "labels": [s["label"] for s in on], "scores": scores}


async def _read_uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """(file name, content) of each upload in field `file`, refused whole when the request breaks a limit."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise Refusal(415, f"send images as multipart/form-data in the field '{FIELD}' (got "
                           f"{ctype.split(';')[0] or 'no content type'}), e.g. curl -F {FIELD}=@photo.jpg URL/predict")
    too_big = f"the upload is larger than {limits.max_upload_bytes // (1024 * 1024)} MiB; send fewer or smaller images"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_upload_bytes:
        raise Refusal(413, too_big)

    async def capped() -> AsyncIterator[bytes]:
        # A body without Content-Length (chunked) is counted as it arrives.
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limits.max_upload_bytes:
                raise Refusal(413, too_big)
            yield chunk

    parser = MultiPartParser(request.headers, capped(), max_files=limits.max_images, max_fields=100)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise Refusal(413, f"more than {limits.max_images} images in one request; send them in several") from None
        raise Refusal(400, f"unreadable multipart body ({exc.message})") from None
    try:
        files = [f for f in form.getlist(FIELD) if isinstance(f, UploadFile)]
        if not files:
            other = ", ".join(sorted(set(form.keys()))) or "none"
            raise Refusal(400, f"no images: send them as files in the multipart field '{FIELD}' (fields sent: {other})")
        return [(_display_name(f.filename, n), await f.read()) for n, f in enumerate(files)]
    finally:
        await form.close()


def _display_name(filename: str | None, n: int) -> str:
    """The name a client gave, only ever echoed back (never used as a path), cut to a sane length."""
    name = "".join(ch for ch in (filename or "") if ch.isprintable())[:255]
    return name or f"upload-{n + 1}"


def _decode(data: bytes, predictor: OnnxPredictor, limits: Limits, scratch: Path
            ) -> tuple[tuple[np.ndarray, ...] | None, str | None]:
    """The graph's inputs for one upload, or why it is not a readable image. The bytes go to a file the server
    names in its own folder, so they decode exactly as `headstart predict` decodes files."""
    if not data:
        return None, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
    except Exception:  # noqa: BLE001  not an image Pillow knows from its header: load_rgb below says why
        w = h = 0
    if w * h > limits.max_pixels:
        return None, f"image too large ({w} x {h} pixels; at most {limits.max_pixels // 1_000_000} megapixels)"
    with tempfile.NamedTemporaryFile(dir=scratch, suffix=".upload") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            img = load_rgb(tmp.name, predictor.info.views[0].resize)
        except ImageDecodeError as exc:
            return None, str(exc)
    return predictor.views(img), None


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Refusal)
    async def refusal(_: Request, exc: Refusal) -> JSONResponse:
        body: dict = {"error": exc.message}
        if exc.files:
            body["files"] = exc.files
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request ({where})"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits()) -> None:
    """Load the model's export once and serve it until interrupted."""
    import uvicorn

    from headstart.serve.onnx_predictor import load_export

    predictor = load_export(model_dir)
    if predictor is None:
        from headstart.errors import ArtifactError

        raise ArtifactError(f"{model_dir}: no up-to-date model.onnx; run `headstart export {model_dir}` first")
    uvicorn.run(create_app(predictor, limits), host=host, port=port, log_level="warning")
