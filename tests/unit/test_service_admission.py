"""Admission in the HTTP process: the cost budget and the conversation cap, before any work."""

import asyncio
from types import SimpleNamespace

import pytest

from models.summary_predictor import SummarizationError
from service.admission import ClassifyAdmission, Refusal, SummarizeAdmission
from service.config import Settings

pytestmark = pytest.mark.unit


class WordTokenizer:
    """One token per whitespace-separated word, plus [CLS] and [SEP] when asked."""

    def __init__(self):
        self.calls = 0

    def __call__(self, texts, add_special_tokens=True):
        self.calls += 1
        extra = 2 if add_special_tokens else 0
        return {"input_ids": [[0] * (len(t.split()) + extra) for t in texts]}


def classify(settings: Settings, max_length: int = 16, vote: bool = False):
    tokenizer = WordTokenizer()
    predictor = SimpleNamespace(
        tokenizer=tokenizer,
        labels=["a", "b", "c"],
        max_length=max_length,
        has_neighbour_vote=vote,
    )
    return ClassifyAdmission(predictor, settings), tokenizer


def run(coroutine):
    return asyncio.run(coroutine)


def test_admission_cost_is_tokens_times_method_passes():
    admission, _ = classify(Settings(ig_steps=8))
    # 4 tokens each: prediction 1 + attention 0 + gradient_x_input 2 + IG 8 + occlusion 4.
    methods = ["attention", "gradient_x_input", "integrated_gradients", "occlusion"]
    assert admission.cost([4, 4], methods) == 2 * 4 * (1 + 0 + 2 + 8 + 4)
    # Text over the length limit is truncated, and costs only what is kept.
    assert admission.cost([100], []) == 16


def test_admission_refuses_a_request_over_the_budget_naming_the_limit():
    admission, _ = classify(Settings(max_request_cost=500, ig_steps=32))
    texts = ["my card was declined twice today"] * 4  # 8 tokens each
    with pytest.raises(Refusal) as refused:
        run(admission.check(texts, 3, ["integrated_gradients", "occlusion"]))
    assert refused.value.status == 413
    assert "SUPPORTLENS_MAX_REQUEST_COST" in refused.value.detail
    assert "500" in refused.value.detail
    run(admission.check(texts[:1], 3, []))  # the same text alone is fine


def test_admission_skips_tokenizing_when_the_bound_fits_the_budget():
    admission, tokenizer = classify(Settings(max_request_cost=10_000))
    run(admission.check(["hello there"] * 8, 3, ["attention"]))
    assert tokenizer.calls == 0


def test_admission_top_k_over_the_labels_names_the_field():
    admission, _ = classify(Settings())
    with pytest.raises(Refusal) as refused:
        run(admission.check(["hi"], 4, []))
    assert refused.value.status == 422 and refused.value.field == "top_k"


def test_admission_strict_length_names_the_text():
    admission, _ = classify(Settings(strict_length=True), max_length=5)
    with pytest.raises(Refusal) as refused:
        run(admission.check(["short", "one two three four five six"], 3, []))
    assert refused.value.field == "texts[1]" and "8 tokens" in refused.value.detail


class FakeSummarizer:
    tokenizer = WordTokenizer()

    def segment(self, texts):
        if not any(c.isalnum() for c in texts[0]):
            raise SummarizationError("conversation 0 is empty")
        return [[texts[0]]]


def test_admission_caps_the_tokens_of_one_conversation():
    admission = SummarizeAdmission(FakeSummarizer(), Settings(max_conversation_tokens=10))
    run(admission.check(["word " * 10], []))
    with pytest.raises(Refusal) as refused:
        run(admission.check(["fine", "word " * 11], []))
    assert refused.value.status == 422 and refused.value.field == "texts[1]"
    assert "SUPPORTLENS_MAX_CONVERSATION_TOKENS" in refused.value.detail


def test_admission_refuses_a_conversation_without_sentences():
    admission = SummarizeAdmission(FakeSummarizer(), Settings())
    with pytest.raises(Refusal) as refused:
        run(admission.check(["fine", "..."], []))
    assert refused.value.field == "texts[1]"


