"""The lab chapter of the built book: the live panel renders from its saved state, offline.

`test_book_offline.py` checks every page in general; this file checks what only chapter 4 has.
It serves `_build/html/` from a local `http.server`, opens `chapters/04_lab.html` in headless
Chromium with every request off the machine refused and recorded, and asserts that:

- the panel is drawn by the book's own ipywidgets embed manager: its sliders, buttons,
  counters, chart, verdict and tables (queue, inbox, projection beside the truth, dead
  letters), showing the state the chapter left it in;
- the page says plainly that moving a slider needs a running kernel, and how to get one;
- the panel's snapshots, printed as ordinary outputs, show the same tables without widgets;
- no request left the local server and no script failed.

Screenshots of the page and of the panel go to `test-output/`. Run the book build first
(`make book`; `make test` does it before the tests).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from support.book_server import serve

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "_build" / "html"
PAGE = BUILD / "chapters" / "04_lab.html"
SHOTS = ROOT / "test-output"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    if not PAGE.is_file():
        pytest.fail(f"the built lab chapter is missing ({PAGE.relative_to(ROOT)}): build the"
                    " book first (`make book`, or `jupyter-book build --all .`); `make test`"
                    " does it for you", pytrace=False)
    with serve(BUILD) as url:
        yield url


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[tuple[object, dict[str, list[str]]]]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install -y chromium` (which"
                    " `make test` does) or set CHROMIUM to its path", pytrace=False)
    from playwright.sync_api import sync_playwright

    seen: dict[str, list[str]] = {"external": [], "failed": [], "errors": []}
    local = urlsplit(server).netloc

    def route(r: object) -> None:
        url = r.request.url
        parts = urlsplit(url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.netloc != local:
            seen["external"].append(url)
            r.abort()
        else:
            r.continue_()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 900})
            pg.route("**/*", route)
            pg.on("requestfailed", lambda r: seen["failed"].append(f"{r.url} ({r.failure})"))
            pg.on("response", lambda r: seen["failed"].append(f"{r.url} (HTTP {r.status})")
                  if r.status >= 400 else None)
            pg.on("pageerror", lambda e: seen["errors"].append(str(e)))
            pg.goto(f"{server}/chapters/04_lab.html", wait_until="networkidle",
                    timeout=60_000)
            pg.wait_for_selector(".dl-live .dl-inbox table", state="visible", timeout=30_000)
            yield pg, seen
        finally:
            browser.close()


def counter(pg: object, name: str) -> int:
    return int(pg.locator(f".dl-live .dl-count-{name} .dl-counter-value").inner_text())


def test_the_panel_and_its_tables_render_from_the_saved_state(page) -> None:
    pg, _ = page
    panel = pg.locator(".dl-live").first
    assert panel.is_visible()
    for css in ("dl-ack-slider", "dl-crash-slider", "dl-visibility-slider", "dl-orders-slider",
                "dl-workers-slider", "dl-mode-dropdown", "dl-seed", "dl-place-button",
                "dl-step-button", "dl-run-button", "dl-autorun-button", "dl-lose-button",
                "dl-reconcile-button", "dl-reset-button"):
        assert pg.locator(f".dl-live .{css}").first.is_visible(), f"{css} is not shown"
    # The chapter set the ACK failure rate to 0.8 and ended in at-least-once mode.
    assert "0.80" in pg.locator(".dl-live .dl-ack-slider").inner_text()
    assert pg.locator(".dl-live .dl-mode-dropdown select").input_value() == "at-least-once"
    for css in ("dl-queue", "dl-inbox", "dl-projection", "dl-dead-letters"):
        assert pg.locator(f".dl-live .{css} .dl-caption").is_visible(), f"{css}: no caption"
    for css in ("dl-inbox", "dl-projection", "dl-dead-letters"):
        table = pg.locator(f".dl-live .{css} table.dl-table")
        assert table.is_visible() and table.locator("tbody tr").count() > 0, css
    # The inbox holds the 20 events the idempotent worker applied; the 20 orders placed in
    # at-least-once mode never pass through it, and the repair fences events, not the inbox.
    inbox_rows = pg.locator(".dl-live .dl-inbox .dl-rows").get_attribute("data-rows")
    assert inbox_rows == "20"
    assert counter(pg, "duplicates-skipped") > 0 and counter(pg, "deliveries") > 40
    assert counter(pg, "applied") >= 40 and counter(pg, "lost") == 0
    # Green after the reconcile, and the duplicated history it cannot undo still on record.
    verdict = pg.locator(".dl-live .dl-verdict").inner_text()
    assert verdict.startswith("checker: OK (repaired): projection equals truth;"), verdict
    assert "had duplicated effects before the repair" in verdict
    chart = pg.locator(".dl-live .dl-chart svg")
    assert chart.is_visible() and chart.locator("polyline").count() == 5
    assert "Reconciled" in pg.locator(".dl-live .dl-status").inner_text()
    assert "worker-1" in pg.locator(".dl-live .dl-log").inner_text()


def test_the_page_says_a_slider_needs_a_running_kernel(page) -> None:
    pg, _ = page
    note = pg.locator(".dl-live .dl-note").inner_text()
    assert "needs a running kernel" in note and "make lab" in note
    article = pg.locator("article.bd-article").inner_text()
    assert re.search(r"moving a slider or pressing a button\s+needs a\s+running Python kernel",
                     article)


def test_the_snapshots_show_the_same_tables_without_widgets(page) -> None:
    pg, _ = page
    snapshots = pg.locator("article .dl-snapshot")
    assert snapshots.count() == 2
    last = snapshots.nth(1)
    last.scroll_into_view_if_needed()
    assert last.locator("table.dl-table").count() >= 3
    assert last.locator(".dl-verdict-line").inner_text() == \
        pg.locator(".dl-live .dl-verdict .dl-verdict-line").inner_text()
    assert last.locator(".dl-counter-value").all_inner_texts() == \
        pg.locator(".dl-live .dl-counter-value").all_inner_texts()


def test_nothing_left_the_local_server_and_screenshots_are_saved(page) -> None:
    pg, seen = page
    SHOTS.mkdir(exist_ok=True)
    panel = pg.locator(".dl-live").first
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(SHOTS / "book_lab_panel.png"))
    pg.screenshot(path=str(SHOTS / "book_lab_page.png"), full_page=True)
    assert (SHOTS / "book_lab_panel.png").stat().st_size > 10_000
    assert not seen["external"], f"requests off the machine: {seen['external']}"
    assert not seen["failed"], f"failed requests: {seen['failed']}"
    assert not seen["errors"], f"script errors: {seen['errors']}"
