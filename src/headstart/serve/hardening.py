"""What stands between the service and the network: the Host allow-list, the response headers, and the server's
own limits (uvicorn's settings, and a header timeout uvicorn lacks).

What uvicorn does itself (its settings, set in `uvicorn_config`):
- `timeout_keep_alive`: an idle keep-alive connection is closed after that many seconds;
- `limit_concurrency`: beyond that many connections (or tasks) at once, new requests are answered 503 at once;
- `h11_max_incomplete_event_size`: a request line and headers larger than that are refused (400);
- `backlog`: connections the kernel queues before accepting.
What it does not: it has no timeout on a request's headers (a client sending one header line per second holds
its connection forever; the keep-alive timer only runs between requests) and none on the body. The headers get one
here (`HeaderTimeoutH11`: uvicorn's own h11 protocol, closing a connection whose headers are not complete
`header_timeout_s` after it opened or after its previous answer); the body's limits are the app's
(`uploads.Limits.upload_timeout_s`, `idle_timeout_s`). Neither limits a client's rate beyond that: put the service
behind a reverse proxy (nginx's `client_header_timeout`, `client_body_timeout`, `limit_conn`) when it faces
the Internet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

import h11
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# The page loads nothing from elsewhere; the policy makes the browser hold it to that. No page may frame any answer.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")
FRAME_CSP = "frame-ancestors 'none'"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServerLimits:
    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_connections: int = 64  # uvicorn's limit_concurrency
    max_header_bytes: int = 16 * 1024
    backlog: int = 128


def default_hosts(bound: str) -> tuple[str, ...]:
    """The Host names a browser may reach the service by: the bound address and localhost's names; when bound to
    every interface (0.0.0.0, ::), this machine's name and its addresses too. Anything else (a DNS rebinding
    attacker's name pointing at 127.0.0.1) is refused with 400."""
    hosts = [bound.strip("[]"), *LOCAL_NAMES]
    if bound in ("0.0.0.0", "::", ""):
        name = socket.gethostname()
        hosts += [name, socket.getfqdn()]
        try:
            hosts += socket.gethostbyname_ex(name)[2]
        except OSError:
            pass
    return tuple(dict.fromkeys(h.lower() for h in hosts if h and h not in ("0.0.0.0", "::")))


def allowed_hosts_for(bound: str) -> tuple[str, ...]:
    """$HEADSTART_ALLOWED_HOSTS (comma-separated; "*" allows any, e.g. behind a proxy that checks it) when set,
    else `default_hosts(bound)`."""
    listed = tuple(h.strip().lower() for h in os.environ.get("HEADSTART_ALLOWED_HOSTS", "").split(",") if h.strip())
    return listed or default_hosts(bound)


class SecurityHeaders:
    """Adds `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer` and `frame-ancestors 'none'` to every
    answer (a route that sets its own Content-Security-Policy, the page, keeps it). Plain ASGI, so streamed
    answers pass untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
                if "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = FRAME_CSP
            await send(message)

        await self.app(scope, receive, with_headers)


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers (see the module's docstring)."""

    header_timeout_s = ServerLimits.header_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()  # the next request's headers get their own time

    def connection_lost(self, exc: Exception | None) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        old = getattr(self, "_header_deadline", None)
        if old is not None:
            old.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        # IDLE: the client has not finished a request's headers since the connection opened or its last answer.
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        log.warning("%s: no complete request headers within %g s; connection closed", _peer(self.client),
                    self.header_timeout_s)
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return "%s:%d" % client if client else "a client"


def uvicorn_config(app: ASGIApp, host: str, port: int, server: ServerLimits = ServerLimits()):
    """uvicorn's Config for the service, every limit above set."""
    import uvicorn

    protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout_s": server.header_timeout_s})
    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=protocol,
                          timeout_keep_alive=server.keep_alive_s, limit_concurrency=server.max_connections,
                          h11_max_incomplete_event_size=server.max_header_bytes, backlog=server.backlog,
                          server_header=False)
