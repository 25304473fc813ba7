"""Builds the LitServer: one LitAPI per model endpoint, the routes and the middlewares.

LitServe registers an untyped POST route per API; this module replaces the public
ones with typed routes so that bodies are validated in the HTTP process (a bad
request is answered there and never joins a batch), the OpenAPI document carries the
real request/response schemas, and ``/v1/classify`` can send requests for expensive
explanations to their own worker pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import threading
import time
import uuid
from pathlib import Path
from typing import Any, get_args

import litserve as ls
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from litserve.server import RegularRequestHandler
from litserve.utils import LitAPIStatus, ResponseBufferItem

from models.bundle import BundleError, sha256_file, verify_bundle
from service import metrics
from service.classify import ClassifyAPI
from service.config import CHEAP_METHODS, ConfigError, Settings
from service.middleware import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    InFlightLimitMiddleware,
    MetricsMiddleware,
    release,
    try_acquire,
)
from service.schemas import (
    ERROR_RESPONSES,
    ClassifyMethod,
    ClassifyRequest,
    ClassifyResponse,
    SummarizeMethod,
    SummarizeRequest,
    SummarizeResponse,
)
from service.summarize import SummarizeAPI

logger = logging.getLogger("supportlens.service")
STATIC = Path(__file__).parent / "static"
ROUTES = (
    "/",
    "/health",
    "/livez",
    "/metrics",
    "/openapi.json",
    "/v1/models",
    "/v1/classify",
    "/v1/summarize",
)


class SupportLensServer(ls.LitServer):
    """LitServer whose shutdown drains in-flight requests before stopping the workers.

    LitServe's own shutdown closes the response transport before it stops the HTTP
    processes, and a SIGTERM to the parent kills it without any shutdown at all,
    leaving worker processes behind. Here SIGTERM (see :mod:`service.server`) sets the
    shutdown event; the HTTP processes are then stopped first (uvicorn stops
    accepting and finishes the requests it has, within ``drain_timeout``) while the
    model workers keep answering, and only then are the workers stopped.
    """

    def __init__(self, *args, drain_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.uvicorn_graceful_timeout = drain_timeout
        self._shutdown_lock = threading.Lock()
        self._shutdown_done = False
        self.uvicorn_processes: dict = {}

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        # Requests reach the workers through plain multiprocessing queues (a pipe each,
        # written by a feeder thread) instead of LitServe's manager queues: a manager
        # queue's put is a blocking round trip to the manager process, made inside the
        # HTTP process's event loop, and the manager has to serve every put and get.
        context = mp.get_context("spawn")
        for path in self.litapi_request_queues:
            self.litapi_request_queues[path] = context.Queue()
        return manager

    def _start_server(self, *args, **kwargs):
        self.uvicorn_processes = super()._start_server(*args, **kwargs)
        return self.uvicorn_processes

    def request_shutdown(self) -> None:
        """Ask :meth:`run` to drain and return; safe to call from a signal handler."""
        event = self._shutdown_event
        if event is not None:
            # A manager proxy must not be used from inside a handler that interrupted
            # the main thread's own call on it, so another thread sets the event.
            threading.Thread(target=event.set, daemon=True).start()

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
        with self._shutdown_lock:
            if self._shutdown_done:
                return
            self._shutdown_done = True
            logger.info("draining in-flight requests (up to %.0f s)", self.uvicorn_graceful_timeout)
            processes = [
                w for w in uvicorn_workers.values() if isinstance(w, mp.process.BaseProcess)
            ]
            for process in processes:
                if process.is_alive():
                    process.terminate()  # SIGTERM: uvicorn's graceful shutdown
            for process in processes:
                process.join(timeout=self.uvicorn_graceful_timeout + 5)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=5)
            super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)


def bundle_summary(path: Path, variable: str) -> dict[str, str]:
    """Verify a bundle without loading it; name and version as the workers will report them."""
    try:
        verify_bundle(path)
    except BundleError as error:
        raise ConfigError(f"{variable}: {error}") from None
    training_file = path / "training.json"
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    return {
        "name": str(training.get("name") or path.name),
        "version": sha256_file(path / "manifest.json")[:12],
    }


async def dispatch(server: ls.LitServer, api_path: str, payload: Any, timeout: float) -> Any:
    """Queue ``payload`` for the workers of ``api_path`` and wait for their answer.

    Replaces LitServe's request handler to bound the wait (504 instead of a hang) and
    to drop the response slot when the client's request ends early.
    """
    uid = str(uuid.uuid4())
    event = asyncio.Event()
    server.response_buffer[uid] = ResponseBufferItem(event)
    try:
        server._get_request_queue(api_path).put(
            (server.app.response_queue_id, uid, time.monotonic(), payload)
        )
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            raise HTTPException(504, f"no answer within {timeout:g} s; try again later") from None
        response, status = server.response_buffer[uid].response
    finally:
        server.response_buffer.pop(uid, None)
    if status == LitAPIStatus.ERROR:
        RegularRequestHandler._handle_error_response(response)
    return response


def _field_name(location: tuple | list) -> str:
    parts = [str(p) for p in location if p != "body"]
    name = ""
    for part in parts:
        name += f"[{part}]" if part.isdigit() else (f".{part}" if name else part)
    return name or "body"


async def validation_error_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 whose ``detail`` names each bad field (400 for a body that is not JSON)."""
    errors = error.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        message = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {})
        reason = message.get("error", "invalid JSON")
        return JSONResponse(
            {"detail": f"body: malformed JSON ({reason})", "errors": None}, status_code=400
        )
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return JSONResponse(
            {
                "detail": "body: expected a JSON object; send the header 'Content-Type: application/json'",
                "errors": None,
            },
            status_code=415,
        )
    fields = []
    for e in errors:
        name = _field_name(e.get("loc", ()))
        msg = e.get("msg", "invalid value")
        msg = msg.removeprefix("Value error, ")
        if e.get("type") == "missing":
            msg = "field required"
        elif e.get("type") == "extra_forbidden":
            msg = "unknown field"
        fields.append({"field": name, "message": msg})
    detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return JSONResponse({"detail": detail, "errors": fields}, status_code=422)


