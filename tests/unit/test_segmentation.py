"""Segmentation into speaker turns or sentences, with offsets into the original text."""

from __future__ import annotations

import pytest

from models.segmentation import Unit, segment, split_sentences

pytestmark = pytest.mark.unit

TEXTS = [
    "Customer: Hi, my order is late.\nAgent: Sorry! Let me check.\n\nCustomer: Thanks.",
    "#Person1#: Hello.\n#Person2#: Hi, how are you?\n#Person1#: Fine.",
    "Subject: refund\nHello. I was charged twice!   Please help?\nThanks",
    "你好。我的订单还没到！请帮我查一下",
    "مرحبا. طلبي لم يصل؟ شكرا",
    "Привет. Мой заказ не пришёл! Помогите, пожалуйста.",
    "... !!! ??? ok",
    "  \n leading space. trailing space.  \n",
]


def check_offsets(text: str, units: list[Unit]) -> None:
    previous_end = 0
    for unit in units:
        assert unit.text == text[unit.start : unit.end]
        assert unit.text == unit.text.strip() and unit.text
        assert unit.start >= previous_end
        previous_end = unit.end


@pytest.mark.parametrize("text", TEXTS)
def test_segment_units_point_back_into_the_text(text):
    check_offsets(text, segment(text))


@pytest.mark.parametrize("text", TEXTS[2:])
def test_segment_sentences_keep_every_non_space_character(text):
    units = segment(text)
    covered = "".join(unit.text for unit in units)
    assert "".join(covered.split()) == "".join(text.split())


def test_segment_splits_speaker_turns_and_keeps_multi_line_turns_whole():
    text = "Customer: My parcel is late.\nIt was due Monday.\nAgent: Let me check. One moment."
    units = segment(text)
    assert [u.speaker for u in units] == ["Customer", "Agent"]
    assert units[0].text == "My parcel is late.\nIt was due Monday."
    assert units[1].text == "Let me check. One moment."


def test_segment_recognises_dialogsum_markers():
    units = segment("#Person1#: Hello.\n#Person2#: Hi there.")
    assert [(u.speaker, u.text) for u in units] == [
        ("#Person1#", "Hello."),
        ("#Person2#", "Hi there."),
    ]


def test_segment_single_role_line_is_a_turn_but_a_single_label_line_is_a_sentence():
    assert segment("Customer: where is my order?")[0].speaker == "Customer"
    units = segment("Note: the card was blocked. Please advise.")
    assert all(u.speaker is None for u in units)
    assert len(units) == 2


def test_segment_urls_are_not_speaker_markers():
    units = segment("see http://example.com/a\nhttps://example.com/b")
    assert all(u.speaker is None for u in units)


def test_segment_text_before_the_first_marker_becomes_sentences():
    units = segment("Ticket 123. Refund request\nCustomer: I want my money back.\nAgent: Sure.")
    assert [u.speaker for u in units] == [None, None, "Customer", "Agent"]


def test_segment_turn_with_marker_only_is_dropped():
    units = segment("Customer: Hello?\nAgent:\nCustomer: anyone there?")
    assert [u.text for u in units] == ["Hello?", "anyone there?"]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t"])
def test_segment_empty_text_gives_no_units(text):
    assert segment(text) == []


def test_segment_rejects_non_text():
    with pytest.raises(TypeError, match="needs a str"):
        segment(None)  # type: ignore[arg-type]


def test_split_sentences_handles_cjk_punctuation_without_spaces():
    units = split_sentences("你好。谢谢！再见")
    assert [u.text for u in units] == ["你好。", "谢谢！", "再见"]


def test_unit_has_words_only_with_letters_or_digits():
    assert not Unit("...", 0, 3).has_words
    assert Unit("ok!", 0, 3).has_words
    assert Unit("你好", 0, 2).has_words


@pytest.mark.parametrize("text", TEXTS)
def test_segment_sentence_units_point_back_into_the_text(text):
    check_offsets(text, segment(text, units="sentences"))


def test_segment_sentence_units_split_turns_and_keep_the_speaker():
    text = "Customer: My parcel is late.\nIt was due Monday!\nAgent: Let me check. One moment."
    units = segment(text, units="sentences")
    assert [(u.speaker, u.text) for u in units] == [
        ("Customer", "My parcel is late."),
        ("Customer", "It was due Monday!"),
        ("Agent", "Let me check."),
        ("Agent", "One moment."),
    ]
    # Without speaker markers both kinds are the same sentences.
    plain = "Hello. I was charged twice! Please help?"
    assert segment(plain, units="sentences") == segment(plain)


def test_segment_rejects_an_unknown_unit_kind():
    with pytest.raises(ValueError, match="units must be one of"):
        segment("Customer: hi", units="paragraphs")
