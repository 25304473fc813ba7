"""ASGI middlewares: request id, security headers, access log and metrics; the drain;
API-key auth; the body (size limit and read timeout).

They are plain ASGI (not ``BaseHTTPMiddleware``) so they add no task or copy per
request, and each answers its own errors in the service's one error shape,
``{"detail": str, "errors": [...]}``. The in-flight bound is not here: a request
takes its slot in the route, once its body has arrived and passed validation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.logs import REQUEST_ID

INFERENCE_PREFIX = "/v1/"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A client's X-Request-ID is kept when it looks like an id (it ends up in logs).
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# The page loads only its own script, style and API; nothing may frame it.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        b"frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
access_log = logging.getLogger("supportlens.access")


def error_body(detail: str, errors: list[dict[str, str]] | None = None) -> bytes:
    return json.dumps({"detail": detail, "errors": errors or []}).encode()


async def send_error(
    send: Send, status: int, detail: str, headers: Iterable[tuple[str, str]] = ()
) -> None:
    """Answer ``status`` with ``{"detail": detail, "errors": []}``."""
    body = error_body(detail)
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *[(k.lower().encode(), v.encode()) for k, v in headers],
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Outermost: request id (``X-Request-ID``, the client's if sane), the security
    headers on every answer, one access-log line per request without its query string
    (a query may carry secrets, e.g. ``?api_key=``), and the request metrics: every
    answer counted by route and status, and timed.

    Unknown paths share the route label ``other`` so that probing random URLs cannot
    create unbounded label values.
    """

    def __init__(self, app: ASGIApp, routes: Iterable[str]):
        self.app = app
        self.routes = frozenset(routes)

    def route_label(self, path: str) -> str:
        if path in self.routes:
            return path
        return "/static" if path.startswith("/static/") else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        status = 500
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                    *SECURITY_HEADERS,
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            route = self.route_label(scope["path"])
            metrics.LATENCY.labels(route=route).observe(elapsed)
            metrics.REQUESTS.labels(route=route, status=str(status)).inc()
            if status >= 400:
                metrics.ERRORS.labels(route=route, status=str(status)).inc()
            access_log.info(
                "%s %s %d %.1f ms", scope["method"], scope["path"], status, 1000 * elapsed
            )
            REQUEST_ID.reset(token)


class DrainMiddleware:
    """While the server drains, new inference requests get 503 with ``Retry-After``
    (the connection is still accepted and answered; another replica can take it)."""

    def __init__(self, app: ASGIApp, draining, retry_after: int):
        self.app = app
        self.draining = draining
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self.draining.value
            and scope["path"].startswith(INFERENCE_PREFIX)
        ):
            metrics.REJECTED.labels(reason="draining").inc()
            await send_error(
                send,
                503,
                "the server is shutting down; retry on another replica or shortly",
                [("retry-after", str(self.retry_after)), ("connection", "close")],
            )
            return
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """When a key is configured, inference routes need it as ``Authorization: Bearer <key>``
    or ``X-API-Key: <key>``; probes, metrics and the web page stay open."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    def authorized(self, scope: Scope) -> bool:
        given = _header(scope, b"x-api-key")
        if given is None:
            authorization = _header(scope, b"authorization") or ""
            scheme, _, token = authorization.partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        # compare_digest takes constant time, so the key cannot be guessed byte by byte.
        return given is not None and hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), self.api_key
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.api_key
            and scope["type"] == "http"
            and scope["path"].startswith(INFERENCE_PREFIX)
            and not self.authorized(scope)
        ):
            metrics.REJECTED.labels(reason="unauthorized").inc()
            await send_error(
                send,
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                [("www-authenticate", "Bearer")],
            )
            return
        await self.app(scope, receive, send)


class BodyMiddleware:
    """Reads the whole body before the route runs: 413 over ``max_bytes`` (by
    Content-Length or while reading), 408 when it has not arrived within ``timeout``
    seconds (a slow or stalled client then holds nothing but its connection)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        too_large = f"request body is larger than the limit of {self.max_bytes} bytes"
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_error(send, 400, "invalid Content-Length header")
                return
            if int(declared) > self.max_bytes:
                metrics.REJECTED.labels(reason="too_large").inc()
                await send_error(send, 413, too_large, [("connection", "close")])
                return
        messages: list[Message] = []
        size = 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                metrics.REJECTED.labels(reason="slow_body").inc()
                await send_error(
                    send,
                    408,
                    f"request body not received within {self.timeout:g} s",
                    [("connection", "close")],
                )
                return
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                metrics.REJECTED.labels(reason="too_large").inc()
                await send_error(send, 413, too_large, [("connection", "close")])
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class TurnCoalescingTransport:
    """A connection's transport whose writes of one event-loop turn leave as one send.

    uvicorn writes a response's status line and headers, then its body, with a
    ``transport.write`` each, and uvloop sends each at once: two segments per answer on a
    TCP_NODELAY socket, two wake-ups of the client, and on loopback the kernel's delivery
    paid twice by this process. Held until the end of the turn (``call_soon``), they go
    out as one. Everything else is the real transport's; ``close`` sends what is held
    first, as a transport's close does with its buffer."""

    __slots__ = ("_held", "_inner", "_loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._inner = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def flush(self) -> None:
        if not self._held:
            return
        data = b"".join(self._held)
        self._held.clear()
        if not self._inner.is_closing():
            self._inner.write(data)

    def close(self) -> None:
        self.flush()
        self._inner.close()

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def header_timeout_protocol(timeout: float):
    """uvicorn's HTTP protocol, closing connections whose request headers do not
    arrive within ``timeout`` seconds (uvicorn itself only times out idle keep-alive
    connections, so a client trickling header bytes would hold one forever), and
    writing each answer as one send (:class:`TurnCoalescingTransport`)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(TurnCoalescingTransport(transport, self.loop))
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(timeout, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()  # the next request on this connection

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
