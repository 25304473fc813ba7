"""The server entry point's own housekeeping: its prometheus multiprocess directory."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from service import server

pytestmark = pytest.mark.unit


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    return tmp_path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_server_removes_metrics_dirs_that_killed_servers_left_behind(temp_root, monkeypatch):
    # kill -9 of a server leaves its directory; the next server removes it, and only it.
    orphan = temp_root / f"{server.METRICS_DIR_PREFIX}{dead_pid()}-abc"
    running = temp_root / f"{server.METRICS_DIR_PREFIX}{os.getppid()}-def"
    unrelated = temp_root / f"{server.METRICS_DIR_PREFIX}notapid-ghi"
    target = temp_root / "elsewhere"
    for path in (orphan, running, unrelated, target):
        path.mkdir()
        (path / "counter_1.db").write_bytes(b"x")
    link = temp_root / f"{server.METRICS_DIR_PREFIX}{dead_pid()}-link"
    link.symlink_to(target)

    created = server.prepare_metrics_dir()

    assert not orphan.exists()
    assert running.is_dir() and unrelated.is_dir() and link.is_symlink()
    assert (target / "counter_1.db").exists()  # a link is never followed
    assert created.parent == temp_root and created.is_dir()
    assert created.name.startswith(f"{server.METRICS_DIR_PREFIX}{os.getpid()}-")
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(created)
    # The new directory belongs to a live process: another server leaves it alone.
    assert server.remove_orphaned_metrics_dirs() == []


def test_server_uses_a_given_metrics_dir_and_clears_only_its_counts(temp_root, monkeypatch):
    given = temp_root / "metrics"
    given.mkdir()
    (given / "counter_1.db").write_bytes(b"x")
    (given / "keep.txt").write_text("x")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    assert server.prepare_metrics_dir() is None
    assert sorted(p.name for p in given.iterdir()) == ["keep.txt"]


def test_server_openmp_waiting_spins_briefly_unless_the_environment_decides():
    environ: dict[str, str] = {}
    server.set_openmp_waiting(environ)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}
    for given in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}):
        environ = dict(given)
        server.set_openmp_waiting(environ)
        assert environ == given