def build_server(settings: Settings) -> SupportLensServer:
    """The configured server, not yet running. Raises :class:`ConfigError` naming the
    environment variable when a bundle is missing or corrupt."""
    apis: list[ls.LitAPI] = []
    models: dict[str, dict[str, Any]] = {}
    intent = settings.bundle_path("intent")
    summarizer = settings.bundle_path("summarizer")
    if intent is not None:
        models["classify"] = bundle_summary(intent, "SUPPORTLENS_INTENT_BUNDLE")
        apis += [ClassifyAPI(settings, intent), ClassifyAPI(settings, intent, expensive=True)]
    if summarizer is not None:
        models["summarize"] = bundle_summary(summarizer, "SUPPORTLENS_SUMMARIZER_BUNDLE")
        apis.append(SummarizeAPI(settings, summarizer))
    if not apis:
        raise ConfigError(
            "no model to serve: set SUPPORTLENS_INTENT_BUNDLE and/or SUPPORTLENS_SUMMARIZER_BUNDLE "
            "to a bundle directory (`make demo-models` trains the demo ones)"
        )

    # Created before the HTTP processes fork, so all of them share these counters.
    in_flight = mp.Value("i", 0)
    middlewares = [
        (
            InFlightLimitMiddleware,
            {
                "counter": in_flight,
                "limit": settings.max_in_flight,
                "retry_after": settings.retry_after,
            },
        ),
        (BodySizeLimitMiddleware, {"max_bytes": settings.max_body_bytes}),
        (ApiKeyMiddleware, {"api_key": settings.api_key}),
        (MetricsMiddleware, {"routes": ROUTES}),  # outermost: sees every answer
    ]
    workers = {
        api.api_path: (api.workers if isinstance(api, ClassifyAPI) else settings.summarize_workers)
        for api in apis
    }
    server = SupportLensServer(
        apis,
        accelerator=settings.accelerator(),
        workers_per_device=workers,
        timeout=settings.queue_timeout,
        middlewares=middlewares,
        model_metadata=models,
        drain_timeout=settings.drain_timeout,
    )
    app: FastAPI = server.app
    app.title = "SupportLens"
    app.description = "Intent classification and extractive summarization of customer-support text, with explanations."
    # Replace LitServe's untyped routes (and its "/" text page) with the typed ones below.
    replaced = {api.api_path for api in apis} | {"/"}
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in replaced]
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    _add_routes(app, server, settings, models)
    return server


