"""Request bodies: text hygiene and field naming, checked before anything is queued."""

import pytest
from pydantic import ValidationError

from service.schemas import ClassifyRequest, SummarizeRequest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("\ud800", "lone surrogate (U+D800) at character 0"),
        ("card \udfff lost", "lone surrogate (U+DFFF) at character 5"),
        ("nul\x00byte", "control character (U+0000) at character 3"),
        ("escape \x1b[31m", "control character (U+001B)"),
        ("c1 \x85", "control character (U+0085)"),
        ("   \n\t", "empty or only whitespace"),
    ],
)
@pytest.mark.parametrize("model", [ClassifyRequest, SummarizeRequest])
def test_schemas_refuse_invalid_text_naming_field_and_index(model, text, words):
    with pytest.raises(ValidationError) as caught:
        model(texts=["a fine text", text])
    (error,) = caught.value.errors()
    assert error["loc"] == ("texts", 1)
    assert words in error["msg"]


def test_schemas_keep_tabs_newlines_and_non_ascii():
    text = "Kunde:\tMeine Karte ist weg 😟\r\nAgent: Ich sperre sie."
    assert ClassifyRequest(text=text).texts == [text]


def test_summarize_request_leaves_the_unit_cap_to_the_bundle_unless_given():
    assert SummarizeRequest(texts=["Customer: hi"]).max_sentences is None
    assert SummarizeRequest(texts=["Customer: hi"], max_sentences=2).max_sentences == 2
    with pytest.raises(ValueError, match="max_sentences"):
        SummarizeRequest(texts=["Customer: hi"], max_sentences=0)
