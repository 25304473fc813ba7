"""Checks made in the HTTP process before a request may take a slot or reach a worker.

The schemas already refused malformed bodies; what is checked here needs the model's
tokenizer and labels (loaded once in the main process, before the HTTP processes
fork): ``top_k`` against the model's intents, strict length, the cap on the tokens of
one summarized conversation and the per-request cost budget.

The cost of a request is counted in token passes: each text's tokens (at most the
model's length limit for classification, where longer text is truncated) times the
forward and backward passes its methods need: 1 for the prediction, ``attention``
free, ``rollout`` 1, ``gradient_x_input`` 2, ``integrated_gradients`` its steps and
``occlusion`` one per word (counted as one per token, its upper bound). With a neighbour
vote (:mod:`models.neighbours`) the prediction counts 2: its second encoder runs for the
unsure texts, and any text may be one. Per-request faithfulness (``"faithfulness":
true``) adds, per requested method, one pass per perturbed text (two per bin: the top
words deleted, and only them kept, each at most the text's tokens), and one for the text
itself where the prediction's probabilities cannot stand in for the classifier's (with a
vote). On ``/v1/summarize``, ``occlusion``
rescores the whole conversation once per word and once per sentence (counted as one
per token plus one per sentence), and faithfulness adds two passes per bin per method
plus one. Over ``SUPPORTLENS_MAX_REQUEST_COST`` the request is refused with 413 before
any work.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from models.faithfulness import DEFAULT_BINS
from models.summary_predictor import SummarizationError
from service.config import Settings

CONTRAST = "contrast"

# Above this many characters, tokenizing moves off the event loop.
INLINE_CHARS = 20_000


@dataclass
class Refusal(Exception):
    """A request refused before any work: status, message and the field it names."""

    status: int
    detail: str
    field: str | None = None


def faithfulness_passes(methods: list[str], enabled: bool, *, text: bool = False) -> int:
    """Passes that ``"faithfulness": true`` adds for ``methods``: two perturbed texts per bin
    per method, plus the text itself when ``text`` (its scores not otherwise known); none
    without a method to measure."""
    if not enabled or not methods:
        return 0
    return int(text) + 2 * len(DEFAULT_BINS) * len(methods)


def method_passes(method: str, tokens: int, ig_steps: int) -> int:
    """Passes over a text of ``tokens`` tokens that explanation ``method`` costs."""
    return {
        "attention": 0,
        "rollout": 1,
        "gradient_x_input": 2,
        "integrated_gradients": ig_steps,
        "occlusion": tokens,
    }[method]


def _over_budget(cost: int, limit: int) -> Refusal:
    return Refusal(
        413,
        f"request cost {cost} token passes (tokens x passes per method) is over the limit "
        f"of {limit} (SUPPORTLENS_MAX_REQUEST_COST); send fewer or shorter texts, or fewer "
        "explanation methods",
    )


async def _token_counts(tokenizer, texts: list[str], special: bool) -> list[int]:
    def count() -> list[int]:
        ids = tokenizer(texts, add_special_tokens=special)["input_ids"]
        return [len(row) for row in ids]

    if sum(len(t) for t in texts) <= INLINE_CHARS:
        return count()
    return await asyncio.to_thread(count)


class ClassifyAdmission:
    def __init__(self, predictor, settings: Settings):
        self.tokenizer = predictor.tokenizer
        self.intents = list(predictor.labels)
        self.labels = len(self.intents)
        self.max_length = predictor.max_length
        self.settings = settings
        self.vote = bool(getattr(predictor, "has_neighbour_vote", False))

    def cost(self, tokens: list[int], methods: list[str], faithfulness: bool = False) -> int:
        total = 0
        prediction = 2 if self.vote else 1
        for count in tokens:
            kept = min(count, self.max_length)
            passes = prediction + sum(
                method_passes(m, kept, self.settings.ig_steps) for m in methods
            )
            passes += faithfulness_passes(methods, faithfulness, text=self.vote)
            total += kept * passes
        return total

    async def check(
        self,
        texts: list[str],
        top_k: int,
        methods: list[str],
        target: str | None = None,
        faithfulness: bool = False,
    ) -> None:
        if top_k > self.labels:
            raise Refusal(
                422,
                f"must be at most {self.labels}, the number of intents of this model",
                "top_k",
            )
        if target is not None and target != CONTRAST and target not in self.intents:
            shown = target if len(target) <= 60 else target[:57] + "..."
            raise Refusal(
                422,
                f"unknown intent {shown!r}: give one of this model's intents (GET /v1/models "
                "lists the model; the prediction's top_k shows intent names) or 'contrast'",
                "target",
            )
        limit = self.settings.max_request_cost
        # Every text costs at most the length limit: count tokens only when that bound
        # could break the budget (it never does for plain predictions by default).
        bound = self.cost([self.max_length] * len(texts), methods, faithfulness)
        if bound <= limit and not self.settings.strict_length:
            return
        tokens = await _token_counts(self.tokenizer, texts, special=True)
        if self.settings.strict_length:
            for index, count in enumerate(tokens):
                if count > self.max_length:
                    raise Refusal(
                        422,
                        f"{count} tokens, over the model's limit of {self.max_length} "
                        "(strict length mode is on)",
                        f"texts[{index}]",
                    )
        cost = self.cost(tokens, methods, faithfulness)
        if cost > limit:
            raise _over_budget(cost, limit)


class SummarizeAdmission:
    def __init__(self, predictor, settings: Settings):
        self.predictor = predictor
        self.tokenizer = predictor.tokenizer
        self.settings = settings

    async def check(self, texts: list[str], methods: list[str], faithfulness: bool = False) -> None:
        units: list[int] = []

        def segment() -> None:
            for index, text in enumerate(texts):
                try:
                    units.append(len(self.predictor.segment([text])[0]))
                except SummarizationError:
                    raise Refusal(
                        422, "no sentence or turn to summarize", f"texts[{index}]"
                    ) from None

        if sum(len(t) for t in texts) <= INLINE_CHARS:
            segment()
        else:
            await asyncio.to_thread(segment)
        tokens = await _token_counts(self.tokenizer, texts, special=False)
        cap = self.settings.max_conversation_tokens
        for index, count in enumerate(tokens):
            if count > cap:
                raise Refusal(
                    422,
                    f"{count} tokens, over the limit of {cap} tokens per conversation "
                    "(SUPPORTLENS_MAX_CONVERSATION_TOKENS); summarize it in parts",
                    f"texts[{index}]",
                )
        cost = 0
        for count, sentences in zip(tokens, units, strict=True):
            passes = 1 + sum(
                method_passes(m, count, self.settings.ig_steps)
                + (sentences if m == "occlusion" else 0)
                for m in methods
            )
            # Summary occlusion scores the conversation itself; otherwise faithfulness does.
            extra = faithfulness_passes(methods, faithfulness, text="occlusion" not in methods)
            cost += count * (passes + extra)
        if cost > self.settings.max_request_cost:
            raise _over_budget(cost, self.settings.max_request_cost)
