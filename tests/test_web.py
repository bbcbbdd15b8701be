"""The demo page in a real browser: Debian's headless Chromium, driven by Playwright, against a real server.

The screenshot lands in tests/artifacts/ (git-ignored), where CI can pick it up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect, sync_playwright
from serving import KB_QUERY, ServerProcess, build_tiny_kb, save_chain_model, save_tiny_model

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts"
TIMEOUT_MS = 60_000


@contextmanager
def browser_page(url: str, width: int = 1400, height: int = 900) -> Iterator[Page]:
    """The page at `url` in a fresh headless Chromium, closed afterwards."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            yield page
        finally:
            browser.close()


def save_screenshot(page: Page, name: str) -> Path:
    """A full-page PNG in tests/artifacts/, for CI to collect."""
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / name
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:4] == b"\x89PNG"
    print(f"screenshot: {screenshot}")
    return screenshot


# Counts the changes to the generated text: a streamed answer arrives as many, not one.
COUNT_UPDATES = """() => {
  window.textUpdates = 0;
  new MutationObserver((records) => { window.textUpdates += records.length; })
    .observe(document.getElementById("output"), { childList: true, characterData: true, subtree: true });
}"""


def test_page_streams_a_completion_and_draws_attention(tmp_path):
    server = ServerProcess(save_tiny_model(tmp_path / "model"), "--max-tokens", "400", workdir=tmp_path)
    try:
        with browser_page(server.url, height=1000) as page:
            expect(page.locator("#model-name")).to_contain_text("tisslm")
            expect(page.locator("#kb-option")).to_be_hidden()  # no --kb: nothing to ground in

            page.fill("#prompt", "def add(a, b):\n")
            page.fill("#max-tokens", "120")
            page.fill("#seed", "7")
            page.evaluate(COUNT_UPDATES)
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("done", timeout=TIMEOUT_MS)
            shown = page.locator("#output .generated").text_content()
            assert shown and page.evaluate("window.textUpdates") > 2

            # The page sent what its controls say: the same request, not streamed, gives the same text.
            body = {"prompt": "def add(a, b):\n", "max_tokens": 120, "seed": 7, "temperature": 0.8, "top_p": 0.95}
            direct = httpx.post(f"{server.url}/v1/completions", json=body | {"top_k": 50}, timeout=60).json()
            assert shown == direct["choices"][0]["text"]

            page.fill("#attn-text", "def f(x): return x")
            page.click("#attn-run")
            expect(page.locator("#attn-grid canvas")).to_have_count(2 * 4)  # layers x heads
            expect(page.locator("#attn-status")).to_contain_text("18 tokens")
            page.locator("#attn-grid canvas").first.hover()
            expect(page.locator("#attn-tip")).to_contain_text("layer 0, head 0")

            save_screenshot(page, "web_demo.png")
    finally:
        server.stop()


def test_page_shows_the_sources_of_a_grounded_completion(tmp_path):
    kb = build_tiny_kb(tmp_path / "corpus")
    server = ServerProcess(save_tiny_model(tmp_path / "model"), "--kb", str(kb), workdir=tmp_path)
    try:
        with browser_page(server.url) as page:
            expect(page.locator("#kb-option")).to_be_visible()
            expect(page.locator("#kb-info")).to_contain_text("4 documents")

            prompt = f"# {KB_QUERY}\ndef duty(value, rate):\n"
            page.fill("#prompt", prompt)
            page.fill("#max-tokens", "40")
            page.fill("#seed", "3")
            page.check("#use-kb")
            page.fill("#kb-k", "3")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("done", timeout=TIMEOUT_MS)
            sources = page.locator("#sources li.source")
            expect(sources.first).to_contain_text("tariffs.py:1-3 tariffs.customs_duty")

            # What the page lists is what the API cites for the same request (the third chunk does
            # not fit the default 384-token prompt budget whole: it is cut, and the page says so).
            body = {"prompt": prompt, "max_tokens": 40, "seed": 3, "temperature": 0.8, "top_p": 0.95, "top_k": 50}
            direct = httpx.post(f"{server.url}/v1/completions", json=body | {"retrieve": {"k": 3}}, timeout=60).json()
            listed = [text.rsplit(" (", 1)[0] for text in sources.all_text_contents()]
            assert listed == [f"{s['path']}:{s['start_line']}-{s['end_line']} {s['name']}" for s in direct["sources"]]
            assert page.locator("#output .generated").text_content() == direct["choices"][0]["text"]
            assert page.locator("#sources .note").is_visible() == direct["context_truncated"]

            page.uncheck("#use-kb")  # an ungrounded completion clears the list
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("done", timeout=TIMEOUT_MS)
            expect(page.locator("#sources")).to_be_hidden()
            page.check("#use-kb")
            page.click("#generate")
            expect(sources).to_have_count(len(direct["sources"]))

            save_screenshot(page, "web_kb_sources.png")
    finally:
        server.stop()


def test_page_shows_what_the_content_filter_did(tmp_path):
    """A filtered server: the page shows the redacted text, never the email, and says what the filter did."""
    model = save_chain_model(tmp_path / "model", "\nhistory -c;bq@xz.uk\n")
    server = ServerProcess(model, workdir=tmp_path, filtered=True)
    try:
        with browser_page(server.url) as page:
            page.fill("#prompt", "run\n")
            page.fill("#max-tokens", "40")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text(
                "content filter: shell flag, pii redact", timeout=TIMEOUT_MS
            )
            shown = page.locator("#output .generated").text_content()
            assert shown.startswith("history -c;<EMAIL>\n") and "bq@" not in shown
            page.fill("#prompt", "you are a fucking idiot\n")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("refused by the content filter (toxicity)")
            save_screenshot(page, "web_content_filter.png")
    finally:
        server.stop()
