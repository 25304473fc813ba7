"""Soak test: a thousand explanation calls do not grow memory or keep autograd graphs."""

from __future__ import annotations

import gc
import resource

import pytest
import torch

from models.backbone import load_backbone
from models.classifier import ClassifierConfig, IntentClassifier
from models.explanations import METHODS, Explainer

pytestmark = pytest.mark.integration


def test_repeated_calls_release_graphs_and_memory(tiny_backbone):
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds contention
    try:
        _soak(tiny_backbone)
    finally:
        torch.set_num_threads(previous_threads)


def _soak(tiny_backbone) -> None:
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    config = ClassifierConfig(num_labels=3, special_token_ids=tokenizer.all_special_ids)
    explainer = Explainer(IntentClassifier(config, encoder), tokenizer, ig_steps=2)
    texts = ["card declined"]

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))

    for method in METHODS * 4:
        explainer.explain(texts, [method])
    tensors_before = live_tensors()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    # 1000 calls, every method alike (one per call keeps the test to seconds).
    for call in range(1000):
        explainer.explain(texts, [METHODS[call % len(METHODS)]])
    assert live_tensors() <= tensors_before + 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50 * 1024
    assert all(p.grad is None for p in explainer.model.parameters())
