"""The k-NN vote for unsure messages (``--neighbours``) on BANKING77: accuracy and speed,
with and without it, on the same bundles.

Reads the runs of ``benchmarks/banking77.py`` (``<runs_dir>/seed-N``: the bundle and the
resolved recipe, so each seed's train / validation / test split is rebuilt exactly), fits
the vote as ``train_intent --neighbours true`` does after fine-tuning
(:func:`training.neighbours.fit_vote`: the bank from the training messages, weight and gate
chosen on validation macro-F1), and measures both through :class:`IntentPredictor`, the
path the server runs (tokenization included), on the test messages:

- accuracy and macro-F1 without and with the vote, and the share of messages it ran for;
- throughput in batches of ``--batch_size`` without and with, measured side by side
  (alternating rounds, the median of each), so the cost of the second encoder on the
  unsure messages is a ratio from one run;
- the same on the ONNX Runtime backends (``--backends``, default fp32 and int8): the
  bundle with its vote is exported as ``supportlens-export-onnx --int8`` exports it (the
  vote's encoder gets a graph of its own), and served as ``SUPPORTLENS_BACKEND=onnx``
  serves it.

A run trained with ``--neighbours true`` is measured the same way: its vote is set aside
and fitted again, so "without" is the classifier alone.

Test data chooses nothing. Results go to ``benchmarks/results/neighbours.{json,md}``.

    python benchmarks/neighbours.py [--runs_dirs runs/banking77 runs/banking77-b64] [--seeds 1 2 3]
        [--backends onnx-fp32 onnx-int8]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, machine_sentence, run_heading, spread, write_runs  # noqa: E402


def probabilities(predictor, texts: list[str], batch_size: int) -> np.ndarray:
    """Calibrated probabilities ``(N, C)`` as served (with the vote when attached)."""
    parts = []
    for start in range(0, len(texts), batch_size):
        encoding, _ = predictor.encode(texts[start : start + batch_size])
        parts.append(predictor.probabilities(predictor.forward(encoding).logits).cpu().numpy())
    return np.concatenate(parts)


def throughput(predictor, texts: list[str], batch_size: int) -> float:
    """Texts per second of ``predictor.predict`` over ``texts`` in batches."""
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        predictor.predict(texts[start : start + batch_size])
    return len(texts) / (time.perf_counter() - started)


def side_by_side(
    model, vote, predictor, texts, labels, batch_size: int, rounds: int
) -> tuple[dict, dict]:
    """Test accuracy without and with ``vote`` (attached to ``model``, which ``predictor``
    serves), the share of texts it ran for, and throughput without and with, in
    alternating rounds (the median of each); and the served probabilities, without and with."""
    figures: dict = {}
    served = {}
    for name, attached in (("without", None), ("with", vote)):
        model.attach_neighbours(attached)
        served[name] = probabilities(predictor, texts, batch_size)  # (N, C)
        figures[f"test_accuracy_{name}"] = float((served[name].argmax(-1) == labels).mean())
    unsure = vote.unsure(torch.from_numpy(served["without"]))  # (N,)
    figures["test_unsure_share"] = float(unsure.float().mean())
    speeds: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(rounds):
        for name, attached in (("without", None), ("with", vote)):
            model.attach_neighbours(attached)
            speeds[name].append(throughput(predictor, texts, batch_size))
    for name, values in speeds.items():
        figures[f"throughput_{name}"] = round(statistics.median(values), 1)
    return figures, served


def onnx_bundle(bundle, directory: Path):
    """``bundle`` (its vote attached) saved at ``directory`` and exported as
    ``supportlens-export-onnx --int8`` does: the classifier's graphs and the vote's."""
    from models.bundle import load_bundle, save_bundle
    from training.export_onnx import export

    save_bundle(
        directory,
        bundle.model,
        bundle.tokenizer,
        task=bundle.task,
        labels=bundle.labels,
        calibration={k: v for k, v in bundle.calibration.items() if k != "ood"},
        training=bundle.training,
        detector=bundle.detector,
    )
    export(directory, int8=True)
    return load_bundle(directory)


def measure_seed(
    directory: Path, batch_size: int, rounds: int, backends: tuple[str, ...] = ()
) -> dict:
    from sklearn.metrics import f1_score

    from benchmarks.out_of_scope_features import load_draw
    from models.onnx_backend import onnx_runner
    from models.predictor import IntentPredictor
    from training.neighbours import fit_vote

    bundle, pretrained, data, (data_args, _, _) = load_draw(directory)
    model = bundle.model
    model.attach_neighbours(None)  # a run trained with --neighbours: fitted again below
    predictor = IntentPredictor(bundle)
    train, validation, test = (data.splits[s] for s in ("train", "validation", "test"))
    started = time.perf_counter()
    vote, report = fit_vote(
        pretrained,
        bundle.tokenizer,
        (train["text"], np.asarray(train["label"])),
        (
            validation["text"],
            np.asarray(validation["label"]),
            probabilities(predictor, validation["text"], batch_size),
        ),
        len(bundle.labels),
        data_args.max_length,
    )
    fit_time = time.perf_counter() - started
    texts, labels = test["text"], np.asarray(test["label"])
    row = {"seed": int(directory.name.split("-")[-1]), **report, "fit_time_s": round(fit_time, 1)}
    if vote is None:
        predicted = probabilities(predictor, texts, batch_size).argmax(-1)
        for name in ("without", "with"):
            row[f"test_accuracy_{name}"] = float((predicted == labels).mean())
            row[f"test_macro_f1_{name}"] = float(f1_score(labels, predicted, average="macro"))
        row["test_unsure_share"], row["throughput_without"], row["throughput_with"] = 0.0, 0.0, 0.0
        return row
    figures, served = side_by_side(model, vote, predictor, texts, labels, batch_size, rounds)
    row.update(figures)
    for name, probs in served.items():
        row[f"test_macro_f1_{name}"] = float(f1_score(labels, probs.argmax(-1), average="macro"))
    if backends:
        row["backends"] = {}
        model.attach_neighbours(vote)
        with tempfile.TemporaryDirectory() as tmp:
            exported = onnx_bundle(bundle, Path(tmp) / "bundle")
            exported_vote = exported.model.neighbours
            for backend in backends:
                runner = onnx_runner(
                    exported, backend.removeprefix("onnx-"), torch.get_num_threads()
                )
                onnx_predictor = IntentPredictor(exported, runner=runner)
                row["backends"][backend], _ = side_by_side(
                    exported.model, exported_vote, onnx_predictor, texts, labels, batch_size, rounds
                )
    return row


def summarize(rows: list[dict]) -> dict:
    keys = (
        "validation_macro_f1_without",
        "validation_macro_f1",
        "test_accuracy_without",
        "test_accuracy_with",
        "test_unsure_share",
    )
    summary = {key: spread([100 * row[key] for row in rows]) for key in keys}
    summary["throughput_ratio"] = spread(
        [row["throughput_with"] / row["throughput_without"] for row in rows if row["kept"]] or [0]
    )
    summary["fit_time_s"] = spread([row["fit_time_s"] for row in rows])
    kept = [row for row in rows if row["kept"] and "backends" in row]
    summary["backends"] = {
        backend: {
            **{
                key: spread([100 * row["backends"][backend][key] for row in kept])
                for key in ("test_accuracy_without", "test_accuracy_with", "test_unsure_share")
            },
            "throughput_ratio": spread(
                [
                    row["backends"][backend]["throughput_with"]
                    / row["backends"][backend]["throughput_without"]
                    for row in kept
                ]
            ),
        }
        for backend in (kept[0]["backends"] if kept else {})
    }
    return summary


def backends_table(part: dict) -> list[str]:
    """The vote on the ONNX Runtime backends, per seed and backend, then the means."""
    summary = part["summary"].get("backends")
    if not summary:
        return []
    lines = [
        "",
        "The same vote on the ONNX Runtime backends (`SUPPORTLENS_BACKEND=onnx`; the bundle "
        "exported with `supportlens-export-onnx --int8`, which gives the vote's encoder a "
        "graph of its own in each precision):",
        "",
        "| seed | backend | test accuracy | test messages voted | texts/s | speed |",
        "|---|---|---|---|---|---|",
    ]
    for row in part["seeds"]:
        for backend, f in row.get("backends", {}).items():
            lines.append(
                f"| {row['seed']} | {backend} | {100 * f['test_accuracy_without']:.2f} → "
                f"{100 * f['test_accuracy_with']:.2f} | {100 * f['test_unsure_share']:.1f} | "
                f"{f['throughput_without']:.0f} → {f['throughput_with']:.0f} | "
                f"{f['throughput_with'] / f['throughput_without']:.2f}x |"
            )
    for backend, f in summary.items():
        lines.append(
            f"| **mean ± spread** | {backend} | {mean_spread(f['test_accuracy_without'])} → "
            f"**{mean_spread(f['test_accuracy_with'])}** | {f['test_unsure_share']['mean']:.1f} "
            f"| | {f['throughput_ratio']['mean']:.2f}x |"
        )
    return lines


def mean_spread(figure: dict) -> str:
    return f"{figure['mean']:.2f} ± {figure['std']:.2f}"


def render_markdown(results: dict) -> str:
    lines = [
        "# k-NN vote for unsure messages (BANKING77)",
        "",
        "The bundles of `benchmarks/banking77.py`, each given the vote that "
        "`train_intent --neighbours true` fits after fine-tuning (`models/neighbours.py`): "
        "messages whose calibrated confidence is below the gate get the classifier's "
        "distribution interpolated with a k-NN vote (k 10, temperature 0.05) over the "
        "training messages in the sentence-embedding space of the backbone before "
        "fine-tuning. Weight and gate are chosen on validation macro-F1 per seed; test "
        "chooses nothing. Accuracy, macro-F1 and shares in percent; throughput in test "
        "messages per second through `IntentPredictor.predict` (tokenization included), "
        "without and with the vote measured side by side in the same run.",
    ]
    for kind, run in results["runs"].items():
        lines += run_heading(kind, run)
        lines += [
            f"- {machine_sentence(run['machine'])}",
            f"- batch size {run['batch_size']}, {run['rounds']} alternating rounds per seed; "
            f"wall time: {run['wall_time_s'] / 60:.1f} min",
        ]
        for recipe, part in run["recipes"].items():
            s = part["summary"]
            lines += [
                "",
                f"### {recipe} (`{part['runs_dir']}`)",
                "",
                "| seed | validation macro-F1 | weight | gate | test accuracy | "
                "test messages voted | texts/s | speed |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for row in part["seeds"]:
                vote = row["kept"]
                lines.append(
                    f"| {row['seed']} | {100 * row['validation_macro_f1_without']:.2f} → "
                    f"{100 * row['validation_macro_f1']:.2f} | {row['weight'] if vote else '–'} | "
                    f"{row['gate'] if vote else '–'} | {100 * row['test_accuracy_without']:.2f} → "
                    f"{100 * row['test_accuracy_with']:.2f} | "
                    f"{100 * row['test_unsure_share']:.1f} | "
                    + (
                        f"{row['throughput_without']:.0f} → {row['throughput_with']:.0f} | "
                        f"{row['throughput_with'] / row['throughput_without']:.2f}x |"
                        if vote
                        else "– | – |"
                    )
                )

            lines += [
                f"| **mean ± spread** | {mean_spread(s['validation_macro_f1_without'])} → "
                f"{mean_spread(s['validation_macro_f1'])} | | | {mean_spread(s['test_accuracy_without'])} → "
                f"**{mean_spread(s['test_accuracy_with'])}** | {s['test_unsure_share']['mean']:.1f} | | "
                f"{s['throughput_ratio']['mean']:.2f}x |",
                "",
                f"Fitting the vote (sentence embeddings of train and validation, the choice) "
                f"took {s['fit_time_s']['mean']:.0f} s per seed; it runs once, after training.",
            ]
            lines += backends_table(part)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs_dirs", nargs="+", default=["runs/banking77", "runs/banking77-b64"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--backends",
        nargs="*",
        choices=["onnx-fp32", "onnx-int8"],
        default=["onnx-fp32", "onnx-int8"],
        help="ONNX Runtime backends measured beside PyTorch (none: PyTorch only)",
    )
    parser.add_argument("--results_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    missing = [
        f"{d}/seed-{seed}"
        for d in args.runs_dirs
        for seed in args.seeds
        if not (Path(d) / f"seed-{seed}" / "bundle").is_dir()
    ]
    if missing:
        print(
            f"error: no trained run at {', '.join(missing)} (run benchmarks/banking77.py first)",
            file=sys.stderr,
        )
        return 2
    info = machine()
    started = time.perf_counter()
    recipes = {}
    for runs_dir in args.runs_dirs:
        rows = []
        for seed in args.seeds:
            rows.append(
                measure_seed(
                    Path(runs_dir) / f"seed-{seed}",
                    args.batch_size,
                    args.rounds,
                    tuple(args.backends),
                )
            )
            print(f"{runs_dir} seed {seed}: {rows[-1]}", flush=True)
        training = Path(runs_dir) / f"seed-{args.seeds[0]}" / "bundle" / "training.json"
        name = json.loads(training.read_text())["recipe"]
        recipes[name] = {"runs_dir": runs_dir, "seeds": rows, "summary": summarize(rows)}
    run = {
        "recipes": recipes,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "backends": args.backends,
        "machine": info,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "command": shlex.join(
            ["python", "benchmarks/neighbours.py", *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    kind = "cuda" if info.get("gpu") else "cpu"
    print(write_runs(args.results_dir, "neighbours", kind, run, render_markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
