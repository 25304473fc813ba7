"""Request and response bodies of the HTTP API (they are also the OpenAPI schemas).

Requests are validated in the HTTP process, before anything is queued for a model
worker, so a malformed request never reaches (or fails) a batch shared with others.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from service.config import get_settings

ClassifyMethod = Literal[
    "attention", "rollout", "integrated_gradients", "gradient_x_input", "occlusion"
]
SummarizeMethod = Literal["attention", "gradient_x_input"]


def _check_texts(texts: list[str]) -> list[str]:
    limit = get_settings().max_texts
    if len(texts) > limit:
        raise ValueError(f"at most {limit} texts per request, got {len(texts)}")
    for index, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"texts[{index}] is empty or only whitespace")
    return texts


class _TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1, description="Texts to process, answered in order.")

    @model_validator(mode="before")
    @classmethod
    def _single_text(cls, data: Any) -> Any:
        # {"text": "..."} is shorthand for {"texts": ["..."]}.
        if isinstance(data, dict) and "text" in data:
            if "texts" in data:
                raise ValueError("give either 'text' or 'texts', not both")
            data = dict(data)
            data["texts"] = [data.pop("text")]
        return data

    @field_validator("texts")
    @classmethod
    def _texts_not_blank(cls, texts: list[str]) -> list[str]:
        return _check_texts(texts)


class ClassifyRequest(_TextsRequest):
    """``POST /v1/classify``: one message per text."""

    top_k: StrictInt = Field(3, ge=1, description="How many intents to list per text.")
    explain: list[ClassifyMethod] = Field(
        default_factory=list, description="Explanation methods; 'attention' is free."
    )

    @field_validator("top_k")
    @classmethod
    def _top_k_bounded(cls, top_k: int) -> int:
        if top_k > get_settings().max_top_k:
            raise ValueError(f"must be at most {get_settings().max_top_k}")
        return top_k

    @field_validator("explain")
    @classmethod
    def _unique_methods(cls, methods: list[str]) -> list[str]:
        return list(dict.fromkeys(methods))


class SummarizeRequest(_TextsRequest):
    """``POST /v1/summarize``: one conversation per text."""

    max_sentences: StrictInt = Field(3, ge=1, le=50, description="Sentences kept per summary.")
    explain: list[SummarizeMethod] = Field(default_factory=list)

    @field_validator("explain")
    @classmethod
    def _unique_methods(cls, methods: list[str]) -> list[str]:
        return list(dict.fromkeys(methods))


class ModelInfo(BaseModel):
    name: str
    version: str


class WordScore(BaseModel):
    text: str
    start: int = Field(description="Character offset of the word in the text.")
    end: int
    score: float


class Explanation(BaseModel):
    model_config = ConfigDict(extra="allow")

    method: str
    target: Any = None
    words: list[WordScore] = Field(default_factory=list)
    delta: float | None = None


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    label: str = Field(description="The intent, or 'out_of_scope' under the confidence threshold.")
    score: float
    out_of_scope: bool
    top_k: list[LabelScore]
    truncated: bool = Field(description="True when the text was cut to the model's length limit.")
    explanations: dict[str, Explanation] = Field(default_factory=dict)


class ClassifyResponse(BaseModel):
    model: ModelInfo
    results: list[ClassifyResult]


class SummarySentence(BaseModel):
    text: str
    start: int
    end: int
    speaker: str | None = None
    score: float
    selected: bool


class SummarizeResult(BaseModel):
    summary: str
    sentences: list[SummarySentence]
    truncated: bool = False
    explanations: dict[str, Any] = Field(default_factory=dict)


class SummarizeResponse(BaseModel):
    model: ModelInfo
    results: list[SummarizeResult]


class FieldError(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong, naming the offending field.")
    errors: list[FieldError] | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": description}
    for code, description in {
        400: "Malformed JSON body",
        401: "Missing or wrong API key",
        413: "Body larger than the configured limit",
        415: "Body not sent as application/json",
        422: "Invalid field (the message names it)",
        429: "Too many requests in flight; retry after the Retry-After header",
        503: "Not ready, or shutting down",
        504: "The request waited too long",
    }.items()
}
