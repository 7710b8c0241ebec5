"""Every cell output of the built book fits its column: a grader's verdict (its "Why:" line
runs to a thousand characters and more) wraps instead of scrolling sideways.

Opens each chapter of `_build/html/` (run `make book` first) in headless Chromium at a
desktop width, opens every toggle (the model solutions' dropdowns, hidden cells), and
measures every text output against the column it sits in.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.book_server import serve

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "_build" / "html"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHAPTERS = sorted(p.stem for p in (ROOT / "chapters").glob("*.ipynb"))

# Each output <pre>: how wide its text is, how wide it shows, how wide its column is.
MEASURE = """() => {
  const column = document.querySelector('main article, article.bd-article, main');
  const width = column.getBoundingClientRect().width;
  return Array.from(document.querySelectorAll('div.cell_output pre')).map(pre => ({
    text: pre.innerText.slice(0, 80),
    scroll: pre.scrollWidth,
    client: pre.clientWidth,
    right: pre.getBoundingClientRect().right - column.getBoundingClientRect().left,
    column: width,
    verdict: /^(PASS|FAIL): /m.test(pre.innerText),
  }));
}"""


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    if not (BUILD / "intro.html").is_file():
        pytest.fail(f"the built book is missing ({BUILD.relative_to(ROOT)}/intro.html): run"
                    " `make book` first", pytrace=False)
    with serve(BUILD) as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url: str) -> Iterator[object]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it or set CHROMIUM",
                    pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--headless", "--disable-gpu"])
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 900})
        finally:
            browser.close()


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_no_output_is_wider_than_its_column(base_url: str, page: object, chapter: str) -> None:
    page.goto(f"{base_url}/chapters/{chapter}.html")
    page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    page.evaluate("document.querySelectorAll('.toggle-hidden')"
                  ".forEach(e => e.classList.remove('toggle-hidden'))")
    outputs = page.evaluate(MEASURE)
    if "grade(" in (ROOT / "chapters" / f"{chapter}.ipynb").read_text(encoding="utf-8"):
        assert any(o["verdict"] for o in outputs), "no verdict found among the outputs"
    too_wide = [o for o in outputs if o["scroll"] > o["client"] + 1
                or o["right"] > o["column"] + 1]
    assert not too_wide, "\n".join(
        f"{o['scroll']} px of text in {o['client']} px (column {o['column']:.0f} px):"
        f" {o['text']!r}" for o in too_wide)
