"""ASGI middlewares: metrics, API-key auth, body-size limit and the in-flight bound.

They are plain ASGI (not ``BaseHTTPMiddleware``) so they add no task or copy per
request, and each answers its own errors as JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics

INFERENCE_PREFIX = "/v1/"


async def send_error(
    send: Send, status: int, detail: str, headers: Iterable[tuple[str, str]] = ()
) -> None:
    """Answer with ``{"detail": detail}`` and ``status``."""
    body = json.dumps({"detail": detail}).encode()
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


class MetricsMiddleware:
    """Counts every answer by route and status and times it.

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
        route = self.route_label(scope["path"])
        status = 500
        started = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            metrics.LATENCY.labels(route=route).observe(time.perf_counter() - started)
            metrics.REQUESTS.labels(route=route, status=str(status)).inc()
            if status >= 400:
                metrics.ERRORS.labels(route=route, status=str(status)).inc()


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
        return given is not None and hmac.compare_digest(given.encode(), self.api_key)

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


class _TooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with 413, by Content-Length or while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"request body is larger than the limit of {self.max_bytes} bytes"
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_error(send, 400, "invalid Content-Length header")
                return
            if int(declared) > self.max_bytes:
                metrics.REJECTED.labels(reason="too_large").inc()
                await send_error(send, 413, detail)
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked upload): read up to the limit before passing it on.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                metrics.REJECTED.labels(reason="too_large").inc()
                await send_error(send, 413, detail)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class InFlightLimitMiddleware:
    """Bounds the inference requests in flight over all HTTP processes.

    ``counter`` is a ``multiprocessing.Value`` created before the HTTP processes fork,
    so every process sees the same count. Beyond ``limit`` the answer is 429 with
    ``Retry-After`` rather than an ever longer queue.
    """

    def __init__(self, app: ASGIApp, counter, limit: int, retry_after: int):
        self.app = app
        self.counter = counter
        self.limit = limit
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(INFERENCE_PREFIX):
            await self.app(scope, receive, send)
            return
        if not try_acquire(self.counter, self.limit):
            metrics.REJECTED.labels(reason="overloaded").inc()
            await send_error(
                send,
                429,
                f"too many requests in flight (limit {self.limit}); retry later",
                [("retry-after", str(self.retry_after))],
            )
            return
        metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            release(self.counter)
            metrics.IN_FLIGHT.dec()


def try_acquire(counter, limit: int) -> bool:
    """Take one slot of a shared counter unless ``limit`` are taken."""
    with counter.get_lock():
        if counter.value >= limit:
            return False
        counter.value += 1
        return True


def release(counter) -> None:
    with counter.get_lock():
        counter.value -= 1
