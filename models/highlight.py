"""Render a text and its word scores as HTML with highlighted words.

A pure function: no I/O, everything from the text is HTML-escaped, and the only
markup is ``<span>``/``<mark>`` with inline styles, so the fragment is safe to embed
in any page. Colours use the normalised view (:func:`models.explanations.normalize`):
orange for evidence for the explained class, blue for evidence against, opacity by
``|score| / max |score|`` of the text.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from models.explanations import WordScore, normalize

POSITIVE_RGB = (255, 140, 0)
NEGATIVE_RGB = (30, 120, 255)


def _check_words(text: str, words: Sequence[WordScore]) -> None:
    previous_end = 0
    for word in words:
        if not 0 <= word.start < word.end <= len(text):
            raise ValueError(
                f"word {word.text!r} has span [{word.start}, {word.end}) outside the text "
                f"of length {len(text)}"
            )
        if word.start < previous_end:
            raise ValueError(
                f"word {word.text!r} at {word.start} overlaps or precedes the previous word"
            )
        if text[word.start : word.end] != word.text:
            raise ValueError(
                f"word {word.text!r} does not match the text at [{word.start}, {word.end}): "
                f"{text[word.start : word.end]!r}"
            )
        previous_end = word.end


def _style(weight: float) -> str:
    red, green, blue = POSITIVE_RGB if weight >= 0 else NEGATIVE_RGB
    return f"background-color: rgba({red}, {green}, {blue}, {abs(weight):.2f})"


def render_html(text: str, words: Sequence[WordScore], *, label: str | None = None) -> str:
    """HTML fragment of ``text`` with each scored word in a ``<mark>``.

    ``words`` must be in text order, non-overlapping, with ``text[start:end] ==
    word.text`` (as :func:`models.explanations.words_from_tokens` makes them);
    otherwise ``ValueError`` says which word is wrong. Text between words is kept
    as it is (escaped). Each mark carries the raw score in ``data-score`` and its
    normalised value in ``title``. ``label`` (e.g. the method's name) becomes the
    fragment's ``aria-label``.
    """
    _check_words(text, words)
    weights = normalize(words)
    parts: list[str] = []
    cursor = 0
    for word, weight in zip(words, weights, strict=True):
        parts.append(html.escape(text[cursor : word.start]))
        parts.append(
            f'<mark class="sl-word" style="{_style(weight)}" data-score="{word.score:.6g}" '
            f'title="{weight:+.2f}">{html.escape(word.text)}</mark>'
        )
        cursor = word.end
    parts.append(html.escape(text[cursor:]))
    aria = f' aria-label="{html.escape(label, quote=True)}"' if label is not None else ""
    return f'<span class="sl-explanation"{aria}>{"".join(parts)}</span>'
