"""The service under hostile clients, on a real uvicorn server on 127.0.0.1 (bounded in count and time): pixel bombs
refused from their headers, slow and vanishing clients let go in one log line, a connection limit, the Host
allow-list, the security headers, and multipart errors that say what was wrong."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from helpers_serve import tiny_model

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, tiny_weights, tiny_onnx):
    from headstart.serve.onnx_predictor import load_export

    return load_export(tiny_model(tmp_path_factory, tiny_weights, tiny_onnx)[0])


@pytest.fixture(scope="module")
def photo(tmp_path_factory, tiny_weights, tiny_onnx) -> bytes:
    return sorted(tiny_model(tmp_path_factory, tiny_weights, tiny_onnx)[1].rglob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A one-bit 7000 x 7000 PNG: about 6 kB that decode to 49 megapixels (147 MB as RGB)."""
    buf = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 10_000
    return buf.getvalue()


def _serve(app, **server) -> Iterator[str]:
    import uvicorn

    from headstart.serve.hardening import ServerLimits, uvicorn_config

    srv = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0, ServerLimits(**server)))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def live(predictor) -> Iterator[str]:
    from headstart.serve.app import Limits, create_app

    limits = Limits(upload_timeout_s=2.0, idle_timeout_s=1.0)
    yield from _serve(create_app(predictor, limits, ("127.0.0.1", "localhost")), header_timeout_s=1.0,
                      max_connections=6)


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "xYzZy", close: bool = True) -> bytes:
    out = b""
    for field, filename, data in parts:
        name = f'; filename="{filename}"' if filename is not None else ""
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"{name}\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


def _post(addr: str, body: bytes, boundary: str = "xYzZy", **kwargs) -> httpx.Response:
    return httpx.post(f"http://{addr}/predict", content=body, timeout=30,
                      headers={"content-type": f"multipart/form-data; boundary={boundary}", **kwargs})


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_a_pixel_bomb_request_is_refused_from_its_headers(live, bomb) -> None:
    body = _multipart([("file", f"bomb{i}.png", bomb) for i in range(16)])
    assert len(body) < 120_000  # the 96 kB request
    peak = _peak_rss_mib()
    t0 = time.perf_counter()
    resp = _post(live, body)
    elapsed = time.perf_counter() - t0
    assert resp.status_code == 413, resp.text
    assert "784 megapixels" in resp.json()["detail"] and "64" in resp.json()["detail"]
    assert elapsed < 1.0, f"refused in {elapsed:.2f} s"
    assert _peak_rss_mib() - peak < 100  # nothing was decoded (one image alone would be 147 MB)


def test_one_large_image_within_the_budget_decodes(live, bomb, photo) -> None:
    resp = _post(live, _multipart([("file", "bomb.png", bomb), ("file", "a.jpg", photo)]))
    assert resp.status_code == 200, resp.text
    assert [r["file"] for r in resp.json()["results"]] == ["bomb.png", "a.jpg"]


def test_the_pixel_budget_queues_requests_that_together_exceed_it() -> None:
    import asyncio

    from headstart.serve.uploads import PixelBudget

    budget, order = PixelBudget(100), []

    async def use(name: str, pixels: int, hold_s: float) -> None:
        async with budget.hold(pixels):
            order.append(f"{name}+")
            await asyncio.sleep(hold_s)
            order.append(f"{name}-")

    async def main() -> None:
        await asyncio.gather(use("a", 70, 0.2), use("b", 60, 0.0), use("c", 20, 0.0))

    asyncio.run(main())
    assert order.index("b+") > order.index("a-")  # 70 + 60 > 100: b waited for a
    assert order.index("c+") < order.index("a-")  # 70 + 20 fits beside it
    assert budget.used == 0


def test_a_client_that_vanishes_mid_upload_is_one_log_line(live, photo, caplog, capfd) -> None:
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            with socket.create_connection(tuple_addr(live)) as s:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n"
                          b"Content-Type: multipart/form-data; boundary=xYzZy\r\n\r\n" + _multipart(
                              [("file", "a.jpg", photo)], close=False)[:500])
                time.sleep(0.2)
        time.sleep(0.5)
    lines = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(lines) == 3 and all("mid-upload" in line and "\n" not in line for line in lines), lines
    assert "Traceback" not in capfd.readouterr().err and not any(r.exc_info for r in caplog.records)


