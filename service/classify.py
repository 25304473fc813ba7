"""The intent classification API: dynamic batching, tokenization per batch, explanations.

Two instances serve ``POST /v1/classify``: a fast one for plain predictions (and the
free ``attention`` explanation) and one with its own worker for the expensive
methods, so that integrated gradients for one client never delays predictions for
the others. The route chooses between them (see :mod:`service.app`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException
from transformers import BatchEncoding

from service.config import CHEAP_METHODS, Settings
from service.schemas import CONTRAST, ClassifyRequest, ClassifyResponse
from service.worker import EXPIRED, SupervisedLoop


@dataclass
class ClassifyItem:
    """One decoded request: its texts and options, and when its client stops waiting."""

    texts: list[str]
    top_k: int
    explain: list[str]
    deadline: float = float("inf")
    target: str | None = None
    faithfulness: bool = False


@dataclass
class ClassifyBatch:
    """Several requests' texts tokenized together, padded to the longest text of the batch."""

    items: list[ClassifyItem]
    texts: list[str]
    encoding: BatchEncoding
    truncated: list[bool]


def set_worker_threads(threads: int) -> None:
    """Give this worker process its share of the cores."""
    torch.set_num_threads(threads)
    # Inter-op threads can only be set once per process.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


class ClassifyAPI(ls.LitAPI):
    """Intent, calibrated score, top-k intents and optional word explanations per text.

    ``POST /v1/classify`` on one worker pool; ``expensive=True`` is the explanation pool.
    """

    def __init__(self, settings: Settings, bundle: Path, *, expensive: bool = False):
        super().__init__(
            max_batch_size=settings.explain_batch_size if expensive else settings.max_batch_size,
            api_path="/v1/classify/explain" if expensive else "/v1/classify",
            loop=SupervisedLoop(),
        )
        self.settings = settings
        self.bundle_path = str(bundle)
        self.expensive = expensive

    @property
    def workers(self) -> int:
        return self.settings.explain_workers if self.expensive else self.settings.classify_workers()

    def setup(self, device: str) -> None:
        from models.bundle import load_bundle
        from models.explanations import Explainer
        from models.predictor import IntentPredictor
        from service import metrics

        threads = self.settings.threads_per_worker(self.workers)
        set_worker_threads(threads)
        bundle = load_bundle(self.bundle_path, task="intent-classification", device=device)
        # SUPPORTLENS_BACKEND=onnx: plain predictions and `attention` run on ONNX Runtime
        # (intra-op threads = this worker's torch threads); the explanation pool stays on
        # PyTorch, so a request's label and its gradient explanations come from one model.
        # The PyTorch model is loaded either way (explanations, tokenizer limits).
        runner = None
        if self.settings.backend == "onnx" and not self.expensive:
            from models.onnx_backend import onnx_runner

            runner = onnx_runner(bundle, self.settings.onnx_precision, threads)
        self.predictor = IntentPredictor(
            bundle, runner=runner, variant_precision=self.settings.faithfulness_precision
        )
        self.explainer = Explainer(
            bundle.model,
            bundle.tokenizer,
            max_length=self.predictor.max_length,
            ig_steps=self.settings.ig_steps,
        )
        self.model_info = {"name": bundle.name, "version": bundle.version}
        self.batch_sizes = metrics.BATCH_SIZE.labels(api=self.api_path)

    def decode_request(self, request: ClassifyRequest, context: dict | None = None) -> ClassifyItem:
        """The body was validated and admitted in the HTTP process (service.admission)."""
        deadline = (context or {}).get("deadline", float("inf"))
        return ClassifyItem(
            list(request.texts),
            request.top_k,
            list(request.explain),
            deadline,
            target=request.target,
            faithfulness=request.faithfulness,
        )

    def batch(self, inputs: list[ClassifyItem]) -> ClassifyBatch:
        texts = [text for item in inputs for text in item.texts]
        encoding, truncated = self.predictor.encode(texts)
        return ClassifyBatch(inputs, texts, encoding, truncated)

    def targets(self, item: ClassifyItem, logits: torch.Tensor) -> tuple[list[int], list]:
        """The class each text's explanations explain, and the other class of a contrast.

        No target: the predicted intent (the highest logit). An intent name: that intent
        (the HTTP process refused unknown names). ``"contrast"``: the two highest logits,
        the first explained against the second."""
        if item.target is None:
            return logits.argmax(dim=-1).tolist(), [None] * logits.shape[0]
        if item.target == CONTRAST:
            top = logits.topk(2, dim=-1).indices.tolist()  # (B, 2)
            return [row[0] for row in top], [row[1] for row in top]
        index = self.predictor.labels.index(item.target)
        return [index] * logits.shape[0], [None] * logits.shape[0]

    def predict(self, batch: ClassifyBatch) -> list[list[dict[str, Any]]]:
        from models.explanations import ExplanationError

        self.batch_sizes.observe(len(batch.texts))
        output = self.predictor.forward(batch.encoding, output_pooling_weights=True)
        top_k = max(item.top_k for item in batch.items)
        predictions = self.predictor.to_predictions(output, batch.truncated, top_k)
        labels = self.predictor.labels

        results: list[Any] = []
        start = 0
        for item in batch.items:
            rows = range(start, start + len(item.texts))
            start += len(item.texts)
            if item.explain and time.monotonic() > item.deadline:
                results.append(EXPIRED)  # its client was answered 504: skip its explanations
                continue
            item_results = []
            for row in rows:
                prediction = predictions[row]
                item_results.append(
                    {
                        "label": prediction.label,
                        "score": prediction.score,
                        "out_of_scope": prediction.out_of_scope,
                        "ood_score": prediction.ood_score,
                        "top_k": prediction.top_k[: item.top_k],
                        "truncated": prediction.truncated,
                        "explanations": {},
                    }
                )
            targets, versus = self.targets(item, output.logits[rows.start : rows.stop])
            per_text: list[dict] = [{} for _ in item.texts]
            if "attention" in item.explain:
                index = torch.tensor(list(rows))
                encoding = BatchEncoding({k: v[index] for k, v in batch.encoding.items()})
                explanations = self.explainer.attention_from_outputs(
                    item.texts, encoding, output.pooling_weights[index], targets
                )
                for found, explanation, other in zip(per_text, explanations, versus, strict=True):
                    explanation.versus = other  # the pooling weights are the same for any class
                    found["attention"] = explanation
            expensive = [m for m in item.explain if m not in CHEAP_METHODS]
            try:
                if expensive:
                    explained = self.explainer.explain(
                        item.texts, expensive, targets=targets, versus=versus
                    )
                    for found, explanations in zip(per_text, explained, strict=True):
                        found.update(explanations)
                if item.faithfulness and item.explain:
                    # The texts' own probabilities are the prediction's: only the
                    # perturbed texts need a forward pass. Not with a neighbour vote:
                    # faithfulness measures the classifier, without the vote.
                    self.explainer.faithfulness(
                        item.texts,
                        per_text,
                        self.predictor.calibrated,
                        originals=None
                        if self.predictor.has_neighbour_vote
                        else self.predictor.probabilities(output.logits[rows.start : rows.stop]),
                    )
            except ExplanationError as error:
                raise HTTPException(422, f"texts: {error}") from None
            # Keep the requested order of methods in the answer.
            for result, found in zip(item_results, per_text, strict=True):
                for method in item.explain:
                    if method in found:
                        explanation = found[method]
                        data = explanation.to_dict()
                        data["intent"] = labels[explanation.target]
                        if explanation.versus is not None:
                            data["versus_intent"] = labels[explanation.versus]
                        result["explanations"][method] = data
            results.append(item_results)
        return results

    def unbatch(self, output: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        return output

    def encode_response(self, output: list[dict[str, Any]]) -> ClassifyResponse:
        """The response, validated here in the worker (the HTTP process sends it as is)."""
        return ClassifyResponse.model_validate({"model": self.model_info, "results": output})
