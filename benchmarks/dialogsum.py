"""DialogSum benchmark: k-fold cross-validation of the extractive summarizer against LEAD and the oracle.

Reads ``dev.jsonl`` by path (default ``../shared/data/dialogsum/dev.jsonl``, relative
to the repository root; nothing is copied into the repository), shuffles its 500
dialogues with a fixed seed and cuts them into ``--folds`` folds (5: 100 dialogues
each). For every fold, the other folds are the training data, of which a seeded
``--validation`` slice (50) is held out; ``training.train_summarizer`` trains on the
rest with ``training/recipes/summarizer/dialogsum.yaml``, early-stops and chooses the
bundle's summary selection on that validation slice; then the held-out fold is
summarized with the bundle's own selection (what the service does) and scored
(ROUGE-1/2/L F1 ×100, rouge-score with stemming, units written ``#PersonN#: text``)
next to LEAD-2, LEAD-3, the greedy 3-turn ROUGE oracle and the same model under the
plain 3-unit selection. Every dialogue is scored exactly once, as a test dialogue of
its fold. Each fold's result is written to ``<output_dir>/fold-<k>/result.json`` as
it completes, and a rerun resumes from the folds already done.
Writes ``benchmarks/results/dialogsum.{json,md}``, per device kind.

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

from benchmarks.common import hardware, machine, spread, write_runs  # noqa: E402

# Measured on the whole dev.jsonl (shared data README): LEAD-3 and a 3-turn greedy oracle.
REFERENCE = {"lead3": (28.4, 7.8, 21.5), "oracle": (43.9, 19.2, 35.5)}
TARGET_GAIN = 5.0


def fold_splits(count: int, folds: int, validation: int, seed: int) -> list[dict[str, list[int]]]:
    """Per fold, row indices of train / validation / test: a seeded shuffle cut into
    ``folds`` consecutive test folds; the first ``validation`` of the remaining rows (in
    shuffled order) are that fold's validation slice. Every row is in exactly one test fold."""
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    bounds = [round(k * count / folds) for k in range(folds + 1)]
    splits = []
    for k in range(folds):
        test = order[bounds[k] : bounds[k + 1]]
        rest = order[: bounds[k]] + order[bounds[k + 1] :]
        if not 0 < validation < len(rest) - 1:
            raise ValueError(f"validation slice {validation} does not fit {len(rest)} rows")
        splits.append({"train": rest[validation:], "validation": rest[:validation], "test": test})
    return splits


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


def describe_selection(selection: dict) -> str:
    """A bundle's selection in a few words."""
    words = (
        f", word budget {selection['length_scale']}× ({selection['length_slope']}·words "
        f"+ {selection['length_intercept']})"
        if selection.get("length_slope") is not None
        else ""
    )
    mmr = f", redundancy {selection['redundancy']}" if selection.get("redundancy") else ""
    return f"≤{selection.get('max_units', 3)} units{words}{mmr}"


SYSTEMS = (
    ("model", "model, selection chosen on validation (the bundle's)"),
    ("model_plain", "same model, plain 3-unit selection"),
    ("lead2", "LEAD-2"),
    ("lead3", "LEAD-3"),
    ("oracle", "greedy oracle (up to 3 turns)"),
)


