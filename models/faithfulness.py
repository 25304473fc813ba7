"""Faithfulness of a word ranking: ERASER's AOPC comprehensiveness and sufficiency, and NAOPC.

Pure functions, shared by the service (``"faithfulness": true``) and by
``benchmarks/faithfulness.py`` so that both measure exactly the same thing.

**Deletion rule.** A word is removed by deleting its characters, ``text[start:end]``
(the word's character span, as every explanation returns it), from the text; what is
between words (spaces, newlines) stays. The perturbed text is then tokenized again
and scored by the model like any other text. So ``"my card was declined"`` without
``card`` is ``"my  was declined"``.

**Bins.** For a ranking of ``n`` words (highest score first, ties broken by position)
and each fraction ``f`` of :data:`DEFAULT_BINS` (10, 20, 30, 40, 50%), the top
``k = max(1, ceil(f · n))`` words are taken:

* comprehensiveness_k = q(x) − q(x with the top-k words deleted)   (higher is better)
* sufficiency_k       = q(x) − q(x with only the top-k words kept)  (lower is better)

and AOPC is their mean over the bins (DeYoung et al. 2020). ``q`` is the quantity
explained: the calibrated probability of the explained intent, or for a contrast the
margin between two intents' calibrated probabilities.

**NAOPC** (Edin et al. 2024) divides out what is achievable on one input:
``(aopc − lower) / (upper − lower)``, where ``upper`` and ``lower`` are the AOPC of the
best and worst word orderings for that input. Finding them exactly is a search over
``n!`` orderings; :func:`greedy_orderings` approximates them as the paper does with a
beam search, here with a beam of width one (greedy: at each step the word whose
deletion, or keeping, moves ``q`` most in the wanted direction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

DEFAULT_BINS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)

Span = tuple[int, int]


def delete_spans(text: str, spans: Sequence[Span], drop: set[int] | Sequence[int]) -> str:
    """``text`` with the characters of the spans whose index is in ``drop`` removed.

    ``spans`` must be in text order and not overlap (as explanations' words are).
    """
    drop = set(drop)
    pieces, cursor = [], 0
    for index, (start, end) in enumerate(spans):
        if index in drop:
            pieces.append(text[cursor:start])
            cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


def top_k_sizes(num_words: int, bins: Sequence[float] = DEFAULT_BINS) -> list[int]:
    """How many words each bin takes: ``max(1, ceil(f · n))``."""
    return [max(1, math.ceil(fraction * num_words - 1e-9)) for fraction in bins]


def ranking(scores: Sequence[float]) -> list[int]:
    """Word indices by score, highest first; ties keep text order. NaN ranks last."""
    return sorted(
        range(len(scores)),
        key=lambda i: (-scores[i] if scores[i] == scores[i] else math.inf, i),
    )


@dataclass
class Perturbations:
    """The texts one ranking needs: per bin, the text without its top-k words and the
    text with only them."""

    sizes: list[int]
    comprehensive: list[str]
    sufficient: list[str]


def perturb(
    text: str, spans: Sequence[Span], order: Sequence[int], bins: Sequence[float] = DEFAULT_BINS
) -> Perturbations:
    """The perturbed texts of ``text`` for the word ``order`` (most important first)."""
    sizes = top_k_sizes(len(spans), bins)
    everything = set(range(len(spans)))
    comprehensive, sufficient = [], []
    for k in sizes:
        top = set(order[:k])
        comprehensive.append(delete_spans(text, spans, top))
        sufficient.append(delete_spans(text, spans, everything - top))
    return Perturbations(sizes, comprehensive, sufficient)


@dataclass
class Faithfulness:
    """AOPC of one ranking on one input; ``bins`` holds every bin's values."""

    comprehensiveness: float
    sufficiency: float
    bins: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "comprehensiveness": self.comprehensiveness,
            "sufficiency": self.sufficiency,
            "bins": self.bins,
        }


def aopc(
    full: float,
    comprehensive: Sequence[float],
    sufficient: Sequence[float],
    sizes: Sequence[int],
    bins: Sequence[float] = DEFAULT_BINS,
) -> Faithfulness:
    """AOPC from the explained quantity on the full text and on each bin's perturbed texts."""
    rows = []
    for fraction, k, deleted, kept in zip(bins, sizes, comprehensive, sufficient, strict=True):
        rows.append(
            {
                "fraction": float(fraction),
                "words": int(k),
                "comprehensiveness": float(full - deleted),
                "sufficiency": float(full - kept),
            }
        )
    return Faithfulness(
        comprehensiveness=sum(r["comprehensiveness"] for r in rows) / len(rows),
        sufficiency=sum(r["sufficiency"] for r in rows) / len(rows),
        bins=rows,
    )


