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


def test_service_page_shows_faithfulness_and_lets_the_user_pick_method_and_target(page_server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            requests: list[dict] = []
            page.on(
                "request",
                lambda r: (
                    requests.append(r.post_data_json) if r.url.endswith("/classify") else None
                ),
            )
            page.goto(page_server.url + "/")
            page.fill("#message", "I lost my card yesterday, please block it")
            assert page.is_checked("#faithfulness")
            page.click("#classify-button")
            page.wait_for_selector("#classify-result:not([hidden])", timeout=30_000)
            assert requests[-1]["faithfulness"] is True and "target" not in requests[-1]
            predicted = page.inner_text("#intent-label").strip()
            # Each method's own faithfulness next to its highlights, in plain words.
            for box in ("#attention-faithfulness", "#attribution-faithfulness"):
                words = page.inner_text(box)
                assert "comprehensiveness" in words and "sufficiency" in words
                assert "deleting its top words lowers" in words
            assert page.inner_text("#explained-target") == f"Explaining {predicted}"
            page.click("#faithfulness-help summary")
            assert "Comprehensiveness" in page.inner_text("#faithfulness-help")

            # Another method, and the runner-up intent as the target.
            runner_up = page.locator("#top-k-list li").nth(1).locator("span").first.inner_text()
            page.select_option("#method", "integrated_gradients")
            page.select_option("#target", label=runner_up)
            page.click("#classify-button")
            # (The page's CSP forbids eval: wait with locator assertions.)
            expect(page.locator("#attribution-name")).to_have_text(
                "Integrated gradients", timeout=30_000
            )
            body = requests[-1]
            assert body["explain"] == ["attention", "integrated_gradients"]
            assert body["target"] == runner_up.replace(" ", "_")
            assert page.inner_text("#explained-target") == f"Explaining {runner_up}"
            assert page.locator("#attribution-text .word").count() == 9
            assert "comprehensiveness" in page.inner_text("#attribution-faithfulness")

            # The contrast of the top two intents.
            page.select_option("#target", "contrast")
            page.click("#classify-button")
            expect(page.locator("#explained-target")).to_contain_text("rather than", timeout=30_000)
            assert requests[-1]["target"] == "contrast"
            assert page.inner_text("#explained-target").startswith(f"Explaining why {predicted}")

            # Without the check, no numbers.
            page.uncheck("#faithfulness")
            page.click("#classify-button")
            expect(page.locator("#attribution-faithfulness")).to_have_text("", timeout=30_000)
            assert requests[-1]["faithfulness"] is False
            assert page.inner_text("#status") == "" and errors == []
        finally:
            browser.close()
