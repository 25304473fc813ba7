"""Faithfulness and cost of every explanation method on BANKING77 test messages.

    flock /tmp/supportlens-heavy.lock python benchmarks/faithfulness.py \\
        --bundle runs/banking77/seed-1/bundle --data ../shared/data/banking77/test.csv

For a fixed-seed sample of messages, each method (plus random rankings of the words)
explains the classifier's predicted class, and :mod:`models.faithfulness` (the same
functions the service's ``"faithfulness": true`` uses) scores it: words ranked by raw
score, deleted by their character spans, comprehensiveness and sufficiency of the
predicted class's **calibrated** probability (the bundle's temperature), AOPC over
the bins (DeYoung et al. 2020).

* **NAOPC** (Edin et al. 2024): per message, ``(aopc − lower) / (upper − lower)``
  where upper and lower are the best and worst AOPC achievable on that message. They
  are approximated by a greedy search (a beam of width one; the paper uses beam
  search) and tightened by every ordering measured on the message (the methods' and
  the random ones'): the true bounds are at least that wide. Sufficiency is
  normalised the same way with best = lowest, so for both 1 is the best ordering
  found and 0 the worst. Messages where every ordering scores the same are skipped.
* **Per request**: how often a method is worse than random on a given message (its
  comprehensiveness below the mean of ``--random-orderings`` random rankings of that
  message, or its sufficiency above), and the spread of per-message values.
* **Cost**: every message explained alone (batch of one), timed per method next to
  one plain prediction of the same message; and the extra time of
  ``faithfulness: true`` as the service computes it (all perturbed texts in one
  batched forward), per method alone and for all methods in one request.

Results go to ``--output``.{md,json}.
"""

from __future__ import annotations

import argparse
import json
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
from models.faithfulness import (
    DEFAULT_BINS,
    Variants,
    greedy_orderings,
    normalized,
    plan,
)
from models.predictor import VARIANT_PRECISIONS, IntentPredictor

RANDOM = "random"
ATTRIBUTION_METHODS = ("integrated_gradients", "gradient_x_input", "occlusion")
BOUNDS = ("comprehensiveness_best", "comprehensiveness_worst")
SUFFICIENCY_BOUNDS = ("sufficiency_best", "sufficiency_worst")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="runs/banking77/seed-1/bundle")
    parser.add_argument("--data", default="../shared/data/banking77/test.csv")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--sample", type=int, default=500, help="messages sampled (fixed seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bins", default=",".join(str(b) for b in DEFAULT_BINS), help="fractions of words"
    )
    parser.add_argument("--random-orderings", type=int, default=5)
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--internal-batch-size", type=int, default=64)
    parser.add_argument(
        "--faithfulness-precision",
        default="auto",
        choices=VARIANT_PRECISIONS,
        help="how the service scores perturbed texts (SUPPORTLENS_FAITHFULNESS_PRECISION); "
        "the benchmark's own AOPC is always fp32",
    )
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
    if args.random_orderings < 1:
        parser.error("--random-orderings must be at least 1")
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


