"""Intent classifier: any Hugging Face encoder + masked attention pooling + dropout + linear head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from transformers.utils import ModelOutput

from models.pooling import MaskedAttentionPooling, PoolingConfig


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild the classifier around an encoder of known config."""

    num_labels: int
    hidden_size: int
    pooling_heads: int = 1
    dropout: float = 0.1
    label_smoothing: float = 0.0
    # Token ids never pooled over ([CLS], [SEP], [PAD], ...) when exclude_special_tokens.
    special_token_ids: list[int] = field(default_factory=list)
    exclude_special_tokens: bool = True


@dataclass
class ClassifierOutput(ModelOutput):
    """Fields left as None are dropped by ``to_tuple``, which keeps Trainer's predictions small."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    pooling_weights: torch.Tensor | None = None  # (B, N, T)
    pooling_mask: torch.Tensor | None = None  # (B, T)
    attentions: tuple[torch.Tensor, ...] | None = None  # per layer (B, heads, T, T)


class IntentClassifier(nn.Module):
    """Encoder → attention pooling (special tokens and padding excluded) → dropout → linear."""

    def __init__(self, config: ClassifierConfig, encoder: nn.Module):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.pooling = MaskedAttentionPooling(
            PoolingConfig(hidden_size=config.hidden_size, num_heads=config.pooling_heads)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(self.pooling.output_size, config.num_labels)
        self.register_buffer(
            "special_token_ids",
            torch.tensor(config.special_token_ids, dtype=torch.long),
            persistent=False,
        )

    def pooling_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokens the pooling may attend to: real (non-padding) tokens, minus special tokens."""
        mask = attention_mask.to(torch.bool)
        if self.config.exclude_special_tokens and self.special_token_ids.numel():
            mask = mask & ~torch.isin(input_ids, self.special_token_ids)
        return mask  # (B, T)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_pooling_weights: bool = False,
        output_attentions: bool = False,
        pooling_mask: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        """``pooling_mask`` (B, T) overrides the tokens pooled over; explanations pass the
        input's mask with a [PAD]-substituted baseline so both are read at the same positions."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        encoder_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            encoder_kwargs["token_type_ids"] = token_type_ids
        if output_attentions:
            encoder_kwargs["output_attentions"] = True
        encoded = self.encoder(**encoder_kwargs)
        if pooling_mask is None:
            mask = self.pooling_mask(input_ids, attention_mask)  # (B, T)
        else:
            mask = pooling_mask.to(torch.bool)  # (B, T)
        pooled, weights = self.pooling(encoded.last_hidden_state, mask)  # (B, N*H), (B, N, T)
        logits = self.head(self.dropout(pooled))  # (B, C)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float(), labels, label_smoothing=self.config.label_smoothing
            )
        return ClassifierOutput(
            loss=loss,
            logits=logits,
            pooling_weights=weights if output_pooling_weights else None,
            pooling_mask=mask if output_pooling_weights else None,
            attentions=encoded.attentions if output_attentions else None,
        )
