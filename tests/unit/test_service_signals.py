"""Process-level signal rules of the server's main process (service/signals.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only"),
]

# A process that ties its forks to itself and forks a child; in "grandchild" mode the
# child forks a grandchild and exits. It prints the PID of the process left sleeping.
FORKER = textwrap.dedent(
    """
    import os, sys, time
    from service.signals import die_with_this_process
    die_with_this_process()
    child = os.fork()
    if child == 0:
        if sys.argv[1] == "grandchild":
            grandchild = os.fork()
            if grandchild:
                print(grandchild, flush=True)
                os._exit(0)
        time.sleep(60)
        os._exit(0)
    if sys.argv[1] == "child":
        print(child, flush=True)
    time.sleep(60)
    """
)


def start_forker(mode: str) -> tuple[subprocess.Popen, psutil.Process]:
    forker = subprocess.Popen(
        [sys.executable, "-c", FORKER, mode], stdout=subprocess.PIPE, text=True
    )
    return forker, psutil.Process(int(forker.stdout.readline()))


def stop(forker: subprocess.Popen, sleeper: psutil.Process) -> None:
    forker.kill()
    forker.wait()
    if sleeper.is_running():
        sleeper.kill()


def test_die_with_this_process_kills_a_forked_child_when_the_parent_is_killed():
    forker, child = start_forker("child")
    try:
        assert child.is_running()
        forker.send_signal(signal.SIGKILL)
        forker.wait()
        _, alive = psutil.wait_procs([child], timeout=10)
        assert alive == []
    finally:
        stop(forker, child)


def test_die_with_this_process_leaves_the_forks_of_a_child_alone():
    """A child's own fork is not tied to that child: its exit does not kill it."""
    forker, grandchild = start_forker("grandchild")
    try:
        time.sleep(0.5)  # its parent, the child, has exited by now
        assert grandchild.is_running() and grandchild.status() != psutil.STATUS_ZOMBIE
    finally:
        stop(forker, grandchild)
