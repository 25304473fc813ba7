"""The main process's watch over the HTTP processes (service.app.first_to_exit)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from service.app import first_to_exit

pytestmark = pytest.mark.unit


def _sleep() -> None:
    time.sleep(60)


class _ExitingProcess:
    """A process whose sentinel is ready while it cannot be waited for yet: what the
    kernel shows for a moment between closing a dying process's files and reaping it."""

    name = "fake"
    pid = 0

    def __init__(self) -> None:
        read, write = os.pipe()
        os.close(write)
        self.sentinel = read
        self.exitcode = None

    def join(self, timeout=None) -> None:
        self.exitcode = -signal.SIGKILL

    def close(self) -> None:
        os.close(self.sentinel)


def test_first_to_exit_reports_the_exit_code_of_a_process_whose_sentinel_fired_first():
    process = _ExitingProcess()
    try:
        assert first_to_exit([process], lambda: False) is process
        assert process.exitcode == -signal.SIGKILL
    finally:
        process.close()


def test_first_to_exit_returns_the_killed_process_with_its_exit_code():
    context = mp.get_context("fork")
    processes = [context.Process(target=_sleep, daemon=True) for _ in range(2)]
    for process in processes:
        process.start()
    try:
        os.kill(processes[1].pid, signal.SIGKILL)
        exited = first_to_exit(processes, lambda: False)
        assert exited is processes[1]
        assert exited.exitcode == -signal.SIGKILL
    finally:
        for process in processes:
            process.kill()
            process.join()


def test_first_to_exit_returns_none_once_stopping():
    context = mp.get_context("fork")
    process = context.Process(target=_sleep, daemon=True)
    process.start()
    try:
        started = time.monotonic()
        assert first_to_exit([process], lambda: time.monotonic() - started > 0.3) is None
        assert process.is_alive()
    finally:
        process.kill()
        process.join()