def probabilities(predictor: IntentPredictor, texts: list[str]) -> np.ndarray:
    """Calibrated probabilities of many texts, in batches of similar length."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    result = np.zeros((len(texts), len(predictor.labels)), dtype=np.float64)
    for begin in range(0, len(order), 128):
        chunk = order[begin : begin + 128]
        result[chunk] = predictor.calibrated([texts[i] for i in chunk]).cpu().numpy()
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
    # The benchmark's own measurements in full precision; the service's path as configured.
    predictor = IntentPredictor(bundle, variant_precision="fp32")
    serving = IntentPredictor(bundle, variant_precision=args.faithfulness_precision)
    precision = "bf16" if serving.variant_dtype == torch.bfloat16 else "fp32"
    explainer = predictor.explainer(
        ig_steps=args.ig_steps, internal_batch_size=args.internal_batch_size
    )
    texts = load_sample(args.data, args.text_column, args.sample, args.seed)

    def predict(text: str) -> torch.Tensor:
        with torch.inference_mode():
            encoding, _ = predictor.encode([text])
            return predictor.forward(encoding).logits

    def measure(text, row, original: torch.Tensor, scorer: IntentPredictor = serving) -> float:
        # As the service does: the text's own probabilities are its prediction's.
        elapsed, _ = time_ms(
            lambda: explainer.faithfulness([text], [row], scorer.calibrated, originals=original)
        )
        return elapsed

    def side_by_side(number: int, text: str, row, original: torch.Tensor, name: str) -> None:
        """The service's precision and (when it is not fp32) fp32, taking turns at going
        first from one message to the next; the row keeps the service's values."""
        if precision == "fp32":
            faithfulness_times[name].append(measure(text, row, original))
            return
        if number % 2:
            fp32_times[name].append(measure(text, row, original, predictor))
            faithfulness_times[name].append(measure(text, row, original))
            return
        faithfulness_times[name].append(measure(text, row, original))
        served_values = {method: e.faithfulness for method, e in row.items()}
        fp32_times[name].append(measure(text, row, original, predictor))
        for method, explanation in row.items():
            explanation.faithfulness = served_values[method]

    # Warm-up so the first timings do not pay for lazy initialisation.
    for method in METHODS:
        (row,) = explainer.explain([texts[0]], [method])
        measure(texts[0], row, predictor.probabilities(predict(texts[0])))

    rng = random.Random(args.seed)
    kept_texts: list[str] = []
    explanations: dict[str, list[list[WordScore]]] = {m: [] for m in METHODS}
    randoms: list[list[list[float]]] = []
    times: dict[str, list[float]] = {m: [] for m in ("predict", *METHODS)}
    faithfulness_times: dict[str, list[float]] = {m: [] for m in (*METHODS, "all")}
    fp32_times: dict[str, list[float]] = {m: [] for m in (*METHODS, "all")}
    served: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    deltas: list[float] = []
    skipped = 0
    started = time.perf_counter()
    for number, text in enumerate(texts, 1):
        try:
            explainer.explain([text], ["attention"])
        except ExplanationError:
            skipped += 1
            continue
        elapsed, logits = time_ms(lambda text=text: predict(text))
        times["predict"].append(elapsed)
        original = predictor.probabilities(logits)  # (1, C)
        row = {}
        for method in METHODS:
            elapsed, (result,) = time_ms(lambda m=method, t=text: explainer.explain([t], [m]))
            times[method].append(elapsed)
            row[method] = result[method]
            # The service's path: this method's perturbed texts in one batched forward.
            alone = {method: result[method]}
            side_by_side(number, text, alone, original, method)
            measured = result[method].faithfulness
            served[method].append((measured.comprehensiveness, measured.sufficiency))
        side_by_side(number, text, row, original, "all")
        kept_texts.append(text)
        for method in METHODS:
            explanations[method].append(row[method].words)
        words = row["attention"].words
        randoms.append([[rng.random() for _ in words] for _ in range(args.random_orderings)])
        deltas.append(row["integrated_gradients"].delta)
        if number % 50 == 0:
            print(f"explained {number}/{len(texts)} ({time.perf_counter() - started:.0f}s)")

    # Convergence of integrated gradients relative to the logit change it explains.
    full_logits, base_logits = [], []
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
    classes = predicted.tolist()
    spans = [[(w.start, w.end) for w in words] for words in explanations["attention"]]

    # Best and worst orderings per message, greedily, all messages in lockstep.
    def quantity(batch: list[str], owners: list[int]) -> np.ndarray:
        probs = probabilities(predictor, batch)
        return probs[np.arange(len(batch)), [classes[o] for o in owners]]

    bound_started = time.perf_counter()
    greedy = greedy_orderings(list(zip(kept_texts, spans, strict=True)), quantity, args.bins)
    bound_seconds = time.perf_counter() - bound_started

    # AOPC of every ordering of every message, all perturbed texts in one batched pass.
    variants = Variants()
    originals = [variants.add(text) for text in kept_texts]
    planned: dict[str, list] = {}
    for method in METHODS:
        planned[method] = [
            plan(variants, text, spans[m], [w.score for w in explanations[method][m]], args.bins)
            for m, text in enumerate(kept_texts)
        ]
    for r in range(args.random_orderings):
        planned[f"{RANDOM}{r}"] = [
            plan(variants, text, spans[m], randoms[m][r], args.bins)
            for m, text in enumerate(kept_texts)
        ]
    for kind, orders in greedy.items():
        # A greedy prefix ranks its words first; the rest never enter any bin.
        planned[kind] = [
            plan(
                variants,
                text,
                spans[m],
                [
                    len(spans[m]) - orders[m].index(i) if i in orders[m] else 0.0
                    for i in range(len(spans[m]))
                ],
                args.bins,
            )
            for m, text in enumerate(kept_texts)
        ]
    print(f"scoring {len(variants.texts)} distinct perturbed texts")
    probs = probabilities(predictor, variants.texts)
    aopc: dict[str, np.ndarray] = {}
    for name, rows in planned.items():
        values = [
            rows[m].score(probs[originals[m], classes[m]], probs[:, classes[m]].tolist(), args.bins)
            for m in range(len(kept_texts))
        ]
        aopc[name] = np.array([[v.comprehensiveness, v.sufficiency] for v in values])
    random_names = [f"{RANDOM}{r}" for r in range(args.random_orderings)]
    aopc[RANDOM] = np.mean([aopc[n] for n in random_names], axis=0)  # (M, 2)

    # The service's per-request values are the benchmark's values: the same functions (in
    # bf16, up to its rounding).
    gaps = np.concatenate([np.abs(np.array(served[m]) - aopc[m]).ravel() for m in METHODS])

    # NAOPC bounds per message: greedy, tightened by every ordering measured.
    measured_names = [*METHODS, *random_names, *greedy]
    comps = np.stack([aopc[n][:, 0] for n in measured_names])  # (O, M)
    suffs = np.stack([aopc[n][:, 1] for n in measured_names])  # (O, M)
    upper_comp, lower_comp = comps.max(axis=0), comps.min(axis=0)
    best_suff, worst_suff = suffs.min(axis=0), suffs.max(axis=0)
    greedy_is_bound = {
        "comprehensiveness_best": float(
            np.mean(aopc["comprehensiveness_best"][:, 0] >= upper_comp - 1e-9)
        ),
        "comprehensiveness_worst": float(
            np.mean(aopc["comprehensiveness_worst"][:, 0] <= lower_comp + 1e-9)
        ),
        "sufficiency_best": float(np.mean(aopc["sufficiency_best"][:, 1] <= best_suff + 1e-9)),
        "sufficiency_worst": float(np.mean(aopc["sufficiency_worst"][:, 1] >= worst_suff - 1e-9)),
    }

    predict_median = statistics.median(times["predict"])
    results: dict[str, dict] = {}
    for name in (*METHODS, RANDOM):
        comp, suff = aopc[name][:, 0], aopc[name][:, 1]
        n_comp = np.array(
            [normalized(c, lo, hi) for c, lo, hi in zip(comp, lower_comp, upper_comp, strict=True)]
        )
        n_suff = np.array(
            [
                normalized(-s, -hi, -lo)
                for s, lo, hi in zip(suff, best_suff, worst_suff, strict=True)
            ]
        )
        valid_comp = n_comp[~np.isnan(n_comp)]
        valid_suff = n_suff[~np.isnan(n_suff)]
        entry = {
            "comprehensiveness": float(comp.mean()),
            "comprehensiveness_ci95": bootstrap_ci(comp, args.seed),
            "sufficiency": float(suff.mean()),
            "sufficiency_ci95": bootstrap_ci(suff, args.seed),
            "naopc_comprehensiveness": float(valid_comp.mean()),
            "naopc_comprehensiveness_ci95": bootstrap_ci(valid_comp, args.seed),
            "naopc_sufficiency": float(valid_suff.mean()),
            "naopc_sufficiency_ci95": bootstrap_ci(valid_suff, args.seed),
            "naopc_messages": len(valid_comp),
            "comprehensiveness_percentiles": {
                str(q): float(np.percentile(comp, q)) for q in (10, 50, 90)
            },
        }
        if name in METHODS:
            entry["worse_than_random_comprehensiveness"] = float(np.mean(comp < aopc[RANDOM][:, 0]))
            entry["worse_than_random_sufficiency"] = float(np.mean(suff > aopc[RANDOM][:, 1]))
            ms = np.array(times[name])
            extra = np.array(faithfulness_times[name])
            entry.update(
                median_ms=float(np.median(ms)),
                p95_ms=float(np.percentile(ms, 95)),
                median_cost_ratio=float(np.median(ms)) / predict_median,
                p95_cost_ratio=float(np.percentile(ms, 95)) / predict_median,
                faithfulness_median_ms=float(np.median(extra)),
                faithfulness_cost_ratio=float(np.median(extra)) / predict_median,
                faithfulness_p95_cost_ratio=float(np.percentile(extra, 95)) / predict_median,
            )
            if fp32_times[name]:
                entry["faithfulness_fp32_cost_ratio"] = (
                    float(np.median(fp32_times[name])) / predict_median
                )
        results[name] = entry
    random_comp = results[RANDOM]["comprehensiveness"]
    for method in METHODS:
        entry = results[method]
        entry["comprehensiveness_gain_per_cost"] = (
            entry["comprehensiveness"] - random_comp
        ) / entry["median_cost_ratio"]
    best = max(ATTRIBUTION_METHODS, key=lambda m: results[m]["comprehensiveness_gain_per_cost"])
    best_overall = max(METHODS, key=lambda m: results[m]["comprehensiveness_gain_per_cost"])
    all_methods = np.array(faithfulness_times["all"])
    together = {
        "median_ms": float(np.median(all_methods)),
        "cost_ratio": float(np.median(all_methods)) / predict_median,
        "cost_ratio_per_method": float(np.median(all_methods)) / predict_median / len(METHODS),
    }
    if fp32_times["all"]:
        together["fp32_cost_ratio_per_method"] = (
            float(np.median(fp32_times["all"])) / predict_median / len(METHODS)
        )

    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    metrics = {}
    metrics_path = Path(args.bundle) / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
    report = {
        "command": command,
        "machine": info,
        "bundle": {
            "name": bundle.name,
            "version": bundle.version,
            "path": args.bundle,
            "test_accuracy": metrics.get("test", {}).get("accuracy", metrics.get("accuracy")),
            "temperature": predictor.temperature,
        },
        "data": args.data,
        "messages": len(kept_texts),
        "skipped_without_words": skipped,
        "seed": args.seed,
        "bins": args.bins,
        "random_orderings": args.random_orderings,
        "removal": "delete the words' characters (their character spans) from the text, "
        "then tokenize again",
        "probability": "calibrated softmax (the bundle's temperature) of the predicted class",
        "naopc_bounds": "greedy search (beam of width 1), tightened by every ordering "
        "measured on the message",
        "greedy_is_the_bound": greedy_is_bound,
        "greedy_seconds": round(bound_seconds, 1),
        "faithfulness_precision": precision,
        "service_vs_benchmark_abs_difference": {
            "max": float(gaps.max()),
            "mean": float(gaps.mean()),
        },
        "ig_steps": args.ig_steps,
        "internal_batch_size": args.internal_batch_size,
        "predict_ms": {
            "median": predict_median,
            "p95": float(np.percentile(times["predict"], 95)),
        },
        "faithfulness_all_methods": together,
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
    precision = report["faithfulness_precision"]
    reduced = precision != "fp32"
    model = report["bundle"]
    accuracy = (
        f", test accuracy {100 * model['test_accuracy']:.2f}%"
        if model.get("test_accuracy") is not None
        else ""
    )
    # The benchmark itself keeps one core busy; more than that at the start was someone else.
    quiet = (
        "a quiet machine"
        if machine_info["load_average_at_start"][0] <= 1.0
        else "the machine was shared: timings are noisy"
    )
    lines = [
        "# Explanation faithfulness and cost (BANKING77 test sample)",
        "",
        f"Reproduce: `{report['command']}`",
        "",
        f"Machine: {machine_info['cpu']}, {machine_info['cpu_count']} CPUs, "
        f"{machine_info['torch_threads']} torch threads, torch {machine_info['torch']}, "
        f"transformers {machine_info['transformers']}, captum {machine_info['captum']}; "
        f"load average {machine_info['load_average_at_start']} at start, "
        f"{machine_info['load_average_at_end']} at end ({quiet}).",
        "",
        f"Model: bundle `{model['path']}` ({model['name']}, version {model['version']}"
        f"{accuracy}, temperature {model['temperature']:.3f}). Data: {report['messages']} "
        f"messages sampled with seed {report['seed']} from `{report['data']}` "
        f"({report['skipped_without_words']} skipped: no word to explain).",
        "",
        "AOPC over the top-k words, k = max(1, ceil(f × words)) for f in "
        f"{', '.join(f'{b:.0%}' for b in report['bins'])}; removal: {report['removal']}; "
        f"p = {report['probability']}. Comprehensiveness: higher is better; sufficiency: lower "
        "is better; 95% bootstrap intervals over messages in brackets. `random` is the mean "
        f"of {report['random_orderings']} random orderings per message. NAOPC (Edin et al. "
        "2024): per message (aopc − worst) / (best − worst), 1 = the best ordering found, 0 = "
        f"the worst; bounds: {report['naopc_bounds']}.",
        "",
        "| method | comprehensiveness ↑ | sufficiency ↓ | NAOPC comp. ↑ | NAOPC suff. ↑ "
        "| worse than random (comp. / suff.) | comp. p10 / p50 / p90 |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, entry in report["methods"].items():
        comp_lo, comp_hi = entry["comprehensiveness_ci95"]
        suff_lo, suff_hi = entry["sufficiency_ci95"]
        n_lo, n_hi = entry["naopc_comprehensiveness_ci95"]
        s_lo, s_hi = entry["naopc_sufficiency_ci95"]
        q = entry["comprehensiveness_percentiles"]
        worse = (
            f"{entry['worse_than_random_comprehensiveness']:.0%} / "
            f"{entry['worse_than_random_sufficiency']:.0%}"
            if "worse_than_random_comprehensiveness" in entry
            else "–"
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    method,
                    f"{entry['comprehensiveness']:.3f} [{comp_lo:.3f}, {comp_hi:.3f}]",
                    f"{entry['sufficiency']:.3f} [{suff_lo:.3f}, {suff_hi:.3f}]",
                    f"{entry['naopc_comprehensiveness']:.3f} [{n_lo:.3f}, {n_hi:.3f}]",
                    f"{entry['naopc_sufficiency']:.3f} [{s_lo:.3f}, {s_hi:.3f}]",
                    worse,
                    f"{q['10']:.3f} / {q['50']:.3f} / {q['90']:.3f}",
                ]
            )
            + " |"
        )
    naopc_messages = next(iter(report["methods"].values()))["naopc_messages"]
    greedy = report["greedy_is_the_bound"]
    lines += [
        "",
        f"NAOPC over the {naopc_messages} messages where the orderings differ. The greedy "
        "orderings were the bound themselves (no measured ordering beyond them) on "
        + ", ".join(f"{share:.0%} of messages ({kind})" for kind, share in greedy.items())
        + f"; the greedy search took {report['greedy_seconds']} s.",
        "",
        "Cost: each message explained alone (batch of one) as a multiple of one plain "
        f"prediction of the same message (median {report['predict_ms']['median']:.1f} ms, p95 "
        f"{report['predict_ms']['p95']:.1f} ms), measured in the same run. `faithfulness: "
        "true` is the extra time of measuring the explanation as the service does (its "
        "perturbed texts, deduplicated, packed into one forward pass, `models/packing.py`; "
        "the text's own probabilities are its prediction's), with the perturbed texts "
        f"scored in **{precision}** (`SUPPORTLENS_FAITHFULNESS_PRECISION`"
        + (", with the fp32 cost next to it: the two take turns at going first" if reduced else "")
        + f"). Integrated gradients: {report['ig_steps']} steps.",
        "",
        "| method | median ms | p95 ms | median × predict | p95 × predict "
        f"| (comp − random) / cost | `faithfulness: true` ({precision}), median × predict (p95) |"
        + (" fp32, median × predict |" if reduced else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if reduced else ""),
    ]
    for method, entry in report["methods"].items():
        if "median_ms" not in entry:
            continue
        lines.append(
            f"| {method} | {entry['median_ms']:.1f} | {entry['p95_ms']:.1f} "
            f"| {entry['median_cost_ratio']:.1f} | {entry['p95_cost_ratio']:.1f} "
            f"| {entry['comprehensiveness_gain_per_cost']:.4f} "
            f"| {entry['faithfulness_cost_ratio']:.2f} ({entry['faithfulness_p95_cost_ratio']:.2f}) |"
            + (f" {entry['faithfulness_fp32_cost_ratio']:.2f} |" if reduced else "")
        )
    together = report["faithfulness_all_methods"]
    delta = report["ig_relative_delta"]
    gap = report["service_vs_benchmark_abs_difference"]
    lines += [
        "",
        f"All {len([m for m in report['methods'] if 'median_ms' in report['methods'][m]])} "
        f"methods measured in one request: {together['cost_ratio']:.2f} × a prediction, "
        f"{together['cost_ratio_per_method']:.2f} × per method"
        + (f" (fp32: {together['fp32_cost_ratio_per_method']:.2f} × per method)" if reduced else "")
        + ". The service's per-request values differ from the benchmark's fp32 values by at "
        f"most {gap['max']:.1e} (mean {gap['mean']:.1e}, over every method's comprehensiveness "
        "and sufficiency)" + (": bf16 rounding." if reduced else ": batching noise."),
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
