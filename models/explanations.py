"""Word-level explanations of the intent classifier's predictions.

Five methods, selectable by name (:data:`METHODS`), all computed for a batch of texts:

``attention``
    The classifier's own attention-pooling weights (averaged over pooling heads).
    Free: it comes out of the prediction's forward pass. Non-negative, sums to 1
    over the tokens the pooling reads.
``rollout``
    Attention rollout (Abnar & Zuidema 2020) through the encoder: per layer the
    heads are averaged, the identity is added for the residual path and rows are
    renormalised, then the layers are multiplied, ``R = Â_L ⋯ Â_1``. ``R[t, j]`` is
    how much of input token ``j`` reaches output state ``t``; the pooling then reads
    the output states with weights ``w``, so token ``j`` scores ``Σ_t w[t] R[t, j]``.
``integrated_gradients``
    Captum ``LayerIntegratedGradients`` on the word-embedding layer. The baseline is
    the same sequence with every word-piece replaced by [PAD] ([CLS]/[SEP], positions
    and token types kept), so attributions sum to ``f(x) − f(baseline)`` up to the
    returned convergence ``delta``.
``gradient_x_input``
    Captum ``LayerGradientXActivation`` on the word embeddings: one backward pass.
``occlusion``
    Captum ``FeatureAblation`` with one feature per word: each word's pieces are
    replaced by [PAD] (the same baseline as integrated gradients) and the drop of the
    target logit is that word's score; words are ablated in batched forward passes.

Every method explains one target logit (by default the predicted class), or with
``versus`` the **logit difference** ``logit(target) − logit(versus)`` (a contrastive
explanation: why ``target`` rather than ``versus``), and returns raw, signed scores per
token and per word of the original text. The attribution methods are linear in the
explained output, so a contrast's scores are the target's minus the other class's, and
swapping the two flips every sign. ``attention`` and ``rollout`` do not depend on the
class at all: they are the same for every target and contrast.

:meth:`Explainer.faithfulness` measures each explanation on its own input (AOPC
comprehensiveness and sufficiency, :mod:`models.faithfulness`): all perturbed texts of
all methods go through one batched forward. The
attention methods are descriptive, not causal (Jain & Wallace 2019; Wiegreffe &
Pinter 2019): ``benchmarks/faithfulness.py`` measures how faithful each one is.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from captum.attr import FeatureAblation, LayerGradientXActivation, LayerIntegratedGradients
from torch import nn
from transformers import BatchEncoding, PreTrainedTokenizerBase

from models.classifier import IntentClassifier
from models.faithfulness import DEFAULT_BINS, Faithfulness, Variants, plan
from models.tokenization import encode_texts, model_inputs

METHODS = ("attention", "rollout", "integrated_gradients", "gradient_x_input", "occlusion")


class ExplanationError(ValueError):
    """A text cannot be explained (e.g. it has no word the model reads); the message says why."""


@dataclass
class WordScore:
    """One word of the original text: ``text == original[start:end]``."""

    text: str
    start: int
    end: int
    score: float

    def to_dict(self) -> dict:
        return {"text": self.text, "start": self.start, "end": self.end, "score": self.score}


@dataclass
class Explanation:
    """One method's explanation of one text's ``target`` class.

    ``token_scores`` holds one raw score per non-special input token (the tokens
    with a non-empty character span, in order); ``words`` merges them into words.
    ``delta`` is the integrated-gradients convergence delta, ``None`` otherwise.
    ``versus`` is the other class of a contrastive explanation (``None`` otherwise) and
    ``faithfulness`` this explanation's own AOPC, once measured.
    """

    method: str
    target: int
    words: list[WordScore]
    token_scores: list[float] = field(default_factory=list)
    delta: float | None = None
    versus: int | None = None
    faithfulness: Faithfulness | None = None

    def to_dict(self) -> dict:
        data = {
            "method": self.method,
            "target": self.target,
            "words": [word.to_dict() for word in self.words],
        }
        if self.delta is not None:
            data["delta"] = self.delta
        if self.versus is not None:
            data["versus"] = self.versus
        if self.faithfulness is not None:
            data["faithfulness"] = self.faithfulness.to_dict()
        return data


def _is_separator(char: str) -> bool:
    """Punctuation, symbols and CJK ideographs are words of their own, as BERT splits them."""
    return unicodedata.category(char)[0] in "PS" or "CJK" in unicodedata.name(char, "")


def word_groups(text: str, offsets: Sequence[Sequence[int]], keep: Sequence[bool]) -> list[int]:
    """Word index of every token (``-1`` for a dropped token).

    A kept token continues the current word when its span touches or overlaps the
    previous kept token's span and neither side of the joint is punctuation or a
    symbol; otherwise it starts a new word. So ``"card's"`` gives ``card``, ``'``,
    ``s`` and ``"😀😀"`` two words, and tokens with an empty span are dropped.
    """
    groups: list[int] = []
    word = -1
    prev_end: int | None = None
    for (start, end), kept in zip(offsets, keep, strict=True):
        start, end = int(start), int(end)
        if not kept or end <= start:
            groups.append(-1)
            continue
        overlaps = prev_end is not None and start < prev_end
        touches = (
            prev_end is not None
            and start == prev_end
            and not _is_separator(text[prev_end - 1])
            and not _is_separator(text[start])
        )
        if not (overlaps or touches):
            word += 1
        groups.append(word)
        prev_end = max(end, prev_end or 0)
    return groups


def words_from_tokens(
    text: str,
    offsets: Sequence[Sequence[int]],
    scores: Sequence[float],
    keep: Sequence[bool],
) -> list[WordScore]:
    """Merge word-piece scores into words of ``text`` with character spans.

    ``keep[i] = False`` drops token ``i`` (special tokens, padding). A word's score is
    the **sum** of its pieces' scores: the attribution methods are additive (integrated
    gradients' attributions sum to ``f(x) − f(baseline)``, occlusion splits a word's
    effect over its pieces), and for the attention methods the sum is the share of
    the pooled weight the word receives, so word scores keep the meaning token
    scores have. See :func:`word_groups` for what makes a word.
    """
    groups = word_groups(text, offsets, keep)
    words: list[WordScore] = []
    for group, (start, end), score in zip(groups, offsets, scores, strict=True):
        if group < 0:
            continue
        start, end = int(start), int(end)
        if group == len(words):
            words.append(WordScore(text="", start=start, end=end, score=0.0))
        word = words[group]
        word.start, word.end = min(word.start, start), max(word.end, end)
        word.score += float(score)
    for word in words:
        word.text = text[word.start : word.end]
    return words


def normalize(words: Sequence[WordScore]) -> list[float]:
    """The normalised view of word scores: each divided by the text's largest ``|score|``.

    The result lies in ``[-1, 1]``, keeps each score's sign (evidence for vs against
    the class) and maps the most important word to ±1, so one colour scale fits every
    method, whose raw units differ (probability mass, logits). It is per text: values
    are comparable within a text, not across texts. All-zero scores stay zero.
    """
    peak = max((abs(word.score) for word in words), default=0.0)
    if not peak or peak != peak:  # zero or NaN
        return [0.0 for _ in words]
    return [word.score / peak for word in words]


class _LogitOf(nn.Module):
    """``forward(input_ids, attention_mask, token_type_ids, pooling_mask[, pair]) -> logits``
    for Captum.

    The pooling mask is always the input's: [PAD] is excluded from pooling by id, so
    without it the baseline would be pooled over no token at all and ``f`` would jump
    between the last integration step and the baseline, breaking completeness.

    With ``pair`` ``(B, 2)`` the output gets one more column, ``logit[pair[:, 0]] −
    logit[pair[:, 1]]`` (B, C+1): Captum's target for a contrast is that column. It is
    passed as an additional forward argument so Captum repeats it with the inputs.
    """

    def __init__(self, model: IntentClassifier):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        pooling_mask: torch.Tensor,
        pair: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            pooling_mask=pooling_mask,
        ).logits.float()  # (B, C)
        if pair is None:
            return logits
        margin = logits.gather(1, pair[:, :1]) - logits.gather(1, pair[:, 1:])  # (B, 1)
        return torch.cat([logits, margin], dim=-1)  # (B, C+1)


class Explainer:
    """Explains a classifier's predictions with any of :data:`METHODS`, for a batch of texts.

    The model is put in eval mode (dropout off) so explanations are deterministic.
    ``max_length`` truncates like the predictor; ``ig_steps`` and
    ``internal_batch_size`` control the integrated-gradients integral and the size of
    the batched forward/backward passes (also used for occlusion).
    """

    def __init__(
        self,
        model: IntentClassifier,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 128,
        ig_steps: int = 32,
        internal_batch_size: int = 64,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("explanations need a fast tokenizer (character offsets)")
        if tokenizer.pad_token_id is None:
            raise ValueError("explanations need a tokenizer with a [PAD] token (the baseline)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.ig_steps = ig_steps
        self.internal_batch_size = internal_batch_size
        self._forward = _LogitOf(model)
        embeddings = model.encoder.get_input_embeddings()
        self._ig = LayerIntegratedGradients(self._forward, embeddings)
        self._gxi = LayerGradientXActivation(self._forward, embeddings)
        self._ablation = FeatureAblation(self._forward)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inputs -------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> BatchEncoding:
        """Tokenize ``texts`` (padded to the longest, with character offsets)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ExplanationError("texts must be a list of strings")
        return encode_texts(self.tokenizer, texts, self.max_length)[0]

    def _inputs(self, encoding: BatchEncoding) -> dict[str, torch.Tensor]:
        return model_inputs(encoding, self.device)

    @staticmethod
    def _keep(encoding: BatchEncoding) -> torch.Tensor:
        """Tokens that belong to the text: real (not padding) and with a non-empty span."""
        offsets = encoding["offset_mapping"].cpu()  # (B, T, 2)
        real = encoding["attention_mask"].cpu().bool()  # (B, T)
        return real & (offsets[..., 1] > offsets[..., 0])  # (B, T)

    def _check_readable(self, texts: Sequence[str], encoding: BatchEncoding) -> None:
        """Refuse a text without a word: no token the classifier reads that holds a letter
        or digit (empty, whitespace, punctuation/symbols/emoji only). Its explanation would
        be all zeros or rest on a pooling over nothing, so it is an error, not a result."""
        inputs = self._inputs(encoding)
        readable = self.model.pooling_mask(inputs["input_ids"], inputs["attention_mask"])
        readable = readable.cpu() & self._keep(encoding)  # (B, T)
        offsets = encoding["offset_mapping"].tolist()
        for index, text in enumerate(texts):
            if not any(
                any(char.isalnum() for char in text[start:end])
                for (start, end), ok in zip(offsets[index], readable[index].tolist(), strict=True)
                if ok
            ):
                kind = "empty or whitespace only" if not text.strip() else "without any word"
                raise ExplanationError(
                    f"text {index} cannot be explained: it is {kind} (no letter or digit the "
                    "model reads; only whitespace, punctuation, symbols or unknown characters)"
                )

    def _forward_args(self, inputs: dict[str, torch.Tensor]) -> tuple:
        """Extra arguments of :class:`_LogitOf` after ``input_ids``."""
        pooling_mask = self.model.pooling_mask(inputs["input_ids"], inputs["attention_mask"])
        return inputs["attention_mask"], inputs.get("token_type_ids"), pooling_mask

    def baseline_logits(self, texts: Sequence[str]) -> torch.Tensor:
        """Logits of the integrated-gradients baseline of each text, ``(B, C)``."""
        encoding = self.encode(texts)
        inputs = self._inputs(encoding)
        baseline = self._baseline_ids(inputs["input_ids"], self._keep(encoding))
        with torch.inference_mode():
            return self._forward(baseline, *self._forward_args(inputs))

    def _baseline_ids(self, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Every text token replaced by [PAD]; [CLS]/[SEP]/padding stay as they are."""
        return input_ids.masked_fill(keep.to(input_ids.device), self.tokenizer.pad_token_id)

    def _targets(self, targets: Sequence[int] | None, logits: torch.Tensor) -> list[int]:
        if targets is None:
            return logits.argmax(dim=-1).tolist()
        num_labels = logits.shape[-1]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for {logits.shape[0]} texts")
        for target in targets:
            if not 0 <= int(target) < num_labels:
                raise ValueError(f"target {target} is not a class index in [0, {num_labels})")
        return [int(t) for t in targets]

    # -- public API ---------------------------------------------------------------------

    def explain(
        self,
        texts: list[str],
        methods: Sequence[str],
        targets: list[int] | None = None,
        versus: Sequence[int | None] | None = None,
    ) -> list[dict[str, Explanation]]:
        """Explain each text's ``targets`` class (default: the predicted class) with ``methods``.

        ``versus[i]``, when given and not ``None``, makes text ``i``'s explanation
        contrastive: of ``logit(targets[i]) − logit(versus[i])``. Returns one
        ``{method: Explanation}`` per text, in order. Raises ``ValueError`` for an unknown
        method or class and :class:`ExplanationError` for a text with no word.
        """
        if isinstance(methods, str):
            methods = [methods]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown explanation method {unknown[0]!r}; known: {list(METHODS)}")
        if not texts:
            return []
        encoding = self.encode(texts)
        self._check_readable(texts, encoding)
        inputs = self._inputs(encoding)
        need_attentions = "rollout" in methods
        with torch.inference_mode(), self._eager_attention(need_attentions):
            output = self.model(
                **inputs, output_pooling_weights=True, output_attentions=need_attentions
            )
        targets = self._targets(targets, output.logits)
        others = self._versus(versus, targets, output.logits)
        keep = self._keep(encoding)
        args, captum_targets = self._contrast_args(inputs, targets, others, output.logits)

        per_method: dict[str, tuple[torch.Tensor, list[float | None]]] = {}
        for method in dict.fromkeys(methods):
            if method == "attention":
                scores = output.pooling_weights.float().mean(dim=1)  # (B, T)
                per_method[method] = (scores, [None] * len(texts))
            elif method == "rollout":
                per_method[method] = (
                    self._rollout(output.attentions, output.pooling_weights, inputs),
                    [None] * len(texts),
                )
            elif method == "integrated_gradients":
                per_method[method] = self._integrated_gradients(inputs, keep, captum_targets, args)
            elif method == "gradient_x_input":
                per_method[method] = (
                    self._gradient_x_input(inputs, captum_targets, args),
                    [None] * len(texts),
                )
            else:
                per_method[method] = (
                    self._occlusion(texts, encoding, inputs, keep, captum_targets, args),
                    [None] * len(texts),
                )

        results: list[dict[str, Explanation]] = []
        for index, text in enumerate(texts):
            row: dict[str, Explanation] = {}
            for method, (scores, deltas) in per_method.items():
                row[method] = self._explanation(
                    method, text, encoding, index, scores[index], targets[index], deltas[index]
                )
                row[method].versus = others[index]
            results.append(row)
        return results

    def _versus(
        self, versus: Sequence[int | None] | None, targets: list[int], logits: torch.Tensor
    ) -> list[int | None]:
        if versus is None:
            return [None] * len(targets)
        if len(versus) != len(targets):
            raise ValueError(f"got {len(versus)} contrast classes for {len(targets)} texts")
        num_labels = logits.shape[-1]
        for target, other in zip(targets, versus, strict=True):
            if other is not None and not 0 <= int(other) < num_labels:
                raise ValueError(f"class {other} is not a class index in [0, {num_labels})")
            if other is not None and int(other) == target:
                raise ValueError(f"a contrast needs two different classes, got {target} twice")
        return [None if v is None else int(v) for v in versus]

    def _contrast_args(
        self,
        inputs: dict[str, torch.Tensor],
        targets: list[int],
        versus: list[int | None],
        logits: torch.Tensor,
    ) -> tuple[tuple, list[int]]:
        """Captum's additional forward arguments and targets: the logit of each target, or
        the extra margin column of :class:`_LogitOf` for a contrast."""
        args = self._forward_args(inputs)
        if all(v is None for v in versus):
            return args, targets
        pair = torch.tensor(
            [[t, t if v is None else v] for t, v in zip(targets, versus, strict=True)],
            device=self.device,
        )  # (B, 2)
        margin = logits.shape[-1]  # index of the margin column
        return (*args, pair), [
            t if v is None else margin for t, v in zip(targets, versus, strict=True)
        ]

    # -- faithfulness -------------------------------------------------------------------

    def faithfulness(
        self,
        texts: Sequence[str],
        rows: Sequence[dict[str, Explanation]],
        probabilities: Callable[[list[str]], torch.Tensor],
        bins: Sequence[float] = DEFAULT_BINS,
        *,
        originals: torch.Tensor | None = None,
    ) -> None:
        """Measure every explanation of ``rows`` on its own text, in place.

        For each explanation, its words are ranked by score and the perturbed texts of
        :func:`models.faithfulness.perturb` are made (words deleted by their character
        spans); every perturbed text of every method and text, and the texts
        themselves, deduplicated, are scored by ONE call of ``probabilities`` (texts →
        ``(N, C)`` calibrated probabilities). The explained quantity is the target's
        probability, or ``p(target) − p(versus)`` for a contrast. Sets each
        explanation's ``faithfulness``. ``originals`` ``(B, C)``, the texts' calibrated
        probabilities when they are already known (the prediction's), spares their rows.
        """
        variants = Variants()
        planned = []
        for index, (text, row) in enumerate(zip(texts, rows, strict=True)):
            # Without ``originals`` the text is scored with its variants; else row -1 - i.
            original = variants.add(text) if originals is None else -1 - index
            for explanation in row.values():
                spans = [(w.start, w.end) for w in explanation.words]
                scores = [w.score for w in explanation.words]
                planned.append((original, explanation, plan(variants, text, spans, scores, bins)))
        if not planned:
            return
        probs = probabilities(variants.texts).float().cpu()  # (N, C)
        if originals is not None:
            # Row -1 - i is text i's known probabilities (negative indices read from the end).
            probs = torch.cat([probs, originals.float().cpu().flip(0)])  # (N + B, C)
        for original, explanation, ranking in planned:
            values = probs[:, explanation.target]  # (N,)
            if explanation.versus is not None:
                values = values - probs[:, explanation.versus]  # (N,)
            values = values.tolist()
            explanation.faithfulness = ranking.score(values[original], values, bins)

    def attention_from_outputs(
        self,
        texts: Sequence[str],
        encoding: BatchEncoding,
        pooling_weights: torch.Tensor,
        targets: Sequence[int],
    ) -> list[Explanation]:
        """The ``attention`` explanation from an already computed forward pass.

        ``encoding`` must carry ``offset_mapping`` (tokenize with
        ``return_offsets_mapping=True``) and ``pooling_weights`` is the model's
        ``(B, N, T)`` output for it; nothing is recomputed.
        """
        if "offset_mapping" not in encoding:
            raise ValueError(
                "encoding has no offset_mapping: tokenize with return_offsets_mapping=True"
            )
        scores = pooling_weights.detach().float().mean(dim=1).cpu()  # (B, T)
        return [
            self._explanation("attention", text, encoding, index, scores[index], int(target), None)
            for index, (text, target) in enumerate(zip(texts, targets, strict=True))
        ]

    # -- methods ------------------------------------------------------------------------

    def _explanation(
        self,
        method: str,
        text: str,
        encoding: BatchEncoding,
        index: int,
        scores: torch.Tensor,
        target: int,
        delta: float | None,
    ) -> Explanation:
        keep = self._keep(encoding)[index].tolist()
        offsets = encoding["offset_mapping"][index].tolist()
        values = scores.detach().float().cpu().tolist()
        return Explanation(
            method=method,
            target=target,
            words=words_from_tokens(text, offsets, values, keep),
            token_scores=[v for v, k in zip(values, keep, strict=True) if k],
            delta=delta,
        )

    def _eager_attention(self, enabled: bool) -> _EagerAttention:
        """Rollout needs attention maps, which only eager attention returns."""
        return _EagerAttention(self.model.encoder, enabled)

    def _rollout(
        self,
        attentions: tuple[torch.Tensor, ...],
        pooling_weights: torch.Tensor,
        inputs: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        if not attentions or any(a is None for a in attentions):
            raise ExplanationError("the encoder returned no attention maps; rollout needs them")
        size = inputs["input_ids"].shape[1]
        identity = torch.eye(size, device=pooling_weights.device)  # (T, T)
        rollout = identity.expand(inputs["input_ids"].shape[0], size, size)  # (B, T, T)
        for layer in attentions:
            mixed = layer.float().mean(dim=1) + identity  # (B, T, T): heads averaged + residual
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            rollout = torch.bmm(mixed, rollout)  # (B, T, T): layer l ∘ layers below
        weights = pooling_weights.float().mean(dim=1)  # (B, T)
        scores = torch.einsum("bt,btj->bj", weights, rollout)  # (B, T)
        return scores * inputs["attention_mask"]  # padding rows of the rollout are not real

    def _integrated_gradients(
        self, inputs: dict[str, torch.Tensor], keep: torch.Tensor, targets: list[int], args: tuple
    ) -> tuple[torch.Tensor, list[float | None]]:
        input_ids = inputs["input_ids"]
        baseline = self._baseline_ids(input_ids, keep)
        attributions, delta = self._ig.attribute(
            inputs=input_ids,
            baselines=baseline,
            target=targets,
            additional_forward_args=args,
            n_steps=self.ig_steps,
            # Captum splits the steps, not the texts: a chunk must hold one step of all texts.
            internal_batch_size=max(self.internal_batch_size, input_ids.shape[0]),
            return_convergence_delta=True,
        )
        scores = attributions.detach().float().sum(dim=-1)  # (B, T)
        return scores, [float(d) for d in delta.detach().cpu()]

    def _gradient_x_input(
        self, inputs: dict[str, torch.Tensor], targets: list[int], args: tuple
    ) -> torch.Tensor:
        attributions = self._gxi.attribute(
            inputs["input_ids"],
            target=targets,
            additional_forward_args=args,
        )
        return attributions.detach().float().sum(dim=-1)  # (B, T)

    def _occlusion(
        self,
        texts: Sequence[str],
        encoding: BatchEncoding,
        inputs: dict[str, torch.Tensor],
        keep: torch.Tensor,
        targets: list[int],
        args: tuple,
    ) -> torch.Tensor:
        offsets = encoding["offset_mapping"]  # (B, T, 2)
        groups = torch.tensor(
            [
                word_groups(text, offsets[i].tolist(), keep[i].tolist())
                for i, text in enumerate(texts)
            ]
        )  # (B, T), -1 = not part of a word
        num_words = int(groups.max()) + 1
        # Non-word tokens form one extra feature whose baseline equals the input, so
        # ablating it changes nothing and costs one row of one forward pass.
        feature_mask = groups.masked_fill(groups < 0, num_words).to(self.device)  # (B, T)
        input_ids = inputs["input_ids"]
        batch = input_ids.shape[0]
        per_eval = max(1, self.internal_batch_size // batch)
        attributions = self._ablation.attribute(
            input_ids,
            baselines=self._baseline_ids(input_ids, keep),
            target=targets,
            additional_forward_args=args,
            feature_mask=feature_mask,
            perturbations_per_eval=per_eval,
        )  # (B, T): every piece of a word carries the whole word's effect
        pieces = torch.zeros(batch, num_words + 1, device=self.device)  # (B, F+1)
        pieces.scatter_add_(1, feature_mask, torch.ones_like(feature_mask, dtype=pieces.dtype))
        # Split each word's effect evenly over its pieces so summing them gives it back.
        return attributions.float() / pieces.gather(1, feature_mask)  # (B, T)


class _EagerAttention:
    """Context manager: the encoder runs with eager attention inside, its own outside."""

    def __init__(self, encoder: nn.Module, enabled: bool):
        self.encoder = encoder
        self.enabled = enabled
        self.previous: str | None = None

    def __enter__(self):
        config = getattr(self.encoder, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if self.enabled and current not in (None, "eager"):
            self.previous = current
            self.encoder.set_attn_implementation("eager")
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            self.encoder.set_attn_implementation(self.previous)
        return False
