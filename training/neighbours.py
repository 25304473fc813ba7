"""Fit the k-NN vote of :mod:`models.neighbours` after fine-tuning, on train and validation only.

The bank is the pretrained backbone's sentence embeddings of the training messages. The
vote's ``weight`` and ``gate`` are chosen on validation macro-F1 (the figure recipes and
checkpoints are chosen on) over :data:`WEIGHTS` × :data:`GATES`; a tie goes to the lower
gate, which sends fewer messages to the second encoder. When no pair beats the classifier
alone on validation, no vote is kept. ``k`` and ``temperature`` are arguments, not
searched: fewer choices made on ~1,000 validation messages overfit them less.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.neighbours import NeighbourVote
from models.tokenization import encode_texts, model_inputs

WEIGHTS = (0.3, 0.5, 0.7)
GATES = (0.5, 0.7, 0.8, 0.9, 0.95)


@torch.inference_mode()
def embed_texts(
    vote: NeighbourVote,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    batch_size: int = 128,
) -> torch.Tensor:
    """``(N, H)`` sentence embeddings of ``texts`` by ``vote``'s encoder, in order; batches
    of similar lengths, so that little of each is padding."""
    device = next(vote.encoder.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), vote.bank.shape[1], device=device)  # (N, H)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        encoding, _ = encode_texts(tokenizer, [texts[i] for i in rows], max_length)
        out[torch.tensor(rows, device=device)] = vote.embed(**model_inputs(encoding, device))
    return out


def _macro_f1(labels: np.ndarray, probs: torch.Tensor) -> float:
    return float(f1_score(labels, probs.argmax(dim=-1).cpu().numpy(), average="macro"))


def fit_vote(
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: tuple[list[str], np.ndarray],
    validation: tuple[list[str], np.ndarray, np.ndarray],
    num_labels: int,
    max_length: int,
    *,
    k: int = 10,
    temperature: float = 0.05,
) -> tuple[NeighbourVote | None, dict[str, Any]]:
    """The vote over ``train`` (texts, labels) with the ``weight`` and ``gate`` that do best on
    ``validation`` (texts, labels, calibrated probabilities (N, C)), or ``None`` when none
    beats the classifier there; and a report of the choice (JSON-safe)."""
    texts, labels = train
    vote = NeighbourVote(
        encoder.config, num_labels, len(texts), k=k, temperature=temperature, encoder=encoder
    ).eval()
    vote.bank.copy_(embed_texts(vote, tokenizer, texts, max_length))
    vote.bank_labels.copy_(torch.as_tensor(np.asarray(labels), dtype=torch.long))
    val_texts, val_labels, val_probs = validation
    probs = torch.as_tensor(val_probs, dtype=torch.float32)  # (N, C)
    with torch.inference_mode():
        votes = vote.vote(embed_texts(vote, tokenizer, val_texts, max_length)).cpu()  # (N, C)
    before = _macro_f1(val_labels, probs)
    best = (before, None, None, 0.0)
    for gate in GATES:
        unsure = probs.amax(dim=-1) < gate  # (N,)
        for weight in WEIGHTS:
            vote.weight, vote.gate = weight, gate
            mixed = torch.where(unsure[:, None], vote.mix(probs, votes), probs)  # (N, C)
            score = _macro_f1(val_labels, mixed)
            if score > best[0]:
                best = (score, weight, gate, float(unsure.float().mean()))
    score, weight, gate, share = best
    report = {
        "kept": weight is not None,
        "k": k,
        "temperature": temperature,
        "weight": weight,
        "gate": gate,
        "validation_macro_f1_without": before,
        "validation_macro_f1": score,
        "validation_unsure_share": share,
    }
    if weight is None:
        return None, report
    vote.weight, vote.gate = weight, gate
    return vote, report


def revise_logits(
    vote: NeighbourVote,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    logits: np.ndarray,
    temperature: float,
    max_length: int,
) -> tuple[np.ndarray, float]:
    """``logits`` (N, C) of ``texts`` as the predictor serves them with ``vote``
    (:meth:`NeighbourVote.revise`), and the share of rows that got the vote."""

    def embed(rows: torch.Tensor) -> torch.Tensor:
        return embed_texts(vote, tokenizer, [texts[i] for i in rows.tolist()], max_length)

    device = vote.bank.device
    with torch.inference_mode():
        before = torch.as_tensor(logits, dtype=torch.float32, device=device)
        revised = vote.revise(before, temperature, embed)
    share = float((revised != before).any(dim=-1).float().mean()) if len(texts) else 0.0
    return revised.cpu().numpy(), share
