"""DialogSum benchmark: train the extractive summarizer and compare it with LEAD and the oracle.

Reads ``dev.jsonl`` by path (default ``../shared/data/dialogsum/dev.jsonl``, relative
to the repository root; nothing is copied into the repository) and splits its 500
dialogues with a fixed seed into train / validation / test (350 / 50 / 100 by
default). The split files go to a temporary directory outside the repository and are
fed to ``training.train_summarizer`` with ``training/recipes/summarizer/dialogsum.yaml``.

The summary budget (units per summary, or a ratio of the dialogue's units) is chosen
on the validation split; then, in the same run, the test split is scored (ROUGE-1/2/L
F1 ×100, rouge-score with stemming, turns written ``#PersonN#: text``) for the model,
LEAD-2, LEAD-3 and the greedy 3-turn ROUGE oracle, with training time and inference
throughput. Writes ``benchmarks/results/dialogsum.{json,md}``, per device kind.

    python benchmarks/dialogsum.py [--data ../shared/data/dialogsum/dev.jsonl] [--key value ...]

Any ``--key value`` not listed below is passed on to ``training.train_summarizer``.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import hardware, machine, write_runs  # noqa: E402

# Measured on the whole dev.jsonl (shared data README): LEAD-3 and a 3-turn greedy oracle.
REFERENCE = {"lead3": (28.4, 7.8, 21.5), "oracle": (43.9, 19.2, 35.5)}
TARGET_GAIN = 4.0
BUDGETS = [{"max_sentences": k} for k in (1, 2, 3, 4, 5, 6)] + [
    {"ratio": r} for r in (0.2, 0.3, 0.4)
]


def split_rows(rows: list[dict], sizes: tuple[int, int, int], seed: int) -> dict[str, list[dict]]:
    """Seeded shuffle, then consecutive train / validation / test slices."""
    if sum(sizes) > len(rows):
        raise ValueError(
            f"split sizes {sizes} need {sum(sizes)} dialogues, the file has {len(rows)}"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    train, validation, test = sizes
    return {
        "train": [rows[i] for i in order[:train]],
        "validation": [rows[i] for i in order[train : train + validation]],
        "test": [rows[i] for i in order[train + validation : train + validation + test]],
    }


def budget_name(budget: dict) -> str:
    return (
        f"{budget['max_sentences']} unit{'s' if budget['max_sentences'] != 1 else ''}"
        if "max_sentences" in budget
        else f"ratio {budget['ratio']}"
    )


def score_budgets(predictor, texts: list[str], references: list[str]) -> list[dict]:
    """ROUGE of the model's summaries under every budget (one scoring pass, many selections)."""
    from models.summary_predictor import budget_size, join_units, select_units
    from training.summarization_data import rouge_f1

    results = predictor.summarize(texts, max_sentences=1)
    segmented = predictor.segment(texts)  # once, not once per budget
    rows = []
    for budget in BUDGETS:
        summaries = []
        for units, result in zip(segmented, results, strict=True):
            scores = result.explanations["unit_scores"]
            size = budget_size(len(units), budget.get("max_sentences", 3), budget.get("ratio"))
            chosen = select_units(scores, [u.text for u in units], size)
            summaries.append(join_units([units[i] for i in chosen]))
        rows.append({"budget": budget, **rouge_f1(summaries, references)})
    return rows


def describe_training(training: dict) -> str:
    """One line on how the model was trained, from the run's report."""
    targets = {
        "oracle": f"0/1 labels from a greedy ROUGE oracle of up to "
        f"{training.get('oracle_units', 3)} units",
        "rouge": "each unit's own ROUGE against the reference",
    }
    frozen = training.get("frozen_encoder_layers", 0)
    parts = [
        f"{training.get('loss', 'bce')} loss on {targets.get(training.get('targets', 'oracle'))}"
    ]
    if training.get("position_features"):
        parts.append("relative-position features")
    if frozen:
        parts.append(f"embeddings and lowest {frozen} encoder layers frozen")
    return ", ".join(parts)


