"""Builds the server: one LitAPI per model endpoint, the routes and the middlewares.

Each inference route is typed by its LitAPI (the request model is the annotation of
``decode_request``'s ``request``, the response model the return annotation of
``encode_response``), so bodies are validated in the HTTP process, answers are
validated against their response model, and the OpenAPI document carries both.
A request passes, in order: the body middleware (size, read timeout), validation,
the admission checks that need the model's tokenizer (:mod:`service.admission`), the
in-flight bound, and only then is queued for a worker (:mod:`service.supervisor`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import multiprocessing as mp
import signal
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any, get_args, get_type_hints

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from litserve.callbacks import EventTypes
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.bundle import BundleError, load_bundle
from service import litserve_compat as compat
from service import metrics
from service.admission import ClassifyAdmission, Refusal, SummarizeAdmission
from service.classify import ClassifyAPI
from service.config import CHEAP_METHODS, ConfigError, Settings
from service.heap import freeze_startup_heap
from service.logs import REQUEST_ID, configure_logging
from service.middleware import (
    ApiKeyMiddleware,
    BodyMiddleware,
    DrainMiddleware,
    RequestContextMiddleware,
)
from service.schemas import (
    ERROR_RESPONSES,
    ClassifyMethod,
    ModelsResponse,
    ReadyResponse,
    SummarizeMethod,
)
from service.signals import start_thread
from service.summarize import SummarizeAPI
from service.supervisor import QueuedRequest, SharedState, Supervisor

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
# LitServe's own routes that this service replaces or does not offer: its untyped
# inference routes, its text index page, its health check, and /info (internals).
LITSERVE_ROUTES = {"/", "/health", "/info", "/docs", "/docs/oauth2-redirect", "/redoc"}
TASKS = {"intent": "intent-classification", "summarizer": "extractive-summarization"}


class ApiError(Exception):
    """An error answer in the service's shape, with the field it names (if any)."""

    def __init__(self, status: int, detail: str, field: str | None = None, headers=None):
        self.status, self.detail, self.field, self.headers = status, detail, field, headers


def first_to_exit(
    processes: list[mp.process.BaseProcess], stopping: Callable[[], bool]
) -> mp.process.BaseProcess | None:
    """The first of ``processes`` to exit, reaped so that its ``exitcode`` is set; None
    once ``stopping()`` is true.

    A process's sentinel is ready as soon as the kernel closes its files, a moment before
    the process can be waited for: ``exitcode`` read right then is still None, hence
    the join.
    """
    by_sentinel = {process.sentinel: process for process in processes}
    while by_sentinel and not stopping():
        ready = mp_wait(list(by_sentinel), timeout=0.25)
        if ready and not stopping():
            process = by_sentinel[ready[0]]
            process.join(5)
            return process
    return None


