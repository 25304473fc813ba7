"""A second opinion for the classifier's unsure messages: a k-nearest-neighbour vote in the
sentence-embedding space of the backbone before fine-tuning.

Fine-tuning reshapes the encoder around the training intents; the pretrained sentence
embedding (the mean of the last hidden states, as sentence-transformers pools
all-MiniLM-L6-v2) keeps a geometry of its own, and its errors differ from the
classifier's. Interpolating the classifier's distribution with a k-NN distribution over
training messages (Khandelwal et al. 2020, "kNN-LM"; ConvFiT's nearest-neighbour
inference) recovers most of the gain of a two-model ensemble. To keep serving at the
classifier's speed, only messages whose calibrated confidence is below ``gate`` get the
vote (a cascade): on BANKING77 about one message in ten, so the second encoder runs for
those alone (``benchmarks/results/neighbours.md``).

For a message with calibrated probabilities ``p`` (C,) and top-k cosine similarities
``s_j`` to training messages of labels ``y_j``::

    knn_c = Σ_j softmax(s / temperature)_j · [y_j = c]
    p'    = (1 − weight) · p + weight · knn      when max(p) < gate, else p

The encoder and the bank (L2-normalised embeddings of the training messages and their
labels) are submodules and buffers of the classifier, so they are saved and loaded with
its weights (``model.safetensors``); the settings live in ``ClassifierConfig.neighbours``.
Fitting (the embeddings, and ``weight`` and ``gate`` chosen on validation) is in
:mod:`training.neighbours`; this module only scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel


def mean_over_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, H)`` mean of ``hidden`` (B, T, H) over the tokens where ``mask`` (B, T) is set:
    the sentence embedding sentence-transformers computes for all-MiniLM-L6-v2."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, H)


class NeighbourVote(nn.Module):
    """The pretrained encoder, the bank and the vote's settings.

    Buffers: ``bank`` (M, H) L2-normalised training embeddings (float32) and
    ``bank_labels`` (M,) their intent ids (int64).
    """

    def __init__(
        self,
        encoder_config: PreTrainedConfig,
        num_labels: int,
        bank_size: int,
        k: int = 10,
        temperature: float = 0.05,
        weight: float = 0.5,
        gate: float = 0.9,
        encoder: PreTrainedModel | None = None,
    ):
        super().__init__()
        if not (isinstance(k, int) and k >= 1 and isinstance(bank_size, int) and bank_size >= 1):
            raise ValueError(
                f"a neighbour vote needs k >= 1 and bank_size >= 1, got {k}, {bank_size}"
            )
        if not (temperature > 0 and 0 <= weight <= 1 and math.isfinite(gate)):
            raise ValueError(
                "a neighbour vote needs temperature > 0, weight in [0, 1] and a finite gate, "
                f"got {temperature}, {weight}, {gate}"
            )
        self.encoder = AutoModel.from_config(encoder_config) if encoder is None else encoder
        self.num_labels = num_labels
        self.k, self.temperature, self.weight, self.gate = k, temperature, weight, gate
        hidden = int(encoder_config.hidden_size)
        self.register_buffer("bank", torch.zeros(bank_size, hidden))
        self.register_buffer("bank_labels", torch.zeros(bank_size, dtype=torch.long))

    def check_bank(self) -> None:
        """Raise ``ValueError`` unless the bank's labels are intents and its rows finite."""
        labels = self.bank_labels
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_labels):
            raise ValueError(f"its bank holds labels outside the {self.num_labels} intents")
        if not bool(torch.isfinite(self.bank).all()):
            raise ValueError("its bank holds non-finite embeddings")

    def settings(self) -> dict:
        """What :class:`ClassifierConfig` stores under ``neighbours`` (JSON-safe)."""
        return {
            "bank_size": int(self.bank.shape[0]),
            "k": self.k,
            "temperature": self.temperature,
            "weight": self.weight,
            "gate": self.gate,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items())

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, H)`` L2-normalised mean of the encoder's last hidden states over real tokens."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state.float()  # (B, T, H)
        return F.normalize(mean_over_tokens(hidden, attention_mask), dim=-1)

    def vote(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` k-NN distribution of L2-normalised ``embeddings`` (B, H) over the bank."""
        similarity = embeddings.float() @ self.bank.float().T  # (B, M)
        k = min(self.k, self.bank.shape[0])
        top, index = similarity.topk(k, dim=-1)  # (B, k) each
        # float32 even under autocast, which would have run the product above in bf16.
        weights = torch.softmax(top.float() / self.temperature, dim=-1)  # (B, k)
        votes = torch.zeros(
            embeddings.shape[0], self.num_labels, device=embeddings.device
        )  # (B, C)
        return votes.scatter_add_(1, self.bank_labels[index], weights)

    def unsure(self, probs: torch.Tensor) -> torch.Tensor:
        """``(B,)`` rows whose calibrated confidence is below the gate: those get the vote."""
        return probs.amax(dim=-1) < self.gate

    def mix(self, probs: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
        """The interpolated distribution ``(B, C)`` of calibrated ``probs`` and ``votes``."""
        return (1.0 - self.weight) * probs.float() + self.weight * votes

    def revise(
        self,
        logits: torch.Tensor,
        temperature: float,
        embed: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``logits`` (B, C) with the unsure rows' replaced by ``temperature · log(p')``, so
        that the calibrated softmax gives the interpolated ``p'`` exactly; ``embed(rows)``
        returns the embeddings (U, H) of the unsure rows (U,), computed only for them."""
        probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, C)
        rows = self.unsure(probs).nonzero().flatten()  # (U,)
        if rows.numel() == 0:
            return logits
        mixed = self.mix(probs[rows], self.vote(embed(rows)))  # (U, C)
        revised = logits.float().clone()  # (B, C)
        revised[rows] = temperature * mixed.clamp_min(1e-12).log()
        return revised
