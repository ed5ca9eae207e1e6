"""The web page in a real headless browser: Debian's chromium driven by Playwright (nothing downloaded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from carsearch.index.build import build_index
from carsearch.search import Searcher
from carsearch.serve.app import create_app
from tests.conftest import DEV, REPO, live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (make test installs it: apt-get install chromium)",
)
# Chromium on a machine without a network: no background connections, no sandbox (root in CI), no GPU.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
SCREENSHOT = REPO / "test-artifacts" / "serve-page.png"


def test_upload_see_results_click_a_neighbour(dev_embeddings: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    build_index([dev_embeddings], tmp_path / "idx")
    app = create_app(searcher=Searcher.open(tmp_path / "idx"))
    with live_server(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            expect(page.locator("#index-info")).to_contain_text("1568 cars indexed")
            page.select_option("#k", "10")
            page.set_input_files("#file-input", str(DEV / "images" / "00001.jpg"))
            cards = page.locator("#results .card")
            expect(cards).to_have_count(10, timeout=60_000)
            expect(page.locator("body")).to_have_attribute("data-searches", "1")
            labels = cards.locator(".label").all_inner_texts()
            assert len(labels) == 10 and all(lab.strip() for lab in labels)
            predicted = page.locator("#label").inner_text()
            assert predicted == "Audi TTS Coupe 2012"  # the photo itself is indexed: it wins its own vote
            expect(page.locator("#votes li")).not_to_have_count(0)
            # Every thumbnail really loads.
            page.wait_for_function(
                "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000,
            )
            # Clicking a neighbour searches with that image.
            second = cards.nth(1)
            clicked_label = second.locator(".label").inner_text()
            second.click()
            expect(page.locator("body")).to_have_attribute("data-searches", "2", timeout=60_000)
            expect(page.locator("#query-name")).to_have_text(clicked_label)
            expect(cards).to_have_count(10)
            assert page.locator("#status").inner_text() == ""
            # The filter controls: only BMWs (typed in any case), and the makes offered from the index.
            assert page.locator("#makes option[value='BMW']").count() == 1
            page.fill("#f-make", "bmw")
            page.set_input_files("#file-input", str(DEV / "images" / "00002.jpg"))
            expect(page.locator("body")).to_have_attribute("data-searches", "3", timeout=60_000)
            expect(cards).to_have_count(10)
            labels = cards.locator(".label").all_inner_texts()
            assert all(lab.startswith("BMW ") for lab in labels), labels
            assert page.locator("#label").inner_text().startswith("BMW ")
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
