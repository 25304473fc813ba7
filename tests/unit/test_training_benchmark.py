"""The training throughput table of benchmarks/training.py: layouts by precision, speed-ups."""

from __future__ import annotations

import pytest

from benchmarks.training import layout, layout_name, render

pytestmark = pytest.mark.unit


def test_training_table_shows_each_layout_in_each_precision_and_the_speed_ups():
    layouts = {
        layout_name(processes, 2, precision): {
            "layout": layout(processes, 2),
            "precision": precision,
            "examples_per_s": rate,
            "examples_per_s_by_round": [rate, rate + 1],
            "global_step": 200,
            "train_time_s": 30.0,
        }
        for (processes, precision), rate in {
            (1, "fp32"): 70.0,
            (1, "bf16"): 100.0,
            (2, "fp32"): 80.0,
            (2, "bf16"): 90.0,
        }.items()
    }
    run = {
        "machine": {
            "cpu": "Some CPU",
            "cpu_count": 2,
            "torch_threads": 2,
            "torch": "2",
            "python": "3.11",
            "load_average_at_start": [0.1, 0.2, 0.3],
        },
        "command": "python benchmarks/training.py --steps 200",
        "steps": 200,
        "batch_per_process": 16,
        "rounds": 2,
        "note": "",
        "layouts": layouts,
        "speedups": {"bf16 / fp32, 1 process x 2 threads": 1.43},
    }
    markdown = render({"runs": {"cpu": run}})
    assert "| 1 process x 2 threads | bf16 | 100.0 | 100.0 / 101.0 | 200 | 30.0 |" in markdown
    assert "| 2 processes (torchrun, gloo) x 1 thread(s) | fp32 | 80.0 |" in markdown
    assert "| bf16 / fp32, 1 process x 2 threads | **1.43x** |" in markdown
