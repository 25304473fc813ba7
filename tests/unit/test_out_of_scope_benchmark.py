"""The held-out-intent protocol of benchmarks/out_of_scope.py: what is left out, and where."""

from __future__ import annotations

import csv

import pytest

from benchmarks.out_of_scope import OOS_LABEL, aggregate, draw_held_out, make_split

pytestmark = pytest.mark.unit


def test_draws_leave_out_a_quarter_of_the_intents_reproducibly():
    intents = [f"intent_{i}" for i in range(77)]
    first = draw_held_out(intents, 0.25, seed=1)
    assert len(first) == 19 and set(first) <= set(intents)
    assert draw_held_out(intents, 0.25, seed=1) == first
    assert draw_held_out(intents, 0.25, seed=2) != first


def test_held_out_intents_leave_training_and_become_the_out_of_scope_test_set(tmp_path):
    train = [{"text": f"t{i}", "category": c} for i, c in enumerate("aabbcc")]
    test = [{"text": f"q{i}", "category": c} for i, c in enumerate("abc")]
    train_file, test_file = make_split(train, test, ["b"], "category", tmp_path)
    with open(train_file, newline="") as handle:
        assert [row["category"] for row in csv.DictReader(handle)] == ["a", "a", "c", "c"]
    with open(test_file, newline="") as handle:
        assert [row["category"] for row in csv.DictReader(handle)] == ["a", OOS_LABEL, "c"]


def test_aggregate_reports_mean_and_sample_spread():
    draws = [
        {
            "in_scope_accuracy": acc,
            "in_scope_accuracy_with_rule": acc - 1,
            "oos_recall": 80.0,
            "oos_precision": 90.0,
            "wall_time_s": 60.0,
            "detectors": {"knn": {"auroc": auroc}},
        }
        for acc, auroc in ((92.0, 96.0), (94.0, 98.0))
    ]
    summary = aggregate(draws)
    assert summary["in_scope_accuracy"] == {"mean": 93.0, "std": 1.41, "min": 92.0, "max": 94.0}
    assert summary["cost"] == {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0}
    assert summary["detectors"]["knn"]["auroc"] == {
        "mean": 97.0,
        "std": 1.41,
        "min": 96.0,
        "max": 98.0,
    }
