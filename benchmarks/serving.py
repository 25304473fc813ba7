"""Serving benchmark: raw batched forward vs. this server vs. a plain FastAPI baseline.

A bounded load generator (fixed request count and a time cap per cell) on loopback
sends one BANKING77 test message per request at concurrency 1, 8 and 32 to

(a) the raw model: tokenize + batched forward + top-k with no HTTP and no queues, as
    one process using every core and as one single-threaded process per core
    (batches split between them); the faster of the two is the limit on this machine;
(b) this server (``python -m service.server``), with and without ``attention``,
    plus the latency of ``integrated_gradients``;
(c) the baseline a user would otherwise write: the same model wrapped in a Hugging Face
    ``Pipeline`` behind FastAPI/uvicorn, one forward pass per request.

The targets (issue 9): at concurrency 1 the server's throughput is at least the
baseline's and its p50 within 2 ms of the raw in-process p50; at concurrency 32 it
serves at least 0.8x the fastest raw layout. The summary table reports each ratio.
Every server cell also records the CPU time its processes spent per answered request,
by role (model workers, HTTP, main) and for the load client, read from ``/proc``: where
the cores go, next to the raw layouts' cores x wall time per request.

Everything runs in one go, side by side, and writes ``benchmarks/results/serving.md``
and ``.json`` with the machine description and the command, kept per device kind (a
GPU run adds a section next to the CPU one). The server runs with its default
settings, so the figures are what ``make serve`` gives on the same machine.

    python benchmarks/serving.py --bundle runs/banking77/seed-1/bundle
    python benchmarks/serving.py --bundle runs/demo-intent/bundle --quick   # ~4 minutes
    python benchmarks/serving.py --random-init --api-servers 2   # no trained bundle at hand

``--backends`` measures the inference backends side by side instead (issue 13) and
writes ``benchmarks/results/backends.md`` / ``.json``: PyTorch fp32, ONNX Runtime fp32
and ONNX Runtime int8 (the bundle must hold both graphs: ``supportlens-export-onnx
BUNDLE --int8``) as raw throughput at concurrency 32 (tokenization included, in both
process layouts) and latency at concurrency 1; accuracy and ECE (after the bundle's
temperature) of each on the BANKING77 test file; and the server with the ONNX backend
(``SUPPORTLENS_BACKEND=onnx``, ``--fast-precision``) next to its own raw limit and the
PyTorch server:

    python benchmarks/serving.py --backends --bundle runs/banking77/seed-1/bundle --quick
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

from benchmarks.common import machine, machine_sentence, run_heading, write_runs  # noqa: E402
from service.config import Settings, available_cores  # noqa: E402


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
    parser.add_argument("--requests", type=int, default=1000, help="requests per cell and round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds; each cell reports its median round"
    )
    parser.add_argument("--time-cap", type=float, default=20.0, help="seconds per cell at most")
    parser.add_argument("--ig-requests", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=available_cores(), help="cores to use (default: all)"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="where models run"
    )
    parser.add_argument(
        "--api-servers",
        type=int,
        default=1,
        help="HTTP processes of the server (SUPPORTLENS_API_SERVERS)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="concurrency 1 and 32 only, 2 rounds of up to 400 requests (a few minutes)",
    )
    parser.add_argument(
        "--backends",
        action="store_true",
        help="torch vs ONNX Runtime fp32 / int8: speed, accuracy, ECE (benchmarks/results/backends)",
    )
    parser.add_argument(
        "--fast-precision",
        choices=("fp32", "int8"),
        default="int8",
        help="--backends: the ONNX precision the server runs with",
    )
    parser.add_argument("--out", default=None, help="results path without suffix")
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
        ClassifierConfig(num_labels=77, special_token_ids=tokenizer.all_special_ids),
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


def intent_pipeline(bundle_dir: str, device: str):
    """Our classifier as a Hugging Face ``Pipeline``: what the transformers docs suggest
    for a custom model (tokenize -> forward -> softmax/top-k, one call per input)."""
    from transformers import Pipeline

    from models.bundle import load_bundle

    bundle = load_bundle(bundle_dir, task="intent-classification", device=device)
    max_length = int(bundle.training.get("max_length", 128))

    class IntentPipeline(Pipeline):
        def _sanitize_parameters(self, top_k=None, **kwargs):
            return {}, {}, ({"top_k": top_k} if top_k else {})

        def preprocess(self, text):
            return self.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")

        def _forward(self, inputs):
            output = self.model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
            return {"logits": output.logits}

        def postprocess(self, outputs, top_k=3):
            probs = outputs["logits"][0].float().softmax(-1)
            values, indices = probs.topk(top_k)
            return [
                {"label": bundle.labels[i], "score": v}
                for v, i in zip(values.tolist(), indices.tolist(), strict=True)
            ]

    return IntentPipeline(model=bundle.model, tokenizer=bundle.tokenizer, device=device)


def run_baseline_app(bundle: str, port: int, threads: int, device: str) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI

    torch.set_num_threads(threads)
    pipe = intent_pipeline(bundle, device)
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(body: BaselineBody) -> dict:  # sync: FastAPI runs it in its thread pool
        return {"results": [{"top_k": pipe(text, top_k=body.top_k)} for text in body.texts]}

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


async def post_json(reader, writer, path: str, body: bytes) -> int:
    """One HTTP/1.1 keep-alive POST on an open connection; returns the status code."""
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (path.encode(), len(body)) + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def load(url: str, texts: list[str], concurrency: int, total: int, cap: float, explain):
    """``concurrency`` closed-loop clients on keep-alive connections, ``total`` requests.

    A minimal HTTP/1.1 client on asyncio streams rather than httpx: on a 2-core machine
    httpx spent about a third of a core at 100 req/s, CPU taken from the server under
    test; this client needs a few percent.
    """
    host, _, rest = url.removeprefix("http://").partition(":")
    port, _, path = rest.partition("/")
    latencies: list[float] = []
    errors = 0
    next_index = 0
    deadline = time.perf_counter() + cap

    async def user():
        nonlocal next_index, errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while next_index < total and time.perf_counter() < deadline:
                body = {"texts": [texts[next_index % len(texts)]], "top_k": 3}
                next_index += 1
                if explain:
                    body["explain"] = explain
                started = time.perf_counter()
                status = await post_json(reader, writer, "/" + path, json.dumps(body).encode())
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return summarize(latencies, time.perf_counter() - started, errors)


def _predictor(bundle_dir: str, device: str, threads: int, backend: str = "torch"):
    """An IntentPredictor on ``backend``: ``torch``, ``onnx-fp32`` or ``onnx-int8``."""
    import torch

    from models.bundle import load_bundle
    from models.onnx_backend import onnx_runner
    from models.predictor import IntentPredictor

    torch.set_num_threads(threads)
    bundle = load_bundle(bundle_dir, task="intent-classification", device=device)
    if backend == "torch":
        return IntentPredictor(bundle)
    precision = backend.removeprefix("onnx-")
    return IntentPredictor(bundle, runner=onnx_runner(bundle, precision, threads))


def _raw_process(
    bundle, texts, batch, total, cap, threads, device, barrier, results, rank, backend="torch"
):
    predictor = _predictor(bundle, device, threads, backend)
    predictor.predict(texts[:batch])  # warm-up
    barrier.wait()
    latencies = []
    done = 0
    offset = rank * 997  # each process its own messages
    started = time.perf_counter()
    while done < total and time.perf_counter() - started < cap:
        first = (offset + done) % len(texts)
        chunk = texts[first : first + batch]
        t0 = time.perf_counter()
        predictor.predict(chunk)
        # Every request of the batch waits for the whole batch.
        latencies += [time.perf_counter() - t0] * len(chunk)
        done += len(chunk)
    results.put((latencies, time.perf_counter() - started))


def raw_limit(
    bundle, texts, concurrency, total, cap, threads, device, processes=1, backend="torch"
):
    """The model alone: ``processes`` processes with ``threads // processes`` threads
    each, sharing ``total`` requests in batches that add up to ``concurrency``."""
    import multiprocessing as mp

    context = mp.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    workers = [
        context.Process(
            target=_raw_process,
            args=(
                bundle,
                texts,
                max(1, concurrency // processes),
                max(1, total // processes),
                cap,
                max(1, threads // processes),
                device,
                barrier,
                results,
                rank,
                backend,
            ),
        )
        for rank in range(processes)
    ]
    for worker in workers:
        worker.start()
    parts = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    latencies = [x for part, _ in parts for x in part]
    return summarize(latencies, max(elapsed for _, elapsed in parts), 0)


def group_cpu_seconds(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system, every thread) so far of the processes of a started
    server (its process group, see :func:`start`), by role: ``main`` (the supervisor),
    ``workers`` (the model workers, started by multiprocessing's spawn), ``http`` (the
    HTTP processes) and ``other``. Linux ``/proc``; empty elsewhere."""
    clock = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    roles: dict[str, float] = {}
    for entry in os.listdir("/proc") if Path("/proc").is_dir() else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # from field 3 (state): pgrp, utime, stime
        if int(fields[2]) != pgid:
            continue
        if int(entry) == pgid:
            role = "main"
        elif "spawn_main" in cmdline:
            role = "workers"
        elif "service.server" in cmdline:
            role = "http"
        else:
            role = "other"
        roles[role] = roles.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / clock
    return roles


