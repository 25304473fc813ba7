"""Intent classifier: any Hugging Face encoder + masked attention pooling + dropout + linear head.

A ``PreTrainedModel`` with its own ``model_type``: ``save_pretrained`` writes ``config.json``
(the encoder's config nested under ``encoder``, the intents in ``id2label``) and
``model.safetensors``; after ``import models`` the Auto classes load it like any other model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import ModelOutput

from models.neighbours import NeighbourVote
from models.packing import packed_hidden_states
from models.pooling import MaskedAttentionPooling, PoolingConfig


class ClassifierConfig(PreTrainedConfig):
    """The classifier around an encoder whose config is nested under ``encoder`` (as in
    ``EncoderDecoderConfig``). The intents are ``id2label``; ``num_labels`` is their count."""

    model_type = "supportlens-intent-classifier"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "encoder": SubConfigSpec(config_class=AutoConfig, model_type="bert")
    }

    encoder: PreTrainedConfig | dict | None = None
    pooling_heads: int = 1
    dropout: float = 0.1
    label_smoothing: float = 0.0
    # R-Drop (Liang et al. 2021): in training, each batch runs twice under different dropout
    # masks and the loss adds this weight times the symmetric KL divergence of the two
    # predictions. 0 turns it off; inference is unchanged either way.
    rdrop_alpha: float = 0.0
    # Knowledge distillation (Hinton et al. 2015): when a batch carries a teacher's logits,
    # the loss is (1 - alpha) times the loss above plus alpha times T^2 times the KL
    # divergence of the student's temperature-T distribution from the teacher's.
    distillation_alpha: float = 0.5
    distillation_temperature: float = 2.0
    # Token ids never pooled over ([CLS], [SEP], [PAD], ...) when exclude_special_tokens.
    special_token_ids: list[int] | None = None
    exclude_special_tokens: bool = True
    # The k-NN vote of the pretrained encoder for unsure messages (models.neighbours):
    # its settings (bank_size, k, temperature, weight, gate), or None without one.
    neighbours: dict | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.hidden_size)


@dataclass
class ClassifierOutput(ModelOutput):
    """Fields left as None are dropped by ``to_tuple``, which keeps Trainer's predictions small."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    pooling_weights: torch.Tensor | None = None  # (B, N, T)
    pooling_mask: torch.Tensor | None = None  # (B, T)
    attentions: tuple[torch.Tensor, ...] | None = None  # per layer (B, heads, T, T)
    pooled: torch.Tensor | None = None  # (B, N*H), the features out-of-scope detection reads


class SupportLensPreTrainedModel(PreTrainedModel):
    """What the classifier and the summarizer share: weight initialisation and the encoder.

    The encoder is a ``PreTrainedModel`` of its own: ``post_init`` dispatches to its own
    ``_init_weights`` and leaves it alone when it arrives loaded (pretrained weights carry
    transformers' ``_is_hf_initialized`` flag).
    """

    base_model_prefix = "supportlens"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, MaskedAttentionPooling):
            nn.init.normal_(module.query, std=module.config.hidden_size**-0.5)
        elif isinstance(module, nn.Linear):
            module.reset_parameters()  # PyTorch's default, as the heads had before
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()

    def _attach_encoder(self, encoder: PreTrainedModel | None) -> PreTrainedModel:
        """The given encoder, else one built from ``config.encoder``; both share that config."""
        if encoder is None:
            encoder = AutoModel.from_config(self.config.encoder)
        encoder.config = self.config.encoder  # one shared object, as in EncoderDecoderModel
        return encoder

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder.set_input_embeddings(value)


