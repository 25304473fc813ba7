"""The serving benchmark's own models build and answer with the current model code."""

from __future__ import annotations

import pytest

from benchmarks.serving import intent_pipeline, random_bundle

pytestmark = pytest.mark.integration


def test_serving_benchmark_baseline_pipeline_answers_from_an_untrained_bundle(tmp_path):
    bundle = random_bundle(tmp_path)
    pipe = intent_pipeline(str(bundle), "cpu")
    answer = pipe("my card was declined", top_k=3)
    assert [entry["label"].startswith("intent_") for entry in answer] == [True] * 3
    scores = [entry["score"] for entry in answer]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1


BURNER = """
import multiprocessing as mp, sys, time

def burn(seconds, done=None):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    if done is not None:
        done.set()
        time.sleep(60)

if __name__ == "__main__":
    context = mp.get_context("spawn")
    done = context.Event()
    child = context.Process(target=burn, args=(0.6, done))
    child.start()
    burn(0.3)
    done.wait()
    print("burnt", flush=True)
    time.sleep(60)
"""


def test_group_cpu_seconds_splits_a_process_group_by_role(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from benchmarks.serving import group_cpu_seconds

    script = tmp_path / "burner.py"
    script.write_text(BURNER)
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert process.stdout.readline().strip() == "burnt"
        roles = group_cpu_seconds(process.pid)
        assert roles["main"] >= 0.25  # the group's leader
        assert roles["workers"] >= 0.55  # the spawned child
        assert group_cpu_seconds(999_999_999) == {}
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_padding_benchmark_compares_one_padded_pass_with_length_groups(tmp_path):
    import json

    from benchmarks.padding import main

    bundle = random_bundle(tmp_path)
    data = tmp_path / "test.csv"
    # Every other message 1 word, the others 40: one padded pass would be half padding.
    rows = [("refund " * (1 if i % 2 else 40)).strip() for i in range(24)]
    data.write_text("text,category\n" + "".join(f"{row},x\n" for row in rows))
    out = tmp_path / "results" / "padding"
    args = ["--bundle", str(bundle), "--data", str(data), "--messages", "24"]
    assert main([*args, "--batch-sizes", "8", "--out", str(out)]) == 0
    (cell,) = json.loads(out.with_suffix(".json").read_text())["runs"]["cpu"]["cells"]
    assert cell["backend"] == "torch" and cell["batch_size"] == 8
    assert cell["passes_per_batch"] > 1  # the lengths differ enough to split
    assert cell["max_logit_difference"] < 1e-4 and cell["labels_differ"] == 0
    assert "| torch | 8 |" in out.with_suffix(".md").read_text()