def normalized(value: float, lower: float, upper: float) -> float:
    """NAOPC: ``(value − lower) / (upper − lower)``; NaN when the bounds coincide (every
    ordering scores the same, e.g. a one-word text: nothing to normalise by)."""
    if not upper > lower:
        return math.nan
    return (value - lower) / (upper - lower)


class Variants:
    """Collects perturbed texts, deduplicated, so all of them go through one batched
    forward: :meth:`add` returns each text's row in :attr:`texts`."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self._rows: dict[str, int] = {}

    def add(self, text: str) -> int:
        row = self._rows.get(text)
        if row is None:
            row = self._rows[text] = len(self.texts)
            self.texts.append(text)
        return row

    def add_all(self, texts: Sequence[str]) -> list[int]:
        return [self.add(text) for text in texts]


@dataclass
class PlannedRanking:
    """One ranking's perturbed texts, as rows of a :class:`Variants`."""

    sizes: list[int]
    comprehensive: list[int]
    sufficient: list[int]

    def score(
        self, full: float, values: Sequence[float], bins: Sequence[float] = DEFAULT_BINS
    ) -> Faithfulness:
        """AOPC given the explained quantity of every row of the variants."""
        return aopc(
            full,
            [values[r] for r in self.comprehensive],
            [values[r] for r in self.sufficient],
            self.sizes,
            bins,
        )


def plan(
    variants: Variants,
    text: str,
    spans: Sequence[Span],
    scores: Sequence[float],
    bins: Sequence[float] = DEFAULT_BINS,
) -> PlannedRanking:
    """Add the perturbed texts of the ranking by ``scores`` to ``variants``."""
    perturbed = perturb(text, spans, ranking(scores), bins)
    return PlannedRanking(
        perturbed.sizes,
        variants.add_all(perturbed.comprehensive),
        variants.add_all(perturbed.sufficient),
    )


def greedy_orderings(
    inputs: Sequence[tuple[str, Sequence[Span]]],
    quantity: Callable[[list[str], list[int]], Sequence[float]],
    bins: Sequence[float] = DEFAULT_BINS,
) -> dict[str, list[list[int]]]:
    """Approximate best and worst word orderings of many inputs, found greedily in lockstep.

    ``quantity(texts, owners)`` returns the explained quantity of each text, where
    ``owners[i]`` is the index of the input that ``texts[i]`` perturbs (all candidates
    of one step of every input go through one call). Each ordering is grown one word
    at a time up to the largest bin's size:

    * ``comprehensiveness_best`` / ``_worst``: the next word is the one whose deletion
      (with those already chosen) gives the lowest / highest quantity;
    * ``sufficiency_best`` / ``_worst``: the next word is the one whose keeping (with
      those already chosen, every other word deleted) gives the highest / lowest.

    Returns, per kind, one ordering (a prefix of word indices) per input.
    """
    kinds = {
        "comprehensiveness_best": (True, min),
        "comprehensiveness_worst": (True, max),
        "sufficiency_best": (False, max),
        "sufficiency_worst": (False, min),
    }
    result: dict[str, list[list[int]]] = {}
    for kind, (deleting, choose) in kinds.items():
        orders: list[list[int]] = [[] for _ in inputs]
        limits = [max(top_k_sizes(len(spans), bins)) for _, spans in inputs]
        while True:
            texts, owners, candidates = [], [], []
            for i, (text, spans) in enumerate(inputs):
                if len(orders[i]) >= limits[i]:
                    continue
                chosen = set(orders[i])
                everything = set(range(len(spans)))
                for word in range(len(spans)):
                    if word in chosen:
                        continue
                    picked = chosen | {word}
                    texts.append(
                        delete_spans(text, spans, picked if deleting else everything - picked)
                    )
                    owners.append(i)
                    candidates.append(word)
            if not texts:
                break
            values = list(quantity(texts, owners))
            best: dict[int, tuple[float, int]] = {}
            for owner, word, value in zip(owners, candidates, values, strict=True):
                if owner not in best or choose(value, best[owner][0]) != best[owner][0]:
                    best[owner] = (value, word)
            for owner, (_, word) in best.items():
                orders[owner].append(word)
        result[kind] = orders
    return result
