"""The HTML highlighter: escaping, exact text round trip, colours from normalised scores."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pytest

from models.explanations import WordScore
from models.highlight import NEGATIVE_RGB, POSITIVE_RGB, render_html

pytestmark = pytest.mark.unit


def _words(text: str, scored: dict[str, float]) -> list[WordScore]:
    """WordScores for the first occurrence of each key, in text order."""
    words = []
    for word, score in scored.items():
        start = text.index(word)
        words.append(WordScore(word, start, start + len(word), score))
    return sorted(words, key=lambda w: w.start)


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.tags: list[str] = []
        self.marks: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "mark":
            self.marks.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _parse(fragment: str) -> _Collector:
    collector = _Collector()
    collector.feed(fragment)
    collector.close()
    return collector


def test_rendered_text_is_the_original_text():
    text = '  My card <b>was</b> charged twice & "nobody" helps 😡\n Привет '
    words = _words(text, {"card": 1.0, "<b>was</b>": 0.5, "&": -0.2, "😡": 0.1, "Привет": -1.0})
    collector = _parse(render_html(text, words))
    assert "".join(collector.text) == text
    assert set(collector.tags) == {"span", "mark"}  # the input's <b> is text, not markup
    assert [m["data-score"] for m in collector.marks] == ["1", "0.5", "-0.2", "0.1", "-1"]


def test_script_and_attribute_injection_are_escaped():
    text = "<script>alert(1)</script> \"onmouseover=alert(2) x='y'"
    words = _words(text, {"<script>alert(1)</script>": 2.0, '"onmouseover=alert(2)': -1.0})
    fragment = render_html(text, words, label='" onclick="evil()')
    assert "<script" not in fragment
    assert 'onclick="' not in fragment
    collector = _parse(fragment)
    assert "".join(collector.text) == text
    assert all(set(mark) == {"class", "style", "data-score", "title"} for mark in collector.marks)


def test_opacity_follows_normalised_score_and_sign_picks_colour():
    text = "lost card yesterday"
    words = _words(text, {"lost": 2.0, "card": -1.0, "yesterday": 0.0})
    marks = _parse(render_html(text, words)).marks
    alphas = [float(re.search(r"([\d.]+)\)$", m["style"]).group(1)) for m in marks]
    assert alphas == [1.0, 0.5, 0.0]
    positive, negative = (f"rgba({r}, {g}, {b}," for r, g, b in (POSITIVE_RGB, NEGATIVE_RGB))
    assert positive in marks[0]["style"] and negative in marks[1]["style"]
    assert [m["title"] for m in marks] == ["+1.00", "-0.50", "+0.00"]


def test_words_that_do_not_match_the_text_are_refused():
    text = "refund please"
    with pytest.raises(ValueError, match="does not match"):
        render_html(text, [WordScore("refund", 1, 7, 1.0)])
    with pytest.raises(ValueError, match="outside"):
        render_html(text, [WordScore("please", 7, 99, 1.0)])
    with pytest.raises(ValueError, match="overlaps"):
        render_html(text, [WordScore("please", 7, 13, 1.0), WordScore("refund", 0, 6, 1.0)])


def test_text_without_words_renders_escaped_plain_text():
    fragment = render_html("a < b", [])
    assert html.unescape(re.sub(r"<[^>]+>", "", fragment)) == "a < b"
    assert "<mark" not in fragment
