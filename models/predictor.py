"""Batch prediction from a loaded classifier bundle: calibrated scores, top-k, out-of-scope."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import BatchEncoding

from models.bundle import Bundle
from models.classifier import ClassifierOutput
from models.packing import can_pack
from models.tokenization import encode_texts, model_inputs

OUT_OF_SCOPE = "out_of_scope"

# A pass's fixed cost in tokens' worth of work, per runner on CPU, from passes of 1x8 to
# 32x32 tokens on one thread timed as ``a + b x rows x width``: a / b is about 20-30 for
# PyTorch (its fp32 weights are read from memory once per pass; a 1x8 pass costs what
# 32 more tokens do), 14 for ONNX Runtime fp32 and 6 for int8. :func:`length_groups`
# weighs padding against it; benchmarks/results/padding.md measures what that saves.
PASS_TOKENS = {"torch": 32, "onnx-fp32": 14, "onnx-int8": 6}
# Precisions in which :meth:`IntentPredictor.calibrated` may score many texts (the
# perturbed texts of per-request faithfulness); "auto" is bf16 where the CPU multiplies
# bfloat16 natively, else fp32.
VARIANT_PRECISIONS = ("auto", "bf16", "fp32")


def length_groups(lengths: list[int], pass_tokens: float) -> list[list[int]]:
    """Row indices grouped for separate passes, to spare the padding of mixed lengths.

    Rows are taken shortest first; the next row joins the current group unless the
    padding it adds (every row of the group widened to its length) costs more than a pass
    of its own (``pass_tokens``). One group holding every row when the batch is even or
    ``pass_tokens`` is infinite (a GPU, where padding is nearly free)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        # Sorted ascending: the candidate row is the group's longest.
        if groups and len(groups[-1]) * (lengths[i] - lengths[groups[-1][-1]]) <= pass_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@dataclass
class Prediction:
    """One text's prediction. ``ood_score`` is the bundle's out-of-scope detector's score
    (higher = further from the trained intents); ``out_of_scope`` is that score above the
    detector's threshold, and then ``label`` is :data:`OUT_OF_SCOPE`. A bundle without a
    detector keeps the older rule: calibrated confidence under ``oos_threshold``, with
    ``ood_score`` = 1 − the confidence. ``top_k`` always lists real intents."""

    label: str
    score: float
    out_of_scope: bool
    top_k: list[dict[str, float | str]] = field(default_factory=list)
    truncated: bool = False
    ood_score: float = 0.0


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively on ``device``: on CPU, AVX512-BF16 or
    AMX (where oneDNN runs them about twice as fast as fp32; elsewhere they are emulated,
    and slower). Off the CPU: False (there fp32 is fast already and the choice is left
    alone). torch has no public query for it; ``torch.cpu._is_*_supported`` are its own
    checks (tests/unit/test_predictor.py fails loudly if they go away)."""
    if device.type != "cpu":
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def variant_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of :data:`VARIANT_PRECISIONS` ``precision`` on ``device``."""
    if precision not in VARIANT_PRECISIONS:
        choices = ", ".join(VARIANT_PRECISIONS)
        raise ValueError(f"precision must be one of {choices}, not {precision!r}")
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float32


def pass_tokens(runner, device: torch.device) -> float:
    """:data:`PASS_TOKENS` of ``runner`` (its ``backend`` name; a PyTorch model has none);
    infinite off the CPU."""
    if device.type != "cpu":
        return math.inf
    return PASS_TOKENS.get(getattr(runner, "backend", "torch"), PASS_TOKENS["torch"])