def test_admission_summarize_budget_counts_gradient_passes():
    admission = SummarizeAdmission(FakeSummarizer(), Settings(max_request_cost=100))
    run(admission.check(["word " * 40], []))  # 40 passes
    with pytest.raises(Refusal) as refused:
        run(admission.check(["word " * 40], ["gradient_x_input"]))  # 40 x 3
    assert refused.value.status == 413


def test_admission_counts_faithfulness_variants_per_method():
    admission, _ = classify(Settings(ig_steps=8))
    # 4 tokens: prediction 1 + occlusion 4, and faithfulness: 2 x 5 bins per method (the
    # text's own probabilities are the prediction's).
    assert admission.cost([4], ["occlusion"], faithfulness=True) == 4 * (1 + 4 + 10)
    assert admission.cost([4], ["attention", "occlusion"], True) == 4 * (1 + 4 + 20)
    assert admission.cost([4], [], faithfulness=True) == 4  # nothing to measure
    tight, _ = classify(Settings(max_request_cost=4 * (1 + 4)), max_length=64)
    run(tight.check(["one two"], 3, ["occlusion"]))
    with pytest.raises(Refusal) as refused:
        run(tight.check(["one two"], 3, ["occlusion"], faithfulness=True))
    assert refused.value.status == 413


def test_admission_counts_the_neighbour_vote_pass_and_faithfulness_rescoring():
    admission, _ = classify(Settings(ig_steps=8), vote=True)
    # 4 tokens: prediction 2 (the classifier, and the vote's encoder for an unsure text).
    assert admission.cost([4, 4], []) == 2 * 4 * 2
    # Faithfulness scores the text again on the classifier alone: 1 + 2 x 5 bins.
    assert admission.cost([4], ["occlusion"], faithfulness=True) == 4 * (2 + 4 + 1 + 10)
    tight, _ = classify(Settings(max_request_cost=16), max_length=64, vote=True)
    run(tight.check(["one two three four five six"], 3, []))  # 8 tokens x 2 passes
    with pytest.raises(Refusal) as refused:
        run(tight.check(["one two three four five six seven"], 3, []))
    assert refused.value.status == 413 and "18" in refused.value.detail


def test_admission_refuses_an_unknown_target_intent_naming_it():
    admission, _ = classify(Settings())
    run(admission.check(["hi"], 3, ["occlusion"], target="b"))
    run(admission.check(["hi"], 3, ["occlusion"], target="contrast"))
    with pytest.raises(Refusal) as refused:
        run(admission.check(["hi"], 3, ["occlusion"], target="refund_statuss"))
    assert refused.value.status == 422 and refused.value.field == "target"
    assert "'refund_statuss'" in refused.value.detail


class SentenceSummarizer(FakeSummarizer):
    def segment(self, texts):
        return [[s for s in texts[0].split(".") if s.strip()]]


def test_admission_summary_occlusion_counts_a_pass_per_word_and_per_sentence():
    admission = SummarizeAdmission(SentenceSummarizer(), Settings(max_request_cost=10**6))
    text = "one two. three four. five six"  # 6 tokens, 3 sentences
    admission.settings = Settings(max_request_cost=6 * (1 + 6 + 3) - 1)
    with pytest.raises(Refusal):
        run(admission.check([text], ["occlusion"]))
    admission.settings = Settings(max_request_cost=6 * (1 + 6 + 3))
    run(admission.check([text], ["occlusion"]))
    with pytest.raises(Refusal):  # the selection's faithfulness: 2 x 5 bins more
        run(admission.check([text], ["occlusion"], faithfulness=True))
    admission.settings = Settings(max_request_cost=6 * (1 + 6 + 3 + 10))
    run(admission.check([text], ["occlusion"], faithfulness=True))
    # Without occlusion the conversation itself is scored again: one pass more.
    admission.settings = Settings(max_request_cost=6 * (1 + 2 + 10))
    with pytest.raises(Refusal):
        run(admission.check([text], ["gradient_x_input"], faithfulness=True))
    admission.settings = Settings(max_request_cost=6 * (1 + 2 + 11))
    run(admission.check([text], ["gradient_x_input"], faithfulness=True))
