"""BANKING77 benchmark: fine-tune the default MiniLM-L6 classifier and report test figures.

Reads the data by path (default ``../shared/data/banking77/``, relative to the
repository root; nothing is copied into the repository), trains with
``training/recipes/intent/banking77.yaml`` (a stratified 10% of train.csv held out
for validation, early stopping and calibration) and writes
``benchmarks/results/banking77.{json,md}``: test accuracy, macro-F1, ECE before and
after temperature scaling, wall time, the machine and the exact command. Results
are kept per device kind (cpu / cuda), so a GPU run adds a row next to the CPU one.

    python benchmarks/banking77.py [--data_dir ../shared/data/banking77] [--key value ...]

Any ``--key value`` not listed below is passed on to ``training.train_intent``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import hardware, machine, write_runs  # noqa: E402

# Published full-data BANKING77 test accuracy (Casanueva et al. 2020 and follow-ups).
PUBLISHED = [
    ("BERT-large (fine-tuned)", 93.66),
    ("BERT-base (fine-tuned)", 93.1),
    ("DistilBERT", 92.5),
]
TARGET_ACCURACY = 92.5
TARGET_MINUTES = 20


def render_markdown(results: dict) -> str:
    """The committed result table, one row per device kind measured."""
    lines = [
        "# BANKING77 benchmark: attention-pooling MiniLM-L6 intent classifier",
        "",
        "Fine-tuned on `../shared/data/banking77/train.csv` (stratified 10% held out for "
        "validation, early stopping on validation macro-F1 and temperature fitting), "
        "evaluated once on `test.csv` (3,080 messages, 77 intents).",
        "",
        "| device | test accuracy | macro-F1 | ECE before | ECE after | temperature | epochs | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, run in sorted(results["runs"].items()):
        m = run["metrics"]
        lines.append(
            f"| {kind} ({hardware(run['machine'])}) "
            f"| {m['accuracy']:.2f} | {m['macro_f1']:.2f} | {m['ece_before']:.2f} | "
            f"{m['ece_after']:.2f} | {m['temperature']:.3f} | {run['epochs']:.1f} | "
            f"{run['wall_time_s'] / 60:.1f} min |"
        )
    lines += [
        "",
        "Accuracy, macro-F1 and ECE (15 bins) are percentages. ECE before/after: the same "
        "test predictions scored with the raw softmax and with the validation-fitted "
        "temperature. Wall time covers data loading, training, calibration and evaluation.",
        "",
        f"Target: at least {TARGET_ACCURACY} accuracy on 2 CPU cores in under "
        f"{TARGET_MINUTES} minutes. Published full-data test accuracy for comparison:",
        "",
        "| model | test accuracy |",
        "|---|---|",
        *[f"| {name} | {acc} |" for name, acc in PUBLISHED],
        "",
    ]
    for kind, run in sorted(results["runs"].items()):
        mach = run["machine"]
        lines += [
            f"## {kind} run",
            "",
            f"- machine: {mach['cpu']}, {mach['cpu_count']} CPU cores available "
            f"({mach['torch_threads']} torch threads)"
            + (f", GPU {mach['gpu']}" if mach.get("gpu") else ""),
            f"- versions: Python {mach['python']}, torch {mach['torch']}, "
            f"transformers {mach['transformers']}",
            f"- command (from the repository root): `{run['command']}`",
            f"- recipe: `{run['recipe']}`; training overrides: `{' '.join(run['overrides']) or '(none)'}`",
            f"- out-of-scope threshold {run['metrics']['oos_threshold']:.3f} rejects "
            f"{run['metrics']['oos_rejected_rate']:.2f}% of the (in-scope) test messages",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data_dir", default="../shared/data/banking77", help="holds train.csv, test.csv"
    )
    parser.add_argument("--recipe", default="training/recipes/intent/banking77.yaml")
    parser.add_argument(
        "--output_dir", default="runs/banking77", help="checkpoints, report, bundle/"
    )
    parser.add_argument("--results_dir", default="benchmarks/results")
    args, overrides = parser.parse_known_args(argv)
    os.chdir(REPO)  # every default path is relative to the repository root
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning
    # threads starve each other and a training step became several times slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from training.train_intent import train

    data_dir = Path(args.data_dir)
    for name in ("train.csv", "test.csv"):
        if not (data_dir / name).is_file():
            print(f"error: {data_dir / name} not found (set --data_dir)", file=sys.stderr)
            return 2
    train_args = [
        args.recipe,
        "--train_file",
        str(data_dir / "train.csv"),
        "--test_file",
        str(data_dir / "test.csv"),
        "--output_dir",
        args.output_dir,
        *overrides,
    ]
    started = time.perf_counter()
    result = train(train_args)
    wall = time.perf_counter() - started

    import torch

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    m = result.report["metrics"]
    run = {
        "metrics": {
            "accuracy": round(100 * m["accuracy"], 2),
            "macro_f1": round(100 * m["macro_f1"], 2),
            "ece_before": round(100 * m["ece_before"], 2),
            "ece_after": round(100 * m["ece_after"], 2),
            "nll_before": round(m["nll_before"], 4),
            "nll_after": round(m["nll_after"], 4),
            "temperature": round(m["temperature"], 4),
            "oos_threshold": round(m["oos_threshold"], 4),
            "oos_rejected_rate": round(100 * m["oos_rejected_rate"], 2),
            "n_test": m["n_examples"],
        },
        "epochs": result.report["training"]["epochs"],
        "global_step": result.report["training"]["global_step"],
        "examples": result.report["training"]["data"]["examples"],
        "wall_time_s": round(wall, 1),
        "machine": machine(),
        "command": shlex.join(
            ["python", "benchmarks/banking77.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "recipe": args.recipe,
        "overrides": overrides,
        "bundle": str(Path(args.output_dir) / "bundle"),
    }
    print(write_runs(args.results_dir, "banking77", kind, run, render_markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
