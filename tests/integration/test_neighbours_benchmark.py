"""benchmarks/neighbours.py on a real (tiny) training run: the vote with and without, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.neighbours import main
from training.train_intent import train

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _train(tiny_backbone, output_dir: Path, *extra: str):
    demo = REPO / "training" / "demo"
    return train([str(REPO / "training/recipes/intent/demo.yaml"),
                  "--train_file", str(demo / "intents.csv"),
                  "--test_file", str(demo / "intents_test.csv"),
                  "--backbone", str(tiny_backbone), "--max_length", "32", "--max_steps", "3",
                  "--seed", "1", "--output_dir", str(output_dir), *extra])  # fmt: skip


def _row(runs: Path, results: Path, *extra: str) -> dict:
    argv = ["--runs_dirs", str(runs), "--seeds", "1", "--rounds", "1", "--results_dir"]
    assert main([*argv, str(results), *extra]) == 0
    (part,) = json.loads((results / "neighbours.json").read_text())["runs"]["cpu"][
        "recipes"
    ].values()
    (row,) = part["seeds"]
    return row


def test_benchmark_measures_the_vote_on_a_trained_run(tmp_path, tiny_backbone):
    _train(tiny_backbone, tmp_path / "runs" / "seed-1")
    row = _row(tmp_path / "runs", tmp_path / "results")
    # Three steps leave the classifier unsure: the vote is kept, chosen on validation.
    assert row["kept"] and row["validation_macro_f1"] > row["validation_macro_f1_without"]
    assert 0 < row["test_unsure_share"] <= 1
    assert row["throughput_without"] > 0 and row["throughput_with"] > 0
    # The ONNX Runtime backends, the vote's encoder exported beside the classifier: fp32
    # serves what PyTorch serves.
    assert set(row["backends"]) == {"onnx-fp32", "onnx-int8"}
    fp32 = row["backends"]["onnx-fp32"]
    for key in ("test_accuracy_without", "test_accuracy_with", "test_unsure_share"):
        assert fp32[key] == pytest.approx(row[key])
    assert all(f["throughput_with"] > 0 for f in row["backends"].values())
    assert "| **mean ± spread** | onnx-int8 |" in (tmp_path / "results/neighbours.md").read_text()
    # Fitted as training fits it: the same choice as a run trained with --neighbours.
    voted = _train(tiny_backbone, tmp_path / "voted" / "seed-1", "--neighbours", "true")
    metrics = voted.report["metrics"]
    assert (row["weight"], row["gate"]) == (
        metrics["neighbours"]["weight"],
        metrics["neighbours"]["gate"],
    )
    assert row["test_accuracy_with"] == pytest.approx(metrics["accuracy"])
    assert row["test_unsure_share"] == pytest.approx(metrics["neighbours"]["unsure_share"]["test"])
    assert "| **mean ± spread** |" in (tmp_path / "results" / "neighbours.md").read_text()
    # The run trained with the vote measures the same: its vote is set aside, so that
    # "without" is the classifier alone, and fitted again.
    again = _row(tmp_path / "voted", tmp_path / "results-voted", "--backends")
    assert "backends" not in again
    for key in ("weight", "gate", "test_accuracy_without", "test_accuracy_with"):
        assert again[key] == pytest.approx(row[key]), key