class IntentPredictor:
    """Tokenizes, runs the classifier in inference mode and applies the bundle's calibration.

    ``runner`` replaces the PyTorch model's forward pass (e.g. an
    :class:`~models.onnx_backend.OnnxClassifier`, same outputs); ``model`` stays the
    PyTorch model, which explanations that need gradients use.
    """

    def __init__(
        self,
        bundle: Bundle,
        max_length: int | None = None,
        *,
        runner=None,
        variant_precision: str = "auto",
    ):
        if bundle.task != "intent-classification":
            raise ValueError(
                f"bundle {bundle.path} holds a {bundle.task!r} model, not an intent classifier"
            )
        self.bundle = bundle
        self.model = bundle.model
        self.runner = bundle.model if runner is None else runner
        self.tokenizer = bundle.tokenizer
        self.labels = bundle.labels
        self.temperature = float(bundle.calibration.get("temperature", 1.0))
        self.threshold = float(bundle.calibration.get("oos_threshold", 0.0))
        self.detector = bundle.detector
        self.pass_tokens = pass_tokens(self.runner, self.device)
        self.variant_dtype = variant_dtype(variant_precision, self.device)
        limit = getattr(self.model.config.encoder, "max_position_embeddings", None) or 512
        self.max_length = min(max_length or int(bundle.training.get("max_length", 128)), limit)

    @property
    def needs_features(self) -> bool:
        """Whether :meth:`to_predictions` needs the pooled features (``output_pooled=True``)."""
        return self.detector is not None and self.detector.needs_features

    @property
    def has_neighbour_vote(self) -> bool:
        """Whether :meth:`forward` gives unsure rows the k-NN vote (:mod:`models.neighbours`)."""
        return getattr(self.model, "neighbours", None) is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, texts: list[str]) -> tuple[BatchEncoding, list[bool]]:
        """Tokenize once (padding to the longest text, offsets) and say which texts were cut."""
        return encode_texts(self.tokenizer, texts, self.max_length)

    def model_inputs(self, encoding: BatchEncoding) -> dict[str, torch.Tensor]:
        return model_inputs(encoding, self.device)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled softmax (the calibrated confidence)."""
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def to_predictions(
        self, output: ClassifierOutput | torch.Tensor, truncated: list[bool], top_k: int = 3
    ) -> list[Prediction]:
        """Predictions from :meth:`forward`'s output (or bare logits (B, C) when the bundle's
        detector needs no features)."""
        if isinstance(output, torch.Tensor):
            logits, pooled = output, None
        else:
            logits, pooled = output.logits, output.pooled
        probs = self.probabilities(logits)
        if self.detector is None:
            scores = 1.0 - probs.amax(dim=-1)  # (B,)
            flags = probs.amax(dim=-1) < self.threshold  # (B,)
        else:
            if self.needs_features and pooled is None:
                raise ValueError(
                    f"the {self.detector.method} out-of-scope detector needs the pooled features: "
                    "pass the whole output of IntentPredictor.forward, not its logits"
                )
            scores, flags = self.detector(pooled, probs)  # (B,), (B,)
        probs = probs.cpu()
        k = max(1, min(top_k, probs.shape[-1]))
        values, indices = probs.topk(k, dim=-1)
        results = []
        for row_values, row_indices, was_truncated, ood_score, out_of_scope in zip(
            values.tolist(),
            indices.tolist(),
            truncated,
            scores.tolist(),
            flags.tolist(),
            strict=True,
        ):
            results.append(
                Prediction(
                    label=OUT_OF_SCOPE if out_of_scope else self.labels[row_indices[0]],
                    score=row_values[0],
                    out_of_scope=bool(out_of_scope),
                    top_k=[
                        {"label": self.labels[i], "score": s}
                        for i, s in zip(row_indices, row_values, strict=True)
                    ],
                    truncated=was_truncated,
                    ood_score=float(ood_score),
                )
            )
        return results

    def explainer(self, *, ig_steps: int = 32, internal_batch_size: int = 64):
        """An :class:`~models.explanations.Explainer` of this model that tokenizes exactly
        as :meth:`encode` does (same tokenizer, same ``max_length``)."""
        from models.explanations import Explainer

        return Explainer(
            self.model,
            self.tokenizer,
            max_length=self.max_length,
            ig_steps=ig_steps,
            internal_batch_size=internal_batch_size,
        )

    @torch.inference_mode()
    def forward(
        self,
        encoding: BatchEncoding,
        *,
        output_pooling_weights: bool = False,
        neighbour_vote: bool = True,
    ):
        """The classifier's output for an :meth:`encode` result (``.logits`` (B, C);
        ``.pooled`` (B, N*H) when the out-of-scope detector reads features; and
        ``.pooling_weights`` (B, N, T) when asked: the free ``attention`` explanation).

        Rows of similar length run together (:func:`length_groups`), each group cut to
        its own longest row, and the outputs come back in the encoding's row order with
        ``pooling_weights`` zero on the padding, as one padded pass would give them.
        The bundle's neighbour vote revises the unsure rows (:meth:`neighbour_vote`) unless
        ``neighbour_vote`` is False: the classifier alone.
        """
        inputs = self.model_inputs(encoding)
        mask = inputs["attention_mask"]
        # Lengths from the tokenizer's CPU tensor: reading them from the device copy
        # would wait for the GPU before every forward.
        lengths = encoding["attention_mask"].sum(dim=-1).tolist()  # (B,)
        groups = length_groups(lengths, self.pass_tokens)
        if len(groups) == 1:
            output = self.runner(
                **inputs,
                output_pooling_weights=output_pooling_weights,
                output_pooled=self.needs_features,
            )
            return self.neighbour_vote(output, inputs, lengths) if neighbour_vote else output
        # Padding is most of the work in a batch of mixed lengths: a CPU forward costs
        # about its padded tokens, and neither runner skips padding on its own.
        logits, weights, pooled = [], [], []
        for group in groups:
            index = torch.tensor(group, device=mask.device)
            width = max(lengths[i] for i in group)
            part = self.runner(
                **{k: v[index, :width] for k, v in inputs.items()},  # (G, width)
                output_pooling_weights=output_pooling_weights,
                output_pooled=self.needs_features,
            )
            logits.append(part.logits)
            pooled.append(part.pooled)
            if output_pooling_weights:
                pad = mask.shape[1] - width
                weights.append(nn.functional.pad(part.pooling_weights, (0, pad)))  # (G, N, T)
        order = torch.tensor([i for group in groups for i in group], device=mask.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=mask.device)
        output = ClassifierOutput(
            logits=torch.cat(logits)[inverse],  # (B, C)
            pooling_weights=torch.cat(weights)[inverse] if output_pooling_weights else None,
            pooled=torch.cat(pooled)[inverse] if self.needs_features else None,
        )
        return self.neighbour_vote(output, inputs, lengths) if neighbour_vote else output

    def neighbour_vote(
        self, output: ClassifierOutput, inputs: dict[str, torch.Tensor], lengths: list[int]
    ) -> ClassifierOutput:
        """Give the unsure rows of ``output`` the bundle's k-NN vote (:mod:`models.neighbours`),
        when it has one: those rows alone run the second encoder, in one pass cut to their
        longest row, on the runner's backend (an ONNX runner carries the vote's graph).
        Their logits become ``temperature · log(p')``, so that :meth:`probabilities`
        returns the interpolated distribution ``p'`` exactly."""
        if not self.has_neighbour_vote:
            return output
        vote = self.model.neighbours
        encoder = getattr(self.runner, "neighbour_embed", None) or vote.embed

        def embed(rows: torch.Tensor) -> torch.Tensor:
            width = max(lengths[i] for i in rows.tolist())
            return encoder(**{k: v[rows, :width] for k, v in inputs.items()})  # (U, H)

        output.logits = vote.revise(output.logits, self.temperature, embed)
        return output

    @torch.inference_mode()
    def calibrated(self, texts: list[str]) -> torch.Tensor:
        """Calibrated probabilities ``(N, C)`` of many texts by the classifier alone (no
        neighbour vote: the model that explanations explain), tokenized as :meth:`encode`
        does and scored in one pass with the texts packed (:mod:`models.packing`) where the
        PyTorch model runs and its encoder allows; else as :meth:`forward` scores them.
        What per-request faithfulness scores its perturbed texts with.

        The packed pass runs in :attr:`variant_dtype`: with bfloat16 (autocast: matrix
        products and attention in bf16, layer norms in fp32) it costs about 0.7x the fp32
        pass on a CPU with native bf16, and the faithfulness values computed from it move
        by at most about 0.005 (``benchmarks/results/faithfulness.md`` measures both
        precisions side by side on the trained model)."""
        if not texts:
            return torch.zeros(0, len(self.labels), device=self.device)
        encoding, _ = self.encode(texts)
        if self.runner is not self.model or not can_pack(self.model.encoder):
            return self.probabilities(self.forward(encoding, neighbour_vote=False).logits)
        inputs = self.model_inputs(encoding)
        reduced = self.variant_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.variant_dtype, enabled=reduced):
            logits = self.model.forward_packed(**inputs).logits  # (N, C)
        return self.probabilities(logits)

    def predict(self, texts: list[str], top_k: int = 3) -> list[Prediction]:
        """Predict intents for a batch of texts, in order."""
        if not texts:
            return []
        encoding, truncated = self.encode(texts)
        return self.to_predictions(self.forward(encoding), truncated, top_k)