class SupportLensServer(compat.LitServerHooks):
    """LitServer with supervised workers (:mod:`service.supervisor`) and a drain.

    SIGINT or SIGTERM to the main process (see :mod:`service.server`) starts the
    drain: readiness turns false and new inference requests get 503 at once, the
    requests in flight are answered (up to ``SUPPORTLENS_DRAIN_TIMEOUT``), then the
    HTTP processes stop, then the workers. The HTTP processes and the workers ignore
    those signals themselves (Ctrl+C reaches the whole process group): the main
    process drives the shutdown.
    """

    def __init__(self, apis, *, settings: Settings, shared: SharedState, **kwargs):
        super().__init__(apis, **kwargs)
        self.settings = settings
        self.shared = shared
        self.supervisor = Supervisor(self, shared, settings)
        self.metrics_server = None  # bound by build_server when SUPPORTLENS_METRICS_PORT is set
        self.uvicorn_graceful_timeout = settings.drain_timeout
        self._drain_started = threading.Lock()
        self.exit_code = 0  # 1 when the server stopped because one of its processes failed

    # Main process -----------------------------------------------------------------

    def on_manager(self, manager, num_api_servers: int) -> None:
        configure_logging(self.settings.log_level, self.settings.log_format)
        compat.use_main_process_transport(self, num_api_servers)
        self.shared.open_request_pipes(num_api_servers)

    def launch_inference_worker(self, lit_api) -> list:
        return self.supervisor.launch(lit_api)

    def on_http_started(self, uvicorn_workers: dict) -> None:
        compat.transport(self).close_readers()  # each HTTP process holds its own
        self.shared.requests.close_writers()
        self.supervisor.start()
        freeze_startup_heap("main process")
        http = [p for p in uvicorn_workers.values() if isinstance(p, mp.process.BaseProcess)]
        start_thread(lambda: self._watch_http(http), "http-watch")
        if self.metrics_server is not None:
            metrics.start(self.metrics_server)

    def _watch_http(self, processes: list[mp.process.BaseProcess]) -> None:
        """An HTTP process that dies stops the server, with exit status 1.

        It is not replaced: LitServe forks the HTTP processes before any thread of this
        process starts, and a fork now could copy a lock that another thread holds. The
        requests it held are lost either way. Without it, the port would stay open with
        nobody accepting (clients hang instead of being refused) while the process looks
        alive; so the other HTTP processes drain and the server exits for its supervisor
        (Kubernetes, systemd) to start it again whole.
        """
        process = first_to_exit(processes, lambda: bool(self.shared.stopping.value))
        if process is None:
            return  # the shutdown stops them
        logger.error(
            "HTTP process %s (pid %s) exited with code %s; stopping the server",
            process.name,
            process.pid,
            process.exitcode,
        )
        self.exit_code = 1
        self.request_shutdown()

    def request_shutdown(self) -> None:
        """Start the drain (once); safe to call from a signal handler."""
        if not self._drain_started.acquire(blocking=False):
            return
        start_thread(self._drain, "drain")

    def _drain(self) -> None:
        self.shared.draining.value = 1
        logger.info(
            "draining %d requests in flight (up to %.0f s)",
            self.shared.in_flight(),
            self.settings.drain_timeout,
        )
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.shared.in_flight() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.shared.in_flight() > 0:
            logger.warning("drain timeout: %d requests still in flight", self.shared.in_flight())
        compat.request_shutdown(self)

    def on_shutdown(self, uvicorn_workers: dict) -> None:
        self.shared.draining.value = 1
        self.shared.stopping.value = 1  # each HTTP process closes its listener and exits
        for process in uvicorn_workers.values():
            process.join(self.settings.drain_timeout + 5)
            if process.is_alive():
                process.terminate()
                process.join(5)
        self.supervisor.stop()
        logger.info("stopped")

    # HTTP processes -----------------------------------------------------------------

    def _lost(self, requests: list[QueuedRequest]) -> None:
        """Requests that could not reach the main process (it is gone): answered 503."""
        logger.error("%d requests could not reach the main process: answered 503", len(requests))
        error = self.supervisor.unavailable("the server is restarting; retry shortly")
        for request in requests:
            self.shared.release(request.slots)
            compat.deliver_response(self, request.uid, error, ok=False)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        configure_logging(self.settings.log_level, self.settings.log_format)
        compat.transport(self).keep_only(compat.response_queue_id(self))
        self.shared.requests.keep_only(compat.response_queue_id(self), lost=self._lost)
        # uvicorn installed its handlers for SIGINT/SIGTERM: keep its server object and
        # ignore both signals; the main process says when to stop (shared.stopping).
        uvicorn_server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if uvicorn_server is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

        async def stop_when_told() -> None:
            while not self.shared.stopping.value:
                await asyncio.sleep(0.05)
            uvicorn_server.should_exit = True

        watcher = asyncio.create_task(stop_when_told()) if uvicorn_server is not None else None
        async with super().lifespan(app):
            freeze_startup_heap(f"HTTP process {compat.response_queue_id(self)}")
            yield
        if watcher is not None:
            watcher.cancel()


