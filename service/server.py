"""``supportlens-serve`` / ``python -m service.server``: run the HTTP service.

Settings come from ``SUPPORTLENS_*`` environment variables (see
:class:`service.config.Settings`); by default it serves the demo bundles under
``runs/`` on http://localhost:8000. SIGTERM or SIGINT (Ctrl+C) drains the requests in
flight and stops every worker process before exiting. A bad setting or bundle exits
with status 2 and one line on stderr.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from service.config import ConfigError, get_settings
from service.logs import configure_logging
from service.signals import die_with_this_process, install_signal_handlers

METRICS_DIR_PREFIX = "supportlens-metrics-"


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
    remove_orphaned_metrics_dirs()
    directory = Path(tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


def remove_orphaned_metrics_dirs() -> list[Path]:
    """Remove the metrics directories of servers that died without removing their own.

    A server removes its directory when it exits, but not when it is killed with
    ``kill -9``; its name carries the pid of the server that made it, so the next server
    removes those whose process is gone. Only this user's real directories (no links)
    are touched. Returns what was removed."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(METRICS_DIR_PREFIX).split("-", 1)[0]
        try:
            info = path.lstat()
        except OSError:
            continue
        if not pid.isdigit() or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        if not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


def set_openmp_waiting(environ) -> None:
    """How long an idle OpenMP thread of a model worker spins before it sleeps.

    A worker's thread count changes from batch to batch (``Supervisor.threads_for``), so
    a thread left spinning after a batch steals the core another worker was just given
    (with OpenMP's default of about 3 ms it multiplied a request's CPU time several
    times over on a busy machine). Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) makes
    every parallel region of a forward pass wake its threads again, and two threads
    then ran a lone short message slower than one. So libgomp, the OpenMP that torch's
    wheels ship, spins for ``GOMP_SPINCOUNT`` = 10,000 rounds (about 0.1 ms: between the
    operations of one forward pass) and then sleeps; other OpenMP runtimes sleep at
    once. An environment that sets either variable decides instead.
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    environ["GOMP_SPINCOUNT"] = "10000"  # read by libgomp before OMP_WAIT_POLICY


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
    configure_logging(settings.log_level, settings.log_format)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_openmp_waiting(os.environ)
    built = []
    install_signal_handlers(lambda: built[0] if built else None)
    die_with_this_process()  # kill -9 of this process leaves no HTTP process behind
    metrics_dir = prepare_metrics_dir()
    try:
        from service.app import build_server  # imports prometheus_client: after the line above
        from service.middleware import header_timeout_protocol

        try:
            server = build_server(settings)
        except ConfigError as error:
            print(f"supportlens-serve: {error}", file=sys.stderr)
            return 2
        built.append(server)
        try:
            server.run(
                host=settings.bind_host(),
                port=settings.port,
                num_api_servers=settings.api_servers,
                log_level=settings.log_level.lower(),
                generate_client_file=False,
                access_log=False,  # service.middleware writes it, without query strings
                log_config=None,  # uvicorn logs through service.logs like everything else
                timeout_keep_alive=settings.keep_alive_timeout,
                http=header_timeout_protocol(settings.header_timeout),
            )
        except RuntimeError as error:  # a worker failed to load its model
            print(f"supportlens-serve: {error}", file=sys.stderr)
            for process in getattr(server, "inference_workers", []):
                process.kill()
            return 1
        return server.exit_code
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
