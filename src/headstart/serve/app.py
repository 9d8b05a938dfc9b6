"""The REST service and its page: FastAPI over one `OnnxPredictor`, loaded once.

    POST /predict       multipart/form-data, one or several images in the repeatable field `file` -> top-k per image;
                        a multi-label model also gives `labels` (those on) and `scores` (every label:
                        probability, threshold, on), highest probability first
    GET  /health        {"status": "ok"}
    GET  /model         classes, backbone, version, quantization, metrics, limits
    GET  /              the page (static/index.html, its script and style beside it; nothing from elsewhere)
    GET  /openapi.json  every route, its answers (pydantic models in `schemas`) and its refusals, described

Every refusal is JSON in FastAPI's shape, `{"detail": "..."}`, with its status: 413 a body over the upload limit,
more images than a request may carry or more decoded pixels than it may hold; 415 a body that is not
multipart/form-data; 408 an upload too slow; 400 a request without images, a malformed multipart body (what was
wrong is said), or an upload that is not a readable image (`files` names each; a request is answered whole or
not at all); 400 too for a Host header not on the allow-list (`hardening.allowed_hosts_for`), which defeats DNS
rebinding. The interactive /docs page is off: Swagger UI's assets come from a CDN, which the page's policy (and
this service's rule of loading nothing from elsewhere) forbids; /openapi.json describes everything it would show.

No request names a path the server reads or writes: uploads are decoded from a private temporary folder under
names the server picks, and the page is served from the package's own folder. How much one request, and all of
them together, may make the server decode is `uploads`' business; connections and their timeouts `hardening`'s.

Inference runs on one worker thread, off the event loop, one call at a time (calls competing for two cores only
slow each other). With `max_batch` > 1, requests that queued up while it was busy run together as one batch; on
this 2-core CPU that measured slower (bench/serve.py: 7.4 against 12.0 requests/s, 8 clients), so it is off.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path

import anyio
import anyio.to_thread
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from headstart.serve import schemas
from headstart.serve.hardening import LOCAL_NAMES, PAGE_CSP, SecurityHeaders, ServerLimits, allowed_hosts_for
from headstart.serve.onnx_predictor import OnnxPredictor
from headstart.serve.uploads import FIELD, Disconnected, Limits, PixelBudget, Refusal, read_uploads, views_or_reason

__all__ = ["Batcher", "Limits", "ServerLimits", "create_app", "serve", "FIELD"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")


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


def create_app(predictor: OnnxPredictor, limits: Limits = Limits(),
               allowed_hosts: Sequence[str] = LOCAL_NAMES) -> FastAPI:
    """The service around an already loaded predictor, answering requests whose Host is in `allowed_hosts`
    ("*": any)."""
    app = FastAPI(title="headstart", version=predictor.info.headstart_version, docs_url=None, redoc_url=None,
                  description="Image classification with a headstart model exported to ONNX.")
    batcher = Batcher(predictor, limits.max_batch)
    # Decoding, for all requests together: `decoders` images at once, `max_request_pixels` pixels in flight.
    decoders = anyio.CapacityLimiter(limits.decoders)
    pixels = PixelBudget(limits.max_request_pixels)
    scratch = tempfile.TemporaryDirectory(prefix="headstart-serve-")
    app.state.scratch = scratch  # removed with the app
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_middleware(SecurityHeaders)  # added last, so it runs first: refusals of the Host carry the headers too
    _error_handlers(app)
    resize = predictor.info.views[0].resize

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/health", response_model=schemas.Health)
    async def health() -> schemas.Health:
        return schemas.Health(status="ok")

    @app.get("/model", response_model=schemas.ModelInfo)
    async def model() -> schemas.ModelInfo:
        info = predictor.info
        return schemas.ModelInfo(
            classes=list(info.classes), backbone=info.backbone, version=info.headstart_version,
            quantization=info.quantization, metrics=info.metrics,
            inputs=[schemas.InputView(**v.to_dict()) for v in info.views], bytes=predictor.path.stat().st_size,
            limits=schemas.ServiceLimits(**asdict(limits)), multi_label=info.multi_label,
            thresholds=dict(zip(info.classes, info.thresholds)) if info.multi_label else None)

    @app.post("/predict", response_model=schemas.Predictions, responses=schemas.refusals(400, 408, 413, 415),
              openapi_extra={"requestBody": schemas.PREDICT_BODY, "parameters": [schemas.TOP_K]})
    async def predict(request: Request) -> schemas.Predictions | Response:
        """Top-k labels for each uploaded image: `curl -F file=@a.jpg -F file=@b.png URL/predict?top_k=3`."""
        k = max(1, min(_top_k(request), limits.max_top_k, len(predictor.classes)))
        try:
            uploads = await read_uploads(request, limits, resize)
        except Disconnected as gone:  # nobody to answer: one line, not uvicorn's traceback
            log.warning("%s: client disconnected mid-upload (%s)", _peer(request), gone)
            return Response(status_code=400)
        async with pixels.hold(sum(u.pixels for u in uploads)):
            decoded = await asyncio.gather(*(anyio.to_thread.run_sync(views_or_reason, u, predictor, limits,
                                                                      Path(scratch.name), limiter=decoders)
                                             for u in uploads))
        bad = [{"file": u.name, "error": reason} for u, (_, reason) in zip(uploads, decoded) if reason]
        if bad:
            names = ", ".join(f"{b['file']!r} ({b['error']})" for b in bad)
            raise Refusal(400, f"not a readable image: {names}", bad)
        proba = await batcher.proba([views for views, _ in decoded])
        results = []
        for upload, p in zip(uploads, proba):
            top = [schemas.Scored(label=predictor.classes[j], probability=round(float(p[j]), 6))
                   for j in np.argsort(-p)[:k]]
            result = schemas.ImageResult(file=upload.name, label=top[0].label, confidence=top[0].probability,
                                         top_k=top)
            results.append(_multi_label(result, p, predictor) if predictor.info.multi_label else result)
        return schemas.Predictions(results=results)

    return app


def _multi_label(result: schemas.ImageResult, p: np.ndarray, predictor: OnnxPredictor) -> schemas.ImageResult:
    """A multi-label answer: every label with its probability, its threshold and whether it is on (highest
    probability first), the labels on, and `label` the likeliest of those (null when none is on)."""
    cuts = np.asarray(predictor.info.thresholds, np.float32)
    scores = [schemas.LabelScore(label=predictor.classes[j], probability=round(float(p[j]), 6),
                                 threshold=round(float(cuts[j]), 6), on=bool(p[j] >= cuts[j])) for j in np.argsort(-p)]
    on = [s for s in scores if s.on]
    return result.model_copy(update={"label": on[0].label if on else None,
                                     "confidence": on[0].probability if on else None,
                                     "labels": [s.label for s in on], "scores": scores})


def _top_k(request: Request) -> int:
    raw = request.query_params.get("top_k", "3")
    try:
        return int(raw)
    except ValueError:
        raise Refusal(400, f"top_k must be a whole number, not {raw[:40]!r}") from None


def _peer(request: Request) -> str:
    return "%s:%d" % (request.client.host, request.client.port) if request.client else "a client"


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Refusal)
    async def refusal(_: Request, exc: Refusal) -> JSONResponse:
        return JSONResponse(schemas.ErrorBody(detail=exc.message, files=exc.files).model_dump(exclude_none=True),
                            status_code=exc.status, headers={"Connection": "close"} if exc.close else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request ({where})"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          allowed_hosts: Sequence[str] | None = None, server: ServerLimits = ServerLimits(),
          ready: Callable[[], None] | None = None) -> None:
    """Load the model's export once and serve it until interrupted; `ready` is called once it is loaded.
    `allowed_hosts` defaults to $HEADSTART_ALLOWED_HOSTS (comma-separated names; "*": any), else to the bound
    address and localhost's names (`hardening.default_hosts`): behind a proxy that passes its own name in Host,
    list that name there."""
    import uvicorn

    from headstart.serve.hardening import uvicorn_config
    from headstart.serve.onnx_predictor import load_export

    predictor = load_export(model_dir)
    if predictor is None:
        from headstart.errors import ArtifactError

        raise ArtifactError(f"{model_dir}: no up-to-date model.onnx; run `headstart export {model_dir}` first")
    hosts = tuple(allowed_hosts or allowed_hosts_for(host))
    log.info("answering requests whose Host is one of %s", ", ".join(hosts))
    app = create_app(predictor, limits, hosts)
    if ready is not None:
        ready()
    uvicorn.Server(uvicorn_config(app, host, port, server)).run()
