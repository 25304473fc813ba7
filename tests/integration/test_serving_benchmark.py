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
