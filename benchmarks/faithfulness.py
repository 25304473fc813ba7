"""Faithfulness and cost of every explanation method on BANKING77 test messages.

    flock /tmp/supportlens-heavy.lock python benchmarks/faithfulness.py \\
        --bundle runs/banking77/bundle --data ../shared/data/banking77/test.csv

For a fixed-seed sample of messages, each method (plus a random ranking of the
words) explains the classifier's predicted class. Its words are ranked by raw
score, highest first, and for each bin ``k = ceil(f · words)``, f in ``--bins``:

* comprehensiveness = p(c | x) − p(c | x with its top-k words deleted)   (higher is better)
* sufficiency       = p(c | x) − p(c | only its top-k words kept)          (lower is better)

averaged over the bins (AOPC, ERASER: DeYoung et al. 2020). "Delete" removes the
word's characters from the text, which is then tokenized again; the same for every
method. p is the model's softmax without temperature. Cost: every message is
explained alone (batch of one), timed per method next to one plain prediction of
the same message, in the same run. Results go to ``--output``.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import captum
import datasets
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine
from models.bundle import BundleError, load_bundle
from models.explanations import METHODS, ExplanationError, WordScore
from models.predictor import IntentPredictor

RANDOM = "random"
ATTRIBUTION_METHODS = ("integrated_gradients", "gradient_x_input", "occlusion")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="runs/banking77/bundle")
    parser.add_argument("--data", default="../shared/data/banking77/test.csv")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--sample", type=int, default=500, help="messages sampled (fixed seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bins", default="0.1,0.2,0.3,0.4,0.5", help="fractions of words")
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--internal-batch-size", type=int, default=64)
    # One thread: on a shared machine a second one spins and can make a forward 50x slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/faithfulness")
    args = parser.parse_args(argv)
    try:
        args.bins = [float(b) for b in args.bins.split(",")]
    except ValueError:
        parser.error(f"--bins must be comma-separated fractions, got {args.bins!r}")
    if not all(0 < b <= 1 for b in args.bins):
        parser.error("--bins fractions must lie in (0, 1]")
    if args.sample < 1:
        parser.error("--sample must be at least 1")
    return args


def load_sample(path: str, column: str, size: int, seed: int) -> list[str]:
    """``size`` messages of a CSV file, drawn without replacement with ``seed``."""
    if not Path(path).is_file():
        raise SystemExit(f"error: no data file at {path}")
    dataset = datasets.Dataset.from_csv(path)
    if column not in dataset.column_names:
        raise SystemExit(f"error: {path} has no column {column!r} ({dataset.column_names})")
    dataset = dataset.shuffle(seed=seed).select(range(min(size, len(dataset))))
    return [str(text) for text in dataset[column]]


def delete_words(text: str, words: list[WordScore], drop: set[int]) -> str:
    """``text`` with the characters of the words whose index is in ``drop`` removed."""
    pieces, cursor = [], 0
    for index, word in enumerate(words):
        if index in drop:
            pieces.append(text[cursor : word.start])
            cursor = word.end
    pieces.append(text[cursor:])
    return "".join(pieces)


def top_k_sizes(num_words: int, bins: list[float]) -> list[int]:
    return [max(1, math.ceil(fraction * num_words)) for fraction in bins]


def probabilities(predictor: IntentPredictor, texts: list[str]) -> np.ndarray:
    """Uncalibrated softmax of the classifier for many texts, in batches of similar length
    (tokenized and run as the predictor does; the raw softmax, as ERASER measures it)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    result = np.zeros((len(texts), len(predictor.labels)), dtype=np.float64)
    with torch.inference_mode():
        for begin in range(0, len(order), 128):
            chunk = order[begin : begin + 128]
            encoding, _ = predictor.encode([texts[i] for i in chunk])
            logits = predictor.forward(encoding).logits.float()
            result[chunk] = torch.softmax(logits, dim=-1).cpu().numpy()
    return result


