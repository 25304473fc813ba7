"""Log lines of every server process: time, level, process, request id (text or JSON).

The HTTP processes set the request id of the request they are handling in a context
variable; the model workers set it while they work on one request. Lines logged
outside a request carry ``-``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
TEXT_FORMAT = (
    "%(asctime)s %(levelname)s [%(processName)s %(process)d] [%(request_id)s] %(name)s: %(message)s"
)


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` from the context of the code that logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors in clusters."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": record.processName,
            "pid": record.process,
            "request_id": getattr(record, "request_id", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _NoDocsNotice(logging.Filter):
    """LitServe announces a Swagger UI at /docs, which this service does not serve."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Swagger UI")


def configure_logging(level: str, log_format: str) -> None:
    """Send every logger of this process to stderr in the chosen format.

    Also takes over the loggers of LitServe and uvicorn, which install their own
    handlers and formats; called again in each process after they did so.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("litserve", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        for old in logger.handlers[:]:
            logger.removeHandler(old)
        logger.propagate = True
    # The access log is written by service.middleware.AccessLogMiddleware (without
    # query strings); uvicorn's own one would print the full URL.
    logging.getLogger("uvicorn.access").disabled = True
    server_logger = logging.getLogger("litserve.server")
    if not any(isinstance(f, _NoDocsNotice) for f in server_logger.filters):
        server_logger.addFilter(_NoDocsNotice())
