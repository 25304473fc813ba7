"""The main process's signals: SIGTERM and SIGINT start the drain, in the main thread.

Python runs signal handlers in the main thread only, once that thread executes bytecode
again; the kernel hands a signal sent to the process to any thread that does not block
it. LitServe's main thread waits in a blocking read (its shutdown event): a SIGTERM
taken by another thread does not interrupt that read, and the drain never starts. That
happens, for one, when the signal arrives while the main thread is not yet running
after a SIGCONT (a paused container, job control). So every thread the main process
starts blocks both signals (:func:`start_thread`), which leaves the main thread as the
only one to take them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

from service import litserve_compat as compat

SHUTDOWN_SIGNALS = {signal.SIGINT, signal.SIGTERM}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_dying_with: list[int] = []  # the process whose forked children die with it (set once)


def install_signal_handlers(get_server) -> None:
    """SIGTERM and SIGINT in this process start the drain (or exit quietly before the
    server runs); a forked HTTP process ignores them until uvicorn takes over."""
    parent = os.getpid()

    def on_signal(signum, frame):
        if os.getpid() != parent:
            return  # an HTTP process that inherited this handler: the parent decides
        server = get_server()
        if server is None or not compat.shutdown_requested(server):
            raise SystemExit(128 + signum)  # nothing started yet: nothing to drain
        server.request_shutdown()

    for signum in SHUTDOWN_SIGNALS:
        signal.signal(signum, on_signal)


def ignore_shutdown_signals() -> None:
    """In a model worker: ignore SIGTERM and SIGINT (the main process stops it).

    A worker inherits the main process's signal mask, which may block them: unblocked
    here, they are simply ignored.
    """
    for signum in SHUTDOWN_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)


def start_thread(target: Callable[[], object], name: str) -> threading.Thread:
    """Start a daemon thread that never takes SIGTERM or SIGINT.

    The signals are blocked around ``start()``, so the new thread inherits the mask from
    its first instruction; one that arrives meanwhile waits and reaches the main thread
    when the mask is restored.
    """
    thread = threading.Thread(target=target, name=name, daemon=True)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread


def die_with_this_process() -> None:
    """Every child this process forks from now on is killed (SIGKILL) when it dies.

    Killed outright (``kill -9``, the OOM killer), the main process can stop nothing: the
    HTTP processes it forked would keep the port open with nobody behind them to answer,
    and LitServe's manager process would linger. On Linux each forked child asks the
    kernel for a signal at its parent's death (``prctl(PR_SET_PDEATHSIG)``); then the model
    workers, which are spawned rather than forked, see the end of their pipes once those
    processes are gone, and exit.

    The kernel sends it when the *thread* that forked ends: this process forks (the
    manager, the HTTP processes) only from its main thread, which lives as long as it
    does. A fork made by one of those children (a grandchild) is left alone. Elsewhere
    than on Linux: nothing.
    """
    if not sys.platform.startswith("linux") or _dying_with:
        return
    _dying_with.append(os.getpid())
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    forking: list[int] = []

    def before() -> None:
        forking[:] = [os.getpid()]

    def in_child() -> None:
        if forking != _dying_with:
            return  # forked by a child of this process: not ours to tie
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != _dying_with[0]:
            os._exit(1)  # the parent died between fork() and prctl(): no signal will come

    os.register_at_fork(before=before, after_in_child=in_child)
