"""The web page in a real headless browser: Debian's chromium driven by Playwright (nothing downloaded).

Every state of the page (before a search, results, filtered, a filter that matches nothing, a failed upload,
an unlabelled index) is checked at a desktop and a phone width: no horizontal scroll, the boxes of its parts
do not overlap, the left column's controls stay inside it; a screenshot of each is kept under
$CARSEARCH_ARTIFACTS (or pytest's tmp folder), never in the repository."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from carsearch.index.build import build_index
from carsearch.search import Searcher
from carsearch.serve.app import create_app
from tests.conftest import DEV, live_server

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
WIDTHS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
PHOTO = DEV / "images" / "00001.jpg"  # Audi TTS Coupe 2012, itself in the index
WAIT = 60_000  # ms: a loaded 2-core machine is slow, not broken

# The page's parts that must never overlap one another (an element and its own ancestor aside), and the
# column each must stay inside.
PARTS = [
    "header",
    "#drop",
    "#options",
    "#k",
    "#level",
    "#filters",
    "#f-make",
    "#f-model",
    "#f-year",
    "#query",
    "#prediction",
    "#status",
    ".section-title",
    "#empty",
    "#note",
    "#results .card",
]
LAYOUT = """(parts) => {
  const shown = [];
  for (const sel of parts) for (const el of document.querySelectorAll(sel)) {
    const r = el.getBoundingClientRect();
    if (el.getClientRects().length && r.width > 0 && r.height > 0) shown.push({sel, el, r});
  }
  const overlaps = [];
  for (let i = 0; i < shown.length; i++) for (let j = i + 1; j < shown.length; j++) {
    const a = shown[i], b = shown[j];
    if (a.el.contains(b.el) || b.el.contains(a.el)) continue;
    const w = Math.min(a.r.right, b.r.right) - Math.max(a.r.left, b.r.left);
    const h = Math.min(a.r.bottom, b.r.bottom) - Math.max(a.r.top, b.r.top);
    if (w > 0.5 && h > 0.5) overlaps.push(`${a.sel} overlaps ${b.sel} by ${w.toFixed(0)}x${h.toFixed(0)} px`);
  }
  const outside = [];
  for (const {sel, el, r} of shown) {
    const column = el.closest("#query-panel, #results-panel");
    const c = column ? column.getBoundingClientRect() : {left: 0, right: innerWidth};
    if (r.left < c.left - 0.5 || r.right > c.right + 0.5)
      outside.push(`${sel} spans ${r.left | 0}..${r.right | 0} px, its column ${c.left | 0}..${c.right | 0}`);
  }
  const first = document.querySelector("#results .card");
  return {
    scrollWidth: document.documentElement.scrollWidth,
    innerWidth,
    innerHeight,
    overlaps,
    outside,
    firstCardBottom: first ? first.getBoundingClientRect().bottom + scrollY : null,
  };
}"""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go: $CARSEARCH_ARTIFACTS/browser if set, else a pytest tmp folder."""
    root = os.environ.get("CARSEARCH_ARTIFACTS")
    out = Path(root) / "browser" if root else tmp_path_factory.mktemp("browser-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def labelled_url(dev_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("browser") / "idx"
    build_index([dev_embeddings], folder)
    with live_server(create_app(searcher=Searcher.open(folder))) as url:
        yield url


@pytest.fixture(scope="module")
def unlabelled_url(unlabelled_index: Path) -> Iterator[str]:
    with live_server(create_app(searcher=Searcher.open(unlabelled_index))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def check_layout(page, artifacts: Path, name: str) -> dict:
    """Screenshot the page as `name`; then no sideways scroll, no overlapping parts, each in its column."""
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)
    got = page.evaluate(LAYOUT, PARTS)
    assert got["scrollWidth"] <= got["innerWidth"], f"{name}: the page is {got['scrollWidth']} px wide"
    assert not got["overlaps"], f"{name}: {got['overlaps']}"
    assert not got["outside"], f"{name}: {got['outside']}"
    assert (artifacts / f"{name}.png").stat().st_size > 5_000
    return got


def finished(page, n: int) -> None:
    """Wait until the page has finished its n-th search request (answered, refused or failed)."""
    from playwright.sync_api import expect

    expect(page.locator("body")).to_have_attribute("data-done", str(n), timeout=WAIT)
    expect(page.locator("body")).not_to_have_attribute("data-busy", "1")


def test_upload_see_results_click_a_neighbour(labelled_url: str, browser, artifacts: Path) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport=WIDTHS["desktop"])
    try:
        page.goto(labelled_url)
        expect(page.locator("#index-info")).to_contain_text("1568 cars indexed")
        page.select_option("#k", "10")
        page.set_input_files("#file-input", str(PHOTO))
        cards = page.locator("#results .card")
        expect(cards).to_have_count(10, timeout=WAIT)
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
        expect(page.locator("body")).to_have_attribute("data-searches", "2", timeout=WAIT)
        expect(page.locator("#query-name")).to_have_text(clicked_label)
        expect(cards).to_have_count(10)
        assert page.locator("#status").inner_text() == ""
        # The makes offered from the index.
        assert page.locator("#make-values option[value='BMW']").count() == 1
        page.screenshot(path=str(artifacts / "clicked-neighbour.png"), full_page=True)
    finally:
        page.close()