def served(process: subprocess.Popen, url: str, *load_args) -> dict:
    """:func:`load` against a started server, with the CPU time each of its roles and the
    load client (this process) spent per answered request, in ms."""
    before, client = group_cpu_seconds(process.pid), time.process_time()
    cell = asyncio.run(load(url, *load_args))
    client = time.process_time() - client
    after = group_cpu_seconds(process.pid)
    answered = max(1, cell["requests"])
    cell["cpu_ms_per_request"] = {
        **{
            role: round(1000 * (after[role] - before.get(role, 0.0)) / answered, 2)
            for role in sorted(after)
        },
        "client": round(1000 * client / answered, 2),
    }
    return cell


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited early with status {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
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


def pause(process: subprocess.Popen) -> None:
    """Freeze a started server and all its processes (they share its process group)."""
    os.killpg(process.pid, signal.SIGSTOP)


def resume(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGCONT)


def median_cell(rounds: list[dict]) -> dict:
    """The round with the median throughput (its latencies with it), plus every round's."""
    ordered = sorted(rounds, key=lambda cell: cell["rps"])
    return {**ordered[(len(ordered) - 1) // 2], "rps_by_round": [cell["rps"] for cell in rounds]}


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def recorded_args(argv: list[str] | None) -> list[str]:
    """The command-line arguments that change what is measured (``--out`` does not)."""
    given = list(argv if argv is not None else sys.argv[1:])
    kept = []
    skip = False
    for arg in given:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return kept


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.concurrency, args.rounds, args.requests, args.time_cap = [1, 32], 2, 400, 10.0
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.baseline_app:
        run_baseline_app(args.baseline_app, args.port, args.threads, device)
        return 0
    if args.backends:
        return run_backends(args, argv, device)
    args.out = args.out or "benchmarks/results/serving"
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
    server_env = {
        "SUPPORTLENS_INTENT_BUNDLE": bundle,
        "SUPPORTLENS_SUMMARIZER_BUNDLE": "none",
        "SUPPORTLENS_DEVICE": device,
        "SUPPORTLENS_API_SERVERS": str(args.api_servers),
        "SUPPORTLENS_LOG_LEVEL": "warning",
    }
    settings = Settings.from_env(server_env)
    workers = settings.classify_workers()
    run: dict = {
        "machine": machine(),
        "device": device,
        "command": " ".join(["python benchmarks/serving.py", *recorded_args(argv)]),
        "bundle": "untrained all-MiniLM-L6-v2 (77 intents)" if args.random_init else bundle,
        "texts": f"{args.data} (first {len(texts)} messages, one per request)",
        "server": {
            "classify_workers": workers,
            "torch_threads_per_worker": settings.threads_per_worker(workers),
            "api_servers": args.api_servers,
            "max_batch_size": settings.max_batch_size,
        },
        "rounds": args.rounds,
        "requests_per_cell": args.requests,
        "cells": {},
    }
    cells = run["cells"]

    # One process with every core, and (on CPU) one single-threaded process per core.
    layouts = [1] if device == "cuda" or args.threads == 1 else [1, args.threads]
    samples: dict[str, list[dict]] = {}

    def measure(name: str, cell) -> None:
        samples.setdefault(name, []).append(cell)
        print(f"{name}: {cell}", flush=True)

    server_port, baseline_port = free_port(), free_port()
    server = start(
        [sys.executable, "-m", "service.server"],
        {**server_env, "SUPPORTLENS_PORT": str(server_port)},
    )
    baseline = start(
        [
            sys.executable,
            __file__,
            "--baseline-app",
            bundle,
            "--port",
            str(baseline_port),
            "--threads",
            str(args.threads),
            "--device",
            device,
        ],
        {},
    )
    server_url = f"http://127.0.0.1:{server_port}/v1/classify"
    baseline_url = f"http://127.0.0.1:{baseline_port}/v1/classify"
    try:
        wait_ready(f"http://127.0.0.1:{server_port}", server)
        wait_ready(f"http://127.0.0.1:{baseline_port}", baseline)
        # The machine is noisy: the setups take turns, round after round, and each cell
        # reports its median round. Whatever is not being measured is paused (SIGSTOP to
        # its process group), so idle servers take no CPU from the one under test.
        pause(server)
        pause(baseline)
        for round_ in range(args.rounds):
            print(f"-- round {round_ + 1} of {args.rounds}", flush=True)
            for c in args.concurrency:
                if c == 1 and device != "cuda" and args.threads > 1:
                    # One request at a time: also the single-threaded forward each server
                    # worker runs (threads only add synchronisation on one short text).
                    measure(
                        "raw (1x1 threads) c=1",
                        raw_limit(bundle, texts, 1, args.requests, args.time_cap, 1, device, 1),
                    )
                for processes in (p for p in layouts if p <= c):
                    threads = max(1, args.threads // processes)
                    name = (
                        "raw (GPU)" if device == "cuda" else f"raw ({processes}x{threads} threads)"
                    )
                    measure(
                        f"{name} c={c}",
                        raw_limit(
                            bundle, texts, c, args.requests, args.time_cap, args.threads, device,
                            processes,
                        ),
                    )  # fmt: skip
            resume(server)
            for explain, name in (([], "server"), (["attention"], "server+attention")):
                for c in args.concurrency:
                    asyncio.run(load(server_url, texts, c, 32, 10, explain))  # warm-up
                    measure(
                        f"{name} c={c}",
                        served(server, server_url, texts, c, args.requests, args.time_cap, explain),
                    )
            if round_ == 0:
                measure(
                    "server+integrated_gradients c=1",
                    asyncio.run(
                        load(server_url, texts, 1, args.ig_requests, 120, ["integrated_gradients"])
                    ),
                )
            pause(server)
            resume(baseline)
            for c in args.concurrency:
                asyncio.run(load(baseline_url, texts, c, 32, 10, []))  # warm-up
                measure(
                    f"baseline c={c}",
                    asyncio.run(load(baseline_url, texts, c, args.requests, args.time_cap, [])),
                )
            pause(baseline)
    finally:
        for process in (server, baseline):
            resume(process)
            stop(process)
    for name, rounds in samples.items():
        cells[name] = median_cell(rounds)

    run["summary"] = summarize_run(cells, max(args.concurrency))
    print(write_runs(Path(args.out).parent, Path(args.out).name, device, run, render_markdown))
    return 0


# -- backends (issue 13) ----------------------------------------------------------------

BACKENDS = ("torch", "onnx-fp32", "onnx-int8")


def load_labelled(path: str) -> tuple[list[str], list[str]]:
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"serving benchmark: no BANKING77 test file at {path} (use --data)")
    with open(file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row["text"] for row in rows], [row["category"] for row in rows]


def labelled_scores(predictor, texts: list[str], truth) -> dict:
    """Accuracy, macro-F1 and ECE (after the predictor's temperature, and before) in %, the
    seconds the forward passes took (batches of 64) and the predicted class indices, of
    ``predictor`` on ``texts`` whose class indices are ``truth``."""
    import numpy as np
    import torch
    from sklearn.metrics import f1_score

    from training.evaluation import expected_calibration_error, softmax

    logits = []
    started = time.perf_counter()
    for first in range(0, len(texts), 64):
        encoding, _ = predictor.encode(texts[first : first + 64])
        with torch.inference_mode():
            logits.append(predictor.forward(encoding).logits.float().numpy())
    elapsed = time.perf_counter() - started
    logits = np.concatenate(logits)  # (N, C)
    predicted = logits.argmax(axis=1)
    return {
        "accuracy": round(100 * float((predicted == truth).mean()), 2),
        "macro_f1": round(100 * float(f1_score(truth, predicted, average="macro")), 2),
        "ece_before": round(100 * expected_calibration_error(softmax(logits), truth), 2),
        "ece_after": round(
            100 * expected_calibration_error(softmax(logits, predictor.temperature), truth), 2
        ),
        "seconds": round(elapsed, 1),
        "predicted": predicted,
    }


def backend_quality(bundle: str, backend: str, texts, labels, threads: int) -> dict:
    """:func:`labelled_scores` of one backend on the labelled file (predictions as a list,
    to compare with PyTorch's)."""
    import numpy as np

    predictor = _predictor(bundle, "cpu", threads, backend)
    index = {label: i for i, label in enumerate(predictor.labels)}
    missing = sorted(set(labels) - set(index))
    if missing:
        raise SystemExit(f"serving benchmark: labels of {bundle} lack {missing[:3]}")
    result = labelled_scores(predictor, texts, np.array([index[label] for label in labels]))
    return {
        **{key: result[key] for key in ("accuracy", "macro_f1", "ece_before", "ece_after")},
        "examples": len(texts),
        "seconds": result["seconds"],
        "predicted": result["predicted"].tolist(),
    }


def run_backends(args: argparse.Namespace, argv, device: str) -> int:
    """The backends side by side: quality, raw speed, and the server on the fast backend."""
    if device != "cpu":
        raise SystemExit("serving benchmark: --backends measures the CPU backends (--device cpu)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out or "benchmarks/results/backends")
    texts, labels = load_labelled(args.data)
    bundle = args.bundle
    from models.bundle import load_bundle

    graphs = load_bundle(bundle, task="intent-classification").onnx_graphs
    if set(graphs) != {"fp32", "int8"}:
        raise SystemExit(
            f"serving benchmark: {bundle} needs both ONNX graphs; run: "
            f"supportlens-export-onnx {bundle} --int8"
        )
    export_info = json.loads((Path(bundle) / "onnx" / "export.json").read_text())
    fast = f"onnx-{args.fast_precision}"
    run: dict = {
        "machine": machine(),
        "device": device,
        "command": " ".join(["python benchmarks/serving.py", *recorded_args(argv)]),
        "bundle": bundle,
        "bundle_training": {
            k: load_bundle(bundle).training.get(k) for k in ("epochs", "global_step", "recipe")
        },
        "quantization": export_info["graphs"]["int8"].get("quantization"),
        "texts": f"{args.data} ({len(texts)} messages)",
        "rounds": args.rounds,
        "requests_per_cell": args.requests,
        "fast_backend": fast,
        "quality": {},
        "cells": {},
    }

    # Quality: every backend on the whole test file (single process, every core).
    for backend in BACKENDS:
        run["quality"][backend] = backend_quality(bundle, backend, texts, labels, args.threads)
        print(backend, {k: v for k, v in run["quality"][backend].items() if k != "predicted"})
    reference = run["quality"]["torch"]["predicted"]
    for backend in BACKENDS:
        predicted = run["quality"][backend].pop("predicted")
        agree = sum(a == b for a, b in zip(predicted, reference, strict=True))
        run["quality"][backend]["agreement_with_torch"] = round(100 * agree / len(reference), 2)

    samples: dict[str, list[dict]] = {}

    def measure(name: str, cell) -> None:
        samples.setdefault(name, []).append(cell)
        print(f"{name}: {cell}", flush=True)

    env = {
        "SUPPORTLENS_INTENT_BUNDLE": bundle,
        "SUPPORTLENS_SUMMARIZER_BUNDLE": "none",
        "SUPPORTLENS_DEVICE": "cpu",
        "SUPPORTLENS_API_SERVERS": str(args.api_servers),
        "SUPPORTLENS_LOG_LEVEL": "warning",
    }
    fast_env = {
        **env,
        "SUPPORTLENS_BACKEND": "onnx",
        "SUPPORTLENS_ONNX_PRECISION": args.fast_precision,
    }
    settings = Settings.from_env(fast_env)
    workers = settings.classify_workers()
    run["server"] = {
        "classify_workers": workers,
        "threads_per_worker": settings.threads_per_worker(workers),
        "api_servers": args.api_servers,
        "max_batch_size": settings.max_batch_size,
    }
    servers = {}
    for name, server_env in (("server torch", env), (f"server {fast}", fast_env)):
        port = free_port()
        process = start(
            [sys.executable, "-m", "service.server"], {**server_env, "SUPPORTLENS_PORT": str(port)}
        )
        servers[name] = (process, f"http://127.0.0.1:{port}")
    top = max(args.concurrency)
    try:
        for process, url in servers.values():
            wait_ready(url, process)
            pause(process)
        for round_ in range(args.rounds):
            print(f"-- round {round_ + 1} of {args.rounds}", flush=True)
            for backend in BACKENDS:
                for c in args.concurrency:
                    layouts = [(1, 1), (1, args.threads)] if c == 1 else [(1, args.threads)]
                    if c > 1 and args.threads > 1:
                        layouts.append((args.threads, 1))
                    for processes, threads in layouts:
                        measure(
                            f"raw {backend} ({processes}x{threads} threads) c={c}",
                            raw_limit(
                                bundle, texts, c, args.requests, args.time_cap,
                                processes * threads, "cpu", processes, backend,
                            ),
                        )  # fmt: skip
            for name, (process, url) in servers.items():
                resume(process)
                for c in args.concurrency:
                    asyncio.run(load(url + "/v1/classify", texts, c, 32, 10, []))  # warm-up
                    measure(
                        f"{name} c={c}",
                        served(
                            process, url + "/v1/classify", texts, c, args.requests,
                            args.time_cap, [],
                        ),
                    )  # fmt: skip
                pause(process)
    finally:
        for process, _ in servers.values():
            resume(process)
            stop(process)
    for name, rounds in samples.items():
        run["cells"][name] = median_cell(rounds)
    run["summary"] = summarize_backends(run, top)
    print(write_runs(out.parent, out.name, device, run, render_backends))
    return 0


def summarize_backends(run: dict, top: int) -> dict[str, object]:
    """The issue-13 targets: speed-ups against PyTorch, accuracy change, server vs raw."""
    cells, quality, fast = run["cells"], run["quality"], run["fast_backend"]

    def best(backend: str, c: int) -> float:
        return max(
            cell["rps"] for name, cell in cells.items() if name.startswith(f"raw {backend} (")
            and name.endswith(f" c={c}")
        )  # fmt: skip

    def p50(backend: str) -> float:
        return min(
            cell["p50_ms"] for name, cell in cells.items() if name.startswith(f"raw {backend} (")
            and name.endswith(" c=1")
        )  # fmt: skip

    summary: dict[str, object] = {}
    for backend in BACKENDS[1:]:
        summary[f"{backend} / torch raw throughput at c={top} (best layouts)"] = round(
            best(backend, top) / best("torch", top), 2
        )
        summary[f"{backend} / torch raw p50 at c=1 (best layouts)"] = round(
            p50(backend) / p50("torch"), 2
        )
        summary[f"{backend} accuracy change (points)"] = round(
            quality[backend]["accuracy"] - quality["torch"]["accuracy"], 2
        )
    server_fast, server_torch = cells[f"server {fast} c={top}"], cells[f"server torch c={top}"]
    summary[f"server ({fast}) / its raw limit at c={top}"] = round(
        server_fast["rps"] / best(fast, top), 2
    )
    summary[f"server ({fast}) / server (torch) at c={top}"] = round(
        server_fast["rps"] / server_torch["rps"], 2
    )
    if f"server {fast} c=1" in cells:
        summary[f"server ({fast}) / server (torch) p50 at c=1"] = round(
            cells[f"server {fast} c=1"]["p50_ms"] / cells["server torch c=1"]["p50_ms"], 2
        )
    return summary


def render_backends(results: dict) -> str:
    lines = [
        "# Inference backends: PyTorch vs ONNX Runtime (fp32, dynamic int8)",
        "",
        "One run per device kind, `python benchmarks/serving.py --backends`: every backend "
        "classifies the whole BANKING77 test file (accuracy, macro-F1, ECE before and after "
        "the bundle's temperature, in %), then the raw predictor (tokenization, forward, "
        "calibration, top-k; no HTTP) of each backend is timed at concurrency 1 and 32 in "
        "each process layout, and the server runs with the PyTorch and with the ONNX "
        "backend. Setups take turns round after round (servers not measured are paused); "
        "each cell shows its median round.",
    ]
    for kind, run in sorted(results["runs"].items()):
        m = run["machine"]
        server = run["server"]
        lines += [
            *run_heading(kind, run),
            f"{machine_sentence(m)} Model: {run['bundle']} (trained {run['bundle_training']}). "
            f"int8 quantization: {run['quantization']}. Requests: {run['texts']}. "
            f"Servers: {server['classify_workers']} classify worker(s) x "
            f"{server['threads_per_worker']} thread(s), {server['api_servers']} HTTP "
            f"process(es). Rounds: {run['rounds']}, up to {run['requests_per_cell']} "
            "requests per cell and round.",
            "",
            *([run["note"], ""] if run.get("note") else []),
            "| backend | accuracy | macro-F1 | ECE before | ECE after | same label as torch | "
            "seconds for the file |",
            "|---|---|---|---|---|---|---|",
        ]
        for backend, q in run["quality"].items():
            lines.append(
                f"| {backend} | {q['accuracy']} | {q['macro_f1']} | {q['ece_before']} | "
                f"{q['ece_after']} | {q['agreement_with_torch']} | {q['seconds']} |"
            )
        lines += ["", *cells_table(run)]
    lines.append("")
    return "\n".join(lines)


def summarize_run(cells: dict[str, dict], top: int) -> dict[str, object]:
    """The figures the targets are about, at the highest concurrency ``top``."""
    rps = lambda name: cells[name]["rps"]  # noqa: E731
    raws = [name for name in cells if name.startswith("raw") and name.endswith(f" c={top}")]
    fastest = max(raws, key=rps)
    # One process using every core: the raw batched forward pass in-process.
    in_process = next(n for n in raws if n.startswith(("raw (1x", "raw (GPU)")))
    server = f"server c={top}"
    low = {}
    if "server c=1" in cells and "baseline c=1" in cells:
        raw_ones = [
            n for n in cells if n.startswith(("raw (1x", "raw (GPU)")) and n.endswith(" c=1")
        ]
        raw_p50 = min(cells[n]["p50_ms"] for n in raw_ones)  # the faster in-process layout
        low = {
            "server / baseline throughput at c=1": round(
                rps("server c=1") / rps("baseline c=1"), 2
            ),
            "server p50 - raw in-process p50 at c=1 (ms)": round(
                cells["server c=1"]["p50_ms"] - raw_p50, 1
            ),
        }
    return {
        **low,
        f"fastest raw layout at c={top}": fastest.removesuffix(f" c={top}"),
        f"server / raw in one process at c={top}": round(rps(server) / rps(in_process), 2),
        f"server / fastest raw layout at c={top}": round(rps(server) / rps(fastest), 2),
        f"server / baseline at c={top}": round(rps(server) / rps(f"baseline c={top}"), 2),
        f"attention throughput cost at c={top}": round(
            1 - rps(f"server+attention c={top}") / rps(server), 3
        ),
    }


def render_markdown(results: dict) -> str:
    """The committed result table: one section per device kind measured."""
    lines = [
        "# Serving benchmark",
        "",
        "A bounded closed-loop load generator on loopback (one BANKING77 test message per "
        "request, keep-alive connections) against (a) the raw model with no HTTP, as one "
        "process using every core and as one single-threaded process per core, the faster "
        "being the limit; (b) this server with its default settings; (c) the same model as a "
        "Hugging Face `Pipeline` behind FastAPI/uvicorn, one forward pass per request. All "
        "cells of a section come from one run in which the setups took turns, round after "
        "round, with the setups not being measured paused; each cell shows its median round.",
    ]
    for kind, run in sorted(results["runs"].items()):
        m = run["machine"]
        server = run["server"]
        lines += [
            *run_heading(kind, run),
            f"{machine_sentence(m)} Model: {run['bundle']}. Requests: {run['texts']}. Server: "
            f"{server['classify_workers']} classify worker(s) x {server['torch_threads_per_worker']} "
            f"torch thread(s), {server['api_servers']} HTTP process(es), batches of up to "
            f"{server['max_batch_size']} (gathered only while every worker is busy). "
            f"Rounds: {run.get('rounds', 1)}, up to {run.get('requests_per_cell', 'n/a')} "
            "requests per cell and round.",
            "",
            *([run["note"], ""] if run.get("note") else []),
            *cells_table(run),
        ]
    lines.append("")
    return "\n".join(lines)


def cells_table(run: dict) -> list[str]:
    """The Markdown table of a run's cells (one per setup and concurrency), then its figures."""
    lines = [
        "| setup | concurrency | requests | errors | req/s (median round) | req/s by round "
        "| p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cell in run["cells"].items():
        setup, _, c = name.rpartition(" c=")
        rounds = " / ".join(str(x) for x in cell.get("rps_by_round", [cell["rps"]]))
        lines.append(
            f"| {setup} | {c} | {cell['requests']} | {cell['errors']} | {cell['rps']} | "
            f"{rounds} | {cell['p50_ms']} | {cell['p99_ms']} |"
        )
    lines += cpu_table(run)
    lines += ["", "| figure | value |", "|---|---|"]
    return lines + [f"| {k} | {v} |" for k, v in run["summary"].items()]


def cpu_table(run: dict) -> list[str]:
    """Where a served request's CPU time goes (server cells measured with :func:`served`),
    next to what the fastest raw layout spends per request (its cores x wall time)."""
    measured = {n: c for n, c in run["cells"].items() if "cpu_ms_per_request" in c}
    if not measured:
        return []
    roles = ["workers", "http", "main", "other", "client"]
    lines = [
        "",
        "CPU time per answered request, ms (user + system, all threads; the load client "
        "shares the machine), in the median round. A raw layout keeps its cores busy: "
        f"{run['machine']['cpu_count']} cores x wall time / requests.",
        "",
        "| setup | concurrency | model workers | HTTP | main | other | load client | total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cell in measured.items():
        setup, _, c = name.rpartition(" c=")
        cpu = cell["cpu_ms_per_request"]
        values = [cpu.get(role, 0.0) for role in roles]
        lines.append(
            f"| {setup} | {c} | "
            + " | ".join(f"{v:.2f}" for v in values)
            + f" | {sum(values):.2f} |"
        )
    for name, cell in run["cells"].items():
        setup, _, c = name.rpartition(" c=")
        if name.startswith("raw") and c != "1" and cell["rps"]:
            share = run["machine"]["cpu_count"] * 1000 / cell["rps"]
            lines.append(f"| {setup} | {c} | {share:.2f} | – | – | – | – | {share:.2f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
