"""Segmentation of a conversation or ticket into units with character offsets.

A text with speaker markers at line starts (``Customer:``, ``Agent:``,
``#Person1#:`` ...) is split into speaker turns: each turn runs from its marker to
the next marker and may span several lines. Any other text is split into
sentences (Latin, CJK and Arabic end-of-sentence punctuation, and line breaks).

With ``units="sentences"`` each turn is further split into its sentences, which keep
the turn's speaker: finer units that a summary can pick without the rest of a long turn.

Every unit's ``text`` equals ``original[start:end]``: the marker itself is not part
of a turn's text (it is kept in ``speaker``), and surrounding whitespace is trimmed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Role names that mark a speaker even on a single line; any capitalised name of up to
# three words followed by ":" counts once it starts at least two lines.
_ROLE_NAMES = {
    "agent",
    "assistant",
    "bot",
    "client",
    "customer",
    "operator",
    "rep",
    "representative",
    "staff",
    "support",
    "system",
    "user",
}
_MARKER = re.compile(
    r"^[ \t]*(?P<speaker>#[^#\n:]{1,30}#|[^\W\d_][\w.'\-]*(?:[ \t][^\W\d_][\w.'\-]*){0,2})[ \t]*:(?!//)[ \t]*",
    re.MULTILINE,
)
# End of a sentence: terminal punctuation (closing quotes/brackets included) followed by
# whitespace, or CJK/Arabic full stops that need no following space; or a line break.
_SENTENCE_END = re.compile(r"(?:[.!?…]+[\"'”’)\]]*(?=\s)|[。！？؟]+[\"'”’)\]」』]*|\n+)")


@dataclass
class Unit:
    """One turn or sentence; ``text == original[start:end]``."""

    text: str
    start: int
    end: int
    speaker: str | None = None

    @property
    def has_words(self) -> bool:
        """Whether the unit contains any letter or digit (``"..."`` or ``"!!!"`` do not)."""
        return any(ch.isalnum() for ch in self.text)


def _trimmed(text: str, start: int, end: int, speaker: str | None = None) -> Unit | None:
    """The unit ``text[start:end]`` without surrounding whitespace, or None if nothing is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start == end:
        return None
    return Unit(text=text[start:end], start=start, end=end, speaker=speaker)


def split_sentences(text: str, start: int = 0, end: int | None = None) -> list[Unit]:
    """Sentences of ``text[start:end]`` with offsets into ``text``."""
    end = len(text) if end is None else end
    units: list[Unit] = []
    position = start
    for match in _SENTENCE_END.finditer(text, start, end):
        unit = _trimmed(text, position, match.end())
        if unit is not None:
            units.append(unit)
        position = match.end()
    unit = _trimmed(text, position, end)
    if unit is not None:
        units.append(unit)
    return units


def _speaker_markers(text: str) -> list[re.Match[str]]:
    """Marker matches if the text is a conversation, else an empty list."""
    markers = list(_MARKER.finditer(text))
    if len(markers) >= 2:
        return markers
    if markers:
        name = markers[0]["speaker"]
        if name.startswith("#") or name.lower() in _ROLE_NAMES:
            return markers
    return []


UNIT_KINDS = ("turns", "sentences")


def segment(text: str, units: str = "turns") -> list[Unit]:
    """Split ``text`` into speaker turns if it has speaker markers, else into sentences.

    With ``units="sentences"`` turns are split into sentences too (each keeps its
    turn's speaker). Text before the first marker (e.g. a ticket subject) becomes
    sentence units with no speaker. A turn with a marker but no words after it is
    dropped (nothing to show). An empty or whitespace-only text gives an empty list.
    """
    if not isinstance(text, str):
        raise TypeError(f"segment() needs a str, got {type(text).__name__}")
    if units not in UNIT_KINDS:
        raise ValueError(f"units must be one of {UNIT_KINDS}, got {units!r}")
    markers = _speaker_markers(text)
    if not markers:
        return split_sentences(text)
    found = split_sentences(text, 0, markers[0].start())
    for index, marker in enumerate(markers):
        end = markers[index + 1].start() if index + 1 < len(markers) else len(text)
        speaker = marker["speaker"].strip()
        if units == "sentences":
            for sentence in split_sentences(text, marker.end(), end):
                sentence.speaker = speaker
                found.append(sentence)
            continue
        unit = _trimmed(text, marker.end(), end, speaker=speaker)
        if unit is not None:
            found.append(unit)
    return found
