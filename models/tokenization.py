"""The one way texts become classifier inputs, shared by prediction and explanations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

# What the encoders read of an encoding (not the offsets, nor the overflow).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> tuple[BatchEncoding, list[bool]]:
    """Tokenize once: padded to the longest text, cut at ``max_length``, with character
    offsets; also say which texts were cut.

    A fast tokenizer computes the cut-off tokens of every text while truncating (its
    ``Encoding.overflowing``), so truncation is known without tokenizing a second time.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast tokenizer is needed (character offsets and overflow)")
    encoding = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        padding="longest",
        return_tensors="pt",
        return_offsets_mapping=True,
    )
    return encoding, [bool(e.overflowing) for e in encoding.encodings]


def model_inputs(
    encoding: BatchEncoding, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of ``encoding`` that the model reads, on ``device`` (left where they are
    when None)."""
    return {k: encoding[k].to(device) for k in MODEL_INPUTS if k in encoding}