def _add_routes(app: FastAPI, server: SupportLensServer, settings: Settings, models: dict) -> None:
    expensive_limit = settings.max_explain_in_flight
    explain_in_flight = mp.Value("i", 0)  # shared by the HTTP processes, like the global bound

    def log_texts(route: str, texts: list[str]) -> None:
        if settings.log_text:
            logger.info("%s texts=%r", route, texts)

    if "classify" in models:

        async def classify(body: ClassifyRequest) -> Any:
            """Intent, calibrated score, top-k intents and optional word explanations per text."""
            log_texts("/v1/classify", body.texts)
            if all(method in CHEAP_METHODS for method in body.explain):
                return JSONResponse(
                    await dispatch(server, "/v1/classify", body, settings.request_timeout)
                )
            # Expensive explanations have their own workers and their own, smaller bound.
            if not try_acquire(explain_in_flight, expensive_limit):
                metrics.REJECTED.labels(reason="overloaded").inc()
                raise HTTPException(
                    429,
                    f"too many explanation requests in flight (limit {expensive_limit}); retry later",
                    headers={"Retry-After": str(settings.retry_after)},
                )
            try:
                return JSONResponse(
                    await dispatch(server, "/v1/classify/explain", body, settings.request_timeout)
                )
            finally:
                release(explain_in_flight)

        app.add_api_route(
            "/v1/classify",
            classify,
            methods=["POST"],
            response_model=ClassifyResponse,
            responses=ERROR_RESPONSES,
            tags=["inference"],
        )

    if "summarize" in models:

        async def summarize(body: SummarizeRequest) -> Any:
            """Extractive summary per conversation, with every sentence's score."""
            log_texts("/v1/summarize", body.texts)
            return JSONResponse(
                await dispatch(server, "/v1/summarize", body, settings.request_timeout)
            )

        app.add_api_route(
            "/v1/summarize",
            summarize,
            methods=["POST"],
            response_model=SummarizeResponse,
            responses=ERROR_RESPONSES,
            tags=["inference"],
        )

    @app.get("/v1/models", tags=["inference"])
    async def served_models() -> dict[str, Any]:
        """The models served, and the explanation methods each endpoint accepts."""
        return {
            "models": models,
            "default_attribution": settings.default_attribution,
            "explain": {
                "classify": list(get_args(ClassifyMethod)),
                "summarize": list(get_args(SummarizeMethod)),
            },
        }

    @app.get("/livez", tags=["probes"])
    async def livez() -> dict[str, str]:
        """Liveness: the HTTP process answers (readiness is ``/health``)."""
        return {"status": "alive"}

    @app.get("/metrics", tags=["probes"])
    async def prometheus_metrics() -> Response:
        """Prometheus metrics summed over all server processes."""
        for path, queue in server.litapi_request_queues.items():
            # The manager is gone (shutting down) or the platform cannot tell: skip it.
            with contextlib.suppress(OSError, EOFError, NotImplementedError):
                metrics.QUEUE_DEPTH.labels(api=path).set(queue.qsize())
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