def render_markdown(results: dict) -> str:
    """The committed result table, one section per device kind measured."""
    lines = [
        "# DialogSum benchmark: attention-pooling extractive summarizer (MiniLM-L6)",
        "",
        "`../shared/data/dialogsum/dev.jsonl` (500 dialogues, one human summary each) split "
        "with a fixed seed into train / validation / test; the model is trained on train, "
        "early-stopped and its summary budget chosen on validation, and every row below is "
        "scored on the test split in the same run. ROUGE F1 ×100 (rouge-score, stemming on); "
        "every unit of a summary is written `#PersonN#: text`. LEAD-k and the oracle pick whole "
        "turns; the model picks the units it was trained on (turns, or sentences within turns).",
        "",
    ]
    for kind, run in results["runs"].items():
        mach = run["machine"]
        device = hardware(mach)
        split = run["split"]
        lines += [
            f"## {kind} ({device})",
            "",
            f"Split (seed {split['seed']}): {split['train']} train / {split['validation']} "
            f"validation / {split['test']} test dialogues.",
            "",
            "| system (test split) | ROUGE-1 | ROUGE-2 | ROUGE-L |",
            "|---|---:|---:|---:|",
        ]
        seeds = run.get("seeds", [])
        model_row = (
            f"model (mean of {len(seeds)} training seeds, budget chosen on validation)"
            if len(seeds) > 1
            else f"model ({budget_name(run['budget'])}, chosen on validation)"
        )
        for name, key in (
            (model_row, "model"),
            ("LEAD-2", "lead2"),
            ("LEAD-3", "lead3"),
            ("greedy oracle (up to 3 turns)", "oracle"),
        ):
            m = run["test"][key]
            lines.append(f"| {name} | {m['rouge1']:.2f} | {m['rouge2']:.2f} | {m['rougeL']:.2f} |")
        gain = run["test"]["model"]["rouge1"] - run["test"]["lead3"]["rouge1"]
        lines += [
            "",
            f"- ROUGE-1 gain over LEAD-3: **{gain:+.2f}** points (target: +{TARGET_GAIN:.0f}; "
            + ("met" if gain >= TARGET_GAIN else "**not met**")
            + ").",
            *(
                [
                    "- model by training seed (test ROUGE-1/2/L, budget chosen on validation): "
                    + "; ".join(
                        f"seed {r['seed']}: {r['test']['rouge1']:.2f}/{r['test']['rouge2']:.2f}/"
                        f"{r['test']['rougeL']:.2f} ({budget_name(r['budget'])})"
                        for r in seeds
                    )
                    + "."
                ]
                if len(seeds) > 1
                else []
            ),
            f"- units: {run.get('training', {}).get('units', 'turns')}; training: "
            f"{describe_training(run.get('training', {}))}.",
            f"- training time{' (mean per seed)' if len(seeds) > 1 else ''}: {run['train_time_s']:.0f} s ({run['epochs']} epochs, "
            f"{run['global_step']} steps); inference: {run['summaries_per_s']:.1f} summaries/s "
            f"(batches of {run['inference_batch_size']}, {run['test_size']} test dialogues, "
            "segmentation and selection included).",
            "- validation ROUGE by budget (model"
            + (f", seed {seeds[0]['seed']}" if len(seeds) > 1 else "")
            + "): "
            + ", ".join(
                f"{budget_name(r['budget'])} {r['rouge1']:.1f}/{r['rouge2']:.1f}/{r['rougeL']:.1f}"
                for r in run["validation_budgets"]
            )
            + ".",
            f"- whole file, same code: LEAD-3 {'/'.join(str(v) for v in run['whole_file']['lead3'].values())}, "
            f"oracle {'/'.join(str(v) for v in run['whole_file']['oracle'].values())} "
            f"(data README: {'/'.join(map(str, REFERENCE['lead3']))} and "
            f"{'/'.join(map(str, REFERENCE['oracle']))}).",
            f"- machine: {mach['cpu']}, {mach['cpu_count']} CPU cores available "
            f"({mach['torch_threads']} torch threads), torch {mach['torch']}, "
            f"transformers {mach['transformers']}, Python {mach['python']}; the machine was "
            "shared with other jobs, so times are indicative.",
            f"- command (from the repository root): `{run['command']}`",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/dialogsum/dev.jsonl")
    parser.add_argument("--recipe", default="training/recipes/summarizer/dialogsum.yaml")
    parser.add_argument("--output_dir", default="runs/dialogsum")
    parser.add_argument("--results_dir", default="benchmarks/results")
    parser.add_argument("--split", default="350,50,100", help="train,validation,test sizes")
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--inference_batch_size", type=int, default=16)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="train one model per seed and report the mean (default: the recipe's seed)",
    )
    args, overrides = parser.parse_known_args(argv)

    from datasets import Dataset

    from models.bundle import load_bundle
    from models.summary_predictor import SummarizerPredictor
    from training.summarization_data import label_units, lead_summaries, oracle_summaries, rouge_f1
    from training.train_summarizer import train

    data = Path(args.data)
    if not data.is_file():
        print(f"error: {data} not found (set --data)", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    sizes = tuple(int(x) for x in args.split.split(","))
    splits = split_rows(rows, sizes, args.split_seed)

    text_column = "dialogue"
    test_texts = [r[text_column] for r in splits["test"]]
    test_refs = [r["summary"] for r in splits["test"]]
    seed_runs = []
    with tempfile.TemporaryDirectory(prefix="dialogsum-split-") as tmp:
        files = {}
        for name, part in splits.items():
            files[name] = Path(tmp) / f"{name}.jsonl"
            files[name].write_text("".join(json.dumps(r) + "\n" for r in part))
        for seed in args.seeds or [None]:
            output_dir = args.output_dir if seed is None else f"{args.output_dir}/seed-{seed}"
            result = train(
                [
                    args.recipe,
                    "--train_file", str(files["train"]),
                    "--validation_file", str(files["validation"]),
                    "--test_file", str(files["test"]),
                    "--output_dir", output_dir,
                    *overrides,
                    *(["--seed", str(seed)] if seed is not None else []),
                ]
            )  # fmt: skip
            predictor = SummarizerPredictor(load_bundle(result.bundle))
            validation_budgets = score_budgets(
                predictor,
                [r[text_column] for r in splits["validation"]],
                [r["summary"] for r in splits["validation"]],
            )
            best = max(validation_budgets, key=lambda r: (r["rouge1"], r["rouge2"]))["budget"]
            started = time.perf_counter()
            summaries = []
            for i in range(0, len(test_texts), args.inference_batch_size):
                batch = test_texts[i : i + args.inference_batch_size]
                summaries += [r.summary for r in predictor.summarize(batch, **best)]
            inference_s = time.perf_counter() - started
            seed_runs.append(
                {
                    "seed": result.report["training"].get("seed", seed),
                    "budget": best,
                    "validation_budgets": validation_budgets,
                    "test": rouge_f1(summaries, test_refs),
                    "train_time_s": result.train_time_s,
                    "epochs": result.report["training"]["epochs"],
                    "global_step": result.report["training"]["global_step"],
                    "summaries_per_s": len(test_texts) / inference_s,
                }
            )
            print(f"seed {seed}: {seed_runs[-1]['test']} ({budget_name(best)})", flush=True)

    import torch

    def labelled(part: list[dict]) -> Dataset:
        dataset = Dataset.from_dict(
            {
                "text": [r[text_column] for r in part],
                "summary": [r["summary"] for r in part],
                "labels": [None] * len(part),
            }
        )
        return label_units(dataset, max_units=3)[0]

    test_labelled = labelled(splits["test"])
    whole = labelled(rows)
    first = seed_runs[0]
    run = {
        "split": {"seed": args.split_seed, **{k: len(v) for k, v in splits.items()}},
        "budget": first["budget"],
        "validation_budgets": first["validation_budgets"],
        "seeds": seed_runs,
        "test": {
            # The mean over the training seeds (one seed: that run).
            "model": {
                key: round(statistics.mean(r["test"][key] for r in seed_runs), 2)
                for key in first["test"]
            },
            "lead2": rouge_f1(lead_summaries(test_labelled, 2), test_labelled["summary"]),
            "lead3": rouge_f1(lead_summaries(test_labelled, 3), test_labelled["summary"]),
            "oracle": rouge_f1(oracle_summaries(test_labelled, 3), test_labelled["summary"]),
        },
        "whole_file": {
            "lead3": rouge_f1(lead_summaries(whole, 3), whole["summary"]),
            "oracle": rouge_f1(oracle_summaries(whole, 3), whole["summary"]),
        },
        "train_time_s": statistics.mean(r["train_time_s"] for r in seed_runs),
        "epochs": first["epochs"],
        "global_step": first["global_step"],
        "summaries_per_s": statistics.mean(r["summaries_per_s"] for r in seed_runs),
        "inference_batch_size": args.inference_batch_size,
        "test_size": len(test_texts),
        "machine": machine(),
        "command": shlex.join(
            ["python", "benchmarks/dialogsum.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "recipe": args.recipe,
        "overrides": overrides,
        "training": {
            key: result.report["training"].get(key)
            for key in (
                "units",
                "oracle_units",
                "targets",
                "loss",
                "position_features",
                "frozen_encoder_layers",
            )
        },
    }
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    print(write_runs(args.results_dir, "dialogsum", kind, run, render_markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
