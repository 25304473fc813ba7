"""The extractive summarization API (``POST /v1/summarize``) with dynamic batching.

Conversations are segmented in ``decode_request`` (so an empty one is refused on its
own) and segmented, chunked and tokenized together per batch by the summarizer's
predictor; requests with different options are run as separate sub-batches.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import HTTPException

from service.classify import set_worker_threads
from service.config import Settings
from service.loop import PerRequestBatchedLoop


@dataclass
class SummarizeItem:
    texts: list[str]
    max_sentences: int
    explain: list[str]


class SummarizeAPI(ls.LitAPI):
    """``POST /v1/summarize`` on its own worker pool."""

    def __init__(self, settings: Settings, bundle: Path):
        super().__init__(
            max_batch_size=settings.max_batch_size,
            batch_timeout=settings.batch_timeout,
            api_path="/v1/summarize",
            loop=PerRequestBatchedLoop(),
        )
        self.settings = settings
        self.bundle_path = str(bundle)

    def setup(self, device: str) -> None:
        from models.bundle import load_bundle
        from models.summary_predictor import SummarizerPredictor
        from service import metrics

        set_worker_threads(self.settings.threads_per_worker(self.settings.summarize_workers))
        bundle = load_bundle(self.bundle_path, task="extractive-summarization", device=device)
        self.predictor = SummarizerPredictor(bundle)
        self.model_info = {"name": bundle.name, "version": bundle.version}
        self.batch_sizes = metrics.BATCH_SIZE.labels(api=self.api_path)

    def decode_request(self, request, **kwargs) -> SummarizeItem:
        from models.summary_predictor import SummarizationError

        for index, text in enumerate(request.texts):
            try:
                self.predictor.segment([text])
            except SummarizationError:
                raise HTTPException(
                    422, f"texts[{index}]: no sentence or turn to summarize"
                ) from None
        return SummarizeItem(list(request.texts), request.max_sentences, list(request.explain))

    def batch(self, inputs: list[SummarizeItem]) -> list[SummarizeItem]:
        return inputs

    def predict(self, items: list[SummarizeItem]) -> list[list[dict[str, Any]]]:
        from models.summary_predictor import SummarizationError

        self.batch_sizes.observe(sum(len(item.texts) for item in items))
        groups: dict[tuple, list[int]] = {}
        for position, item in enumerate(items):
            groups.setdefault((item.max_sentences, tuple(item.explain)), []).append(position)
        outputs: list[list[dict[str, Any]]] = [[] for _ in items]
        for (max_sentences, explain), positions in groups.items():
            texts = [text for p in positions for text in items[p].texts]
            try:
                summaries = self.predictor.summarize(
                    texts, max_sentences=max_sentences, explain=explain
                )
            except SummarizationError as error:
                raise HTTPException(422, f"texts: {error}") from None
            start = 0
            for p in positions:
                count = len(items[p].texts)
                outputs[p] = [
                    {
                        "summary": s.summary,
                        "sentences": s.sentences,
                        "truncated": s.truncated,
                        "explanations": s.explanations,
                    }
                    for s in summaries[start : start + count]
                ]
                start += count
        return outputs

    def unbatch(self, output: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        return output

    def encode_response(self, output: list[dict[str, Any]], **kwargs) -> dict[str, Any]:
        return {"model": self.model_info, "results": output}