class IntentClassifier(SupportLensPreTrainedModel):
    """Encoder → attention pooling (special tokens and padding excluded) → dropout → linear.

    ``IntentClassifier(config, encoder)`` wraps a loaded encoder (training);
    ``IntentClassifier(config)`` builds one from ``config.encoder`` (loading).
    """

    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig, encoder: PreTrainedModel | None = None):
        if encoder is not None:
            config.encoder = encoder.config
        super().__init__(config)
        self.encoder = self._attach_encoder(encoder)
        self.pooling = MaskedAttentionPooling(
            PoolingConfig(hidden_size=config.hidden_size, num_heads=config.pooling_heads)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(self.pooling.output_size, config.num_labels)
        # Not used by forward: the predictor runs it for unsure messages (models.neighbours).
        self.neighbours = (
            NeighbourVote(config.encoder, config.num_labels, **config.neighbours)
            if config.neighbours
            else None
        )
        self.post_init()

    def attach_neighbours(self, vote: NeighbourVote | None) -> None:
        """Add (or with ``None`` remove) the k-NN vote; its settings go into the config,
        its encoder and bank into the weights, so ``save_pretrained`` keeps them."""
        self.neighbours = vote
        self.config.neighbours = None if vote is None else vote.settings()

    def pooling_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokens the pooling may attend to: real (non-padding) tokens, minus special tokens."""
        mask = attention_mask.to(torch.bool)
        if self.config.exclude_special_tokens and self.config.special_token_ids:
            # Built per call, not a buffer: from_pretrained creates modules on the meta
            # device and would leave a non-persistent buffer uninitialised.
            special = torch.tensor(self.config.special_token_ids, device=input_ids.device)
            mask = mask & ~torch.isin(input_ids, special)
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
        output_pooled: bool = False,
        teacher_logits: torch.Tensor | None = None,
        **kwargs,
    ) -> ClassifierOutput:
        """``pooling_mask`` (B, T) overrides the tokens pooled over; explanations pass the
        input's mask with a [PAD]-substituted baseline so both are read at the same positions.
        ``output_pooled`` returns the pooled features (B, N*H) before dropout (computed anyway,
        so asking costs nothing). ``teacher_logits`` (B, C), in training with ``labels``, adds
        the distillation term (see ``ClassifierConfig``). Other keyword arguments (Trainer's
        ``num_items_in_batch``) are not used."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rdrop = self.training and labels is not None and self.config.rdrop_alpha > 0
        if rdrop:
            # Two copies of the batch in one pass: their dropout masks differ.
            input_ids = input_ids.repeat(2, 1)  # (2B, T)
            attention_mask = attention_mask.repeat(2, 1)  # (2B, T)
            if token_type_ids is not None:
                token_type_ids = token_type_ids.repeat(2, 1)  # (2B, T)
            if pooling_mask is not None:
                pooling_mask = pooling_mask.repeat(2, 1)  # (2B, T)
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
        logits, pooled, weights = self.classify(encoded.last_hidden_state, mask)
        loss = None
        if rdrop:
            loss = self.rdrop_loss(logits.float(), labels)
            logits, pooled, weights, mask = (x.chunk(2)[0] for x in (logits, pooled, weights, mask))
        elif labels is not None:
            loss = F.cross_entropy(
                logits.float(), labels, label_smoothing=self.config.label_smoothing
            )
        if loss is not None and teacher_logits is not None and self.training:
            loss = self.distillation_loss(loss, logits.float(), teacher_logits.float())
        return ClassifierOutput(
            loss=loss,
            logits=logits,
            pooling_weights=weights if output_pooling_weights else None,
            pooling_mask=mask if output_pooling_weights else None,
            attentions=encoded.attentions if output_attentions else None,
            pooled=pooled if output_pooled else None,
        )

    def rdrop_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of both passes plus ``rdrop_alpha`` times their symmetric KL
        divergence; ``logits`` (2B, C) holds the first pass, then the second."""
        first, second = logits.chunk(2)  # (B, C) each
        ce = F.cross_entropy(logits, labels.repeat(2), label_smoothing=self.config.label_smoothing)
        log_p, log_q = F.log_softmax(first, dim=-1), F.log_softmax(second, dim=-1)
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") + F.kl_div(
            log_q, log_p, log_target=True, reduction="batchmean"
        )
        return ce + self.config.rdrop_alpha * kl / 2

    def distillation_loss(
        self, loss: torch.Tensor, logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        """Mix ``loss`` (from the labels) with the KL divergence of the student's softened
        prediction from the teacher's, scaled by T^2 so its gradients keep their size."""
        alpha, t = self.config.distillation_alpha, self.config.distillation_temperature
        kl = F.kl_div(
            F.log_softmax(logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        return (1 - alpha) * loss + alpha * t * t * kl

    def classify(
        self, hidden_states: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooling and head on the encoder's states ``(B, T, H)`` over ``mask`` ``(B, T)``:
        logits (B, C), pooled features (B, N*H) and pooling weights (B, N, T)."""
        pooled, weights = self.pooling(hidden_states, mask)  # (B, N*H), (B, N, T)
        logits = self.head(self.dropout(pooled))  # (B, C)
        return logits, pooled, weights

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        output_pooled: bool = False,
    ) -> ClassifierOutput:
        """:meth:`forward`'s logits (and pooled features) for a padded batch, with the
        texts packed into few rows (:mod:`models.packing`): one pass and almost no
        padding for many short texts of mixed lengths. Needs ``can_pack(self.encoder)``."""
        hidden = packed_hidden_states(self.encoder, input_ids, attention_mask, token_type_ids)
        logits, pooled, _ = self.classify(hidden, self.pooling_mask(input_ids, attention_mask))
        return ClassifierOutput(logits=logits, pooled=pooled if output_pooled else None)
