"""Start-up and shutdown: a bad bundle, serving without a key, SIGTERM and Ctrl+C (SIGINT
to the process group): in-flight requests answered, new ones 503, no process left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from tests.integration.conftest import REPO, ServerProcess, bundle_env, free_port, model_workers

pytestmark = pytest.mark.integration


def _in_flight(url: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("supportlens_in_flight_requests "):
            return float(line.split()[1])
    return 0.0


def test_service_drains_in_flight_requests_on_sigterm_and_leaves_no_process(tiny_bundles, tmp_path):
    intent, _ = tiny_bundles
    server = ServerProcess(
        {
            "SUPPORTLENS_INTENT_BUNDLE": str(intent),
            "SUPPORTLENS_SUMMARIZER_BUNDLE": "none",
            "SUPPORTLENS_API_SERVERS": "2",
            "SUPPORTLENS_WORKERS": "2",  # two classify workers to drain, + the explain worker
        },
        tmp_path / "server.log",
    ).wait_ready()
    try:
        # No key configured: inference is open to everyone.
        assert requests.post(f"{server.url}/v1/classify", json={"text": "hi"}, timeout=10).ok
        assert (
            requests.post(f"{server.url}/v1/summarize", json={"text": "hi"}, timeout=10).status_code
            == 404
        )
        main = psutil.Process(server.process.pid)
        descendants = main.children(recursive=True)
        workers = model_workers(server.process.pid)
        assert len(workers) == 3 and len(descendants) >= 6  # + 2 HTTP, manager, tracker

        # Freeze the model workers so that requests are surely in flight at SIGTERM.
        for worker in workers:
            worker.send_signal(signal.SIGSTOP)
        pool = ThreadPoolExecutor(8)
        futures = [
            pool.submit(
                requests.post,
                f"{server.url}/v1/classify",
                json={"texts": [f"message number {i}"]},
                timeout=60,
            )
            for i in range(8)
        ]
        deadline = time.monotonic() + 20
        while _in_flight(server.url) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _in_flight(server.url) == 8
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        # Draining: not ready, and a new request is answered 503 (not reset).
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 503
        late = requests.post(f"{server.url}/v1/classify", json={"text": "late"}, timeout=10)
        assert late.status_code == 503 and late.headers["Retry-After"] == "1"
        assert set(late.json()) == {"detail", "errors"}
        for worker in workers:
            worker.send_signal(signal.SIGCONT)

        responses = [f.result() for f in futures]
        pool.shutdown()
        assert [r.status_code for r in responses] == [200] * 8
        assert all(len(r.json()["results"]) == 1 for r in responses)
        assert server.process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert alive == [], f"orphaned processes: {[p.cmdline() for p in alive]}"
    finally:
        server.stop()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_service_drains_when_the_whole_process_group_is_signalled(tiny_bundles, tmp_path, signum):
    """Ctrl+C in a terminal sends SIGINT to every process of the group; systemd's
    ``KillMode=control-group`` and ``kill -TERM -<pgid>`` send SIGTERM to all of them.
    Either way the workers finish what they hold and no worker is restarted."""
    intent, _ = tiny_bundles
    server = ServerProcess(
        {
            "SUPPORTLENS_INTENT_BUNDLE": str(intent),
            "SUPPORTLENS_SUMMARIZER_BUNDLE": "none",
            "SUPPORTLENS_API_SERVERS": "2",
            "SUPPORTLENS_WORKERS": "2",
            "SUPPORTLENS_LOG_LEVEL": "info",
            "SUPPORTLENS_LOG_FORMAT": "json",
        },
        tmp_path / "server.log",
    ).wait_ready()
    try:
        descendants = psutil.Process(server.process.pid).children(recursive=True)
        workers = model_workers(server.process.pid)
        for worker in workers:
            worker.send_signal(signal.SIGSTOP)
        pool = ThreadPoolExecutor(20)
        futures = [
            pool.submit(
                requests.post,
                f"{server.url}/v1/classify",
                json={"texts": [f"message number {i}"]},
                headers={"X-Request-ID": f"in-flight-{i}"},
                timeout=60,
            )
            for i in range(20)
        ]
        deadline = time.monotonic() + 20
        while _in_flight(server.url) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _in_flight(server.url) == 20
        os.killpg(server.process.pid, signum)
        time.sleep(1.0)
        late = requests.post(f"{server.url}/v1/classify", json={"text": "late"}, timeout=10)
        assert late.status_code == 503 and "Retry-After" in late.headers
        for worker in workers:
            worker.send_signal(signal.SIGCONT)

        responses = [f.result() for f in futures]
        pool.shutdown()
        assert [r.status_code for r in responses] == [200] * 20
        assert server.process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert alive == [], f"orphaned processes: {[p.cmdline() for p in alive]}"
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert "starting a new one" not in log
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert all({"time", "level", "process", "pid", "request_id"} <= set(e) for e in entries)
    processes = {e["process"] for e in entries}
    assert {"MainProcess", "LitServer-0", "LitServer-1"} <= processes
    assert any(e["process"].startswith("supportlens-worker") for e in entries)
    assert any(e["request_id"] == "in-flight-3" for e in entries)


def test_service_drains_on_sigterm_right_after_the_group_was_stopped_and_continued(
    tiny_bundles, tmp_path
):
    """A SIGTERM that arrives while the main thread is not yet running again (it was
    stopped with its group, e.g. a paused container or job control) is delivered to
    another thread of the main process; it must still start the drain."""
    intent, _ = tiny_bundles
    server = ServerProcess(
        {"SUPPORTLENS_INTENT_BUNDLE": str(intent), "SUPPORTLENS_SUMMARIZER_BUNDLE": "none"},
        tmp_path / "server.log",
    ).wait_ready()
    try:
        main = psutil.Process(server.process.pid)
        descendants = main.children(recursive=True)
        # Only the main thread takes SIGINT and SIGTERM (bits 2 and 15 of SigBlk).
        unblocked = []
        for thread in main.threads():
            status = Path(f"/proc/{main.pid}/task/{thread.id}/status").read_text()
            blocked = int(status.split("SigBlk:")[1].split()[0], 16)
            if blocked & 0x4002 != 0x4002:
                unblocked.append(thread.id)
        assert unblocked == [main.pid]
        for _ in range(3):
            os.killpg(server.process.pid, signal.SIGSTOP)
            time.sleep(0.5)
            os.killpg(server.process.pid, signal.SIGCONT)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        assert server.process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert alive == [], f"orphaned processes: {[p.cmdline() for p in alive]}"
    finally:
        server.stop()


def test_service_refuses_a_bundle_of_the_wrong_task_with_one_line(tiny_bundles, tmp_path):
    _, summarizer = tiny_bundles
    result = subprocess.run(
        [sys.executable, "-m", "service.server"],
        cwd=REPO,
        env={
            **os.environ,
            "SUPPORTLENS_INTENT_BUNDLE": str(summarizer),  # a summarizer where an intent model goes
            "SUPPORTLENS_SUMMARIZER_BUNDLE": "none",
            "SUPPORTLENS_PORT": "8799",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("supportlens-serve: SUPPORTLENS_INTENT_BUNDLE:")
    assert "intent-classification" in lines[0] and "Traceback" not in result.stderr


def test_service_metrics_port_serves_metrics_apart_from_the_api(tiny_bundles, tmp_path):
    metrics_port = free_port()
    server = ServerProcess(
        {**bundle_env(tiny_bundles), "SUPPORTLENS_METRICS_PORT": str(metrics_port)},
        tmp_path / "server.log",
    ).wait_ready()
    try:
        requests.post(f"{server.url}/v1/classify", json={"text": "lost card"}, timeout=30)
        scraped = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert scraped.status_code == 200
        assert 'supportlens_http_requests_total{route="/v1/classify",status="200"}' in scraped.text
        assert "supportlens_in_flight_requests" in scraped.text
        # Each port serves only its own: no metrics on the API port, no API on the metrics one.
        assert requests.get(f"{server.url}/metrics", timeout=5).status_code == 404
        assert requests.get(f"http://127.0.0.1:{metrics_port}/health", timeout=5).status_code == 404
    finally:
        assert server.stop() == 0

    # A metrics port that is taken: one line and exit 2, before any worker starts.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "service.server"],
            cwd=REPO,
            env={
                **os.environ,
                **bundle_env(tiny_bundles),
                "SUPPORTLENS_PORT": str(free_port()),
                "SUPPORTLENS_METRICS_PORT": str(taken.getsockname()[1]),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("supportlens-serve: SUPPORTLENS_METRICS_PORT: cannot")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
