"""Serving without an API key, and SIGTERM: in-flight requests answered, no process left."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from tests.integration.conftest import ServerProcess, model_workers

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