def bootstrap_ci(values: np.ndarray, seed: int, rounds: int = 1000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over messages."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (rounds, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def time_ms(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return (time.perf_counter() - start) * 1000.0, result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/faithfulness.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    info = {**machine(), "captum": captum.__version__}
    try:
        bundle = load_bundle(args.bundle, task="intent-classification")
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    predictor = IntentPredictor(bundle)
    explainer = predictor.explainer(
        ig_steps=args.ig_steps, internal_batch_size=args.internal_batch_size
    )
    texts = load_sample(args.data, args.text_column, args.sample, args.seed)

    def predict(text: str) -> torch.Tensor:
        with torch.inference_mode():
            encoding, _ = predictor.encode([text])
            return predictor.forward(encoding).logits

    # Warm-up so the first timings do not pay for lazy initialisation.
    for method in METHODS:
        explainer.explain([texts[0]], [method])
    predict(texts[0])

    rng = random.Random(args.seed)
    kept_texts: list[str] = []
    explanations: dict[str, list[list[WordScore]]] = {m: [] for m in (*METHODS, RANDOM)}
    times: dict[str, list[float]] = {m: [] for m in ("predict", *METHODS)}
    deltas: list[float] = []
    skipped = 0
    started = time.perf_counter()
    for number, text in enumerate(texts, 1):
        try:
            explainer.explain([text], ["attention"])
        except ExplanationError:
            skipped += 1
            continue
        elapsed, _ = time_ms(lambda text=text: predict(text))
        times["predict"].append(elapsed)
        row = {}
        for method in METHODS:
            elapsed, (result,) = time_ms(lambda m=method, t=text: explainer.explain([t], [m]))
            times[method].append(elapsed)
            row[method] = result[method]
        kept_texts.append(text)
        for method in METHODS:
            explanations[method].append(row[method].words)
        words = row["attention"].words
        explanations[RANDOM].append(
            [WordScore(w.text, w.start, w.end, rng.random()) for w in words]
        )
        ig = row["integrated_gradients"]
        deltas.append(ig.delta)
        if number % 50 == 0:
            print(f"explained {number}/{len(texts)} ({time.perf_counter() - started:.0f}s)")

    # Convergence of integrated gradients relative to the logit change it explains.
    full_logits = []
    base_logits = []
    for begin in range(0, len(kept_texts), 64):
        chunk = kept_texts[begin : begin + 64]
        encoding, _ = predictor.encode(chunk)
        with torch.inference_mode():
            full_logits.append(predictor.forward(encoding).logits.float())
        base_logits.append(explainer.baseline_logits(chunk))
    full = torch.cat(full_logits)
    base = torch.cat(base_logits)
    predicted = full.argmax(dim=-1)
    differences = (full - base).gather(1, predicted[:, None]).squeeze(1).abs()
    relative_deltas = [
        abs(d) / max(float(diff), 1e-12) for d, diff in zip(deltas, differences, strict=True)
    ]

    # AOPC: every perturbed text of every method, scored in one batched pass.
    queries: list[str] = list(kept_texts)
    index_of: dict[str, int] = {text: i for i, text in enumerate(queries)}

    def query(text: str) -> int:
        if text not in index_of:
            index_of[text] = len(queries)
            queries.append(text)
        return index_of[text]

    plan: dict[str, list[tuple[int, list[int], list[int]]]] = {}
    for method, per_text in explanations.items():
        plan[method] = []
        for message, (text, words) in enumerate(zip(kept_texts, per_text, strict=True)):
            ranking = sorted(range(len(words)), key=lambda i: (-words[i].score, i))
            comprehensive, sufficient = [], []
            for k in top_k_sizes(len(words), args.bins):
                top = set(ranking[:k])
                comprehensive.append(query(delete_words(text, words, top)))
                rest = set(range(len(words))) - top
                sufficient.append(query(delete_words(text, words, rest)))
            plan[method].append((message, comprehensive, sufficient))
    print(f"scoring {len(queries)} distinct perturbed texts")
    probs = probabilities(predictor, queries)
    classes = probs[: len(kept_texts)].argmax(axis=1)
    original = probs[np.arange(len(kept_texts)), classes]

    predict_median = statistics.median(times["predict"])
    results: dict[str, dict] = {}
    for method, rows in plan.items():
        # AOPC per message, then the mean over messages.
        comp = np.array([original[m] - probs[c, classes[m]].mean() for m, c, _ in rows])
        suff = np.array([original[m] - probs[s, classes[m]].mean() for m, _, s in rows])
        entry = {
            "comprehensiveness": float(comp.mean()),
            "comprehensiveness_ci95": bootstrap_ci(comp, args.seed),
            "sufficiency": float(suff.mean()),
            "sufficiency_ci95": bootstrap_ci(suff, args.seed),
        }
        if method in times:
            ms = np.array(times[method])
            entry.update(
                median_ms=float(np.median(ms)),
                p95_ms=float(np.percentile(ms, 95)),
                median_cost_ratio=float(np.median(ms)) / predict_median,
                p95_cost_ratio=float(np.percentile(ms, 95)) / predict_median,
            )
        results[method] = entry
    random_comp = results[RANDOM]["comprehensiveness"]
    for method in METHODS:
        entry = results[method]
        entry["comprehensiveness_gain_per_cost"] = (
            entry["comprehensiveness"] - random_comp
        ) / entry["median_cost_ratio"]
    best = max(ATTRIBUTION_METHODS, key=lambda m: results[m]["comprehensiveness_gain_per_cost"])
    best_overall = max(METHODS, key=lambda m: results[m]["comprehensiveness_gain_per_cost"])

    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "command": command,
        "machine": info,
        "bundle": {"name": bundle.name, "version": bundle.version, "path": args.bundle},
        "data": args.data,
        "messages": len(kept_texts),
        "skipped_without_words": skipped,
        "seed": args.seed,
        "bins": args.bins,
        "removal": "delete the words' characters from the text, then tokenize again",
        "probability": "softmax of the logits (no temperature) for the predicted class",
        "ig_steps": args.ig_steps,
        "internal_batch_size": args.internal_batch_size,
        "predict_ms": {
            "median": predict_median,
            "p95": float(np.percentile(times["predict"], 95)),
        },
        "ig_relative_delta": {
            "median": statistics.median(relative_deltas),
            "p95": float(np.percentile(relative_deltas, 95)),
        },
        "accuracy_note": "explanations are of the predicted class, right or wrong",
        "methods": results,
        "default_attribution_method": best,
        "best_per_cost_overall": best_overall,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results(Path(args.output), report)
    print(render_markdown(report))
    return 0


def render_markdown(report: dict) -> str:
    machine_info = report["machine"]
    lines = [
        "# Explanation faithfulness and cost (BANKING77 test sample)",
        "",
        f"Reproduce: `{report['command']}`",
        "",
        f"Machine: {machine_info['cpu']}, {machine_info['cpu_count']} CPUs, "
        f"{machine_info['torch_threads']} torch threads, torch {machine_info['torch']}, "
        f"transformers {machine_info['transformers']}, captum {machine_info['captum']}; "
        f"load average {machine_info['load_average_at_start']} at start, "
        f"{machine_info['load_average_at_end']} at end (the machine was shared).",
        "",
        f"Model: bundle `{report['bundle']['path']}` ({report['bundle']['name']}, "
        f"version {report['bundle']['version']}). Data: {report['messages']} messages sampled "
        f"with seed {report['seed']} from `{report['data']}` "
        f"({report['skipped_without_words']} skipped: no word to explain).",
        "",
        "AOPC over the top-k words, k = ceil(f × words) for f in "
        f"{', '.join(f'{b:.0%}' for b in report['bins'])}; removal: {report['removal']}; "
        f"p = {report['probability']}. Comprehensiveness: higher is better; sufficiency: lower "
        "is better; 95% bootstrap intervals over messages in brackets. Cost: each message "
        "explained alone (batch of one) as a multiple of one plain prediction of the same "
        f"message (median {report['predict_ms']['median']:.1f} ms, p95 "
        f"{report['predict_ms']['p95']:.1f} ms), measured in the same run. Integrated "
        f"gradients: {report['ig_steps']} steps.",
        "",
        "| method | comprehensiveness ↑ | sufficiency ↓ | median ms | p95 ms | median × predict "
        "| p95 × predict | (comp − random) / cost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, entry in report["methods"].items():
        comp_lo, comp_hi = entry["comprehensiveness_ci95"]
        suff_lo, suff_hi = entry["sufficiency_ci95"]
        cells = [
            method,
            f"{entry['comprehensiveness']:.3f} [{comp_lo:.3f}, {comp_hi:.3f}]",
            f"{entry['sufficiency']:.3f} [{suff_lo:.3f}, {suff_hi:.3f}]",
        ]
        if "median_ms" in entry:
            cells += [
                f"{entry['median_ms']:.1f}",
                f"{entry['p95_ms']:.1f}",
                f"{entry['median_cost_ratio']:.1f}",
                f"{entry['p95_cost_ratio']:.1f}",
                f"{entry['comprehensiveness_gain_per_cost']:.4f}",
            ]
        else:
            cells += ["–"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    delta = report["ig_relative_delta"]
    lines += [
        "",
        f"Integrated gradients convergence: median |delta| / |logit(x) − logit(baseline)| = "
        f"{delta['median']:.4f} (p95 {delta['p95']:.4f}).",
        "",
        f"Default attribution method (best comprehensiveness gain over random per unit of cost "
        f"among {', '.join(ATTRIBUTION_METHODS)}): **{report['default_attribution_method']}**. "
        "`attention` is returned with every prediction anyway: in the service it costs nothing "
        "extra (its column here includes a forward pass of its own). Best per unit of cost "
        f"among all methods: {report['best_per_cost_overall']}.",
        "",
    ]
    return "\n".join(lines)


def write_results(output: Path, report: dict) -> None:
    """Write ``output``.json and ``output``.md, each to a temporary name then renamed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for suffix, content in (
        (".json", json.dumps(report, indent=2) + "\n"),
        (".md", render_markdown(report)),
    ):
        final = output.with_suffix(suffix)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        tmp.write_text(content, encoding="utf-8")
        tmp.replace(final)


if __name__ == "__main__":
    sys.exit(main())
