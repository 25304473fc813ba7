"""Prometheus metrics shared by the HTTP processes and the model workers.

The server runs several processes, so metrics use prometheus_client's multiprocess
mode: ``PROMETHEUS_MULTIPROC_DIR`` must be set (by :func:`service.server.main`)
before this module is first imported in any of them.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "supportlens_http_requests_total",
    "HTTP requests answered, by route and status.",
    ["route", "status"],
)
ERRORS = Counter(
    "supportlens_http_errors_total", "HTTP answers with a 4xx or 5xx status.", ["route", "status"]
)
LATENCY = Histogram(
    "supportlens_http_request_duration_seconds",
    "Time from request to response, by route.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram(
    "supportlens_batch_size",
    "Texts per model forward pass, by API.",
    ["api"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_THREADS = Histogram(
    "supportlens_batch_threads",
    "Torch threads a model worker ran one batch with, by API (more while others idle).",
    ["api"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
IN_FLIGHT = Gauge(
    "supportlens_in_flight_requests",
    "Inference requests admitted whose work has not ended, sampled at scrape time.",
    multiprocess_mode="mostrecent",
)
QUEUE_DEPTH = Gauge(
    "supportlens_queue_depth",
    "Requests waiting in a model worker queue, sampled at scrape time.",
    ["api"],
    multiprocess_mode="mostrecent",
)
REJECTED = Counter(
    "supportlens_rejected_total", "Requests refused before inference, by reason.", ["reason"]
)


def sample(shared) -> None:
    """Set the gauges sampled at scrape time from the server's shared state."""
    for index, path in enumerate(shared.api_paths):
        QUEUE_DEPTH.labels(api=path).set(shared.queue_depth[index])
    IN_FLIGHT.set(shared.in_flight())


def metrics_server(host: str, port: int, shared):
    """An HTTP server for ``/metrics`` alone on a port of its own, bound now (``OSError``
    if it cannot be); the main process runs it with :func:`start`. prometheus_client's own
    exposition server is not used: it cannot sample the gauges above at scrape time."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            sample(shared)
            body, content_type = render()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # scrapes are not access-logged
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def start(server) -> None:
    """Serve ``server`` from a daemon thread of this process."""
    from service.signals import start_thread

    start_thread(server.serve_forever, "metrics")


def render() -> tuple[bytes, str]:
    """The exposition text over all processes, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
