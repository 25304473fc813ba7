"""Thread policies of the CPU model workers, side by side on the same server.

Four servers with the same bundle and defaults except for the thread policy take
turns, round after round (those not measured are paused), at concurrency 1 and 32:

- ``adaptive`` (the default): a batch started while the other classify workers are
  idle runs with their cores; idle OpenMP threads spin about 0.1 ms, then sleep (the
  server's ``GOMP_SPINCOUNT=10000``);
- ``fixed``: ``SUPPORTLENS_ADAPTIVE_THREADS=0``, each worker keeps its share of the
  cores;
- ``adaptive-passive``: idle OpenMP threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``
  alone: every parallel region wakes them again);
- ``adaptive-spin``: OpenMP's own wait policy (its threads spin about 3 ms after each
  parallel region).

    python benchmarks/threads.py --bundle runs/demo-intent/bundle

writes ``benchmarks/results/threads.md`` / ``.json``; each cell shows its median round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, machine_sentence, run_heading, write_runs
from benchmarks.serving import (
    free_port,
    load,
    load_texts,
    pause,
    resume,
    start,
    stop,
    wait_ready,
)

POLICIES = {
    "adaptive": {},
    "fixed": {"SUPPORTLENS_ADAPTIVE_THREADS": "0"},
    "adaptive-passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "adaptive-spin": {"OMP_WAIT_POLICY": ""},  # set, so the server leaves OpenMP's default
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="runs/demo-intent/bundle")
    parser.add_argument("--data", default="../shared/data/banking77/test.csv")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/threads")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    texts = load_texts(args.data)
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # each policy sets its own
        os.environ.pop(name, None)
    env = {
        "SUPPORTLENS_INTENT_BUNDLE": args.bundle,
        "SUPPORTLENS_SUMMARIZER_BUNDLE": "none",
        "SUPPORTLENS_DEVICE": "cpu",
        "SUPPORTLENS_LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    run = {
        "machine": machine(),
        "command": " ".join(["python benchmarks/threads.py", *(argv or sys.argv[1:])]),
        "bundle": args.bundle,
        "rounds": args.rounds,
        "requests_per_cell": args.requests,
        "cells": {},
    }
    servers = {}
    samples: dict[str, list[dict]] = {}
    try:
        for name, extra in POLICIES.items():
            port = free_port()
            process = start(
                [sys.executable, "-m", "service.server"],
                {**env, **extra, "SUPPORTLENS_PORT": str(port)},
            )
            servers[name] = (process, f"http://127.0.0.1:{port}")
        for process, url in servers.values():
            wait_ready(url, process)
            pause(process)
        for round_ in range(args.rounds):
            print(f"-- round {round_ + 1} of {args.rounds}", flush=True)
            for name, (process, url) in servers.items():
                resume(process)
                for c in (1, 32):
                    asyncio.run(load(f"{url}/v1/classify", texts, c, 32, 10, []))  # warm-up
                    cell = asyncio.run(load(f"{url}/v1/classify", texts, c, args.requests, 30, []))
                    samples.setdefault(f"{name} c={c}", []).append(cell)
                    print(f"{name} c={c}: {cell}", flush=True)
                pause(process)
    finally:
        for process, _ in servers.values():
            resume(process)
            stop(process)
    for key, cells in samples.items():
        run["cells"][key] = {
            "rps": statistics.median(c["rps"] for c in cells),
            "p50_ms": statistics.median(c["p50_ms"] for c in cells),
            "p99_ms": statistics.median(c["p99_ms"] for c in cells),
            "rps_by_round": [c["rps"] for c in cells],
            "p99_ms_by_round": [c["p99_ms"] for c in cells],
        }
    out = Path(args.out)
    print(write_runs(out.parent, out.name, "cpu", run, render))
    return 0


def render(results: dict) -> str:
    intro, policies = __doc__.split("\n\n")[1:3]
    lines = ["# Thread policies of the CPU model workers", "", intro.strip(), "", policies.strip()]
    for kind, run in sorted(results["runs"].items()):
        m = run["machine"]
        lines += [
            *run_heading(kind, run),
            f"{machine_sentence(m)} Model: {run['bundle']}. Rounds: {run['rounds']}, {run['requests_per_cell']} requests "
            "per cell and round; each cell is the median round.",
            "",
            "| policy | concurrency | req/s | req/s by round | p50 ms | p99 ms | p99 ms by round |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, cell in run["cells"].items():
            name, _, c = key.rpartition(" c=")
            lines.append(
                f"| {name} | {c} | {cell['rps']} | {' / '.join(map(str, cell['rps_by_round']))} "
                f"| {cell['p50_ms']} | {cell['p99_ms']} | "
                f"{' / '.join(map(str, cell['p99_ms_by_round']))} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