def check_bundle(path: Path, which: str, backend: str = "torch", precision: str = "int8"):
    """Verify a bundle in the main process before any worker starts; load it for the
    HTTP processes' checks (tokenizer, labels, limits). With the ``onnx`` backend the
    bundle must hold its ONNX graph in ``precision``. :class:`ConfigError` on failure."""
    from models.onnx_backend import OnnxBackendError, require_graph

    variable = f"SUPPORTLENS_{which.upper()}_BUNDLE"
    task = TASKS[which]
    try:
        bundle = load_bundle(path, task=task, device="cpu")  # verifies it completely first
        if backend == "onnx":
            require_graph(bundle, precision)
    except (BundleError, OnnxBackendError) as error:
        raise ConfigError(f"{variable}: {error}") from None
    return bundle


def _field_name(location: tuple | list) -> str:
    parts = [str(p) for p in location if p != "body"]
    name = ""
    for part in parts:
        name += f"[{part}]" if part.isdigit() else (f".{part}" if name else part)
    return name or "body"


def _error_response(
    status: int, detail: str, errors: list[dict[str, str]] | None = None, headers=None
) -> JSONResponse:
    return JSONResponse({"detail": detail, "errors": errors or []}, status, headers=headers)


async def validation_error_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming each bad field (400 for a body that is not JSON, 415 for a form)."""
    errors = error.errors()
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        reason = bad_json.get("ctx", {}).get("error", "invalid JSON")
        return _error_response(400, f"body: malformed JSON ({reason})")
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return _error_response(
            415, "body: expected a JSON object; send the header 'Content-Type: application/json'"
        )
    fields = []
    for e in errors:
        msg = e.get("msg", "invalid value").removeprefix("Value error, ")
        if e.get("type") == "missing":
            msg = "field required"
        elif e.get("type") == "extra_forbidden":
            msg = "unknown field"
        fields.append({"field": _field_name(e.get("loc", ())), "message": msg})
    detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return _error_response(422, detail, fields)


async def api_error_handler(request: Request, error: ApiError) -> JSONResponse:
    errors = [{"field": error.field, "message": error.detail}] if error.field else []
    detail = f"{error.field}: {error.detail}" if error.field else error.detail
    return _error_response(error.status, detail, errors, error.headers)


async def http_error_handler(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return _error_response(error.status_code, str(error.detail), headers=error.headers)


async def unexpected_error_handler(request: Request, error: Exception) -> JSONResponse:
    # The exception text may quote the request: log its type only.
    logger.error("unexpected %s", type(error).__name__)
    return _error_response(500, "internal error")


def build_server(settings: Settings) -> SupportLensServer:
    """The configured server, not yet running. Raises :class:`ConfigError` naming the
    environment variable when a bundle is missing, corrupt or of the wrong task."""
    if settings.batch_timeout:
        logger.warning(
            "SUPPORTLENS_BATCH_TIMEOUT is ignored: batches form only while every worker is busy"
        )
    apis: list = []
    models: dict[str, dict[str, Any]] = {}
    admissions: dict[str, Any] = {}
    intent = settings.bundle_path("intent")
    summarizer = settings.bundle_path("summarizer")
    if intent is not None:
        from models.predictor import IntentPredictor

        bundle = check_bundle(intent, "intent", settings.backend, settings.onnx_precision)
        models["classify"] = {"name": bundle.name, "version": bundle.version}
        admissions["classify"] = ClassifyAdmission(IntentPredictor(bundle), settings)
        apis += [ClassifyAPI(settings, intent), ClassifyAPI(settings, intent, expensive=True)]
    if summarizer is not None:
        from models.summary_predictor import SummarizerPredictor

        bundle = check_bundle(summarizer, "summarizer", settings.backend, settings.onnx_precision)
        models["summarize"] = {"name": bundle.name, "version": bundle.version}
        admissions["summarize"] = SummarizeAdmission(SummarizerPredictor(bundle), settings)
        apis.append(SummarizeAPI(settings, summarizer))
    if not apis:
        raise ConfigError(
            "no model to serve: set SUPPORTLENS_INTENT_BUNDLE and/or SUPPORTLENS_SUMMARIZER_BUNDLE "
            "to a bundle directory (`make demo-models` trains the demo ones)"
        )

    workers = {api.api_path: api.workers for api in apis}
    # Created before the HTTP processes fork, so all of them share it.
    shared = SharedState(workers)
    middlewares = [
        (BodyMiddleware, {"max_bytes": settings.max_body_bytes, "timeout": settings.body_timeout}),
        (ApiKeyMiddleware, {"api_key": settings.api_key}),
        (DrainMiddleware, {"draining": shared.draining, "retry_after": settings.retry_after}),
        # Outermost: every answer gets its headers, its access-log line and its metrics.
        (RequestContextMiddleware, {"routes": ROUTES}),
    ]
    server = SupportLensServer(
        apis,
        accelerator=settings.accelerator(),
        workers_per_device=workers,
        timeout=settings.queue_timeout,
        middlewares=middlewares,
        model_metadata=models,
        settings=settings,
        shared=shared,
    )
    app: FastAPI = server.app
    app.title = "SupportLens"
    app.description = "Intent classification and extractive summarization of customer-support text, with explanations."
    app.docs_url = app.redoc_url = None
    replaced = {api.api_path for api in apis} | LITSERVE_ROUTES
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in replaced]
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    _add_routes(app, server, settings, models, apis, admissions)
    if settings.metrics_port:
        try:
            server.metrics_server = metrics.metrics_server(
                settings.bind_host(), settings.metrics_port, shared
            )
        except OSError as error:
            raise ConfigError(
                f"SUPPORTLENS_METRICS_PORT: cannot listen on port {settings.metrics_port} "
                f"({error.strerror or error})"
            ) from None
    return server


async def dispatch(server: SupportLensServer, api_path: str, body: Any, slots: tuple) -> Any:
    """Queue ``body`` for the workers of ``api_path`` and wait for their answer.

    ``slots`` (already taken) are released by the main process when the work ends.
    """
    settings, shared = server.settings, server.shared
    uid = uuid.uuid4().hex
    event = compat.register_response(server, uid)
    now = time.monotonic()
    request = QueuedRequest(
        api_path=api_path,
        consumer=compat.response_queue_id(server),
        uid=uid,
        request_id=REQUEST_ID.get(),
        queued_at=now,
        deadline=now + settings.request_timeout,
        payload=body,
        slots=slots,
    )
    compat.trigger(server, EventTypes.ON_REQUEST, active_requests=shared.in_flight())
    try:
        shared.requests.send(request.consumer, request)
    except BaseException:
        compat.take_response(server, uid)
        shared.release(slots)
        raise
    try:
        await asyncio.wait_for(event.wait(), settings.request_timeout)
    except TimeoutError:
        compat.take_response(server, uid)
        raise ApiError(
            504, f"no answer within {settings.request_timeout:g} s; try again later"
        ) from None
    answer = compat.take_response(server, uid)
    compat.trigger(server, EventTypes.ON_RESPONSE)
    if answer is None:
        raise ApiError(500, "internal error: no answer")
    payload, ok = answer
    if not ok:
        status, detail, headers = payload
        raise ApiError(status, detail, headers=headers or None)
    # The worker validated the response against the route's model and serialized it
    # (service.worker.to_json); the route's response_model documents it.
    return Response(payload, media_type="application/json")


def _typed_endpoint(request_model, handle):
    """An endpoint whose body is ``request_model`` (FastAPI reads ``__signature__``)."""

    async def endpoint(body):
        return await handle(body)

    endpoint.__signature__ = inspect.Signature(
        [inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=request_model)]
    )
    return endpoint


def _add_routes(
    app: FastAPI,
    server: SupportLensServer,
    settings: Settings,
    models: dict,
    apis: list,
    admissions: dict,
) -> None:
    shared = server.shared
    retry = {"Retry-After": str(settings.retry_after)}

    def log_texts(route: str, texts: list[str]) -> None:
        if settings.log_text:
            logger.info("%s texts=%r", route, texts)

    def take_slots(api_path: str, expensive: bool) -> tuple[str, ...]:
        if shared.draining.value:
            raise ApiError(503, "the server is shutting down; retry shortly", headers=retry)
        if shared.live_workers(api_path) == 0:  # its worker is being replaced
            raise ApiError(
                503, f"no live model worker for {api_path}; retry shortly", headers=retry
            )
        if not shared.try_acquire("in_flight", settings.max_in_flight):
            metrics.REJECTED.labels(reason="overloaded").inc()
            raise ApiError(
                429,
                f"too many requests in flight (limit {settings.max_in_flight}); retry later",
                headers=retry,
            )
        if not expensive:
            return ("in_flight",)
        # Expensive explanations have their own workers and their own, smaller bound.
        if not shared.try_acquire("explain", settings.max_explain_in_flight):
            shared.release(("in_flight",))
            metrics.REJECTED.labels(reason="overloaded").inc()
            raise ApiError(
                429,
                "too many explanation requests in flight "
                f"(limit {settings.max_explain_in_flight}); retry later",
                headers=retry,
            )
        return ("in_flight", "explain")

    async def admit(check) -> None:
        try:
            await check
        except Refusal as refusal:
            metrics.REJECTED.labels(
                reason="too_costly" if refusal.status == 413 else "invalid"
            ).inc()
            raise ApiError(refusal.status, refusal.detail, refusal.field) from None

    by_path = {api.api_path: api for api in apis}

    def route(path: str, handle) -> None:
        api = by_path[path]
        request_model = get_type_hints(api.decode_request)["request"]
        response_model = get_type_hints(api.encode_response)["return"]
        app.add_api_route(
            path,
            _typed_endpoint(request_model, handle),
            methods=["POST"],
            response_model=response_model,
            responses=ERROR_RESPONSES,
            tags=["inference"],
            summary=(api.__doc__ or "").strip().splitlines()[0],
        )

    if "classify" in models:
        classify_admission = admissions["classify"]

        async def classify(body) -> Any:
            log_texts("/v1/classify", body.texts)
            await admit(
                classify_admission.check(
                    body.texts, body.top_k, body.explain, body.target, body.faithfulness
                )
            )
            expensive = body.faithfulness or any(m not in CHEAP_METHODS for m in body.explain)
            path = "/v1/classify/explain" if expensive else "/v1/classify"
            return await dispatch(server, path, body, take_slots(path, expensive))

        route("/v1/classify", classify)

    if "summarize" in models:
        summarize_admission = admissions["summarize"]

        async def summarize(body) -> Any:
            log_texts("/v1/summarize", body.texts)
            await admit(summarize_admission.check(body.texts, body.explain, body.faithfulness))
            return await dispatch(server, "/v1/summarize", body, take_slots("/v1/summarize", False))

        route("/v1/summarize", summarize)

    @app.get("/v1/models", tags=["inference"], responses=ERROR_RESPONSES)
    async def served_models() -> ModelsResponse:
        """The models served, and the explanation methods each endpoint accepts."""
        return ModelsResponse(
            models=models,
            default_attribution=settings.default_attribution,
            explain={
                "classify": list(get_args(ClassifyMethod)),
                "summarize": list(get_args(SummarizeMethod)),
            },
        )

    @app.get("/health", tags=["probes"], responses={503: ERROR_RESPONSES[503]})
    async def health() -> ReadyResponse:
        """Readiness: 503 while shutting down or while an API has no live model worker."""
        if shared.draining.value:
            raise ApiError(503, "shutting down", headers=retry)
        missing = shared.unready_apis()
        if missing:
            raise ApiError(503, f"no live model worker for {', '.join(missing)}", headers=retry)
        return ReadyResponse(status="ready")

    @app.get("/livez", tags=["probes"])
    async def livez() -> dict[str, str]:
        """Liveness: the HTTP process answers (readiness is ``/health``)."""
        return {"status": "alive"}

    if not settings.metrics_port:  # else on SUPPORTLENS_METRICS_PORT only (see metrics.serve)

        @app.get("/metrics", tags=["probes"])
        async def prometheus_metrics() -> Response:
            """Prometheus metrics summed over all server processes."""
            metrics.sample(shared)
            body, content_type = metrics.render()
            return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
