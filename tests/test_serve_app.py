"""serve.app through FastAPI's test client: answers, every refusal as JSON with its status, no path from a request
ever read or written, and the batching of concurrent requests."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_serve import tiny_model

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_weights, tiny_onnx) -> tuple[Path, Path, Path]:
    return tiny_model(tmp_path_factory, tiny_weights, tiny_onnx)


@pytest.fixture(scope="module")
def predictor(exported):
    from headstart.serve.onnx_predictor import load_export

    return load_export(exported[0])


@pytest.fixture(scope="module")
def client(predictor):
    from fastapi.testclient import TestClient

    from headstart.serve.app import create_app

    with TestClient(create_app(predictor), base_url="http://localhost") as c:
        yield c


@pytest.fixture(scope="module")
def strict(predictor):
    """A service with small limits: 64 kB bodies, 2 images a request, 100 x 100 pixels."""
    from fastapi.testclient import TestClient

    from headstart.serve.app import Limits, create_app

    with TestClient(create_app(predictor, Limits(max_upload_bytes=64_000, max_images=2, max_pixels=10_000)),
                    base_url="http://127.0.0.1:8000") as c:
        yield c


@pytest.fixture(scope="module")
def photos(exported) -> list[Path]:
    return sorted(exported[1].rglob("*.jpg"))


def _jpeg(size=(64, 48), colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def _error(resp, status: int, *needles: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body["detail"], str) and "\n" not in body["detail"] and "error" not in body
    for needle in needles:
        assert needle in body["detail"], body["detail"]
    assert resp.headers["x-content-type-options"] == "nosniff"
    return body


def test_health_model_and_page(client, predictor) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    model = client.get("/model").json()
    assert model["classes"] == ["cat", "dog", "fish"] and model["quantization"] == "float32"
    assert model["version"] and model["limits"]["max_images"] == 16 and model["bytes"] > 0
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/app.css"):
        assert client.get(asset).status_code == 200
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/app.css").text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text and "@import" not in text
    assert 'name="viewport"' in page.text and 'type="file"' in page.text and "multiple" in page.text


def test_predict_one_and_several_images(client, predictor, photos) -> None:
    resp = client.post("/predict", files=[("file", (photos[0].name, photos[0].read_bytes(), "image/jpeg"))])
    assert resp.status_code == 200, resp.text
    (result,) = resp.json()["results"]
    expected = predictor.predict_table([photos[0]], top_k=3)[0]
    assert result["file"] == photos[0].name and result["label"] == expected.label
    assert [t["label"] for t in result["top_k"]] == [label for label, _ in expected.top_k]
    assert abs(result["confidence"] - expected.confidence) < 1e-5
    chosen = [photos[0], photos[9], photos[17]]
    resp = client.post("/predict?top_k=2", files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in chosen])
    results = resp.json()["results"]
    assert [r["file"] for r in results] == [p.name for p in chosen]
    assert [r["label"] for r in results] == [r.label for r in predictor.predict_table(chosen)]
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["probability"] >= r["top_k"][1]["probability"] for r in results)


@pytest.mark.parametrize("top_k, n", [("1", 1), ("0", 1), ("99", 3)])
def test_top_k_is_clamped_to_the_classes(client, top_k, n) -> None:
    resp = client.post(f"/predict?top_k={top_k}", files={"file": ("a.jpg", _jpeg(), "image/jpeg")})
    assert len(resp.json()["results"][0]["top_k"]) == n


def test_top_k_that_is_not_a_number_is_400(client) -> None:
    _error(client.post("/predict?top_k=lots", files={"file": ("a.jpg", _jpeg(), "image/jpeg")}), 400, "top_k")


@pytest.mark.parametrize("headers, body", [
    ({"content-type": "application/json"}, b'{"file": "/etc/passwd"}'),
    ({"content-type": "image/jpeg"}, None),
    ({"content-type": "text/plain"}, b"hello"),
    ({}, b""),
])
def test_a_body_that_is_not_multipart_is_415(client, headers, body) -> None:
    _error(client.post("/predict", content=body if body is not None else _jpeg(), headers=headers), 415,
           "multipart/form-data", "'file'")


def test_a_body_over_the_limit_is_413(strict) -> None:
    big = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")  # noise does not compress: ~270 kB
    _error(strict.post("/predict", files={"file": ("big.png", buf.getvalue(), "image/png")}), 413, "larger than")


def test_a_chunked_body_over_the_limit_is_413(strict) -> None:
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n'.encode()

    def chunks():  # no Content-Length: the service must count what arrives
        yield head
        for _ in range(40):
            yield b"\xff" * 4096
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = strict.post("/predict", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    _error(resp, 413, "larger than")


def test_more_images_than_allowed_is_413(strict) -> None:
    files = [("file", (f"{i}.jpg", _jpeg((20, 20)), "image/jpeg")) for i in range(3)]
    _error(strict.post("/predict", files=files), 413, "more than 2 images")


def test_too_many_pixels_is_400_naming_the_file(strict) -> None:
    body = _error(strict.post("/predict", files={"file": ("wide.jpg", _jpeg((200, 100)), "image/jpeg")}), 400,
                  "wide.jpg", "too large")
    assert body["files"] == [{"file": "wide.jpg", "error": body["files"][0]["error"]}]


@pytest.mark.parametrize("name, data, reason", [
    ("text.jpg", b"not an image", "cannot identify"),
    ("empty.jpg", b"", "empty"),
    ("truncated.jpg", None, "truncated"),
])
def test_an_unreadable_upload_is_400_naming_the_file(client, name, data, reason) -> None:
    data = _jpeg((300, 200))[:600] if data is None else data
    files = [("file", ("good.jpg", _jpeg(), "image/jpeg")), ("file", (name, data, "image/jpeg"))]
    body = _error(client.post("/predict", files=files), 400, name)
    assert [f["file"] for f in body["files"]] == [name] and reason in body["files"][0]["error"]
    assert "good.jpg" not in body["detail"]


@pytest.mark.parametrize("files, data", [
    (None, {"x": "1"}),  # a form without the field
    (None, {"file": "/etc/passwd"}),  # the field as text, not a file: never a path to open
    ({"photo": ("a.jpg", _jpeg(), "image/jpeg")}, None),  # a file under another name
])
def test_no_images_is_400(client, files, data) -> None:
    _error(client.post("/predict", files=files, data=data) if files else
           client.post("/predict", data=data, headers={"content-type": "multipart/form-data; boundary=zz"}), 400)


def test_a_form_field_naming_a_path_is_never_read(client, photos) -> None:
    data = {"x": "1"}
    resp = client.post("/predict", data={"file": str(photos[0])}, files={"other": ("n.txt", b"x", "text/plain")})
    _error(resp, 400, "a file part in the field 'other'", "'file'")
    assert data  # the path above is a readable image: had the server opened it, the answer would be 200


def test_a_malformed_multipart_body_is_400(client) -> None:
    resp = client.post("/predict", content=b"garbage", headers={"content-type": "multipart/form-data"})
    _error(resp, 400, "multipart")


def test_file_names_are_echoed_never_used_as_paths(client, photos, tmp_path: Path) -> None:
    target = tmp_path / "written.jpg"
    # A readable image on disk named as the upload, with bytes that are not an image: 400, so the file was not read.
    body = _error(client.post("/predict", files={"file": (str(photos[0]), b"junk", "image/jpeg")}), 400)
    assert body["files"][0]["file"] == str(photos[0])
    for name in (str(target), "../../written.jpg", "..\\..\\x.jpg", "/dev/stdin"):
        resp = client.post("/predict", files={"file": (name, _jpeg(), "image/jpeg")})
        assert resp.status_code == 200, resp.text
        assert resp.json()["results"][0]["file"] == name
    assert not target.exists() and not (Path.cwd().parent.parent / "written.jpg").exists()


@pytest.mark.parametrize("path", ["/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2f..%2fexport.py",
                                  "/static//etc/passwd", "/etc/passwd", "/model.onnx"])
def test_no_path_outside_the_page_is_served(client, path) -> None:
    resp = client.get(path)
    assert resp.status_code == 404 and "detail" in resp.json()


def test_wrong_method_is_json(client) -> None:
    _error(client.get("/predict"), 405)


def test_concurrent_requests_all_get_their_own_answer(client, predictor, photos) -> None:
    chosen = photos[:8]
    expected = [r.label for r in predictor.predict_table(chosen)]

    def ask(p: Path) -> str:
        return client.post("/predict", files={"file": (p.name, p.read_bytes(), "image/jpeg")}).json()["results"][0]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, chosen))
    assert [g["file"] for g in got] == [p.name for p in chosen] and [g["label"] for g in got] == expected


def test_requests_waiting_for_inference_run_as_one_batch(predictor, photos) -> None:
    import asyncio

    from headstart.serve.app import Batcher

    calls: list[int] = []
    release = threading.Event()

    class Held:
        def run(self, views):
            calls.append(len(views[0]))
            if len(calls) == 1:
                release.wait(10)
            return predictor.run(views)

    batcher = Batcher(Held(), max_batch=32)
    views = [predictor.load(p) for p in photos[:5]]

    async def main():
        first = asyncio.ensure_future(batcher.proba(views[:1]))
        await asyncio.sleep(0.2)  # the worker now holds the first request
        rest = [asyncio.ensure_future(batcher.proba([v])) for v in views[1:]]
        await asyncio.sleep(0.2)
        release.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert calls == [1, 4]  # the four that queued up while the first ran went in together
    expected = predictor.run([np.stack(v) for v in zip(*views)])
    np.testing.assert_allclose(np.concatenate([first, *rest]), expected, atol=1e-5)
