"""Extractive summarizer: encoder over overlapping chunks → per-unit attention pooling →
a small transformer over unit vectors → one score per unit.

This is the classifier's attention pooling one level up, in the spirit of
hierarchical attention networks and BertSumExt. A conversation's units (turns or
sentences, see :mod:`models.segmentation`) are laid out as one token sequence
``[speaker ":"] unit tokens [SEP]`` per unit; the sequence is cut into overlapping
chunks that fit the encoder, so nothing the user sent is truncated. Every unit token
is read from exactly one chunk (the one where it has the most context on both sides),
and a unit that spans chunks is pooled over its tokens from all of them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import ModelOutput

from models.classifier import SupportLensPreTrainedModel
from models.pooling import MaskedAttentionPooling, PoolingConfig
from models.segmentation import Unit


class SummarizerConfig(PreTrainedConfig):
    """The summarizer around an encoder whose config is nested under ``encoder``."""

    model_type = "supportlens-extractive-summarizer"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "encoder": SubConfigSpec(config_class=AutoConfig, model_type="bert")
    }

    encoder: PreTrainedConfig | dict | None = None
    pooling_heads: int = 1
    context_layers: int = 2
    context_heads: int = 4
    context_feedforward: int = 1024
    dropout: float = 0.1
    # Weight of the positive (selected) class in the BCE loss: few units are selected.
    pos_weight: float = 1.0
    # "bce": each unit scored on its own against its label (0/1, or a graded target in
    # [0, 1]); "listwise": a softmax over each conversation's units is fitted to the
    # targets turned into a distribution (softmax of target / temperature). Only the
    # units' order matters for selection, and the listwise loss trains exactly that.
    loss: str = "bce"
    listwise_temperature: float = 0.1
    # Add learned features of each unit's place in the conversation (relative position,
    # first, last) to the unit vectors: the sinusoidal index alone cannot say where the
    # end is, and openings and closings matter in dialogue summaries.
    position_features: bool = False
    # Chunks per encoder pass at inference, to bound memory on very long inputs.
    chunks_per_pass: int = 32

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.hidden_size)


@dataclass
class SummarizerOutput(ModelOutput):
    """Fields left as None are dropped by ``to_tuple``, which keeps Trainer's predictions small."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, U)
    pooling_weights: torch.Tensor | None = None  # (B, U, N, Tu)
    unit_mask: torch.Tensor | None = None  # (B, U)


@dataclass
class EncodedConversations:
    """Model inputs for a batch of segmented conversations, and where each token came from.

    ``token_offsets[b][u]`` lists the ``(start, end)`` character offsets, in the
    original text, of the tokens pooled for unit ``u`` (in the order of the pooling
    weights' last axis).
    """

    tensors: dict[str, torch.Tensor]
    token_offsets: list[list[list[tuple[int, int]]]]
    num_chunks: list[int]


