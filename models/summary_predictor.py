"""Extractive summaries from a loaded summarizer bundle: scoring, selection, explanations.

Selection takes units by score under a budget (``max_sentences`` units, or a
``ratio`` of the conversation's units), skips a unit that repeats a word trigram of
an already chosen one (trigram blocking, as in BertSumExt), and keeps the original
order. Units without any letter or digit (``"..."``, ``"!!!"``) are scored and
listed but only chosen when nothing else is left.

A bundle may also record a :class:`Selection` (``training.json`` → ``selection``),
chosen on validation when it was trained: a word budget that grows with the
conversation's length (a line fitted to the training references' lengths), and a
redundancy penalty (maximal marginal relevance over the units' word counts). The unit
budget stays a cap. Bundles without it select as before.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

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


def count_words(text: str) -> int:
    """Words as the selection counts them (runs of letters, digits and ``_``)."""
    return len(_WORD.findall(text))


def word_overlap(a: str, b: str) -> float:
    """Cosine similarity of two texts' lower-cased word counts, in [0, 1]."""
    x, y = Counter(_WORD.findall(a.lower())), Counter(_WORD.findall(b.lower()))
    if not x or not y:
        return 0.0
    dot = sum(count * y[word] for word, count in x.items())
    return dot / math.sqrt(sum(v * v for v in x.values()) * sum(v * v for v in y.values()))


@dataclass(frozen=True)
class Selection:
    """How a bundle's summaries are selected beyond the unit budget (see the module doc).

    ``length_slope``/``length_intercept``: the expected summary length in words for a
    conversation of ``w`` words is ``length_slope * w + length_intercept``; units are
    taken until ``length_scale`` times that many words are reached (the unit that
    reaches it is kept). No slope: no word budget. ``redundancy``: each candidate's
    score is lowered by ``redundancy`` times its largest :func:`word_overlap` with a
    unit already chosen. ``max_units``: the unit cap when a request names none. The
    default is the selection of bundles that record none (three units by score).
    """

    max_units: int = 3
    length_slope: float | None = None
    length_intercept: float = 0.0
    length_scale: float = 1.0
    redundancy: float = 0.0

    @classmethod
    def from_dict(cls, values: Mapping | None) -> Selection:
        """From a bundle's ``training.json`` entry; None gives the default."""
        if not values:
            return cls()
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        selection = cls(**known)
        if (
            selection.redundancy < 0
            or selection.length_scale <= 0
            or isinstance(selection.max_units, bool)
            or not isinstance(selection.max_units, int)
            or selection.max_units < 1
        ):
            raise ValueError(f"invalid summary selection {dict(values)!r}")
        return selection

    def to_dict(self) -> dict:
        return asdict(self)

    def word_budget(self, conversation_words: int) -> float | None:
        """Words a summary of a conversation of ``conversation_words`` words may reach."""
        if self.length_slope is None:
            return None
        expected = self.length_slope * conversation_words + self.length_intercept
        return self.length_scale * max(1.0, expected)


def select_units(
    scores: Sequence[float],
    texts: Sequence[str],
    budget: int,
    *,
    trigram_blocking: bool = True,
    word_budget: float | None = None,
    redundancy: float = 0.0,
) -> list[int]:
    """Indices (ascending) of up to ``budget`` units chosen by descending score.

    A unit sharing a word trigram with a chosen unit is skipped when
    ``trigram_blocking``; units with no word characters are only taken when no unit
    with words remains. At least one unit is chosen whenever there is one. With
    ``word_budget``, selection stops once the chosen units hold that many words (the
    unit that reaches it is kept); with ``redundancy`` > 0, the next unit is the one
    with the best score minus ``redundancy`` × its largest :func:`word_overlap` with a
    chosen unit (maximal marginal relevance).
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    wordy = [i for i in order if _WORD.search(texts[i])]
    # Units without words only when no unit has any (then every unit is such a unit).
    pool = wordy or order
    chosen: list[int] = []
    seen: set[tuple[str, ...]] = set()
    words = 0
    while pool and len(chosen) < budget:
        if redundancy and chosen:
            position = max(
                range(len(pool)),
                key=lambda p: (
                    scores[pool[p]]
                    - redundancy * max(word_overlap(texts[pool[p]], texts[j]) for j in chosen),
                    -p,
                ),
            )
        else:
            position = 0
        i = pool.pop(position)
        grams = _trigrams(texts[i])
        if trigram_blocking and grams & seen:
            continue
        chosen.append(i)
        seen |= grams
        words += count_words(texts[i])
        if word_budget is not None and words >= word_budget:
            break
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
        # The selection chosen on validation at training time (none recorded: the default).
        self.selection = Selection.from_dict(bundle.training.get("selection"))

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
        max_sentences: int | None = None,
        ratio: float | None = None,
        explain: Sequence[str] = (),
    ) -> list[SummaryResult]:
        """Summarize each text; ``explain`` may name ``"attention"`` and ``"gradient_x_input"``.

        ``max_sentences`` (or ``ratio``) caps the units of a summary; None takes the
        bundle's :class:`Selection` cap (3 for bundles that record no selection). The
        bundle's word budget and redundancy penalty apply under any cap.

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
        if max_sentences is None:
            max_sentences = self.selection.max_units
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
            chosen = self.select(units, unit_scores, max_sentences=max_sentences, ratio=ratio)
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

    def select(
        self,
        units: Sequence[Unit],
        scores: Sequence[float],
        *,
        max_sentences: int | None = None,
        ratio: float | None = None,
        selection: Selection | None = None,
    ) -> list[int]:
        """Indices of the units a summary keeps: the unit budget (``max_sentences`` or
        ``ratio``; None: the selection's cap) as a cap, then the bundle's
        :class:`Selection` (or ``selection``) for the word budget and redundancy."""
        selection = self.selection if selection is None else selection
        texts = [u.text for u in units]
        cap = selection.max_units if max_sentences is None else max_sentences
        return select_units(
            scores,
            texts,
            budget_size(len(units), cap, ratio),
            word_budget=selection.word_budget(sum(count_words(t) for t in texts)),
            redundancy=selection.redundancy,
        )

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
