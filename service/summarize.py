"""The extractive summarization API (``POST /v1/summarize``).

Empty conversations, the per-conversation token cap and the cost budget are checked
in the HTTP process (:mod:`service.admission`); the worker segments, chunks and
scores one conversation at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import HTTPException

from service.classify import set_worker_threads
from service.config import Settings
from service.schemas import SummarizeRequest, SummarizeResponse
from service.worker import EXPIRED, SupervisedLoop


@dataclass
class SummarizeItem:
    texts: list[str]
    max_sentences: int | None  # None: the bundle's recorded selection decides
    explain: list[str]
    deadline: float = float("inf")
    faithfulness: bool = False


class SummarizeAPI(ls.LitAPI):
    """Extractive summary per conversation, with every sentence's score.

    ``POST /v1/summarize`` on its own worker pool. Conversations are summarized one
    at a time (each one's chunks in one batch), and a request whose client was
    answered 504 stops before its next conversation.
    """

    def __init__(self, settings: Settings, bundle: Path):
        super().__init__(
            max_batch_size=settings.max_batch_size,
            api_path="/v1/summarize",
            loop=SupervisedLoop(),
        )
        self.settings = settings
        self.bundle_path = str(bundle)

    @property
    def workers(self) -> int:
        return self.settings.summarize_workers

    def setup(self, device: str) -> None:
        from models.bundle import load_bundle
        from models.summary_predictor import SummarizerPredictor
        from service import metrics

        threads = self.settings.threads_per_worker(self.settings.summarize_workers)
        set_worker_threads(threads)
        bundle = load_bundle(self.bundle_path, task="extractive-summarization", device=device)
        # SUPPORTLENS_BACKEND=onnx: scoring runs on ONNX Runtime; gradient_x_input on the
        # PyTorch model, which is loaded either way.
        runner = None
        if self.settings.backend == "onnx":
            from models.onnx_backend import onnx_runner

            runner = onnx_runner(bundle, self.settings.onnx_precision, threads)
        self.predictor = SummarizerPredictor(bundle, runner=runner)
        self.model_info = {"name": bundle.name, "version": bundle.version}
        self.batch_sizes = metrics.BATCH_SIZE.labels(api=self.api_path)

    def decode_request(
        self, request: SummarizeRequest, context: dict | None = None
    ) -> SummarizeItem:
        """The body was validated and admitted in the HTTP process (service.admission)."""
        deadline = (context or {}).get("deadline", float("inf"))
        return SummarizeItem(
            list(request.texts),
            request.max_sentences,
            list(request.explain),
            deadline,
            faithfulness=request.faithfulness,
        )

    def batch(self, inputs: list[SummarizeItem]) -> list[SummarizeItem]:
        return inputs

    def predict(self, items: list[SummarizeItem]) -> list[Any]:
        from models.summary_predictor import SummarizationError

        self.batch_sizes.observe(sum(len(item.texts) for item in items))
        outputs: list[Any] = []
        for item in items:
            results = []
            for text in item.texts:
                if time.monotonic() > item.deadline:
                    results = EXPIRED  # its client was answered 504: stop its work here
                    break
                try:
                    (summary,) = self.predictor.summarize(
                        [text],
                        max_sentences=item.max_sentences,
                        explain=[m for m in item.explain if m != "occlusion"],
                    )
                    explanations = self.explain_summary(text, summary, item)
                except SummarizationError as error:
                    raise HTTPException(422, f"texts: {error}") from None
                results.append(
                    {
                        "summary": summary.summary,
                        "sentences": summary.sentences,
                        "truncated": summary.truncated,
                        "explanations": explanations,
                    }
                )
            outputs.append(results)
        return outputs

    def explain_summary(self, text: str, summary, item: SummarizeItem) -> dict[str, Any]:
        """The predictor's explanations, plus sentence-level occlusion and each method's
        faithfulness to the selection when asked (:mod:`models.summary_explanations`)."""
        from models.summary_explanations import SummaryExplainer

        explanations = dict(summary.explanations)
        occlusion = "occlusion" in item.explain
        measured = item.faithfulness and bool(item.explain)
        if not (occlusion or measured):
            return explanations
        selected = [i for i, sentence in enumerate(summary.sentences) if sentence["selected"]]
        rankings = None
        if measured:
            rankings = {
                method: {
                    (word["start"], word["end"]): word["score"]
                    for unit in explanations[method]["units"]
                    for word in unit["words"]
                }
                for method in item.explain
                if method != "occlusion"
            }
        found = SummaryExplainer(self.predictor).explain(
            text, selected, occlusion=occlusion, rankings=rankings
        )
        if occlusion:
            explanations["occlusion"] = found["occlusion"]
        for method, faithfulness in found.get("faithfulness", {}).items():
            explanations[method] = {**explanations[method], "faithfulness": faithfulness}
        # Keep the requested order of methods after the unit scores.
        return {
            "unit_scores": explanations["unit_scores"],
            **{m: explanations[m] for m in item.explain},
        }

    def unbatch(self, output: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        return output

    def encode_response(self, output: list[dict[str, Any]]) -> SummarizeResponse:
        """The response, validated here in the worker (the HTTP process sends it as is)."""
        return SummarizeResponse.model_validate({"model": self.model_info, "results": output})