def _chunk_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start positions of windows of ``window`` tokens covering ``length`` tokens."""
    if length <= window:
        return [0]
    stride = window - overlap
    starts = list(range(0, length - window, stride))
    # The last window is aligned to the end so no window runs past the sequence.
    starts.append(length - window)
    return starts


def encode_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Unit]],
    *,
    max_length: int,
    overlap: int | None = None,
) -> EncodedConversations:
    """Tokenize segmented conversations into overlapping encoder chunks.

    Returns ``input_ids``/``attention_mask`` of shape ``(C, L)`` for all chunks of the
    batch, ``unit_token_index`` ``(B, U, Tu)`` pointing into the flattened ``(C*L)``
    token states, ``unit_token_mask`` ``(B, U, Tu)`` and ``unit_mask`` ``(B, U)``.
    Conversations must have at least one unit each. ``overlap`` defaults to a quarter
    of a chunk, at most 64 tokens.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the summarizer needs a fast tokenizer (character offsets of tokens)")
    cls_id = (
        tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    )
    sep_id = (
        tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    )
    specials = int(cls_id is not None) + int(sep_id is not None)
    window = max_length - specials
    if window < 8:
        raise ValueError(f"max_length {max_length} is too small to encode anything")
    if overlap is None:
        overlap = min(64, window // 4)
    if not 0 <= overlap <= window // 2:
        raise ValueError(f"chunk overlap must be between 0 and {window // 2}, got {overlap}")
    if any(len(units) == 0 for units in conversations):
        raise ValueError("every conversation needs at least one unit")

    texts = [unit.text for units in conversations for unit in units]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    speakers = sorted({u.speaker for units in conversations for u in units if u.speaker})
    prefix_ids = {
        s: ids
        for s, ids in zip(
            speakers,
            tokenizer([f"{s}:" for s in speakers], add_special_tokens=False)["input_ids"]
            if speakers
            else [],
            strict=True,
        )
    }

    chunks: list[list[int]] = []
    # Per conversation, per unit: positions (chunk index, position in chunk) of its tokens.
    positions: list[list[list[tuple[int, int]]]] = []
    token_offsets: list[list[list[tuple[int, int]]]] = []
    num_chunks: list[int] = []
    flat_unit = 0
    for units in conversations:
        sequence: list[int] = []
        unit_spans: list[range] = []
        offsets: list[list[tuple[int, int]]] = []
        for unit in units:
            ids = encoded["input_ids"][flat_unit]
            unit_offsets = encoded["offset_mapping"][flat_unit]
            flat_unit += 1
            sequence += prefix_ids.get(unit.speaker, [])
            unit_spans.append(range(len(sequence), len(sequence) + len(ids)))
            sequence += ids
            offsets.append([(unit.start + a, unit.start + b) for a, b in unit_offsets])
            if sep_id is not None:
                sequence.append(sep_id)
        starts = _chunk_starts(len(sequence), window, overlap)
        first_chunk = len(chunks)
        for start in starts:
            body = sequence[start : start + window]
            chunks.append(
                ([cls_id] if cls_id is not None else [])
                + body
                + ([sep_id] if sep_id is not None else [])
            )
        lead = int(cls_id is not None)

        def owner(
            p: int, starts: list[int] = starts, n: int = len(sequence), lead: int = lead
        ) -> tuple[int, int]:
            # Of the (at most a few) chunks holding token p, the one where p is farthest
            # from an edge that cuts context; the sequence's own ends cut nothing.
            best, best_margin = 0, -1
            c = bisect.bisect_right(starts, p) - 1
            while c >= 0 and starts[c] + window > p:
                s, e = starts[c], min(starts[c] + window, n)
                margin = min(p - s if s > 0 else window, e - 1 - p if e < n else window)
                if margin > best_margin:
                    best, best_margin = c, margin
                c -= 1
            return best, p - starts[best] + lead

        positions.append(
            [[(first_chunk + c, q) for c, q in map(owner, span)] for span in unit_spans]
        )
        token_offsets.append(offsets)
        num_chunks.append(len(starts))

    length = max(len(chunk) for chunk in chunks)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(chunks), length), pad_id, dtype=torch.long)  # (C, L)
    attention_mask = torch.zeros((len(chunks), length), dtype=torch.long)  # (C, L)
    for c, chunk in enumerate(chunks):
        input_ids[c, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        attention_mask[c, : len(chunk)] = 1

    max_units = max(len(units) for units in conversations)
    max_tokens = max(1, max(len(span) for conv in positions for span in conv))
    index = torch.zeros((len(conversations), max_units, max_tokens), dtype=torch.long)  # (B, U, Tu)
    token_mask = torch.zeros_like(index, dtype=torch.bool)  # (B, U, Tu)
    unit_mask = torch.zeros((len(conversations), max_units), dtype=torch.bool)  # (B, U)
    for b, conv in enumerate(positions):
        unit_mask[b, : len(conv)] = True
        for u, span in enumerate(conv):
            if span:
                index[b, u, : len(span)] = torch.tensor([c * length + q for c, q in span])
                token_mask[b, u, : len(span)] = True
    return EncodedConversations(
        tensors={
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "unit_token_index": index,
            "unit_token_mask": token_mask,
            "unit_mask": unit_mask,
        },
        token_offsets=token_offsets,
        num_chunks=num_chunks,
    )


def sinusoidal_positions(count: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed sine/cosine position encodings ``(count, dim)``: no limit on the number of units."""
    position = torch.arange(count, device=device, dtype=torch.float32)[:, None]  # (U, 1)
    frequency = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )  # (H/2,)
    table = torch.zeros(count, dim, device=device)  # (U, H)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


LOSSES = ("bce", "listwise")


def relative_position_features(unit_mask: torch.Tensor) -> torch.Tensor:
    """Per unit: position / (units - 1), is first, is last; ``(B, U, 3)``, zeros on padding."""
    count = unit_mask.sum(dim=1, keepdim=True).float()  # (B, 1)
    index = torch.arange(unit_mask.shape[1], device=unit_mask.device).float()[None]  # (1, U)
    index = index.expand(unit_mask.shape[0], -1)  # (B, U)
    features = torch.stack(
        [index / (count - 1).clamp_min(1), (index == 0).float(), (index == count - 1).float()],
        dim=-1,
    )  # (B, U, 3)
    return features * unit_mask[..., None]


class ExtractiveSummarizer(SupportLensPreTrainedModel):
    """Chunked encoder → per-unit attention pooling → unit-level transformer → linear score.

    ``ExtractiveSummarizer(config, encoder)`` wraps a loaded encoder (training);
    ``ExtractiveSummarizer(config)`` builds one from ``config.encoder`` (loading).
    """

    config_class = SummarizerConfig

    def __init__(self, config: SummarizerConfig, encoder: PreTrainedModel | None = None):
        if encoder is not None:
            config.encoder = encoder.config
        super().__init__(config)
        self.encoder = self._attach_encoder(encoder)
        hidden = config.hidden_size
        self.pooling = MaskedAttentionPooling(
            PoolingConfig(hidden_size=hidden, num_heads=config.pooling_heads)
        )
        self.unit_projection = nn.Linear(self.pooling.output_size, hidden)
        self.unit_norm = nn.LayerNorm(hidden)
        if config.loss not in LOSSES:
            raise ValueError(f"unknown summarizer loss {config.loss!r}; available: {list(LOSSES)}")
        if not config.listwise_temperature > 0:
            raise ValueError(
                f"listwise_temperature must be positive, got {config.listwise_temperature}"
            )
        self.position_features = nn.Linear(3, hidden) if config.position_features else None
        layer = nn.TransformerEncoderLayer(
            d_model=hidden,
            nhead=config.context_heads,
            dim_feedforward=config.context_feedforward,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.context = nn.TransformerEncoder(
            layer, num_layers=config.context_layers, enable_nested_tensor=False
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(hidden, 1)
        self.post_init()

    def encode_chunks(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token states ``(C, L, H)``.

        Without autograd, chunks go through in slices to bound memory. With autograd the
        graph keeps every slice's activations anyway, so one pass is used (which also
        lets layer hooks, e.g. Captum's, see every chunk in a single call).
        """

        def encode(rows: slice) -> torch.Tensor:
            kwargs = {"input_ids": input_ids[rows], "attention_mask": attention_mask[rows]}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids[rows]
            return self.encoder(**kwargs).last_hidden_state  # (C', L, H)

        if self.training or torch.is_grad_enabled():
            # No loop over the chunk count here: torch.export (the ONNX export) would
            # specialize the graph to the traced number of chunks.
            return encode(slice(None))  # (C, L, H)
        step = max(1, self.config.chunks_per_pass)
        states = [encode(slice(s, s + step)) for s in range(0, input_ids.shape[0], step)]
        return torch.cat(states, dim=0)  # (C, L, H)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        unit_token_index: torch.Tensor,
        unit_token_mask: torch.Tensor,
        unit_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_pooling_weights: bool = False,
        **kwargs,
    ) -> SummarizerOutput:
        states = self.encode_chunks(input_ids, attention_mask, token_type_ids)  # (C, L, H)
        batch, units, tokens = unit_token_index.shape
        flat_states = states.reshape(-1, states.shape[-1])  # (C*L, H)
        unit_states = flat_states[unit_token_index.reshape(-1)].reshape(
            batch * units, tokens, -1
        )  # (B*U, Tu, H)
        pooled, weights = self.pooling(
            unit_states, unit_token_mask.reshape(batch * units, tokens)
        )  # (B*U, N*H), (B*U, N, Tu)
        vectors = self.unit_norm(self.unit_projection(pooled)).reshape(
            batch, units, -1
        )  # (B, U, H)
        vectors = vectors + sinusoidal_positions(units, vectors.shape[-1], vectors.device).to(
            vectors.dtype
        )
        unit_mask = unit_mask.to(torch.bool)
        if self.position_features is not None:
            vectors = vectors + self.position_features(
                relative_position_features(unit_mask).to(vectors.dtype)
            )  # (B, U, H)
        padding = ~unit_mask
        # A row with no unit at all would make attention divide by zero (NaN).
        padding[:, 0] = padding[:, 0] & unit_mask.any(dim=1)  # not &=: no ONNX export
        context = self.context(vectors, src_key_padding_mask=padding)  # (B, U, H)
        logits = self.head(self.dropout(context)).squeeze(-1)  # (B, U)
        loss = None
        if labels is not None:
            loss = self.loss(logits, labels, unit_mask)
        return SummarizerOutput(
            loss=loss,
            logits=logits,
            pooling_weights=(
                weights.reshape(batch, units, weights.shape[1], tokens)  # (B, U, N, Tu)
                if output_pooling_weights
                else None
            ),
            unit_mask=unit_mask if output_pooling_weights else None,
        )

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, unit_mask: torch.Tensor
    ) -> torch.Tensor:
        """The configured loss; ``labels`` (B, U) are targets in [0, 1], negative on padding."""
        valid = unit_mask & (labels >= 0)  # (B, U)
        targets = labels.float().clamp(0, 1)
        if self.config.loss == "listwise":
            # -inf would give NaN for a conversation with no valid unit; those are dropped.
            blocked = torch.finfo(torch.float32).min
            wanted = F.softmax(
                (targets / self.config.listwise_temperature).masked_fill(~valid, blocked), dim=1
            )  # (B, U)
            log_probs = F.log_softmax(logits.float().masked_fill(~valid, blocked), dim=1)
            per_conversation = -(wanted * log_probs).masked_fill(~valid, 0).sum(dim=1)  # (B,)
            rows = valid.any(dim=1)
            return (per_conversation * rows).sum() / rows.sum().clamp_min(1)
        per_unit = F.binary_cross_entropy_with_logits(
            logits.float(),
            targets,
            pos_weight=torch.tensor(self.config.pos_weight, device=logits.device),
            reduction="none",
        )  # (B, U)
        return (per_unit * valid).sum() / valid.sum().clamp_min(1)
