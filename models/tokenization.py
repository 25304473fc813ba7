"""The one way texts become classifier inputs, shared by prediction and explanations."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import BatchEncoding, PreTrainedTokenizerBase


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
