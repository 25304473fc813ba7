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


def render() -> tuple[bytes, str]:
    """The exposition text over all processes, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
