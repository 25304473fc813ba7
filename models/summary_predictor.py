"""Extractive summaries from a loaded summarizer bundle: scoring, selection, explanations.

Selection takes units by score under a budget (``max_sentences`` units, or a
``ratio`` of the conversation's units), skips a unit that repeats a word trigram of
an already chosen one (trigram blocking, as in BertSumExt), and keeps the original
order. Units without any letter or digit (``"..."``, ``"!!!"``) are scored and
listed but only chosen when nothing else is left.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from models.bundle import Bundle
from models.segmentation import Unit, segment
from models.summarizer import EncodedConversations, encode_conversations

TASK = "extractive-summarization"
EXPLANATION_METHODS = ("attention", "gradient_x_input")
_WORD = re.compile(r"\w+")


class SummarizationError(ValueError):
    """The input cannot be summarized (e.g. an empty conversation); the message says why."""


@dataclass
class SummaryResult:
    """One conversation's summary.

    ``sentences`` lists every unit in original order as
    ``{"text", "start", "end", "speaker", "score", "selected"}``; offsets index the
    text that was sent. ``truncated`` is always False: long inputs are read in
    overlapping chunks, never cut (the field mirrors the classifier's output).
    """

    summary: str
    sentences: list[dict] = field(default_factory=list)
    explanations: dict = field(default_factory=dict)
    truncated: bool = False


def unit_text(unit: Unit) -> str:
    """A unit as shown in a summary: ``"Speaker: text"`` for a turn, the text for a sentence."""
    return f"{unit.speaker}: {unit.text}" if unit.speaker else unit.text


def join_units(units: Sequence[Unit]) -> str:
    """Summary text of units in the given order: turns one per line, sentences space-separated."""
    if any(unit.speaker for unit in units):
        return "\n".join(unit_text(unit) for unit in units)
    return " ".join(unit.text for unit in units)


def budget_size(num_units: int, max_sentences: int = 3, ratio: float | None = None) -> int:
    """How many units a summary may hold: ``ratio`` of the units (rounded, at least 1)
    when a ratio is given, else ``max_sentences``; never more than there are."""
    if ratio is not None:
        if isinstance(ratio, bool) or not 0.0 < float(ratio) <= 1.0:
            raise SummarizationError(f"ratio must be in (0, 1], got {ratio!r}")
        wanted = max(1, round(float(ratio) * num_units))
    else:
        if (
            isinstance(max_sentences, bool)
            or not isinstance(max_sentences, int)
            or max_sentences < 1
        ):
            raise SummarizationError(
                f"max_sentences must be a positive integer, got {max_sentences!r}"
            )
        wanted = max_sentences
    return min(wanted, num_units)


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def select_units(
    scores: Sequence[float],
    texts: Sequence[str],
    budget: int,
    *,
    trigram_blocking: bool = True,
) -> list[int]:
    """Indices (ascending) of up to ``budget`` units chosen by descending score.

    A unit sharing a word trigram with a chosen unit is skipped when
    ``trigram_blocking``; units with no word characters are only taken when no unit
    with words remains. At least one unit is chosen whenever there is one.
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    wordy = [i for i in order if _WORD.search(texts[i])]
    wordy_set = set(wordy)
    candidates = wordy + [i for i in order if i not in wordy_set]
    chosen: list[int] = []
    seen: set[tuple[str, ...]] = set()
    for i in candidates:
        if len(chosen) >= budget:
            break
        if chosen and not _WORD.search(texts[i]) and wordy:
            break
        grams = _trigrams(texts[i])
        if trigram_blocking and grams & seen:
            continue
        chosen.append(i)
        seen |= grams
    return sorted(chosen)


class SummarizerPredictor:
    """Segments, encodes in overlapping chunks, scores units and builds summaries.

    ``runner`` replaces the PyTorch model's forward pass (e.g. an
    :class:`~models.onnx_backend.OnnxSummarizer`, same outputs); ``gradient_x_input``
    always runs on the PyTorch model.
    """

    def __init__(self, bundle: Bundle, *, max_length: int | None = None, runner=None):
        if bundle.task != TASK:
            raise ValueError(
                f"bundle {bundle.path} holds a {bundle.task!r} model, not a summarizer"
            )
        self.bundle = bundle
        self.model = bundle.model
        self.runner = bundle.model if runner is None else runner
        self.tokenizer = bundle.tokenizer
        limit = getattr(self.model.encoder.config, "max_position_embeddings", None) or 512
        self.max_length = min(max_length or int(bundle.training.get("max_length", 256)), limit)
        self.chunk_overlap = min(
            int(bundle.training.get("chunk_overlap", 64)), (self.max_length - 2) // 2
        )
        # Inference splits conversations into the units the model was trained on.
        self.units = str(bundle.training.get("units", "turns"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def segment(self, texts: Sequence[str]) -> list[list[Unit]]:
        """Units of each text; an empty one is a :class:`SummarizationError` naming its index."""
        segmented = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise SummarizationError(
                    f"conversation {index} is not text ({type(text).__name__})"
                )
            units = segment(text, self.units)
            if not units:
                raise SummarizationError(
                    f"conversation {index} is empty: it has no sentence or turn to summarize"
                )
            segmented.append(units)
        return segmented

    def encode(self, segmented: Sequence[Sequence[Unit]]) -> EncodedConversations:
        return encode_conversations(
            self.tokenizer, segmented, max_length=self.max_length, overlap=self.chunk_overlap
        )

    def _inputs(self, encoded: EncodedConversations) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in encoded.tensors.items()}

    def summarize(
        self,
        texts: list[str],
        *,
        max_sentences: int = 3,
        ratio: float | None = None,
        explain: Sequence[str] = (),
    ) -> list[SummaryResult]:
        """Summarize each text; ``explain`` may name ``"attention"`` and ``"gradient_x_input"``.

        ``explanations`` always has ``"unit_scores"``; each requested method adds
        ``{"units": [{"unit": i, "words": [{"text", "start", "end", "score"}]}]}``.
        """
        unknown = sorted(set(explain) - set(EXPLANATION_METHODS))
        if unknown:
            raise SummarizationError(
                f"unknown explanation method(s) {unknown}; available: {list(EXPLANATION_METHODS)}"
            )
        if not texts:
            return []
        budget_size(1, max_sentences, ratio)  # validates the budget before any work
        segmented = self.segment(texts)
        encoded = self.encode(segmented)
        with torch.inference_mode():
            output = self.runner(
                **self._inputs(encoded), output_pooling_weights="attention" in explain
            )
        scores = torch.sigmoid(output.logits.float()).cpu()  # (B, U)
        if not torch.isfinite(scores).all():
            raise RuntimeError(
                "the summarizer produced non-finite scores; the bundle may be damaged"
            )

        results = []
        selections = []
        for b, units in enumerate(segmented):
            unit_scores = scores[b, : len(units)].tolist()
            chosen = select_units(
                unit_scores, [u.text for u in units], budget_size(len(units), max_sentences, ratio)
            )
            selections.append(chosen)
            selected = set(chosen)
            results.append(
                SummaryResult(
                    summary=join_units([units[i] for i in chosen]),
                    sentences=[
                        {
                            "text": u.text,
                            "start": u.start,
                            "end": u.end,
                            "speaker": u.speaker,
                            "score": unit_scores[i],
                            "selected": i in selected,
                        }
                        for i, u in enumerate(units)
                    ],
                    explanations={"unit_scores": unit_scores},
                )
            )
        if "attention" in explain:
            # Head-averaged pooling weights: how much each token shaped its unit's vector.
            weights = output.pooling_weights.float().mean(dim=2).cpu()  # (B, U, Tu)
            for b, result in enumerate(results):
                result.explanations["attention"] = self._word_explanations(
                    texts[b], encoded.token_offsets[b], weights[b]
                )
        if "gradient_x_input" in explain:
            attributions = self._gradient_x_input(encoded, selections)  # (B, U, Tu)
            for b, result in enumerate(results):
                result.explanations["gradient_x_input"] = self._word_explanations(
                    texts[b], encoded.token_offsets[b], attributions[b]
                )
        return results

    @staticmethod
    def _word_explanations(
        text: str, token_offsets: list[list[tuple[int, int]]], token_scores: torch.Tensor
    ) -> dict:
        from models.explanations import words_from_tokens

        units = []
        for u, offsets in enumerate(token_offsets):
            scores = token_scores[u, : len(offsets)].tolist()
            words = words_from_tokens(text, offsets, scores, [True] * len(offsets))
            units.append({"unit": u, "words": [word.to_dict() for word in words]})
        return {"units": units}

    def _gradient_x_input(
        self, encoded: EncodedConversations, selections: list[list[int]]
    ) -> torch.Tensor:
        """Gradient × input of the summed logits of each conversation's selected units,
        at the word embeddings (as the classifier's explainer), summed over the hidden
        axis, per unit token.

        One backward pass covers the whole batch (conversations do not share chunks, so
        each conversation's target only has gradients on its own tokens); this is why it
        is offered here where the classifier's many-step methods would cost a pass per step.
        """
        from captum.attr import LayerGradientXActivation

        inputs = self._inputs(encoded)
        target_mask = torch.zeros(inputs["unit_mask"].shape, dtype=torch.bool)  # (B, U)
        for b, chosen in enumerate(selections):
            target_mask[b, chosen] = True
        target_mask = target_mask.to(self.device)
        others = {k: v for k, v in inputs.items() if k != "input_ids"}

        def selected_logit_sum(input_ids: torch.Tensor) -> torch.Tensor:
            logits = self.model(input_ids=input_ids, **others).logits  # (B, U)
            total = (logits.float() * target_mask).sum().reshape(1)
            # Captum wants one output per input row and differentiates their sum: the
            # total goes in row 0 (gradients of different conversations do not mix).
            return torch.cat([total, total.new_zeros(input_ids.shape[0] - 1)])

        method = LayerGradientXActivation(
            selected_logit_sum, self.model.encoder.get_input_embeddings()
        )
        with torch.enable_grad():
            token_attr = method.attribute(inputs["input_ids"]).sum(dim=-1)  # (C, L)
        flat = token_attr.detach().float().reshape(-1)  # (C*L,)
        index = inputs["unit_token_index"]  # (B, U, Tu)
        return (flat[index.reshape(-1)].reshape(index.shape) * inputs["unit_token_mask"]).cpu()