def tuple_addr(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def test_slow_headers_are_cut_off(live, caplog) -> None:
    with caplog.at_level(logging.WARNING), socket.create_connection(tuple_addr(live)) as s:
        s.settimeout(5)
        t0 = time.perf_counter()
        s.sendall(b"POST /predict HTTP/1.1\r\n")
        closed = False
        for i in range(8):  # one header line every 0.4 s: never complete
            time.sleep(0.4)
            try:
                s.sendall(f"X-Slow-{i}: 1\r\n".encode())
            except OSError:
                closed = True
                break
        closed = closed or s.recv(100) == b""
    assert closed and time.perf_counter() - t0 < 3.5
    assert any("no complete request headers within 1 s" in r.getMessage() for r in caplog.records)


def _recv_or_closed(s: socket.socket, n: int) -> bytes:
    """What the server sent next; b"" once it closed. A close while the client's bytes were still arriving is a
    reset (TCP's answer to unread data), not a FIN: closed either way, which is what these tests look for."""
    try:
        return s.recv(n)
    except ConnectionResetError:
        return b""


@pytest.mark.parametrize("pace, needle", [(0.4, "took longer than 2 s"), (1.5, "stalled")])
def test_a_slow_body_is_refused_with_408(live, photo, pace, needle) -> None:
    import select

    body = _multipart([("file", "a.jpg", photo)])
    head = (f"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: multipart/form-data; boundary=xYzZy\r\n\r\n").encode()
    with socket.create_connection(tuple_addr(live)) as s:
        s.sendall(head)
        t0 = time.perf_counter()
        answer = b""
        for i in range(0, len(body), 200):  # 200 bytes every `pace` seconds, until the server answers
            s.sendall(body[i:i + 200])
            if select.select([s], [], [], pace)[0]:
                answer = s.recv(65536)
                break
        elapsed = time.perf_counter() - t0
        s.settimeout(3)
        while answer.endswith(b"}") is False and (more := _recv_or_closed(s, 65536)):
            answer += more
        assert _recv_or_closed(s, 100) == b"", "the connection stays open for the rest of a refused body"
    assert answer.startswith(b"HTTP/1.1 408") and needle.encode() in answer, answer[:300]
    assert b"connection: close" in answer.lower()
    assert elapsed < 3.5, f"answered after {elapsed:.1f} s"


def test_connections_beyond_the_limit_get_503(live) -> None:
    held = []
    try:
        for _ in range(6):  # connections that never finish their headers (within the 1 s deadline)
            s = socket.create_connection(tuple_addr(live))
            s.sendall(b"GET /health HTTP/1.1\r\n")
            held.append(s)
        time.sleep(0.1)
        assert httpx.get(f"http://{live}/health", timeout=5).status_code == 503
    finally:
        for s in held:
            s.close()
    time.sleep(1.2)
    assert httpx.get(f"http://{live}/health", timeout=5).status_code == 200


@pytest.mark.parametrize("host, status", [("localhost", 200), ("127.0.0.1", 200), ("evil.example", 400),
                                          ("127.0.0.1.nip.io", 400)])
def test_only_allowed_hosts_are_served(live, host, status) -> None:
    resp = httpx.get(f"http://{live}/health", headers={"host": host}, timeout=5)
    assert resp.status_code == status, resp.text


def test_default_hosts_are_the_bound_address_and_localhost() -> None:
    from headstart.serve.hardening import default_hosts

    assert default_hosts("127.0.0.1") == ("127.0.0.1", "localhost", "::1")
    assert default_hosts("10.1.2.3")[:2] == ("10.1.2.3", "localhost")
    assert socket.gethostname().lower() in default_hosts("0.0.0.0") and "0.0.0.0" not in default_hosts("0.0.0.0")


def test_allowed_hosts_can_be_listed_by_the_operator(monkeypatch) -> None:
    from headstart.serve.hardening import allowed_hosts_for

    monkeypatch.delenv("HEADSTART_ALLOWED_HOSTS", raising=False)
    assert allowed_hosts_for("127.0.0.1") == ("127.0.0.1", "localhost", "::1")
    monkeypatch.setenv("HEADSTART_ALLOWED_HOSTS", " classify.example.org, Localhost ,")
    assert allowed_hosts_for("127.0.0.1") == ("classify.example.org", "localhost")


def test_every_answer_carries_the_security_headers(live) -> None:
    for path in ("/health", "/model", "/nope", "/"):
        resp = httpx.get(f"http://{live}{path}", timeout=5)
        assert resp.headers["x-content-type-options"] == "nosniff", path
        assert "frame-ancestors 'none'" in resp.headers["content-security-policy"], path
    page = httpx.get(f"http://{live}/", timeout=5).headers["content-security-policy"]
    assert "default-src 'self'" in page and "object-src 'none'" in page
    refused = httpx.get(f"http://{live}/health", headers={"host": "evil.example"}, timeout=5)
    assert refused.headers["x-content-type-options"] == "nosniff"


def test_multipart_errors_say_what_was_wrong(live, photo) -> None:
    cut = _post(live, _multipart([("file", "a.jpg", photo)], close=False))
    assert cut.status_code == 400 and "closing boundary" in cut.json()["detail"], cut.text
    junk = _post(live, _multipart([("junk", f"{i}.bin", b"x") for i in range(5000)]))
    assert junk.status_code == 400 and "file part in the field 'junk'" in junk.json()["detail"], junk.text
    fields = _post(live, _multipart([("note", None, b"x")] * 50 + [("file", "a.jpg", photo)]))
    assert fields.status_code == 400 and "more than 20 text fields" in fields.json()["detail"], fields.text
    many = _post(live, _multipart([("file", f"{i}.jpg", photo) for i in range(17)]))
    assert many.status_code == 413 and "more than 16 images" in many.json()["detail"]
