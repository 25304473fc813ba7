"""Sequence packing: texts laid end to end with a block-diagonal mask score as if padded."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from models.backbone import load_backbone
from models.classifier import ClassifierConfig, IntentClassifier
from models.packing import can_pack, pack_rows, packed_hidden_states

pytestmark = pytest.mark.unit

TEXTS = [
    "card",
    "I still have not received my new card and it has been two weeks",
    "how do I top up",
    "why was I charged twice for one purchase",
    "refund",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_backbone):
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    torch.manual_seed(0)
    model = IntentClassifier(
        ClassifierConfig(num_labels=4, special_token_ids=tokenizer.all_special_ids), encoder
    )
    return model.eval(), tokenizer


def test_pack_rows_places_every_text_once_within_the_row_size():
    lengths = [5, 30, 12, 7, 7, 20, 3, 64]
    rows = pack_rows(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert sum(lengths[i] for i in row) <= 32 or len(row) == 1  # 64 gets a row alone
    # First fit by decreasing length: 64 alone, 30 alone (3 does not fit its 2 left),
    # 20 + 12, then 7 + 7 + 5 + 3.
    assert rows == [[7], [1], [5, 2], [3, 4, 0, 6]]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_packed_hidden_states_equal_each_text_scored_from_position_zero(
    model_and_tokenizer, padding_side
):
    """Equal to a right-padded pass on the real tokens, whichever side the input is
    padded on (a left-padded BERT pass shifts the texts' positions; packing does not)."""
    model, tokenizer = model_and_tokenizer
    reference = tokenizer(TEXTS, padding=True, return_tensors="pt")
    tokenizer.padding_side = padding_side
    try:
        encoding = tokenizer(TEXTS, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    with torch.inference_mode():
        padded = model.encoder(**reference).last_hidden_state  # (B, T, H)
        packed = packed_hidden_states(model.encoder, **encoding)
    real = encoding["attention_mask"].bool()
    assert packed.shape == padded.shape
    torch.testing.assert_close(
        packed[real], padded[reference["attention_mask"].bool()], atol=1e-5, rtol=1e-4
    )
    assert packed[~real].abs().max() == 0


def test_forward_packed_gives_the_classifier_logits_and_features(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    encoding = tokenizer(TEXTS * 12, padding=True, return_tensors="pt")  # several rows
    with torch.inference_mode():
        padded = model(**encoding, output_pooled=True)
        packed = model.forward_packed(**encoding, output_pooled=True)
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed.pooled, padded.pooled, atol=1e-5, rtol=1e-4)


def test_only_encoders_with_positions_from_zero_are_packed(model_and_tokenizer):
    model, _ = model_and_tokenizer
    assert can_pack(model.encoder)
    roberta = torch.nn.Module()
    roberta.config = AutoConfig.for_model("roberta")  # positions start after the padding id
    assert not can_pack(roberta)
    relative = torch.nn.Module()
    relative.config = AutoConfig.for_model("bert", position_embedding_type="relative_key")
    assert not can_pack(relative)
