"""What running a batch in length groups saves: one padded pass against length groups.

Every backend of a trained intent bundle (PyTorch, and ONNX Runtime fp32 and int8 when
the bundle has the graphs) runs the BANKING77 test messages, shuffled once, in batches
of each size, on one thread: the forward pass alone (tokenization excluded), once as one
pass padded to the batch's longest message and once in the predictor's length groups
(``models.predictor.length_groups`` with the backend's ``PASS_TOKENS``). Reports ms per
message, the passes per batch, and how far the grouped outputs are from the padded ones
(largest logit difference, labels that differ).

    python benchmarks/padding.py --bundle runs/banking77/seed-1/bundle

Results: ``benchmarks/results/padding.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, machine_sentence, run_heading, write_runs  # noqa: E402
from benchmarks.serving import load_texts  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="runs/banking77/seed-1/bundle")
    parser.add_argument("--data", default="../shared/data/banking77/test.csv")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--messages", type=int, default=960, help="messages per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/padding")
    return parser.parse_args(argv)


def timed_forward(predictor, encodings, pass_tokens: float) -> tuple[float, list, int]:
    """Seconds for every encoding's forward with ``pass_tokens``, the logits, the passes."""
    import torch

    from models.predictor import length_groups

    predictor.pass_tokens = pass_tokens
    predictor.forward(encodings[0])  # warm-up
    logits, passes = [], 0
    started = time.perf_counter()
    for encoding in encodings:
        logits.append(predictor.forward(encoding).logits)
    elapsed = time.perf_counter() - started
    for encoding in encodings:
        passes += len(length_groups(encoding["attention_mask"].sum(-1).tolist(), pass_tokens))
    return elapsed, torch.cat(logits), passes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from models.bundle import load_bundle
    from models.onnx_backend import onnx_runner
    from models.predictor import IntentPredictor

    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle, task="intent-classification")
    texts = load_texts(args.data)
    random.Random(args.seed).shuffle(texts)
    texts = texts[: args.messages]
    backends = {"torch": None}
    for precision in ("fp32", "int8"):
        if precision in bundle.onnx_graphs:
            backends[f"onnx-{precision}"] = precision
    run = {
        "machine": machine(),
        "command": "python benchmarks/padding.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "bundle": args.bundle,
        "texts": f"{args.data} ({len(texts)} messages, shuffled with seed {args.seed})",
        "cells": [],
    }
    for backend, precision in backends.items():
        runner = None if precision is None else onnx_runner(bundle, precision, threads=1)
        predictor = IntentPredictor(bundle, runner=runner)
        grouped_tokens = predictor.pass_tokens
        for size in args.batch_sizes:
            batches = [texts[i : i + size] for i in range(0, len(texts), size)]
            encodings = [predictor.encode(batch)[0] for batch in batches]
            padded_s, padded, _ = timed_forward(predictor, encodings, math.inf)
            grouped_s, grouped, grouped_passes = timed_forward(predictor, encodings, grouped_tokens)
            cell = {
                "backend": backend,
                "batch_size": size,
                "pass_tokens": grouped_tokens,
                "padded_ms_per_message": round(1000 * padded_s / len(texts), 3),
                "grouped_ms_per_message": round(1000 * grouped_s / len(texts), 3),
                "speed_up": round(padded_s / grouped_s, 2),
                "passes_per_batch": round(grouped_passes / len(batches), 2),
                "max_logit_difference": float((grouped - padded).abs().max()),
                "labels_differ": int((grouped.argmax(-1) != padded.argmax(-1)).sum()),
            }
            run["cells"].append(cell)
            print(cell, flush=True)
    print(write_runs(Path(args.out).parent, Path(args.out).name, "cpu", run, render))
    return 0


def render(results: dict) -> str:
    lines = [
        "# Length groups: one padded pass against passes of similar lengths",
        "",
        "`python benchmarks/padding.py`: the forward pass alone (tokenization excluded), one "
        "thread, batches of consecutive messages from the shuffled BANKING77 test file; each "
        "batch run as one pass padded to its longest message, then in the predictor's length "
        "groups. Dynamic int8 quantizes each pass's activations with one scale, so its logits "
        "depend a little on which messages share a pass; PyTorch and ONNX fp32 give the same "
        "outputs up to float rounding.",
    ]
    for kind, run in sorted(results["runs"].items()):
        lines += [
            *run_heading(kind, run),
            f"{machine_sentence(run['machine'])} Model: {run['bundle']}. Texts: {run['texts']}.",
            "",
            "| backend | batch | pass tokens | padded ms / message | grouped ms / message | "
            "speed-up | passes per batch | max logit difference | labels that differ |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in run["cells"]:
            lines.append(
                f"| {c['backend']} | {c['batch_size']} | {c['pass_tokens']} | "
                f"{c['padded_ms_per_message']} | {c['grouped_ms_per_message']} | "
                f"{c['speed_up']} | {c['passes_per_batch']} | "
                f"{c['max_logit_difference']:.2g} | {c['labels_differ']} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
