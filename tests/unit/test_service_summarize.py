"""The summarize worker stops a request's work between conversations once its deadline passed."""

import time
from types import SimpleNamespace

import pytest

from service.config import Settings
from service.summarize import SummarizeAPI, SummarizeItem
from service.worker import EXPIRED

pytestmark = pytest.mark.unit


class SlowSummarizer:
    def __init__(self):
        self.calls = 0

    def summarize(self, texts, max_sentences, explain):
        self.calls += 1
        time.sleep(0.05)
        return [SimpleNamespace(summary="s", sentences=[], truncated=False, explanations={})]


def test_summarize_work_stops_between_conversations_after_the_deadline(tmp_path):
    api = SummarizeAPI(Settings(), tmp_path)
    api.predictor = SlowSummarizer()
    api.batch_sizes = SimpleNamespace(observe=lambda n: None)
    late = SummarizeItem(["a"] * 20, 3, [], deadline=time.monotonic() + 0.12)
    on_time = SummarizeItem(["b"] * 2, 3, [], deadline=time.monotonic() + 60)
    outputs = api.predict([late, on_time])
    assert outputs[0] is EXPIRED
    assert len(outputs[1]) == 2
    assert api.predictor.calls <= 3 + 2  # the late request stopped after ~3 of its 20
