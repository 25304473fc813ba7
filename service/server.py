"""``supportlens-serve`` / ``python -m service.server``: run the HTTP service.

Settings come from ``SUPPORTLENS_*`` environment variables (see
:class:`service.config.Settings`); by default it serves the demo bundles under
``runs/`` on http://localhost:8000. SIGTERM drains in-flight requests and stops every
worker process before exiting.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from service.config import ConfigError, get_settings


def prepare_metrics_dir() -> Path | None:
    """Point prometheus_client's multiprocess mode at a fresh directory.

    Must run before ``prometheus_client`` is imported. Returns the directory when this
    process created it (and must remove it), None when one was given.
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        directory = Path(given)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):  # counts from a previous run would be added in
            stale.unlink()
        return None
    directory = Path(tempfile.mkdtemp(prefix="supportlens-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


def install_sigterm_handler(server) -> None:
    """SIGTERM in this process starts the drain; in a forked child it keeps its default."""
    parent = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != parent:
            # An HTTP process inherited this handler: behave as if it were not there.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if server._shutdown_event is None:
            raise SystemExit(128 + signum)  # nothing started yet
        server.request_shutdown()

    signal.signal(signal.SIGTERM, on_sigterm)


def main(argv: list[str] | None = None) -> int:
    """Start the server; returns the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    try:
        settings = get_settings()
    except ConfigError as error:
        print(f"supportlens-serve: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    metrics_dir = prepare_metrics_dir()
    try:
        from service.app import build_server  # imports prometheus_client: after the line above

        try:
            server = build_server(settings)
        except ConfigError as error:
            print(f"supportlens-serve: {error}", file=sys.stderr)
            return 2
        install_sigterm_handler(server)
        host = "127.0.0.1" if settings.host == "localhost" else settings.host
        try:
            server.run(
                host=host,
                port=settings.port,
                num_api_servers=settings.api_servers,
                log_level=settings.log_level.lower(),
                generate_client_file=False,
            )
        except RuntimeError as error:  # a worker failed to load its model
            print(f"supportlens-serve: {error}", file=sys.stderr)
            for process in getattr(server, "inference_workers", []):
                process.kill()
            return 1
        return 0
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
