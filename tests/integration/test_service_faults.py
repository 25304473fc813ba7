"""Faults and slow clients: killed and hung model workers, half-sent bodies, trickled headers."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from tests.integration.conftest import ServerProcess, bundle_env, worker_pids

pytestmark = pytest.mark.integration

FAULT_ENV = {
    "SUPPORTLENS_WORKERS": "2",  # two classify workers: one can die while the other serves
    "SUPPORTLENS_MAX_IN_FLIGHT": "8",
    "SUPPORTLENS_WORKER_HANG_TIMEOUT": "2",
    "SUPPORTLENS_BODY_TIMEOUT": "2",
    "SUPPORTLENS_HEADER_TIMEOUT": "2",
    "SUPPORTLENS_KEEP_ALIVE_TIMEOUT": "1",
    "SUPPORTLENS_REQUEST_TIMEOUT": "8",
    "SUPPORTLENS_IG_STEPS": "4",
    "SUPPORTLENS_LOG_LEVEL": "info",
    "SUPPORTLENS_BATCH_TIMEOUT": "0.01",  # deprecated: accepted with a warning
}
CONVERSATION = "Customer: my card is gone. Agent: I blocked it. Customer: thanks."


@pytest.fixture(scope="module")
def fault_server(tiny_bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("faults") / "server.log"
    process = ServerProcess({**bundle_env(tiny_bundles), **FAULT_ENV}, log).wait_ready()
    yield process
    process.stop()


def classify(url: str, text: str = "where is my card", **body):
    return requests.post(f"{url}/v1/classify", json={"texts": [text], **body}, timeout=30)


def wait_health(url: str, status: int, timeout: float) -> float:
    """Seconds until /health answers ``status``; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if requests.get(f"{url}/health", timeout=5).status_code == status:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"/health never answered {status} within {timeout} s")


def wait_new_worker(server, api: str, old: set[int], timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [pid for pid in worker_pids(server, api) if pid not in old]
        if new:
            return new[-1]
        time.sleep(0.1)
    raise AssertionError(f"no new {api} worker within {timeout} s:\n{server.log()}")


def test_service_replaces_a_killed_worker_under_load(fault_server):
    url = fault_server.url
    classify_pids = worker_pids(fault_server, "v1-classify")[-2:]
    results: list[tuple[int, float, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = classify(url)
            results.append(
                (
                    response.status_code,
                    time.monotonic() - started,
                    response.headers.get("Retry-After"),
                )
            )

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    victim = classify_pids[0]
    psutil.Process(victim).kill()
    replacement = wait_new_worker(fault_server, "v1-classify", set(classify_pids))
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(30)

    assert fault_server.process.poll() is None  # the main process lives
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) > 20
    assert all(retry == "1" for status, _, retry in results if status == 503)
    assert max(latency for _, latency, _ in results) < 5  # nothing hung
    assert psutil.pid_exists(replacement) and replacement != victim
    # Served by the new worker too, and ready throughout (the other classify worker lived).
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    assert all(classify(url).status_code == 200 for _ in range(10))


def test_service_held_request_fails_at_once_and_readiness_follows_live_workers(fault_server):
    url = fault_server.url
    (summarizer,) = worker_pids(fault_server, "v1-summarize")[-1:]
    worker = psutil.Process(summarizer)
    worker.send_signal(signal.SIGSTOP)  # it takes the next request and holds it
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(
            requests.post, f"{url}/v1/summarize", json={"text": CONVERSATION}, timeout=30
        )
        time.sleep(0.5)
        killed_at = time.monotonic()
        worker.kill()
        response = held.result()
        answered_after = time.monotonic() - killed_at
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert "retry" in response.json()["detail"]
    assert answered_after < 1.5
    # No summarize worker for a moment: not ready, and new requests are answered 503 at
    # once instead of waiting for the replacement; ready again once it is replaced.
    assert requests.get(f"{url}/health", timeout=5).status_code == 503
    started = time.monotonic()
    meanwhile = requests.post(f"{url}/v1/summarize", json={"text": CONVERSATION}, timeout=30)
    assert meanwhile.status_code == 503 and meanwhile.headers["Retry-After"] == "1"
    assert time.monotonic() - started < 1
    wait_new_worker(fault_server, "v1-summarize", {summarizer})
    wait_health(url, 200, 30)
    ok = requests.post(f"{url}/v1/summarize", json={"text": CONVERSATION}, timeout=30)
    assert ok.status_code == 200


def test_service_replaces_a_hung_worker(fault_server):
    url = fault_server.url
    (explainer,) = worker_pids(fault_server, "v1-classify-explain")[-1:]
    psutil.Process(explainer).send_signal(signal.SIGSTOP)  # alive, but hung
    started = time.monotonic()
    response = classify(url, explain=["integrated_gradients"])
    waited = time.monotonic() - started
    assert response.status_code == 503 and "Retry-After" in response.headers
    assert 1.5 < waited < 5  # the 2 s heartbeat timeout, not the 8 s request timeout
    assert not psutil.pid_exists(explainer) or psutil.Process(explainer).status() == "zombie"
    wait_new_worker(fault_server, "v1-classify-explain", {explainer})
    wait_health(url, 200, 30)
    assert classify(url, explain=["integrated_gradients"]).status_code == 200


def half_sent_request(port: int, declared: int = 200, sent: int = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        "POST /v1/classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"texts": ["' + b"x" * (sent - 12))
    return sock


def test_service_half_sent_bodies_hold_no_slot_and_get_408(fault_server):
    # As many stalled uploads as the in-flight limit (8): they must not lock anyone out.
    sockets = [half_sent_request(fault_server.port) for _ in range(8)]
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: classify(fault_server.url).status_code, range(16)))
        assert statuses == [200] * 16
        answers = []
        for sock in sockets:
            data = b""
            while chunk := sock.recv(4096):  # until the server closes the connection
                data += chunk
            answers.append(data)
        waited = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0][:200]
    assert b'"errors": []' in answers[0] or b'"errors":[]' in answers[0]
    assert waited < 6  # the 2 s body timeout, not the client's patience


