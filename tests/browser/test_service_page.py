"""The web page in a real headless Chromium: classify, summarize, and look at the pixels."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _count(image: Image.Image, predicate) -> int:
    return sum(1 for pixel in image.convert("RGB").getdata() if predicate(pixel))


def test_service_page_shows_intent_highlights_and_summary(page_server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(page_server.url + "/")
            page.fill("#message", "I lost my card yesterday, please block it")
            page.click("#classify-button")
            page.wait_for_selector("#classify-result:not([hidden])", timeout=30_000)
            page.click("#summarize-button")
            page.wait_for_selector("#summarize-result:not([hidden])", timeout=30_000)

            assert page.inner_text("#intent-label").strip()
            assert page.locator("#top-k-list li").count() == 3
            # One span per word: 8 words and the comma (punctuation is a word of its own).
            assert page.locator("#attention-text .word").count() == 9
            assert page.locator("#attribution-text .word").count() == 9
            assert page.inner_text("#attention-text") == "I lost my card yesterday, please block it"
            selected = page.locator("#conversation-text .sentence.selected")
            assert 1 <= selected.count() <= 2
            assert selected.first.inner_text() in page.inner_text("#summary-text")
            assert page.inner_text("#status") == "" and errors == []

            shot = tmp_path / "page.png"  # kept under pytest's tmp dir for a look
            page.screenshot(path=str(shot), full_page=True)
            attention_shot = tmp_path / "attention.png"
            page.locator("#attention-text").screenshot(path=str(attention_shot))
            conversation_shot = tmp_path / "conversation.png"
            page.locator("#conversation-text").screenshot(path=str(conversation_shot))
        finally:
            browser.close()

    image = Image.open(shot)
    assert image.width == 1280 and image.height >= 600
    assert len(set(image.convert("RGB").getdata())) > 50  # rendered, not blank
    # Attention highlights are blue tints: blue clearly above red and green.
    blue = _count(Image.open(attention_shot), lambda p: p[2] > p[0] + 25 and p[2] > p[1] + 10)
    assert blue > 200
    # Selected sentences are on a yellow background (#fde047).
    yellow = _count(
        Image.open(conversation_shot),
        lambda p: abs(p[0] - 253) < 6 and abs(p[1] - 224) < 6 and abs(p[2] - 71) < 10,
    )
    assert yellow > 500
