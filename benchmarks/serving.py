"""Serving benchmark: raw batched forward vs. this server vs. a plain FastAPI baseline.

A bounded load generator (fixed request count and a time cap per cell) on loopback
sends one BANKING77 test message per request at concurrency 1, 8 and 32 to

(a) the raw model in-process: tokenize + batched forward + top-k, batches of the
    concurrency (the limit on this machine: no HTTP, no queues);
(b) this server (``python -m service.server``), with and without ``attention``,
    plus the latency of ``integrated_gradients``;
(c) the baseline a user would otherwise write: the same model behind FastAPI/uvicorn,
    one forward pass per request.

Everything runs in one go, side by side, and writes ``benchmarks/results/serving.md``
and ``.json`` with the machine description and the command.

    flock /tmp/supportlens-heavy.lock python benchmarks/serving.py --bundle runs/demo-intent/bundle
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", default="runs/demo-intent/bundle", help="intent bundle to serve"
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="no trained bundle: time an untrained all-MiniLM-L6-v2 classifier (same cost)",
    )
    parser.add_argument("--data", default="../shared/data/banking77/test.csv")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=300, help="requests per cell")
    parser.add_argument("--time-cap", type=float, default=20.0, help="seconds per cell at most")
    parser.add_argument("--ig-requests", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="benchmarks/results/serving")
    parser.add_argument("--baseline-app", help=argparse.SUPPRESS)  # internal: run the baseline
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_texts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"serving benchmark: no BANKING77 test file at {path} (use --data)")
    with open(file, newline="") as handle:
        return [row["text"] for row in csv.DictReader(handle)]


def random_bundle(directory: Path) -> Path:
    """An untrained MiniLM classifier over the 77 BANKING77 intents (timing only)."""
    import torch

    from models.backbone import load_backbone
    from models.bundle import save_bundle
    from models.classifier import ClassifierConfig, IntentClassifier

    encoder, tokenizer = load_backbone("all-MiniLM-L6-v2")
    torch.manual_seed(0)
    model = IntentClassifier(
        ClassifierConfig(
            77, encoder.config.hidden_size, special_token_ids=tokenizer.all_special_ids
        ),
        encoder,
    )
    return save_bundle(
        directory / "bundle",
        model.eval(),
        tokenizer,
        task="intent-classification",
        labels=[f"intent_{i}" for i in range(77)],
        calibration={"temperature": 1.0, "oos_threshold": 0.0},
        training={"max_length": 64, "name": "untrained-minilm"},
    )


# -- (c) the baseline app -------------------------------------------------------------


class BaselineBody(BaseModel):
    texts: list[str]
    top_k: int = 3


def run_baseline_app(bundle: str, port: int, threads: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI

    from models.bundle import load_bundle
    from models.predictor import IntentPredictor

    torch.set_num_threads(threads)
    predictor = IntentPredictor(load_bundle(bundle, task="intent-classification"))
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(body: BaselineBody) -> dict:  # sync: FastAPI runs it in its thread pool
        predictions = predictor.predict(body.texts, top_k=body.top_k)
        return {"results": [p.__dict__ for p in predictions]}

    @app.get("/health")
    def health() -> str:
        return "ok"

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- load generation ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summarize(latencies: list[float], elapsed: float, errors: int) -> dict:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / elapsed, 2) if elapsed else 0.0,
        "p50_ms": round(pick(0.50), 1) if ordered else None,
        "p99_ms": round(pick(0.99), 1) if ordered else None,
    }


async def load(url: str, texts: list[str], concurrency: int, total: int, cap: float, explain):
    import httpx

    latencies: list[float] = []
    errors = 0
    next_index = 0
    deadline = time.perf_counter() + cap
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def user():
            nonlocal next_index, errors
            while next_index < total and time.perf_counter() < deadline:
                text = texts[next_index % len(texts)]
                next_index += 1
                body = {"texts": [text], "top_k": 3}
                if explain:
                    body["explain"] = explain
                started = time.perf_counter()
                response = await client.post(url, json=body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return summarize(latencies, elapsed, errors)


def raw_limit(bundle: str, texts: list[str], batch: int, total: int, cap: float, threads: int):
    import torch

    from models.bundle import load_bundle
    from models.predictor import IntentPredictor

    torch.set_num_threads(threads)
    predictor = IntentPredictor(load_bundle(bundle, task="intent-classification"))
    predictor.predict(texts[:batch])  # warm-up
    latencies = []
    done = 0
    started = time.perf_counter()
    while done < total and time.perf_counter() - started < cap:
        chunk = texts[done % len(texts) : done % len(texts) + batch]
        t0 = time.perf_counter()
        predictor.predict(chunk)
        # Every request of the batch waits for the whole batch.
        latencies += [time.perf_counter() - t0] * len(chunk)
        done += len(chunk)
    return summarize(latencies, time.perf_counter() - started, 0)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited early with status {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server at {url} not ready after {timeout} s")


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.baseline_app:
        run_baseline_app(args.baseline_app, args.port, args.threads)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    texts = load_texts(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="supportlens-bench-"))
    if args.random_init:
        bundle = str(random_bundle(tmp))
    else:
        bundle = args.bundle
        if not (Path(bundle) / "manifest.json").is_file():
            raise SystemExit(
                f"serving benchmark: no intent bundle at {bundle} (train one, or pass --random-init)"
            )
    results: dict = {
        "machine": machine(),
        "command": " ".join(
            ["python benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "bundle": "untrained all-MiniLM-L6-v2 (77 intents)" if args.random_init else bundle,
        "texts": f"{args.data} (first {len(texts)} messages, one per request)",
        "cells": {},
    }
    cells = results["cells"]

    for c in args.concurrency:
        cells[f"raw c={c}"] = raw_limit(
            bundle, texts, c, args.requests, args.time_cap, args.threads
        )
        print(f"raw batch={c}: {cells[f'raw c={c}']}", flush=True)

    port = free_port()
    server = start(
        [sys.executable, "-m", "service.server"],
        {
            "SUPPORTLENS_INTENT_BUNDLE": bundle,
            "SUPPORTLENS_SUMMARIZER_BUNDLE": "none",
            "SUPPORTLENS_PORT": str(port),
            "SUPPORTLENS_TORCH_THREADS": str(args.threads),
            "SUPPORTLENS_LOG_LEVEL": "warning",
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        for explain, name in (([], "server"), (["attention"], "server+attention")):
            for c in args.concurrency:
                asyncio.run(load(url + "/v1/classify", texts, c, 32, 10, explain))  # warm-up
                cells[f"{name} c={c}"] = asyncio.run(
                    load(url + "/v1/classify", texts, c, args.requests, args.time_cap, explain)
                )
                print(f"{name} c={c}: {cells[f'{name} c={c}']}", flush=True)
        cells["server+integrated_gradients c=1"] = asyncio.run(
            load(url + "/v1/classify", texts, 1, args.ig_requests, 120, ["integrated_gradients"])
        )
        print(f"ig: {cells['server+integrated_gradients c=1']}", flush=True)
    finally:
        stop(server)

    port = free_port()
    baseline = start(
        [
            sys.executable,
            __file__,
            "--baseline-app",
            bundle,
            "--port",
            str(port),
            "--threads",
            str(args.threads),
        ],
        {},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, baseline)
        for c in args.concurrency:
            asyncio.run(load(url + "/v1/classify", texts, c, 32, 10, []))  # warm-up
            cells[f"baseline c={c}"] = asyncio.run(
                load(url + "/v1/classify", texts, c, args.requests, args.time_cap, [])
            )
            print(f"baseline c={c}: {cells[f'baseline c={c}']}", flush=True)
    finally:
        stop(baseline)

    top = max(args.concurrency)
    ratio = lambda a, b: round(cells[a]["rps"] / cells[b]["rps"], 2) if cells[b]["rps"] else None  # noqa: E731
    results["summary"] = {
        f"server / raw at c={top}": ratio(f"server c={top}", f"raw c={top}"),
        f"server / baseline at c={top}": ratio(f"server c={top}", f"baseline c={top}"),
        f"attention throughput cost at c={top}": round(
            1 - cells[f"server+attention c={top}"]["rps"] / cells[f"server c={top}"]["rps"], 3
        ),
    }
    write(results, Path(args.out))
    return 0


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    m = results["machine"]
    lines = [
        "# Serving benchmark",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu']}), torch {m['torch']}, Python {m['python']}; "
        f"load average at start {m['load_average_at_start']}.",
        f"Model: {results['bundle']}. Requests: {results['texts']}.",
        "",
        "| setup | concurrency | requests | errors | req/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, cell in results["cells"].items():
        setup, _, c = name.rpartition(" c=")
        lines.append(
            f"| {setup} | {c} | {cell['requests']} | {cell['errors']} | {cell['rps']} | "
            f"{cell['p50_ms']} | {cell['p99_ms']} |"
        )
    lines += ["", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["summary"].items()]
    lines.append("")
    for suffix, text in (
        (".md", "\n".join(lines)),
        (".json", json.dumps(results, indent=2) + "\n"),
    ):
        target = out.with_suffix(suffix)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
