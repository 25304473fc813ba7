"""Measure the memory of a running server, process by process, to size pod requests/limits.

    python deploy/tools/worker_memory.py --workers 2 \\
        --intent runs/demo-intent/bundle --summarizer runs/demo-summarizer/bundle

Starts ``python -m service.server`` with the given bundles and ``SUPPORTLENS_WORKERS``,
waits until it is ready, warms every worker pool up with real requests (a full classify
batch of long messages, an explained message, a summary), then reads each process's
resident set (RSS), proportional set (PSS: shared pages divided among the processes
sharing them, so PSS adds up to what the pod's memory cgroup is charged) and unique set
(USS) from /proc through psutil. Writes ``deploy/results/worker-memory.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "deploy" / "results"
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def role(process: psutil.Process, server_pid: int) -> str:
    if process.pid == server_pid:
        return "main process (starts and supervises the others)"
    command = " ".join(process.cmdline())
    if "spawn_main" in command:
        return "model worker (spawned: classify, explain or summarize)"
    if "resource_tracker" in command or "semaphore_tracker" in command:
        return "multiprocessing resource tracker"
    if process.cmdline() == psutil.Process(server_pid).cmdline():
        return "forked from main (HTTP server / queue manager)"
    return "other: " + command[:60]


def warm_up(url: str, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    long_text = " ".join(["my card was charged twice for the same order and I want a refund"] * 8)
    texts = [f"{long_text} ({i})" for i in range(32)]
    for _ in range(5):
        requests.post(
            f"{url}/v1/classify", json={"texts": texts, "top_k": 3}, headers=headers, timeout=120
        ).raise_for_status()
    requests.post(
        f"{url}/v1/classify",
        json={"text": long_text, "explain": ["attention", "occlusion"]},
        headers=headers,
        timeout=120,
    ).raise_for_status()
    conversation = "\n".join(
        f"{'Customer' if i % 2 == 0 else 'Agent'}: {long_text}" for i in range(12)
    )
    for _ in range(3):
        requests.post(
            f"{url}/v1/summarize", json={"texts": [conversation] * 4}, headers=headers, timeout=120
        ).raise_for_status()


def measure(args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SUPPORTLENS_INTENT_BUNDLE": args.intent,
        "SUPPORTLENS_SUMMARIZER_BUNDLE": args.summarizer,
        "SUPPORTLENS_PORT": str(port),
        "SUPPORTLENS_WORKERS": str(args.workers),
        "SUPPORTLENS_TORCH_THREADS": "1",
        "SUPPORTLENS_DEVICE": "cpu",
        "SUPPORTLENS_API_KEY": "measure-0123456789",
        "SUPPORTLENS_LOG_LEVEL": "warning",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "service.server"], cwd=REPO, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("server did not become ready")
            time.sleep(0.5)
        warm_up(url, env["SUPPORTLENS_API_KEY"])
        time.sleep(2)
        root = psutil.Process(server.pid)
        rows = []
        for process in [root, *root.children(recursive=True)]:
            info = process.memory_full_info()
            rows.append(
                {
                    "pid": process.pid,
                    "role": role(process, server.pid),
                    "rss_mib": round(info.rss / MIB, 1),
                    "pss_mib": round(info.pss / MIB, 1),
                    "uss_mib": round(info.uss / MIB, 1),
                }
            )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{round(psutil.virtual_memory().total / 2**30)} GiB, Python {platform.python_version()}",
        "command": "python deploy/tools/worker_memory.py " + " ".join(sys.argv[1:]),
        "classify_workers": args.workers,
        "processes": rows,
        "total_pss_mib": round(sum(r["pss_mib"] for r in rows), 1),
        "total_rss_mib": round(sum(r["rss_mib"] for r in rows), 1),
    }


def write(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "worker-memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Memory per server process",
        "",
        f"Machine: {result['machine']}. Command: `{result['command']}`.",
        "",
        f"Server with {result['classify_workers']} classify workers, 1 explanation worker and "
        "1 summarize worker (the defaults), after warm-up requests on every pool; "
        "memory read from /proc with psutil (PSS is what the pod's cgroup is charged for "
        "private and shared pages, split among the processes sharing them).",
        "",
        "| process | RSS MiB | PSS MiB | USS MiB |",
        "|---|---:|---:|---:|",
    ]
    for row in result["processes"]:
        lines.append(f"| {row['role']} | {row['rss_mib']} | {row['pss_mib']} | {row['uss_mib']} |")
    lines += [
        f"| **total** | {result['total_rss_mib']} | **{result['total_pss_mib']}** | |",
        "",
    ]
    (RESULTS / "worker-memory.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--intent", default="runs/demo-intent/bundle")
    parser.add_argument("--summarizer", default="runs/demo-summarizer/bundle")
    result = measure(parser.parse_args())
    write(result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
