"""Explained summaries: sentence-level occlusion, and the faithfulness of word rankings
against the summarizer's selection.

Built on :class:`~models.summary_predictor.SummarizerPredictor`'s public methods
(``segment``, ``encode``, its model): a perturbed conversation keeps its units (turns
or sentences) in place and only changes their text, so every unit keeps its index and
its score can be compared with the original's.

**Occlusion** (``explain: ["occlusion"]``): for each *selected* unit ``s``,

* per word ``w`` of the conversation: ``score_s(x) − score_s(x without w)``, the word
  deleted by its character span (as :mod:`models.faithfulness` deletes words);
* per other unit ``u``: ``score_s(x) − score_s(x with u emptied)``: ``u`` keeps its
  place (and its speaker) but has no words left, so ``s`` loses what ``u`` said, not
  its position.

``score`` is the sigmoid of the unit's logit, the ``score`` the API returns. One
conversation costs one pass per word plus one per unit, all in batched forwards.

**Faithfulness of the selection** (``faithfulness: true``): each method's word scores
(summed over the selected units for occlusion) rank the conversation's words; the
explained quantity is the mean score of the originally selected units, and
comprehensiveness / sufficiency are AOPC over deleting / keeping the top 10..50% of
words, exactly as :mod:`models.faithfulness` defines them for the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from models.explanations import words_from_tokens
from models.faithfulness import DEFAULT_BINS, aopc, ranking, top_k_sizes
from models.segmentation import Unit

Span = tuple[int, int]


class SummaryExplainer:
    """Occlusion and selection faithfulness for one conversation at a time.

    ``batch_size`` bounds how many perturbed conversations go through one forward.
    """

    def __init__(self, predictor, *, batch_size: int = 16):
        self.predictor = predictor
        self.batch_size = batch_size

    # -- words and variants -------------------------------------------------------------

    def words(self, text: str, units: Sequence[Unit]) -> list[tuple[int, Span]]:
        """The conversation's words as ``(unit index, (start, end))`` in text order,
        grouped from the tokens the summarizer reads (as its other explanations are)."""
        encoded = self.predictor.encode([list(units)])
        found = []
        for u, offsets in enumerate(encoded.token_offsets[0]):
            for word in words_from_tokens(
                text, offsets, [0.0] * len(offsets), [True] * len(offsets)
            ):
                found.append((u, (word.start, word.end)))
        return found

    @staticmethod
    def variant(
        units: Sequence[Unit],
        words: Sequence[tuple[int, Span]],
        drop_words: set[int] = frozenset(),
        drop_units: set[int] = frozenset(),
    ) -> list[Unit]:
        """``units`` with the words of ``drop_words`` deleted (by character span) and the
        units of ``drop_units`` emptied; every unit stays in place."""
        cuts: dict[int, list[Span]] = {}
        for index in drop_words:
            unit, span = words[index]
            cuts.setdefault(unit, []).append(span)
        result = []
        for u, unit in enumerate(units):
            if u in drop_units:
                result.append(replace(unit, text=""))
                continue
            if u not in cuts:
                result.append(unit)
                continue
            pieces, cursor = [], unit.start
            for start, end in sorted(cuts[u]):
                pieces.append(unit.text[cursor - unit.start : start - unit.start])
                cursor = end
            pieces.append(unit.text[cursor - unit.start :])
            result.append(replace(unit, text="".join(pieces)))
        return result

    @torch.inference_mode()
    def scores(self, conversations: Sequence[Sequence[Unit]]) -> torch.Tensor:
        """Sigmoid scores ``(N, U)`` of conversations that all have the same units."""
        model = self.predictor.model
        device = self.predictor.device
        rows = []
        for begin in range(0, len(conversations), self.batch_size):
            chunk = [list(c) for c in conversations[begin : begin + self.batch_size]]
            encoded = self.predictor.encode(chunk)
            inputs = {k: v.to(device) for k, v in encoded.tensors.items()}
            rows.append(torch.sigmoid(model(**inputs).logits.float()).cpu())  # (n, U)
        return torch.cat(rows)  # (N, U)

    # -- public API ---------------------------------------------------------------------

    def explain(
        self,
        text: str,
        selected: Sequence[int],
        *,
        occlusion: bool = True,
        rankings: dict[str, dict[Span, float]] | None = None,
        bins: Sequence[float] = DEFAULT_BINS,
    ) -> dict:
        """Occlusion of the selected units (when ``occlusion``) and the faithfulness of
        each ranking in ``rankings`` (``{method: {word span: score}}``; occlusion's own
        ranking is added when both are asked), all variants in batched forwards.

        Returns ``{"occlusion": {...}, "faithfulness": {method: {...}}}`` (keys only
        for what was asked).
        """
        (units,) = self.predictor.segment([text])
        words = self.words(text, units)
        selected = sorted(int(s) for s in selected)
        variants: list[list[Unit]] = [list(units)]
        word_rows = unit_rows = []
        if occlusion:
            word_rows = [len(variants) + w for w in range(len(words))]
            variants += [self.variant(units, words, {w}) for w in range(len(words))]
            unit_rows = [len(variants) + u for u in range(len(units))]
            variants += [self.variant(units, words, drop_units={u}) for u in range(len(units))]
        base_scores = None
        result: dict = {}
        if occlusion:
            scores = self.scores(variants)  # (1 + W + U, U)
            base_scores = scores[0]
            per_unit = []
            totals = [0.0] * len(words)
            for s in selected:
                word_drops = (scores[0, s] - scores[word_rows, s]).tolist() if words else []
                unit_drops = (scores[0, s] - scores[unit_rows, s]).tolist()
                for w, drop in enumerate(word_drops):
                    totals[w] += drop
                per_unit.append(
                    {
                        "unit": s,
                        "words": [
                            {"text": text[a:b], "start": a, "end": b, "score": drop}
                            for (_, (a, b)), drop in zip(words, word_drops, strict=True)
                        ],
                        "sentences": [
                            {"unit": u, "score": drop}
                            for u, drop in enumerate(unit_drops)
                            if u != s
                        ],
                    }
                )
            result["occlusion"] = {"units": per_unit}
            if rankings is not None:
                rankings = {
                    **rankings,
                    "occlusion": {span: t for (_, span), t in zip(words, totals, strict=True)},
                }
        if rankings:
            result["faithfulness"] = self._faithfulness(
                units, words, selected, rankings, bins, base_scores
            )
        return result

    def _faithfulness(
        self,
        units: Sequence[Unit],
        words: Sequence[tuple[int, Span]],
        selected: list[int],
        rankings: dict[str, dict[Span, float]],
        bins: Sequence[float],
        base_scores: torch.Tensor | None,
    ) -> dict:
        sizes = top_k_sizes(len(words), bins)
        everything = set(range(len(words)))
        variants: list[list[Unit]] = [] if base_scores is not None else [list(units)]
        keys: dict[tuple[str, ...], int] = {}

        def add(conversation: list[Unit]) -> int:
            key = tuple(unit.text for unit in conversation)
            if key not in keys:
                keys[key] = len(variants)
                variants.append(conversation)
            return keys[key]

        planned = {}
        for method, by_span in rankings.items():
            order = ranking([by_span.get(span, 0.0) for _, span in words])
            comp, suff = [], []
            for k in sizes:
                top = set(order[:k])
                comp.append(add(self.variant(units, words, top)))
                suff.append(add(self.variant(units, words, everything - top)))
            planned[method] = (comp, suff)
        scores = self.scores(variants)[:, selected].mean(dim=1).tolist()  # (N,)
        full = float(base_scores[selected].mean()) if base_scores is not None else scores[0]
        return {
            method: aopc(
                full, [scores[r] for r in comp], [scores[r] for r in suff], sizes, bins
            ).to_dict()
            for method, (comp, suff) in planned.items()
        }
