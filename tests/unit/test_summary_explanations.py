"""Explained summaries: sentence-level occlusion and the selection's faithfulness, checked
against the predictor's own summaries of texts edited by hand."""

from __future__ import annotations

import pytest
import torch

from models.backbone import load_backbone
from models.bundle import load_bundle, save_bundle
from models.summarizer import ExtractiveSummarizer, SummarizerConfig
from models.summary_explanations import SummaryExplainer
from models.summary_predictor import SummarizerPredictor

pytestmark = pytest.mark.unit

CONVERSATION = (
    "Customer: Hi, my order 48213 is five days late.\n"
    "Agent: Sorry about that, let me check.\n"
    "Agent: The parcel is stuck at the depot, so I will reship it.\n"
    "Customer: Thanks."
)


@pytest.fixture(scope="module")
def predictor(tiny_backbone, tmp_path_factory):
    torch.manual_seed(0)
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    model = ExtractiveSummarizer(
        SummarizerConfig(context_heads=4, context_feedforward=64), encoder
    ).eval()
    path = save_bundle(
        tmp_path_factory.mktemp("summarizer") / "bundle",
        model,
        tokenizer,
        task="extractive-summarization",
        training={"max_length": 48, "chunk_overlap": 8, "units": "sentences"},
    )
    return SummarizerPredictor(load_bundle(path, task="extractive-summarization"))


def _scores(predictor, text):
    (result,) = predictor.summarize([text], max_sentences=2)
    return [s["score"] for s in result.sentences]


def test_summary_occlusion_matches_the_summaries_of_texts_without_each_word(predictor):
    (result,) = predictor.summarize([CONVERSATION], max_sentences=2)
    selected = [i for i, s in enumerate(result.sentences) if s["selected"]]
    found = SummaryExplainer(predictor).explain(CONVERSATION, selected)["occlusion"]
    assert [entry["unit"] for entry in found["units"]] == selected
    original = _scores(predictor, CONVERSATION)
    for entry in found["units"]:
        s = entry["unit"]
        words = entry["words"]
        assert all(CONVERSATION[w["start"] : w["end"]] == w["text"] for w in words)
        assert any(abs(w["score"]) > 1e-6 for w in words)
        # Deleting a word inside a sentence keeps the segmentation: rescore by hand.
        for w in [w for w in words if w["text"].isalpha()][:4]:
            edited = CONVERSATION[: w["start"]] + CONVERSATION[w["end"] :]
            rescored = _scores(predictor, edited)
            assert len(rescored) == len(original)
            assert w["score"] == pytest.approx(original[s] - rescored[s], abs=1e-5)
        others = [u["unit"] for u in entry["sentences"]]
        assert others == [u for u in range(len(original)) if u != s]


def test_summary_selection_faithfulness_matches_a_recomputation(predictor):
    (result,) = predictor.summarize([CONVERSATION], max_sentences=2, explain=["attention"])
    selected = [i for i, s in enumerate(result.sentences) if s["selected"]]
    attention = {
        (w["start"], w["end"]): w["score"]
        for unit in result.explanations["attention"]["units"]
        for w in unit["words"]
    }
    # A ranking of our own: four words in the middle of the long sentence first.
    chosen = ["parcel", "stuck", "depot", "reship"]
    custom = {
        span: (10.0 - chosen.index(CONVERSATION[span[0] : span[1]]))
        if CONVERSATION[span[0] : span[1]] in chosen
        else 0.0
        for span in attention
    }
    found = SummaryExplainer(predictor).explain(
        CONVERSATION, selected, occlusion=True, rankings={"attention": attention, "custom": custom}
    )["faithfulness"]
    assert set(found) == {"attention", "custom", "occlusion"}
    for measured in found.values():
        assert set(measured) == {"comprehensiveness", "sufficiency", "bins"}
        assert len(measured["bins"]) == 5
    # The first bin deletes the top four words: the same as summarizing the text without them.
    first = found["custom"]["bins"][0]
    assert first["words"] == 4
    edited = CONVERSATION
    for word in chosen:
        edited = edited.replace(word, "", 1)
    before = sum(_scores(predictor, CONVERSATION)[s] for s in selected) / len(selected)
    after = sum(_scores(predictor, edited)[s] for s in selected) / len(selected)
    assert first["comprehensiveness"] == pytest.approx(before - after, abs=1e-5)
