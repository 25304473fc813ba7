"""Batch prediction from a loaded classifier bundle: calibrated scores, top-k, out-of-scope."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import BatchEncoding

from models.bundle import Bundle
from models.classifier import ClassifierOutput
from models.tokenization import encode_texts

OUT_OF_SCOPE = "out_of_scope"


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


class IntentPredictor:
    """Tokenizes, runs the classifier in inference mode and applies the bundle's calibration.

    ``runner`` replaces the PyTorch model's forward pass (e.g. an
    :class:`~models.onnx_backend.OnnxClassifier`, same outputs); ``model`` stays the
    PyTorch model, which explanations that need gradients use.
    """

    def __init__(self, bundle: Bundle, max_length: int | None = None, *, runner=None):
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
        limit = getattr(self.model.config.encoder, "max_position_embeddings", None) or 512
        self.max_length = min(max_length or int(bundle.training.get("max_length", 128)), limit)

    @property
    def needs_features(self) -> bool:
        """Whether :meth:`to_predictions` needs the pooled features (``output_pooled=True``)."""
        return self.detector is not None and self.detector.needs_features

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, texts: list[str]) -> tuple[BatchEncoding, list[bool]]:
        """Tokenize once (padding to the longest text, offsets) and say which texts were cut."""
        return encode_texts(self.tokenizer, texts, self.max_length)

    def model_inputs(self, encoding: BatchEncoding) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return {k: encoding[k].to(self.device) for k in keys if k in encoding}

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
    def forward(self, encoding: BatchEncoding, *, output_pooling_weights: bool = False):
        """The classifier's output for an :meth:`encode` result (``.logits`` (B, C);
        ``.pooled`` (B, N*H) when the out-of-scope detector reads features; and
        ``.pooling_weights`` (B, N, T) when asked: the free ``attention`` explanation)."""
        return self.runner(
            **self.model_inputs(encoding),
            output_pooling_weights=output_pooling_weights,
            output_pooled=self.needs_features,
        )

    def predict(self, texts: list[str], top_k: int = 3) -> list[Prediction]:
        """Predict intents for a batch of texts, in order."""
        if not texts:
            return []
        encoding, truncated = self.encode(texts)
        return self.to_predictions(self.forward(encoding), truncated, top_k)