def test_service_trickled_headers_are_cut_off(fault_server):
    sock = socket.create_connection(("127.0.0.1", fault_server.port), timeout=10)
    started = time.monotonic()
    try:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: test\r\n")
        closed = False
        for _ in range(20):  # one header byte every 0.5 s: never a complete request
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
                break
            sock.settimeout(0.5)
            try:
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
    finally:
        sock.close()
    assert closed
    assert time.monotonic() - started < 5  # the 2 s header timeout


def test_service_warns_that_the_batch_timeout_is_ignored(fault_server):
    assert "SUPPORTLENS_BATCH_TIMEOUT is ignored" in fault_server.log_path.read_text()


def test_service_closes_idle_keep_alive_connections(fault_server):
    sock = socket.create_connection(("127.0.0.1", fault_server.port), timeout=10)
    try:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        sock.settimeout(10)
        while sock.recv(4096):  # until the server closes the idle connection
            pass
        assert time.monotonic() - started < 5  # the 1 s keep-alive timeout
    finally:
        sock.close()


def test_service_exits_with_status_1_when_an_http_process_dies(tiny_bundles, tmp_path):
    """A killed HTTP process is not left behind as an open port nobody serves: the other
    HTTP process answers what it holds, then the server exits 1 (for its supervisor to
    restart it), leaving no process behind."""
    log = tmp_path / "server.log"
    server = ServerProcess(
        {
            **bundle_env(tiny_bundles),
            "SUPPORTLENS_API_SERVERS": "2",
            "SUPPORTLENS_LOG_LEVEL": "info",
        },
        log,
    ).wait_ready()
    try:
        main = psutil.Process(server.process.pid)
        descendants = main.children(recursive=True)
        http = [
            int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", log.read_text())
        ]
        assert len(http) == 2
        assert classify(server.url).status_code == 200
        psutil.Process(http[0]).kill()
        assert server.process.wait(timeout=60) == 1
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert alive == [], f"orphaned processes: {[p.cmdline() for p in alive]}"
    finally:
        server.stop()
    text = log.read_text()
    assert f"(pid {http[0]}) exited with code -9; stopping the server" in text
    assert "Traceback" not in text


def test_service_leaves_no_process_behind_when_its_main_process_is_killed(tiny_bundles, tmp_path):
    """``kill -9`` of the main process (an OOM kill, a crashed host agent outside a
    container) takes the whole server with it: no HTTP process is left holding the port
    with nobody to answer, and no manager or worker process lingers."""
    server = ServerProcess(
        {**bundle_env(tiny_bundles), "SUPPORTLENS_API_SERVERS": "2"}, tmp_path / "server.log"
    ).wait_ready()
    try:
        descendants = psutil.Process(server.process.pid).children(recursive=True)
        assert len(descendants) >= 4  # the manager, two HTTP processes, the model workers
        assert classify(server.url).status_code == 200
        server.process.kill()
        server.process.wait(timeout=10)
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert alive == [], f"orphaned processes: {[p.cmdline()[-3:] for p in alive]}"
        with socket.socket() as sock:  # the port is free for a new server
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", server.port))
    finally:
        server.stop()