@pytest.mark.parametrize("width", list(WIDTHS))
def test_every_state_at_desktop_and_phone_width(
    width: str, labelled_url: str, unlabelled_url: str, browser, artifacts: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport=WIDTHS[width])
    searches: list[str] = []
    page.on("request", lambda r: searches.append(r.url) if "/api/search" in r.url else None)
    cards, status = page.locator("#results .card"), page.locator("#status")
    try:
        page.goto(labelled_url)
        expect(page.locator("#index-info")).to_contain_text("1568 cars indexed")
        check_layout(page, artifacts, f"{width}-1-start")

        page.set_input_files("#file-input", str(PHOTO))
        finished(page, 1)
        expect(cards).to_have_count(20)
        expect(page.locator("#label")).to_have_text("Audi TTS Coupe 2012")
        expect(page.locator("#narrowed")).to_be_hidden()
        got = check_layout(page, artifacts, f"{width}-2-results")
        # The first results show without scrolling, on a phone too.
        assert got["firstCardBottom"] <= got["innerHeight"], got

        # Every control searches the current photo again, each change once.
        page.select_option("#k", "10")
        finished(page, 2)
        expect(cards).to_have_count(10)
        page.fill("#f-make", "bmw")
        page.press("#f-make", "Enter")
        finished(page, 3)
        expect(cards).to_have_count(10)
        assert all(lab.startswith("BMW ") for lab in cards.locator(".label").all_inner_texts())
        expect(page.locator("#label")).to_contain_text("BMW ")
        expect(page.locator("#narrowed")).to_have_text(
            "Filtered: only cars with make bmw voted and are shown."
        )
        page.wait_for_timeout(700)  # past the typing pause: the Enter's search was the only one
        assert len(searches) == 3 and "make=bmw" in searches[-1], searches
        check_layout(page, artifacts, f"{width}-3-filtered")
        page.set_input_files("#file-input", str(PHOTO))  # the same photo again
        finished(page, 4)
        page.select_option("#level", "make")
        finished(page, 5)
        expect(page.locator("#label")).to_have_text("BMW")
        assert len(searches) == 5 and "level=make" in searches[-1], searches

        # A filter nothing passes: an empty state that says why, nothing of the previous answer.
        page.fill("#f-make", "Trabant")
        page.press("#f-make", "Enter")
        finished(page, 6)
        expect(page.locator("#empty")).to_have_text(
            "No indexed car passes the filter (make Trabant): widen or clear it."
        )
        expect(cards).to_have_count(0)
        expect(page.locator("#prediction")).to_be_hidden()
        assert status.inner_text() == ""  # no TypeError
        check_layout(page, artifacts, f"{width}-4-no-match")

        # A failed upload: the server's sentence; no results of the photo before.
        page.fill("#f-make", "")  # searches again after the typing pause
        finished(page, 7)
        expect(cards).to_have_count(10)
        notes = tmp_path / "notes.txt"
        notes.write_text("not a photo")
        page.set_input_files("#file-input", str(notes))
        finished(page, 8)
        expect(status).to_contain_text("not_an_image")
        expect(page.locator("#query-name")).to_have_text("notes.txt")
        expect(cards).to_have_count(0)
        expect(page.locator("#prediction")).to_be_hidden()
        expect(page.locator("#empty")).to_be_hidden()
        check_layout(page, artifacts, f"{width}-5-failed-upload")
        assert len(searches) == 8, searches

        # An unlabelled index: no vote and no filters offered, cards named by their files, a note why.
        page.goto(unlabelled_url)
        expect(page.locator("#index-info")).to_contain_text("no labels")
        expect(page.locator("#filters")).to_be_hidden()
        expect(page.locator("#level-control")).to_be_hidden()
        expect(page.locator("#k")).to_be_visible()
        page.set_input_files("#file-input", str(PHOTO))
        finished(page, 1)
        expect(cards).to_have_count(12)
        names = cards.locator(".label").all_inner_texts()
        assert names[0] == "listing-01.jpg" and all(n.startswith("listing-") for n in names), names
        expect(page.locator("#prediction")).to_be_hidden()
        expect(page.locator("#note")).to_contain_text("The index has no labels")
        expect(page.locator("#note")).to_contain_text("holds only 12 images")
        assert "level=" not in searches[-1]
        check_layout(page, artifacts, f"{width}-6-unlabelled")
    finally:
        page.close()
