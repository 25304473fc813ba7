"""Masked attention pooling over encoder token states.

A learned query per head scores every token; padding (and, by the caller's mask,
special tokens) is excluded *before* the softmax so it never receives weight, and
the softmax is written so that a row with no valid token gives zeros, not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PoolingConfig:
    """Shape of the attention pooling layer."""

    hidden_size: int
    num_heads: int = 1
    dropout: float = 0.0


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of ``scores`` over ``dim`` restricted to positions where ``mask`` is true.

    Masked positions get exactly 0. A slice whose positions are all masked gives all
    zeros (``torch.softmax`` with ``-inf`` fill would give NaN there). Computed in
    float32 for stability under bf16/fp16 autocast.
    """
    mask = mask.to(torch.bool)
    scores = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    # Subtracting the max keeps exp() in range; masked entries are zeroed after exp.
    shifted = scores - scores.amax(dim=dim, keepdim=True)
    exp = shifted.exp() * mask
    denom = exp.sum(dim=dim, keepdim=True)
    return exp / denom.clamp_min(torch.finfo(torch.float32).tiny)


class MaskedAttentionPooling(nn.Module):
    """Additive attention pooling with ``num_heads`` learned queries.

    ``forward`` returns the pooled vector ``(B, num_heads * H)`` and the weights
    ``(B, num_heads, T)``: non-negative, summing to 1 over the unmasked tokens of a
    row (0 for a row with no unmasked token), exactly 0 on masked tokens.
    """

    def __init__(self, config: PoolingConfig):
        super().__init__()
        self.config = config
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.query = nn.Parameter(torch.empty(config.num_heads, config.hidden_size))
        nn.init.normal_(self.query, std=config.hidden_size**-0.5)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def output_size(self) -> int:
        return self.config.num_heads * self.config.hidden_size

    def forward(
        self, hidden_states: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size = hidden_states.shape[0]
        keys = torch.tanh(self.key(hidden_states))  # (B, T, H)
        scores = torch.einsum("bth,nh->bnt", keys, self.query.to(keys.dtype))  # (B, N, T)
        weights = masked_softmax(scores, mask[:, None, :], dim=-1)  # (B, N, T)
        pooled = torch.einsum(
            "bnt,bth->bnh", self.dropout(weights).to(hidden_states.dtype), hidden_states
        )  # (B, N, H)
        return pooled.reshape(batch_size, -1), weights  # (B, N*H), (B, N, T)