def render_markdown(results: dict) -> str:
    """The committed result table, one section per device kind measured."""
    lines = [
        "# DialogSum benchmark: attention-pooling extractive summarizer (MiniLM-L6), cross-validated",
        "",
        "`../shared/data/dialogsum/dev.jsonl` (500 dialogues, one human summary each) shuffled "
        "with a fixed seed and cut into folds; for each fold the model is trained on the other "
        "folds (less a validation slice used for early stopping and for choosing the summary "
        "selection, which the bundle records and the service uses) and scores its held-out fold, "
        "so every dialogue is a test dialogue exactly once. ROUGE F1 ×100 (rouge-score, stemming "
        "on); every unit of a summary is written `#PersonN#: text`. LEAD-k and the oracle pick "
        "whole turns; the model picks the units it was trained on (sentences within turns).",
        "",
    ]
    for kind, run in results["runs"].items():
        mach = run["machine"]
        folds = run["folds"]
        lines += [
            f"## {kind} ({hardware(mach)})",
            "",
            f"{len(folds)} folds of {'/'.join(str(f['test_size']) for f in folds)} test "
            f"dialogues (shuffle seed {run['split_seed']}); per fold "
            f"{folds[0]['train_size']} training and {folds[0]['validation_size']} validation "
            "dialogues.",
            "",
            "| system (held-out folds; mean ± std over folds) | ROUGE-1 | ROUGE-2 | ROUGE-L |",
            "|---|---:|---:|---:|",
        ]
        for key, name in SYSTEMS:
            m = run["summary"][key]
            lines.append(
                f"| {name} | "
                + " | ".join(f"{m[r]['mean']:.2f} ± {m[r]['std']:.2f}" for r in ROUGE_KEYS)
                + " |"
            )
        gain = run["summary"]["gain_over_lead3"]
        met = gain["mean"] >= TARGET_GAIN
        lines += [
            "",
            f"- ROUGE-1 gain over LEAD-3: **{gain['mean']:+.2f} ± {gain['std']:.2f}** points "
            f"(mean ± std over folds; per fold {', '.join(f'{g:+.2f}' for g in run['gains'])}; "
            f"target: +{TARGET_GAIN:.0f}; " + ("met" if met else "**not met**") + ").",
            f"- the plain 3-unit selection of the same models: "
            f"{run['summary']['plain_gain_over_lead3']['mean']:+.2f} ± "
            f"{run['summary']['plain_gain_over_lead3']['std']:.2f} over LEAD-3.",
            "- selection chosen on each fold's validation slice: "
            + "; ".join(
                f"fold {f['fold']}: {describe_selection(f['selection'])} "
                f"(validation ROUGE-1 {f['validation_rouge1']:.2f}, plain "
                f"{f['validation_plain_rouge1']:.2f})"
                for f in folds
            )
            + ".",
            f"- units: {run['training'].get('units', 'turns')}; training: "
            f"{describe_training(run['training'])}.",
            f"- training time: {run['train_time_s']['mean']:.0f} s per fold on average "
            f"({run['train_time_s']['min']:.0f}–{run['train_time_s']['max']:.0f} s); whole run "
            f"{run['wall_time_s'] / 60:.0f} min summed over folds; inference {run['summaries_per_s']:.1f} "
            f"summaries/s (batches of {run['inference_batch_size']}, segmentation and selection "
            "included).",
            f"- whole file, same code: LEAD-3 {'/'.join(str(v) for v in run['whole_file']['lead3'].values())}, "
            f"oracle {'/'.join(str(v) for v in run['whole_file']['oracle'].values())} "
            f"(data README: {'/'.join(map(str, REFERENCE['lead3']))} and "
            f"{'/'.join(map(str, REFERENCE['oracle']))}).",
            f"- machine: {mach['cpu']}, {mach['cpu_count']} CPU cores available "
            f"({mach['torch_threads']} torch threads), torch {mach['torch']}, "
            f"transformers {mach['transformers']}, Python {mach['python']}; "
            f"{run.get('note', 'the machine was shared with other jobs, so times are indicative')}.",
            f"- command (from the repository root): `{run['command']}`",
            "",
        ]
    return "\n".join(lines)


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def run_fold(args, overrides, rows, split, fold, files_dir) -> dict:
    """Train on the fold's training rows, score its test rows; returns the fold's result."""
    from datasets import Dataset

    from models.bundle import load_bundle
    from models.summary_predictor import Selection, SummarizerPredictor
    from training.summarization_data import label_units, lead_summaries, oracle_summaries, rouge_f1
    from training.train_summarizer import train

    files = {}
    for name, indices in split.items():
        files[name] = Path(files_dir) / f"fold-{fold}-{name}.jsonl"
        files[name].write_text("".join(json.dumps(rows[i]) + "\n" for i in indices))
    result = train(
        [
            args.recipe,
            "--train_file", str(files["train"]),
            "--validation_file", str(files["validation"]),
            "--test_file", str(files["test"]),
            "--output_dir", f"{args.output_dir}/fold-{fold}",
            *overrides,
        ]
    )  # fmt: skip
    predictor = SummarizerPredictor(load_bundle(result.bundle))
    texts = [rows[i]["dialogue"] for i in split["test"]]
    references = [rows[i]["summary"] for i in split["test"]]
    started = time.perf_counter()
    outputs = []
    for i in range(0, len(texts), args.inference_batch_size):
        outputs += predictor.summarize(texts[i : i + args.inference_batch_size])
    inference_s = time.perf_counter() - started
    plain = []
    for output in outputs:
        units = [s for s in output.sentences]
        chosen = predictor.select(
            [_unit(u) for u in units],
            [u["score"] for u in units],
            max_sentences=3,
            selection=Selection(),
        )
        plain.append(join_units([_unit(units[i]) for i in chosen]))
    labelled = label_units(
        Dataset.from_dict({"text": texts, "summary": references, "labels": [None] * len(texts)}),
        max_units=3,
    )[0]
    validation = result.report["metrics"]["validation_selections"]
    chosen = result.report["metrics"]["selection"]
    return {
        "fold": fold,
        "train_size": len(split["train"]),
        "validation_size": len(split["validation"]),
        "test_size": len(split["test"]),
        "selection": chosen,
        "validation_rouge1": next(v["rouge1"] for v in validation if v["selection"] == chosen)
        if validation
        else None,
        "validation_plain_rouge1": validation[0]["rouge1"] if validation else None,
        "validation_selections": validation,
        "test": {
            "model": rouge_f1([o.summary for o in outputs], references),
            "model_plain": rouge_f1(plain, references),
            "lead2": rouge_f1(lead_summaries(labelled, 2), references),
            "lead3": rouge_f1(lead_summaries(labelled, 3), references),
            "oracle": rouge_f1(oracle_summaries(labelled, 3), references),
        },
        "train_time_s": result.train_time_s,
        "epochs": result.report["training"]["epochs"],
        "summaries_per_s": len(texts) / inference_s,
        "training": {
            key: result.report["training"].get(key)
            for key in (
                "units",
                "oracle_units",
                "targets",
                "loss",
                "position_features",
                "frozen_encoder_layers",
                "seed",
            )
        },
    }


