"""The BANKING77 result table of benchmarks/banking77.py: seeds, their mean and spread."""

from __future__ import annotations

import pytest

from benchmarks.banking77 import DEFAULT_RECIPE, SUMMARY, render_markdown, run_key
from benchmarks.common import spread

pytestmark = pytest.mark.unit

MACHINE = {
    "cpu": "Some CPU",
    "cpu_count": 2,
    "torch_threads": 2,
    "torch": "2",
    "transformers": "5",
    "python": "3.11",
    "load_average_at_start": [0.1, 0.2, 0.3],
}


def seed(number: int, accuracy: float) -> dict:
    metrics = dict.fromkeys(SUMMARY, 1.0)
    metrics.update(accuracy=accuracy, oos_threshold=0.5, oos_rejected_rate=3.0)
    return {
        "seed": number,
        "metrics": metrics,
        "epochs": 6.0,
        "precision": "bf16",
        "validation": {"metric": "macro_f1", "value": accuracy + 1},
    }


def test_banking77_table_lists_every_seed_and_their_mean_and_spread():
    seeds = [seed(1, 93.0), seed(2, 94.0), seed(3, 95.0)]
    run = {
        "seeds": seeds,
        "summary": {k: spread([s["metrics"][k] for s in seeds]) for k in SUMMARY},
        "machine": MACHINE,
        "command": "python benchmarks/banking77.py",
        "recipe": "r.yaml",
        "overrides": [],
    }
    markdown = render_markdown({"runs": {"cpu": run}})
    rows = [line for line in markdown.splitlines() if line.startswith("| cpu (2 CPU cores)")]
    assert [row.split(" | ")[2] for row in rows] == ["1", "2", "3", "mean ± spread"]
    assert "**94.00 ± 1.00**" in rows[-1]
    assert "| 96.00 (macro-f1) |" in rows[2] and "| 95.00 |" in rows[-1]
    assert "load average at start [0.1, 0.2, 0.3]" in markdown
    assert "- training precision: bf16 autocast" in markdown


def test_banking77_table_still_renders_a_single_run_stored_before_seeds():
    old = {
        "metrics": {**dict.fromkeys(SUMMARY, 2.0), "oos_threshold": 0.5, "oos_rejected_rate": 3.0},
        "wall_time_s": 600.0,
        "epochs": 6.0,
        "machine": {**MACHINE, "gpu": "A GPU"},
        "command": "python benchmarks/banking77.py",
        "recipe": "r.yaml",
        "overrides": [],
    }
    markdown = render_markdown({"runs": {"cuda": old}})
    (row,) = [line for line in markdown.splitlines() if line.startswith("| cuda (A GPU)")]
    assert "| 42 | 2.00 |" in row and "10.0 min" in row
    assert "- training precision: not recorded" in markdown


def test_banking77_keeps_a_recipe_tried_beside_the_default_run():
    assert run_key("cpu", DEFAULT_RECIPE) == "cpu"
    assert run_key("cpu", "training/recipes/intent/fast.yaml") == "cpu/fast"
    runs = {}
    for recipe, accuracy in ((DEFAULT_RECIPE, 93.0), ("training/recipes/intent/fast.yaml", 95.0)):
        seeds = [seed(1, accuracy), seed(2, accuracy)]
        runs[run_key("cpu", recipe)] = {
            "seeds": seeds,
            "summary": {k: spread([s["metrics"][k] for s in seeds]) for k in SUMMARY},
            "machine": MACHINE,
            "command": "python benchmarks/banking77.py",
            "recipe": recipe,
            "overrides": [],
        }
    markdown = render_markdown({"runs": runs})
    means = [line for line in markdown.splitlines() if "| mean ± spread |" in line]
    assert len(means) == 2
    assert "`banking77.yaml`" in means[0] and "**93.00 ± 0.00**" in means[0]
    assert "`fast.yaml`" in means[1] and "**95.00 ± 0.00**" in means[1]
    assert "## cpu/fast run" in markdown
