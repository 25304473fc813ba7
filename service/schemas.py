"""Request and response bodies of the HTTP API (they are also the OpenAPI schemas).

Requests are validated in the HTTP process, before anything is queued for a model
worker, so a malformed request never reaches (or fails) a batch shared with others.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema

from service.config import get_settings

ClassifyMethod = Literal[
    "attention", "rollout", "integrated_gradients", "gradient_x_input", "occlusion"
]
SummarizeMethod = Literal["attention", "gradient_x_input", "occlusion"]
CONTRAST = "contrast"


# Lone surrogates (also what the raw bytes ED A0 80 decode to: JSON parsers pass
# them through), C0 control characters other than tab, newline and carriage return,
# DEL and the C1 controls. Refused in the HTTP process, so they never reach a model.
_INVALID_CHARACTER = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _check_text(text: str) -> str:
    found = _INVALID_CHARACTER.search(text)
    if found is not None:
        code = ord(found.group())
        kind = "a lone surrogate" if 0xD800 <= code <= 0xDFFF else "a control character"
        raise ValueError(
            f"contains {kind} (U+{code:04X}) at character {found.start()}; "
            "send valid UTF-8 text without control characters"
        )
    if not text.strip():
        raise ValueError("empty or only whitespace")
    return text


# The schema says what validation enforces, so generated clients (and fuzzers) send
# texts that can pass: at least one non-space character.
Text = Annotated[
    str,
    AfterValidator(_check_text),
    WithJsonSchema({"type": "string", "minLength": 1, "pattern": "\\S"}),
]


def _check_texts(texts: list[str]) -> list[str]:
    limit = get_settings().max_texts
    if len(texts) > limit:
        raise ValueError(f"at most {limit} texts per request, got {len(texts)}")
    return texts


class _TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(
        min_length=1,
        json_schema_extra={"maxItems": get_settings().max_texts},
        description="Texts to process, answered in order (at most SUPPORTLENS_MAX_TEXTS).",
    )

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

    top_k: StrictInt = Field(
        3,
        ge=1,
        json_schema_extra={"maximum": get_settings().max_top_k},
        description="How many intents to list per text.",
    )
    explain: list[ClassifyMethod] = Field(
        default_factory=list, description="Explanation methods; 'attention' is free."
    )
    target: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="What the explanations explain: absent for the predicted intent, an intent "
        "name for that intent, or 'contrast' for the margin between the two most likely "
        "intents (the logit difference for the attributions; faithfulness measures the "
        "calibrated probability difference). An unknown intent is refused (422).",
    )
    faithfulness: StrictBool = Field(
        False,
        description="Measure each explanation on this input: comprehensiveness and sufficiency "
        "(AOPC over deleting / keeping the top 10-50% of its words, removed by their "
        "character spans) of the explained intent's calibrated probability.",
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

    max_sentences: StrictInt | None = Field(
        None,
        ge=1,
        le=50,
        description="Most units kept per summary; omitted: the summarizer bundle's own choice.",
    )
    explain: list[SummarizeMethod] = Field(
        default_factory=list,
        description="'occlusion': how each selected sentence's score depends on each word and "
        "on each other sentence (one pass per word and per sentence).",
    )
    faithfulness: StrictBool = Field(
        False,
        description="Measure each method's word ranking against the selection: drop of the "
        "selected sentences' mean score when the top 10-50% of words are deleted / kept.",
    )

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


class FaithfulnessBin(BaseModel):
    fraction: float = Field(description="Share of the words taken, e.g. 0.1 for the top 10%.")
    words: int = Field(description="How many words that is: max(1, ceil(fraction x words)).")
    comprehensiveness: float
    sufficiency: float


class Faithfulness(BaseModel):
    comprehensiveness: float = Field(
        description="Mean drop of the explained probability when the top-ranked words are "
        "deleted (higher: the ranking found the words the prediction needs)."
    )
    sufficiency: float = Field(
        description="Mean drop when only the top-ranked words are kept (lower: those words "
        "alone carry the prediction)."
    )
    bins: list[FaithfulnessBin]


class Explanation(BaseModel):
    model_config = ConfigDict(extra="allow")

    method: str
    target: Any = None
    intent: str | None = Field(None, description="The intent explained.")
    versus: Any = None
    versus_intent: str | None = Field(
        None, description="For a contrast, the other intent: scores explain intent vs. it."
    )
    words: list[WordScore] = Field(default_factory=list)
    delta: float | None = None
    faithfulness: Faithfulness | None = None


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    label: str = Field(
        description="The intent, or 'out_of_scope' when the detector flags the text."
    )
    score: float = Field(description="Calibrated confidence of the best intent.")
    out_of_scope: bool
    ood_score: float = Field(
        description="The bundle's out-of-scope score (higher = further from every intent); "
        "out_of_scope is true above its threshold."
    )
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


class UnitWords(BaseModel):
    model_config = ConfigDict(extra="allow")

    unit: int = Field(description="Index of the unit (sentence or turn) in `sentences`.")
    words: list[WordScore]


class UnitScore(BaseModel):
    unit: int
    score: float


class OccludedUnit(BaseModel):
    unit: int = Field(description="A selected unit, by its index in `sentences`.")
    words: list[WordScore] = Field(
        description="Every word of the conversation: the drop of this unit's score when the "
        "word is deleted."
    )
    sentences: list[UnitScore] = Field(
        description="Every other unit: the drop of this unit's score when that one is emptied."
    )


class SummaryMethodExplanation(BaseModel):
    model_config = ConfigDict(extra="allow")

    units: list[UnitWords]
    faithfulness: Faithfulness | None = Field(
        None,
        description="This method's word ranking against the selection: drop of the selected "
        "units' mean score when its top words are deleted / kept.",
    )


class SummaryOcclusion(BaseModel):
    units: list[OccludedUnit]
    faithfulness: Faithfulness | None = None


class SummaryExplanations(BaseModel):
    model_config = ConfigDict(extra="allow")

    unit_scores: list[float] = Field(default_factory=list)
    attention: SummaryMethodExplanation | None = None
    gradient_x_input: SummaryMethodExplanation | None = None
    occlusion: SummaryOcclusion | None = None

    @model_serializer(mode="wrap")
    def _only_requested(self, handler):
        # A method that was not asked for is absent from the answer, not null.
        data = handler(self)
        return {key: value for key, value in data.items() if value is not None}


class SummarizeResult(BaseModel):
    summary: str
    sentences: list[SummarySentence]
    truncated: bool = False
    explanations: SummaryExplanations = Field(default_factory=SummaryExplanations)


class SummarizeResponse(BaseModel):
    model: ModelInfo
    results: list[SummarizeResult]


class FieldError(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    """The one shape of every error answer."""

    detail: str = Field(description="What went wrong, naming the offending field.")
    errors: list[FieldError] = Field(description="One entry per bad field; may be empty.")


class ModelsResponse(BaseModel):
    models: dict[str, ModelInfo]
    default_attribution: str
    explain: dict[str, list[str]]


class ReadyResponse(BaseModel):
    status: str


ERROR_DESCRIPTIONS = {
    400: "Malformed JSON body",
    401: "Missing or wrong API key",
    408: "The body did not arrive within the read timeout",
    413: "Body larger than the configured limit, or request cost over the budget",
    415: "Body not sent as application/json",
    422: "Invalid field (the message names it)",
    429: "Too many requests in flight; retry after the Retry-After header",
    503: "Not ready, shutting down, or the model worker stopped; retry after Retry-After",
    504: "No answer within the request timeout",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": description}
    for code, description in ERROR_DESCRIPTIONS.items()
}