def _unit(sentence: dict):
    from models.segmentation import Unit

    return Unit(sentence["text"], sentence["start"], sentence["end"], sentence["speaker"])


def join_units(units):
    from models.summary_predictor import join_units as join

    return join(units)


def drop_single_split_runs(path: Path) -> None:
    """Remove runs of the earlier single-split benchmark (no ``folds``) from the results file:
    their figures are not comparable and the table cannot render them."""
    if not path.is_file():
        return
    from models.files import atomic_write_text

    results = json.loads(path.read_text())
    kept = {kind: run for kind, run in results.get("runs", {}).items() if "folds" in run}
    if kept != results.get("runs"):
        atomic_write_text(path, json.dumps({**results, "runs": kept}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/dialogsum/dev.jsonl")
    parser.add_argument("--recipe", default="training/recipes/summarizer/dialogsum.yaml")
    parser.add_argument("--output_dir", default="runs/dialogsum-cv")
    parser.add_argument("--results_dir", default="benchmarks/results")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--validation", type=int, default=50, help="validation rows per fold")
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--inference_batch_size", type=int, default=16)
    parser.add_argument("--only_folds", type=int, nargs="+", help="run these folds, no table")
    args, overrides = parser.parse_known_args(argv)

    from datasets import Dataset

    from models.files import atomic_write_text
    from training.summarization_data import label_units, lead_summaries, oracle_summaries, rouge_f1

    data = Path(args.data)
    if not data.is_file():
        print(f"error: {data} not found (set --data)", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    try:
        splits = fold_splits(len(rows), args.folds, args.validation, args.split_seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folds = []
    with tempfile.TemporaryDirectory(prefix="dialogsum-folds-") as tmp:
        for fold, split in enumerate(splits):
            if args.only_folds is not None and fold not in args.only_folds:
                continue
            done = Path(args.output_dir) / f"fold-{fold}" / "result.json"
            if done.is_file():
                folds.append(json.loads(done.read_text()))
                print(f"fold {fold}: done earlier ({done})", flush=True)
                continue
            fold_started = time.perf_counter()
            folds.append(run_fold(args, overrides, rows, split, fold, tmp))
            folds[-1]["wall_time_s"] = round(time.perf_counter() - fold_started, 1)
            atomic_write_text(done, json.dumps(folds[-1], indent=2) + "\n")
            test = folds[-1]["test"]
            print(
                f"fold {fold}: model {test['model']}, plain {test['model_plain']}, "
                f"LEAD-3 {test['lead3']}",
                flush=True,
            )
    if args.only_folds is not None:
        return 0

    import torch

    started = time.perf_counter()
    whole = label_units(
        Dataset.from_dict(
            {
                "text": [r["dialogue"] for r in rows],
                "summary": [r["summary"] for r in rows],
                "labels": [None] * len(rows),
            }
        ),
        max_units=3,
    )[0]
    gains = [f["test"]["model"]["rouge1"] - f["test"]["lead3"]["rouge1"] for f in folds]
    plain_gains = [f["test"]["model_plain"]["rouge1"] - f["test"]["lead3"]["rouge1"] for f in folds]
    run = {
        "split_seed": args.split_seed,
        "folds": folds,
        "gains": [round(g, 2) for g in gains],
        "summary": {
            **{
                key: {r: spread([f["test"][key][r] for f in folds]) for r in ROUGE_KEYS}
                for key, _ in SYSTEMS
            },
            "gain_over_lead3": spread(gains),
            "plain_gain_over_lead3": spread(plain_gains),
        },
        "whole_file": {
            "lead3": rouge_f1(lead_summaries(whole, 3), whole["summary"]),
            "oracle": rouge_f1(oracle_summaries(whole, 3), whole["summary"]),
        },
        "train_time_s": spread([f["train_time_s"] for f in folds]),
        # Summed over folds, so a resumed run reports the time of the whole measurement.
        "wall_time_s": sum(f["wall_time_s"] for f in folds) + time.perf_counter() - started,
        "summaries_per_s": statistics.mean(f["summaries_per_s"] for f in folds),
        "inference_batch_size": args.inference_batch_size,
        "machine": machine(),
        "command": shlex.join(
            ["python", "benchmarks/dialogsum.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "recipe": args.recipe,
        "overrides": overrides,
        "training": folds[0]["training"],
    }
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    drop_single_split_runs(Path(args.results_dir) / "dialogsum.json")
    print(write_runs(args.results_dir, "dialogsum", kind, run, render_markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
