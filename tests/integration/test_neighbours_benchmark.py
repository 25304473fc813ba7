"""benchmarks/neighbours.py on a real (tiny) training run: the vote with and without, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.neighbours import main
from training.train_intent import train

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_measures_the_vote_on_a_trained_run(tmp_path, tiny_backbone):
    demo = REPO / "training" / "demo"
    runs = tmp_path / "runs"
    train([str(REPO / "training/recipes/intent/demo.yaml"),
           "--train_file", str(demo / "intents.csv"), "--test_file", str(demo / "intents_test.csv"),
           "--backbone", str(tiny_backbone), "--max_length", "32", "--max_steps", "3",
           "--seed", "1", "--output_dir", str(runs / "seed-1")])  # fmt: skip
    results = tmp_path / "results"
    argv = [
        "--runs_dirs",
        str(runs),
        "--seeds",
        "1",
        "--rounds",
        "1",
        "--results_dir",
        str(results),
    ]
    assert main(argv) == 0
    (part,) = json.loads((results / "neighbours.json").read_text())["runs"]["cpu"][
        "recipes"
    ].values()
    (row,) = part["seeds"]
    # Three steps leave the classifier unsure: the vote is kept, chosen on validation.
    assert row["kept"] and row["validation_macro_f1"] > row["validation_macro_f1_without"]
    assert 0 < row["test_unsure_share"] <= 1
    assert row["throughput_without"] > 0 and row["throughput_with"] > 0
    # Fitted as training fits it: the same choice as a run trained with --neighbours.
    voted = train([str(REPO / "training/recipes/intent/demo.yaml"),
                   "--train_file", str(demo / "intents.csv"),
                   "--test_file", str(demo / "intents_test.csv"),
                   "--backbone", str(tiny_backbone), "--max_length", "32", "--max_steps", "3",
                   "--seed", "1", "--output_dir", str(tmp_path / "voted"),
                   "--neighbours", "true"])  # fmt: skip
    metrics = voted.report["metrics"]
    assert (row["weight"], row["gate"]) == (
        metrics["neighbours"]["weight"],
        metrics["neighbours"]["gate"],
    )
    assert row["test_accuracy_with"] == pytest.approx(metrics["accuracy"])
    assert row["test_unsure_share"] == pytest.approx(metrics["neighbours"]["unsure_share"]["test"])
    assert "| **mean ± spread** |" in (results / "neighbours.md").read_text()
