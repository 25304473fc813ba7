"""Out-of-scope benchmark: BANKING77 with held-out intents, per detector.

For each random draw (seed), 25% of the intents are left out of training: their rows
are dropped from ``train.csv`` and their ``test.csv`` messages become the out-of-scope
test set (relabelled and passed with ``--oos_label``, so they are never a class). The
classifier is trained with the BANKING77 recipe through the normal training code
(``training.train_intent``), with no out-of-scope data at all: the detector in the
bundle and its threshold are chosen on in-scope validation messages only (the coverage
rule, ``--oos_coverage``). Reported per draw and as mean ± spread (sample standard
deviation): in-scope test accuracy without and with the chosen rule, out-of-scope
recall and precision at the chosen threshold, AUROC and FPR@95 for every detector
(``models.ood.METHODS``), and wall time. Results go to
``benchmarks/results/out_of_scope.{json,md}`` with the machine and the command.

    python benchmarks/out_of_scope.py [--data_dir ../shared/data/banking77] [--seeds 1 2 3]
        [--held_out 0.25] [--key value ...]

Any ``--key value`` not listed above is passed on to ``training.train_intent`` (for
example ``--num_train_epochs 3``); the table states every override.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import hardware, machine, spread, write_runs  # noqa: E402

OOS_LABEL = "__out_of_scope__"
TARGET_AUROC = 97.0
TARGET_RECALL = 80.0
TARGET_COST = 1.0


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict[str, str]], columns: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def draw_held_out(intents: list[str], share: float, seed: int) -> list[str]:
    """The intents left out of training in one draw (seeded, reproducible)."""
    count = max(1, round(share * len(intents)))
    return sorted(random.Random(seed).sample(sorted(intents), count))


def make_split(
    train: list[dict[str, str]],
    test: list[dict[str, str]],
    held_out: list[str],
    label_column: str,
    directory: Path,
) -> tuple[Path, Path]:
    """train.csv without the held-out intents; test.csv with them relabelled out of scope."""
    held = set(held_out)
    columns = list(train[0])
    kept_train = [row for row in train if row[label_column] not in held]
    relabelled_test = [
        {**row, label_column: OOS_LABEL} if row[label_column] in held else row for row in test
    ]
    return (
        write_rows(directory / "train.csv", kept_train, columns),
        write_rows(directory / "test.csv", relabelled_test, columns),
    )


def percent(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


def summarise(report: dict) -> dict:
    """The figures of one draw from a training report (percentages)."""
    metrics = report["metrics"]
    oos = metrics["out_of_scope"]
    chosen = oos["detectors"][oos["method"]]
    return {
        "method": oos["method"],
        "rule": oos["rule"],
        "in_scope_accuracy": percent(metrics["accuracy"]),
        "in_scope_accuracy_with_rule": percent(chosen["in_scope_accuracy_with_rule"]),
        "oos_recall": percent(chosen["oos_recall"]),
        "oos_precision": percent(chosen["oos_precision"]),
        "n_in_scope_test": metrics["n_examples"],
        "n_oos_test": oos["n_test_oos"],
        "detectors": {
            method: {
                "auroc": percent(row.get("auroc")),
                "fpr_at_95_tpr": percent(row.get("fpr_at_95_tpr")),
                "oos_recall": percent(row["oos_recall"]),
                "oos_precision": percent(row["oos_precision"]),
                "in_scope_accuracy_with_rule": percent(row["in_scope_accuracy_with_rule"]),
            }
            for method, row in oos["detectors"].items()
        },
    }


def aggregate(draws: list[dict]) -> dict:
    """Mean and sample standard deviation over the draws of every reported figure."""
    keys = ("in_scope_accuracy", "in_scope_accuracy_with_rule", "oos_recall", "oos_precision")
    summary = {key: spread([d[key] for d in draws]) for key in keys}
    summary["cost"] = spread(
        [d["in_scope_accuracy"] - d["in_scope_accuracy_with_rule"] for d in draws]
    )
    summary["wall_time_s"] = spread([d["wall_time_s"] for d in draws])
    summary["detectors"] = {
        method: {
            key: spread([d["detectors"][method][key] for d in draws])
            for key in draws[0]["detectors"][method]
        }
        for method in draws[0]["detectors"]
    }
    return summary


def _ms(figure: dict[str, float]) -> str:
    return f"{figure['mean']:.2f} ± {figure['std']:.2f}"


def render_markdown(results: dict) -> str:
    """The committed result table, one section per device kind measured."""
    lines = [
        "# Out-of-scope benchmark: BANKING77 with held-out intents",
        "",
        "Per draw (seed), a random 25% of the 77 intents is left out of training (their "
        "`train.csv` rows dropped); their `test.csv` messages are the out-of-scope set, the "
        "other test messages the in-scope set. Trained with "
        "`training/recipes/intent/banking77.yaml` through `training.train_intent` without any "
        "out-of-scope data: the detector and its threshold are chosen on in-scope validation "
        "messages only. Mean ± spread (sample standard deviation) over the draws; "
        "percentages.",
        "",
    ]
    for kind, run in sorted(results["runs"].items()):
        s = run["summary"]
        mach = run["machine"]
        lines += [
            f"## {kind} ({hardware(mach)})",
            "",
            f"- command (from the repository root): `{run['command']}`",
            f"- training overrides: `{' '.join(run['overrides']) or '(none: the recipe as is)'}`",
            f"- draws (seeds): {', '.join(str(d['seed']) for d in run['draws'])}; "
            f"{run['held_out_share'] * 100:g}% of intents held out per draw",
            f"- machine: {mach['cpu']}, {mach['cpu_count']} CPU cores "
            f"({mach['torch_threads']} torch threads), load average at start "
            f"{mach['load_average_at_start']}"
            + (f", GPU {mach['gpu']}" if mach.get("gpu") else "")
            + f"; Python {mach['python']}, torch {mach['torch']}, "
            f"transformers {mach['transformers']}",
            "",
            "### The rule in the bundle (chosen detector, chosen threshold)",
            "",
            "| draw | detector | in-scope accuracy | with the rule | cost | OOS recall | "
            "OOS precision | in-scope / OOS test messages | wall time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d in run["draws"]:
            lines.append(
                f"| seed {d['seed']} | {d['method']} | {d['in_scope_accuracy']:.2f} | "
                f"{d['in_scope_accuracy_with_rule']:.2f} | "
                f"{d['in_scope_accuracy'] - d['in_scope_accuracy_with_rule']:.2f} | "
                f"{d['oos_recall']:.2f} | {d['oos_precision']:.2f} | "
                f"{d['n_in_scope_test']} / {d['n_oos_test']} | {d['wall_time_s'] / 60:.1f} min |"
            )
        lines += [
            f"| **mean ± spread** | | {_ms(s['in_scope_accuracy'])} | "
            f"{_ms(s['in_scope_accuracy_with_rule'])} | {_ms(s['cost'])} | "
            f"{_ms(s['oos_recall'])} | {_ms(s['oos_precision'])} | | "
            f"{s['wall_time_s']['mean'] / 60:.1f} min |",
            "",
            "Threshold rule (no out-of-scope data): " + run["draws"][0]["rule"] + ".",
            "",
            "### Every detector (each with its threshold set by the same rule)",
            "",
            "| detector | AUROC | FPR@95 | OOS recall | OOS precision | in-scope accuracy with the rule |",
            "|---|---|---|---|---|---|",
        ]
        for method, row in s["detectors"].items():
            lines.append(
                f"| {method} | {_ms(row['auroc'])} | {_ms(row['fpr_at_95_tpr'])} | "
                f"{_ms(row['oos_recall'])} | {_ms(row['oos_precision'])} | "
                f"{_ms(row['in_scope_accuracy_with_rule'])} |"
            )
        lines += [
            "",
            "Per draw: "
            + "; ".join(
                f"seed {d['seed']}: "
                + ", ".join(
                    f"{m} AUROC {r['auroc']:.2f} / FPR@95 {r['fpr_at_95_tpr']:.2f}"
                    for m, r in d["detectors"].items()
                )
                for d in run["draws"]
            )
            + ".",
            "",
            f"Targets: AUROC ≥ {TARGET_AUROC:g} and out-of-scope recall ≥ {TARGET_RECALL:g}% "
            f"at a cost of at most {TARGET_COST:g} point of in-scope accuracy. FPR@95: share of "
            "in-scope messages flagged when 95% of the out-of-scope ones are caught. Wall time "
            "per draw covers data loading, training, calibration, detector fitting and "
            "evaluation.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_dir", default="../shared/data/banking77")
    parser.add_argument("--recipe", default="training/recipes/intent/banking77.yaml")
    parser.add_argument("--label_column", default="category")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--held_out", type=float, default=0.25, help="share of intents left out")
    parser.add_argument("--output_dir", default="runs/out_of_scope", help="per-draw runs")
    parser.add_argument("--results_dir", default="benchmarks/results")
    parser.add_argument(
        "--rows_per_intent",
        type=int,
        default=None,
        help="smoke tests only: keep this many train and test rows per intent",
    )
    args, overrides = parser.parse_known_args(argv)
    os.chdir(REPO)  # every default path is relative to the repository root
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # Idle OpenMP threads sleep instead of spinning (shared machines; see banking77.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not 0 < args.held_out < 1:
        print(f"error: --held_out must be in (0, 1), got {args.held_out}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir)
    for name in ("train.csv", "test.csv"):
        if not (data_dir / name).is_file():
            print(f"error: {data_dir / name} not found (set --data_dir)", file=sys.stderr)
            return 2

    from training.train_intent import train

    train_rows = read_rows(data_dir / "train.csv")
    test_rows = read_rows(data_dir / "test.csv")
    if args.rows_per_intent:
        train_rows, test_rows = (
            _first_per_intent(rows, args.label_column, args.rows_per_intent)
            for rows in (train_rows, test_rows)
        )
    intents = sorted({row[args.label_column] for row in train_rows})
    info = machine()
    draws = []
    for seed in args.seeds:
        held_out = draw_held_out(intents, args.held_out, seed)
        directory = Path(args.output_dir) / f"seed-{seed}"
        train_file, test_file = make_split(
            train_rows, test_rows, held_out, args.label_column, directory / "data"
        )
        started = time.perf_counter()
        result = train(
            [
                args.recipe,
                "--train_file", str(train_file),
                "--test_file", str(test_file),
                "--label_column", args.label_column,
                "--oos_label", OOS_LABEL,
                "--output_dir", str(directory),
                "--seed", str(seed),
                *overrides,
            ]
        )  # fmt: skip
        wall = time.perf_counter() - started
        draw = {
            "seed": seed,
            "held_out_intents": held_out,
            **summarise(result.report),
            "epochs": result.report["training"]["epochs"],
            "wall_time_s": round(wall, 1),
        }
        draws.append(draw)
        print(
            f"seed {seed}: {draw['method']} recall {draw['oos_recall']}, "
            f"accuracy {draw['in_scope_accuracy']} -> {draw['in_scope_accuracy_with_rule']}",
            flush=True,
        )

    import torch

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    run = {
        "draws": draws,
        "summary": aggregate(draws),
        "held_out_share": args.held_out,
        "machine": info,
        "command": shlex.join(
            ["python", "benchmarks/out_of_scope.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "recipe": args.recipe,
        "overrides": overrides,
        "rows_per_intent": args.rows_per_intent,
    }
    print(write_runs(args.results_dir, "out_of_scope", kind, run, render_markdown))
    return 0


def _first_per_intent(rows: list[dict[str, str]], column: str, count: int) -> list[dict[str, str]]:
    seen: dict[str, int] = {}
    kept = []
    for row in rows:
        if seen.get(row[column], 0) < count:
            seen[row[column]] = seen.get(row[column], 0) + 1
            kept.append(row)
    return kept


if __name__ == "__main__":
    sys.exit(main())
