"""The extractive summarizer: chunked encoding, the model, selection, the predictor, oracle labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from models.backbone import load_backbone
from models.bundle import load_bundle, save_bundle
from models.segmentation import Unit, segment
from models.summarizer import (
    ExtractiveSummarizer,
    SummarizerConfig,
    encode_conversations,
    relative_position_features,
)
from models.summary_predictor import (
    Selection,
    SummarizationError,
    SummarizerPredictor,
    budget_size,
    select_units,
    word_overlap,
)
from training.data import DataError
from training.recipe import RecipeError
from training.summarization_data import greedy_oracle, label_units, rouge_f1, unit_rouge
from training.train_summarizer import choose_selection, fit_summary_length, freeze_encoder

pytestmark = pytest.mark.unit

TASK = "extractive-summarization"
CONVERSATION = (
    "Customer: Hi, my order 48213 is five days late.\n"
    "Agent: Sorry about that, let me check.\n"
    "Agent: The parcel is stuck at the depot, so I will reship it with express delivery.\n"
    "Customer: Thanks.\n"
    "Agent: I have also refunded the shipping fee."
)


@pytest.fixture(scope="module")
def tiny(tiny_backbone):
    torch.manual_seed(0)
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    config = SummarizerConfig(context_heads=4, context_feedforward=64)
    return ExtractiveSummarizer(config, encoder).eval(), tokenizer


@pytest.fixture(scope="module")
def predictor(tiny, tmp_path_factory):
    model, tokenizer = tiny
    path = save_bundle(
        tmp_path_factory.mktemp("summarizer") / "bundle",
        model,
        tokenizer,
        task=TASK,
        training={"max_length": 48, "chunk_overlap": 8},
    )
    return SummarizerPredictor(load_bundle(path, task=TASK))


def long_text(n: int) -> str:
    return " ".join(
        f"Sentence {i} is about parcel number {i * 7} and its refund." for i in range(n)
    )


# --- encoding -------------------------------------------------------------------------


def test_encode_indexes_every_unit_token_once_across_overlapping_chunks(tiny):
    _, tokenizer = tiny
    units = segment(long_text(30))
    encoded = encode_conversations(tokenizer, [units], max_length=32, overlap=8)
    t = encoded.tensors
    assert t["input_ids"].shape[0] > 1 and t["input_ids"].shape[1] <= 32
    flat_ids = t["input_ids"].reshape(-1)
    seen = []
    for u, unit in enumerate(units):
        positions = t["unit_token_index"][0, u][t["unit_token_mask"][0, u]]
        expected = tokenizer(unit.text, add_special_tokens=False)["input_ids"]
        assert flat_ids[positions].tolist() == expected
        assert all(t["attention_mask"].reshape(-1)[positions] == 1)
        seen += positions.tolist()
    assert len(seen) == len(set(seen))


def test_encode_splits_a_unit_longer_than_a_chunk_over_several_chunks(tiny):
    _, tokenizer = tiny
    text = "word " * 100 + "end."
    units = [Unit(text, 0, len(text)), Unit("Short one.", len(text) + 1, len(text) + 11)]
    encoded = encode_conversations(tokenizer, [units], max_length=32, overlap=8)
    length = encoded.tensors["input_ids"].shape[1]
    positions = encoded.tensors["unit_token_index"][0, 0][encoded.tensors["unit_token_mask"][0, 0]]
    assert len(positions) == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert len(set((positions // length).tolist())) >= 4


def test_encode_token_offsets_point_at_the_original_text(tiny):
    _, tokenizer = tiny
    units = segment(CONVERSATION)
    encoded = encode_conversations(tokenizer, [units], max_length=64)
    for unit, offsets in zip(units, encoded.token_offsets[0], strict=True):
        assert offsets and all(unit.start <= a < b <= unit.end for a, b in offsets)
    first = encoded.token_offsets[0][0][0]
    assert CONVERSATION[first[0] : first[1]].lower() == "hi"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_length": 6}, "too small"), ({"max_length": 32, "overlap": 20}, "overlap")],
)
def test_encode_rejects_unusable_chunking(tiny, kwargs, message):
    _, tokenizer = tiny
    with pytest.raises(ValueError, match=message):
        encode_conversations(tokenizer, [segment(CONVERSATION)], **kwargs)


# --- model ----------------------------------------------------------------------------


def test_model_scores_each_unit_independently_of_batch_padding(tiny):
    model, tokenizer = tiny
    short, long = segment(CONVERSATION)[:2], segment(long_text(12))
    alone = model(**encode_conversations(tokenizer, [short], max_length=48).tensors).logits
    batched = model(**encode_conversations(tokenizer, [short, long], max_length=48).tensors)
    assert batched.logits.shape == (2, len(long))
    torch.testing.assert_close(batched.logits[0, : len(short)], alone[0], atol=1e-5, rtol=1e-4)


def test_model_pooling_weights_sum_to_one_per_unit_even_across_chunks(tiny):
    model, tokenizer = tiny
    text = "word " * 80 + "end."
    units = [Unit(text, 0, len(text)), Unit("...", len(text) + 1, len(text) + 4)]
    inputs = encode_conversations(tokenizer, [units], max_length=32, overlap=8).tensors
    output = model(**inputs, output_pooling_weights=True)
    sums = output.pooling_weights.sum(dim=-1)  # (B, U, N)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert torch.isfinite(output.logits).all()


@pytest.mark.parametrize(
    ("loss", "position_features"), [("bce", False), ("listwise", False), ("listwise", True)]
)
def test_model_loss_ignores_padding_labels_and_trains(tiny_backbone, loss, position_features):
    torch.manual_seed(0)
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    config = SummarizerConfig(
        context_feedforward=64,
        dropout=0.0,
        loss=loss,
        position_features=position_features,
    )
    model = ExtractiveSummarizer(config, encoder)
    conversations = [segment(CONVERSATION), segment(long_text(3))]
    batch = encode_conversations(tokenizer, conversations, max_length=48).tensors
    labels = torch.full(batch["unit_mask"].shape, -100.0)
    labels[0, :5] = torch.tensor([1.0, 0, 1, 0, 0])
    labels[1, :3] = torch.tensor([0.0, 0, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(**batch, labels=labels).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # The listwise loss cannot go below the targets' entropy (two positives: log 2).
    floor = math.log(2) if loss == "listwise" else 0.0
    assert losses[-1] - floor < 0.5 * (losses[0] - floor)
    logits = model.eval()(**batch).logits
    assert set(logits[0, :5].topk(2).indices.tolist()) == {0, 2}


def test_listwise_loss_prefers_the_ranking_of_graded_targets(tiny):
    model, _ = tiny
    listwise = ExtractiveSummarizer(SummarizerConfig(loss="listwise"), model.encoder)
    targets = torch.tensor([[1.0, 0.5, 0.0, -100.0]])
    mask = torch.tensor([[True, True, True, False]])
    agreeing = listwise.loss(torch.tensor([[3.0, 1.0, -1.0, 50.0]]), targets, mask)
    reversed_ = listwise.loss(torch.tensor([[-1.0, 1.0, 3.0, 50.0]]), targets, mask)
    assert torch.isfinite(agreeing) and agreeing < reversed_
    # A conversation with no valid unit adds nothing (and no NaN).
    empty = listwise.loss(torch.zeros(1, 4), torch.full((1, 4), -100.0), mask)
    assert empty.item() == 0.0


def test_relative_position_features_mark_first_and_last_unit_and_ignore_padding():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    features = relative_position_features(mask)  # (B, U, 3)
    assert features[0, :3, 0].tolist() == [0.0, 0.5, 1.0]
    assert features[0, :, 1].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert features[0, :, 2].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert features[1, 0].tolist() == [0.0, 1.0, 1.0]
    assert features[:, 3].abs().sum() == 0 and features[1, 1:].abs().sum() == 0


def test_model_rejects_an_unknown_loss(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="unknown summarizer loss 'hinge'"):
        ExtractiveSummarizer(SummarizerConfig(loss="hinge"), model.encoder)


def test_freeze_encoder_stops_gradients_to_embeddings_and_lower_layers(tiny_backbone):
    encoder, _ = load_backbone(str(tiny_backbone))
    assert freeze_encoder(encoder, 1) == 1
    assert not any(p.requires_grad for p in encoder.embeddings.parameters())
    assert not any(p.requires_grad for p in encoder.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in encoder.encoder.layer[1].parameters())
    assert freeze_encoder(encoder, -1) == len(encoder.encoder.layer)
    assert not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(RecipeError, match="no embeddings"):
        freeze_encoder(torch.nn.Linear(2, 2), 1)


# --- selection ------------------------------------------------------------------------


def test_select_units_takes_top_scores_in_original_order_within_budget():
    texts = ["alpha one", "beta two", "gamma three", "delta four"]
    assert select_units([0.1, 0.9, 0.2, 0.8], texts, 2) == [1, 3]
    assert select_units([0.1, 0.9, 0.2, 0.8], texts, 10) == [0, 1, 2, 3]


def test_select_units_blocks_repeated_trigrams():
    texts = ["my card was blocked today", "my card was blocked again", "please call me back"]
    assert select_units([0.9, 0.8, 0.1], texts, 2) == [0, 2]
    assert select_units([0.9, 0.8, 0.1], texts, 2, trigram_blocking=False) == [0, 1]


def test_select_units_prefers_units_with_words():
    assert select_units([0.9, 0.1], ["!!!", "hello there"], 2) == [1]
    assert select_units([0.9], ["..."], 3) == [0]


def test_select_units_stops_once_the_word_budget_is_reached():
    texts = ["one two three", "four five six seven", "eight", "nine ten"]
    scores = [0.9, 0.8, 0.7, 0.6]
    assert select_units(scores, texts, 10) == [0, 1, 2, 3]
    # 3 words, then 7 >= 5: the unit that reaches the budget is kept, nothing after it.
    assert select_units(scores, texts, 10, word_budget=5) == [0, 1]
    assert select_units(scores, texts, 10, word_budget=3) == [0]
    # The unit budget stays a cap under a large word budget.
    assert select_units(scores, texts, 2, word_budget=100) == [0, 1]


def test_select_units_redundancy_penalty_skips_a_near_repeat():
    texts = ["card refund fee", "fee card refund today", "parcel arrives tomorrow"]
    scores = [0.9, 0.8, 0.7]
    assert word_overlap(texts[0], texts[1]) == pytest.approx(3 / math.sqrt(12))
    assert select_units(scores, texts, 2) == [0, 1]  # no shared trigram: not blocked
    assert select_units(scores, texts, 2, redundancy=0.5) == [0, 2]
    assert select_units(scores, texts, 2, redundancy=0.1) == [0, 1]


def test_selection_default_is_the_plain_three_unit_budget_and_bad_values_are_refused():
    assert Selection.from_dict(None) == Selection() == Selection.from_dict({})
    assert Selection().word_budget(500) is None
    recorded = Selection.from_dict(
        {"max_units": 5, "length_slope": 0.1, "length_intercept": 4.0, "length_scale": 1.5}
    )
    assert recorded.word_budget(100) == pytest.approx(1.5 * (0.1 * 100 + 4.0))
    assert Selection.from_dict(recorded.to_dict()) == recorded
    for bad in ({"max_units": 0}, {"redundancy": -1.0}, {"length_scale": 0.0}):
        with pytest.raises(ValueError, match="selection"):
            Selection.from_dict(bad)


def test_budget_size_from_count_or_ratio():
    assert budget_size(10, 3) == 3
    assert budget_size(2, 3) == 2
    assert budget_size(10, 3, ratio=0.5) == 5
    assert budget_size(10, 3, ratio=0.01) == 1
    for bad in ({"max_sentences": 0}, {"ratio": 0.0}, {"ratio": 1.5}):
        with pytest.raises(SummarizationError):
            budget_size(10, **bad)


# --- predictor ------------------------------------------------------------------------


def test_predictor_lists_every_unit_and_selects_within_budget(predictor):
    [result] = predictor.summarize([CONVERSATION], max_sentences=2)
    units = segment(CONVERSATION)
    assert [s["text"] for s in result.sentences] == [u.text for u in units]
    assert all(CONVERSATION[s["start"] : s["end"]] == s["text"] for s in result.sentences)
    selected = [s for s in result.sentences if s["selected"]]
    assert 1 <= len(selected) <= 2
    assert result.summary == "\n".join(f"{s['speaker']}: {s['text']}" for s in selected)
    scores = result.explanations["unit_scores"]
    assert scores == [s["score"] for s in result.sentences]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert result.truncated is False


def test_predictor_ratio_budget(predictor):
    text = long_text(10)
    [result] = predictor.summarize([text], ratio=0.5)
    assert sum(s["selected"] for s in result.sentences) <= 5


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_predictor_empty_conversation_is_an_error_naming_it(predictor, text):
    with pytest.raises(SummarizationError, match="conversation 1 is empty"):
        predictor.summarize([CONVERSATION, text])


def test_predictor_single_unit_is_returned_as_the_summary(predictor):
    [result] = predictor.summarize(["Customer: my card does not work"])
    assert result.summary == "Customer: my card does not work"
    assert result.sentences[0]["selected"] is True


def test_predictor_units_without_words_get_finite_scores_and_are_not_chosen(predictor):
    text = "... !!! I need a refund for order 12. ??? Thanks for the help."
    [result] = predictor.summarize([text], max_sentences=3, explain=["attention"])
    assert all(math.isfinite(s["score"]) for s in result.sentences)
    chosen = [s["text"] for s in result.sentences if s["selected"]]
    assert chosen and all(any(c.isalnum() for c in t) for t in chosen)
    [only] = predictor.summarize(["?!?!"])
    assert only.summary == "?!?!" and math.isfinite(only.sentences[0]["score"])
    # A unit the tokenizer reads as no token at all (zero-width spaces) still gets a score.
    [invisible] = predictor.summarize(["Refund please.\n\u200b\u200b"], explain=["attention"])
    assert all(math.isfinite(s["score"]) for s in invisible.sentences)


def test_predictor_long_input_is_chunked_and_every_unit_scored(predictor):
    text = long_text(120)
    [result] = predictor.summarize([text])
    assert len(result.sentences) == 120
    assert all(math.isfinite(s["score"]) for s in result.sentences)
    encoded = predictor.encode([segment(text)])
    assert encoded.num_chunks[0] > 10 and result.truncated is False


@pytest.mark.parametrize(
    "text",
    [
        "Привет. Мой заказ не пришёл! Помогите.",
        "你好。我的订单还没到！请帮我查一下。",
        "مرحبا. طلبي لم يصل؟ شكرا.",
    ],
)
def test_predictor_other_scripts(predictor, text):
    [result] = predictor.summarize([text], max_sentences=2, explain=["attention"])
    assert result.summary and len(result.sentences) >= 2
    for unit in result.explanations["attention"]["units"]:
        for word in unit["words"]:
            assert text[word["start"] : word["end"]] == word["text"]


def test_predictor_attention_explanation_is_word_level_per_unit(predictor):
    [result] = predictor.summarize([CONVERSATION], explain=["attention"])
    units = result.explanations["attention"]["units"]
    assert [u["unit"] for u in units] == list(range(len(result.sentences)))
    for unit, sentence in zip(units, result.sentences, strict=True):
        assert sum(w["score"] for w in unit["words"]) == pytest.approx(1.0, abs=1e-4)
        for word in unit["words"]:
            assert sentence["start"] <= word["start"] < word["end"] <= sentence["end"]
            assert CONVERSATION[word["start"] : word["end"]] == word["text"]


def test_predictor_gradient_x_input_covers_selected_units(predictor):
    texts = [CONVERSATION, long_text(8)]
    results = predictor.summarize(texts, max_sentences=1, explain=["gradient_x_input"])
    for result in results:
        units = result.explanations["gradient_x_input"]["units"]
        assert len(units) == len(result.sentences)
        scores = [w["score"] for u in units for w in u["words"]]
        assert all(math.isfinite(s) for s in scores) and any(s != 0 for s in scores)


def test_predictor_rejects_unknown_explanations_and_bad_budgets(predictor):
    with pytest.raises(SummarizationError, match="unknown explanation"):
        predictor.summarize([CONVERSATION], explain=["magic"])
    with pytest.raises(SummarizationError, match="max_sentences"):
        predictor.summarize([CONVERSATION], max_sentences=0)
    assert predictor.summarize([]) == []


def test_predictor_refuses_a_classifier_bundle(predictor):
    class FakeBundle:
        task = "intent-classification"
        path = "x"

    with pytest.raises(ValueError, match="not a summarizer"):
        SummarizerPredictor(FakeBundle())  # type: ignore[arg-type]


# --- oracle labels ----------------------------------------------------------------------


def test_greedy_oracle_picks_matching_units_and_stops_when_rouge_stops_improving():
    units = ["the parcel is stuck at the depot", "hello there", "refund of the shipping fee"]
    reference = "The parcel was stuck at the depot; the shipping fee was refunded."
    assert greedy_oracle(units, reference, 3) == [0, 2]
    assert greedy_oracle(units, reference, 1) == [0]
    assert greedy_oracle(units, "completely unrelated words", 3) == []


def test_unit_rouge_scores_the_best_unit_one_and_orders_by_overlap():
    units = ["the parcel is stuck at the depot", "hello there", "the parcel is late"]
    reference = "The parcel is stuck at the depot."
    scores = unit_rouge(units, reference)
    assert scores[0] == 1.0 and scores[1] == 0.0 and 0.0 < scores[2] < 1.0
    assert unit_rouge(units, "completely unrelated words") == [0.0, 0.0, 0.0]


def test_label_units_adds_graded_targets_from_the_summary_or_the_labels():
    data = Dataset.from_dict(
        {
            "text": ["Customer: my parcel is late\nAgent: hello\nAgent: I will reship it", "a. b."],
            "summary": ["The agent will reship the late parcel.", None],
            "labels": [None, [1]],
        }
    )
    labelled, _ = label_units(data)
    targets = labelled[0]["unit_targets"]
    assert max(targets) == 1.0 and targets[1] < min(targets[0], targets[2])
    assert (
        labelled[1]["unit_targets"] == [0.0, 1.0] == [float(x) for x in labelled[1]["unit_labels"]]
    )


def test_label_units_with_sentence_units_labels_sentences_within_turns():
    data = Dataset.from_dict(
        {
            "text": ["Customer: Hello there. My parcel is late.\nAgent: I will reship it today."],
            "summary": ["The parcel is late and the agent will reship it."],
            "labels": [None],
        }
    )
    labelled, _ = label_units(data, units="sentences")
    row = labelled[0]
    assert row["unit_texts"] == ["Hello there.", "My parcel is late.", "I will reship it today."]
    assert row["unit_speakers"] == ["Customer", "Customer", "Agent"]
    assert row["unit_labels"] == [0, 1, 1]


def test_predictor_segments_into_the_units_its_bundle_was_trained_on(tiny, tmp_path):
    model, tokenizer = tiny
    path = save_bundle(
        tmp_path / "bundle",
        model,
        tokenizer,
        task=TASK,
        training={"max_length": 48, "chunk_overlap": 8, "units": "sentences"},
    )
    predictor = SummarizerPredictor(load_bundle(path, task=TASK))
    text = "Customer: Hi. My card was charged twice.\nAgent: Sorry! I have refunded it."
    [result] = predictor.summarize([text], max_sentences=2)
    assert [s["text"] for s in result.sentences] == [
        u.text for u in segment(text, units="sentences")
    ]
    assert len(result.sentences) == 4
    selected = [s for s in result.sentences if s["selected"]]
    assert result.summary == "\n".join(f"{s['speaker']}: {s['text']}" for s in selected)


def test_predictor_selects_with_the_selection_its_bundle_records(tiny, tmp_path):
    model, tokenizer = tiny
    text = "\n".join(f"Customer: Sentence {i} about parcel {i * 7}." for i in range(8))

    def bundle(name, training):
        path = save_bundle(
            tmp_path / name,
            model,
            tokenizer,
            task=TASK,
            training={"max_length": 48, "chunk_overlap": 8, **training},
        )
        return SummarizerPredictor(load_bundle(path, task=TASK))

    def selected(predictor, **kwargs):
        [result] = predictor.summarize([text], **kwargs)
        return sum(s["selected"] for s in result.sentences)

    # A bundle without a recorded selection keeps the previous default of three units.
    assert selected(bundle("old", {})) == 3
    capped = bundle("capped", {"selection": {"max_units": 5}})
    assert selected(capped) == 5
    assert selected(capped, max_sentences=2) == 2  # an explicit cap wins
    # A word budget of 1.0 x (0 x words + 4) words: the first 5-word unit reaches it.
    budgeted = bundle(
        "budgeted", {"selection": {"max_units": 5, "length_slope": 0.0, "length_intercept": 4.0}}
    )
    assert selected(budgeted) == 1


def test_fit_summary_length_recovers_a_linear_relation():
    data = Dataset.from_dict(
        {
            "unit_texts": [["w " * n] for n in (10, 20, 40)],
            "summary": ["s " * (2 + n // 10) for n in (10, 20, 40)],
        }
    )
    slope, intercept = fit_summary_length(data)
    assert slope == pytest.approx(0.1) and intercept == pytest.approx(2.0)


def test_choose_selection_prefers_a_word_budget_when_references_are_one_unit_long():
    units = [
        "the parcel was lost in transit",
        "we will refund the order",
        "thanks a lot",
        "bye now",
    ]
    rows = {
        "unit_texts": [units] * 4,
        "unit_speakers": [[None] * 4] * 4,
        "summary": ["the parcel was lost in transit"] * 4,
    }
    validation = Dataset.from_dict(rows)
    logits = np.array([[3.0, 2.0, 1.0, 0.0]] * 4)
    chosen, tried = choose_selection(logits, validation, validation, max_sentences=3)
    assert tried[0]["selection"] == Selection(max_units=3).to_dict()  # plain budget first
    assert chosen.length_slope is not None
    best = max(t["rouge1"] for t in tried)
    assert best == 100.0 and tried[0]["rouge1"] < best


def test_label_units_uses_explicit_labels_and_checks_them():
    data = Dataset.from_dict(
        {
            "text": ["Customer: a b c\nAgent: d e f\nCustomer: g", "   "],
            "summary": [None, None],
            "labels": [[1], None],
        }
    )
    labelled, skipped = label_units(data, source="t.jsonl")
    assert skipped == 1 and labelled[0]["unit_labels"] == [0, 1, 0]
    bad = Dataset.from_dict({"text": ["one. two."], "summary": [None], "labels": [[5]]})
    with pytest.raises(DataError, match=r"t.jsonl: row 0: labels \[5\]"):
        label_units(bad, source="t.jsonl")
    missing = Dataset.from_dict({"text": ["one. two."], "summary": [""], "labels": [None]})
    with pytest.raises(DataError, match="neither a reference summary nor labels"):
        label_units(missing, source="t.jsonl")


def test_rouge_f1_is_100_for_identical_text_and_0_for_disjoint():
    assert rouge_f1(["the card was refunded"], ["the card was refunded"])["rouge1"] == 100.0
    assert rouge_f1(["alpha beta"], ["gamma delta"])["rouge2"] == 0.0
