"""Sequence packing: many short texts through an encoder without their padding.

On a CPU a pass of a small encoder costs about its tokens, padding included, plus a fixed
share for reading the weights once (``models.predictor.PASS_TOKENS``). Texts of mixed
lengths, such as the perturbed copies of one message that per-request faithfulness
scores (each keeps 10 to 90% of the words), waste most of a padded batch or need
several passes. Packed, several texts share one row of the batch: their tokens are laid
end to end, each text's positions restart at 0 and a block-diagonal attention mask keeps
every token to its own text, so each text's hidden states equal those of a padded pass
(up to float rounding) while the whole batch is one pass with almost no padding.

Transformers packs for training with flash-attention's variable-length kernels
(``DataCollatorWithFlattening``), which the CPU attention does not have; a 4-D mask
through SDPA does the same there. Only encoders whose positions are plain indices from
0 take explicit ``position_ids`` safely (:data:`PACKABLE`): RoBERTa-style positions
start after the padding id, and others have none to restart.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Encoder types whose absolute position embeddings are indexed from 0 by position_ids.
PACKABLE = frozenset({"bert"})
# About the most tokens in one row: the masked attention of a row costs its width squared,
# which at 128 is still a few percent of a pass (the linear layers cost per token).
ROW_TOKENS = 128


def can_pack(encoder: nn.Module) -> bool:
    config = encoder.config
    return (
        config.model_type in PACKABLE
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
    )


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``row_tokens`` tokens, first
    fit by decreasing length (a text longer than a row gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_tokens - lengths[i])
    return rows


def packed_hidden_states(
    encoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The encoder's last hidden states ``(B, T, H)`` for a padded batch, computed packed:
    on the real tokens, equal to ``encoder(input_ids, attention_mask).last_hidden_state``
    of a right-padded batch (each text's positions from 0, whichever side it is padded
    on); zero on the padding. Needs :func:`can_pack`."""
    mask = attention_mask.to(torch.bool)  # (B, T)
    lengths = mask.sum(dim=-1).tolist()  # (B,)
    total = sum(lengths)
    # As many rows as ROW_TOKENS needs, filled evenly: little padding in the last row.
    needed = max(1, math.ceil(total / ROW_TOKENS))
    rows = pack_rows(lengths, max(max(lengths), math.ceil(total / needed)))
    width = max(sum(lengths[i] for i in row) for row in rows)
    device = input_ids.device
    # Where each real token goes: (row, column) of the packed batch, in the order of
    # ``mask``'s True entries (row-major: text by text, left to right).
    target_row = torch.empty(len(lengths), dtype=torch.long)
    target_start = torch.empty(len(lengths), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            target_row[i], target_start[i] = r, start
            start += lengths[i]
    counts = torch.tensor(lengths)
    text = torch.repeat_interleave(torch.arange(len(lengths)), counts)  # (N,)
    position = torch.arange(int(counts.sum())) - torch.repeat_interleave(
        counts.cumsum(0) - counts, counts
    )  # (N,) each token's index within its text
    rows_at = target_row[text].to(device)  # (N,)
    columns_at = (target_start[text] + position).to(device)  # (N,)

    packed_ids = input_ids.new_zeros(len(rows), width)  # (R, W)
    packed_ids[rows_at, columns_at] = input_ids[mask]
    position_ids = input_ids.new_zeros(len(rows), width)  # (R, W)
    position_ids[rows_at, columns_at] = position.to(device)
    # Each token attends to its own text; a padding slot only to itself (a row of keys
    # all masked out would give NaN in the softmax).
    owner = -1 - torch.arange(len(rows) * width, device=device).view(len(rows), width)  # (R, W)
    owner[rows_at, columns_at] = text.to(device)
    block = owner[:, :, None] == owner[:, None, :]  # (R, W, W)
    inputs = {
        "input_ids": packed_ids,
        "attention_mask": block[:, None],  # (R, 1, W, W)
        "position_ids": position_ids,
    }
    packed_types = input_ids.new_zeros(len(rows), width)  # (R, W)
    if token_type_ids is not None:
        packed_types[rows_at, columns_at] = token_type_ids[mask]
    inputs["token_type_ids"] = packed_types
    hidden = encoder(**inputs).last_hidden_state  # (R, W, H)
    out = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])  # (B, T, H)
    out[mask] = hidden[rows_at, columns_at]
    return out
