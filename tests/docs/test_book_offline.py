"""The built book works offline: every page loads only from the book itself.

These tests open the HTML that `jupyter-book build` left in `_build/html/` (run `make book`
first; `make test` builds it before running them) in headless Chromium, served by a local
`http.server`, and check each page in `_toc.yml`:

- every request the page makes goes to the local server (no CDN, fonts, analytics);
- no request fails, no script throws and nothing is logged to the console as an error;
- the page has content; chapter tables and images are visible (collapsed toggles are
  opened first) and images actually loaded;
- maths, where a page has any, is typeset by the book's own MathJax;
- widgets, where a page has any (chapter 4, the lab, has the fault-rate sliders), are
  rendered by the book's own ipywidgets embed manager, exactly once per view.

A screenshot of each page goes to `test-output/`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.book_server import serve
from support.built_book import (
    BUILD,
    PAGES,
    TOC,
    check_math,
    check_visible_content,
    check_widgets,
    open_page,
    screenshot,
)

ROOT = Path(__file__).resolve().parents[2]


# --- the table of contents and the chapters folder agree (no browser needed) -------------


def test_toc_is_a_numbered_book() -> None:
    assert TOC["format"] == "jb-book"
    assert TOC["root"] == "intro"
    # The chapters are numbered; the parts after them (Running the lab, whose pages are in
    # lab/, and the reference pages: glossary, reading) are not.
    for part in TOC.get("parts", []):
        files = [c["file"] for c in part["chapters"]]
        if all(f.startswith("chapters/") for f in files):
            assert part.get("numbered") is True, f"part {part.get('caption')!r} is not numbered"
        else:
            folders = {f.split("/", 1)[0] for f in files}
            assert len(folders) == 1 and folders <= {"lab", "reference"}, (
                f"part {part.get('caption')!r} mixes chapters, lab and reference pages")
            assert not part.get("numbered"), f"part {part.get('caption')!r} is numbered"


def test_every_chapter_notebook_is_in_the_toc() -> None:
    # only_build_toc_files is on: a notebook missing from _toc.yml would silently not be built.
    notebooks = {
        p.relative_to(ROOT).with_suffix("").as_posix() for p in ROOT.glob("chapters/*.ipynb")
    }
    missing = sorted(notebooks - set(PAGES))
    assert not missing, f"notebooks not listed in _toc.yml: {missing}"


def test_every_toc_entry_exists() -> None:
    for page in PAGES:
        candidates = [ROOT / f"{page}{suffix}" for suffix in (".ipynb", ".md")]
        assert any(c.is_file() for c in candidates), f"_toc.yml lists {page!r}, no such file"


# --- the built book in a real browser -----------------------------------------------------


@pytest.fixture(scope="module")
def built_book() -> Path:
    if not (BUILD / "intro.html").is_file():
        pytest.fail(
            f"the built book is missing ({BUILD.relative_to(ROOT)}/intro.html): run the book "
            "build first (`make book`, or `jupyter-book build --all .`); `make test` does it "
            "for you",
            pytrace=False,
        )
    return BUILD


@pytest.fixture(scope="module")
def server(built_book: Path) -> Iterator[str]:
    with serve(built_book) as url:
        yield url


@pytest.mark.browser
@pytest.mark.parametrize("name", PAGES)
def test_page_is_offline_and_complete(name: str, built_book: Path, server: str, browser) -> None:
    html_file = built_book / f"{name}.html"
    assert html_file.is_file(), (
        f"{html_file.relative_to(ROOT)} is missing: the book build is older than _toc.yml; "
        "run the book build again"
    )
    html = html_file.read_text(encoding="utf-8")
    page, log = open_page(browser, f"{server}/{name}.html")
    try:
        check_math(page)
        widgets = check_widgets(page, html)
        if widgets:
            served = [u for u in log.requests if "/_widgets/html-manager/embed-amd.js" in u]
            assert served, "widgets rendered but the book's own embed-amd.js was not loaded"
        screenshot(page, name)  # as a reader first sees it, before toggles are opened
        check_visible_content(page, name)
        assert not log.external(), f"{name}: requests off the machine: {log.external()}"
        assert not log.failures, f"{name}: failed requests: {log.failures}"
        assert not log.errors, f"{name}: script errors: {log.errors}"
        assert not log.console_errors, f"{name}: console errors: {log.console_errors}"
    finally:
        page.close()


@pytest.mark.browser
@pytest.mark.parametrize("name", PAGES)
def test_page_works_from_file_url(name: str, built_book: Path, browser) -> None:
    # A reader may open _build/html/index.html straight from disk: relative asset paths must
    # hold from the root and from chapters/, and nothing may reach for the network.
    html_file = built_book / f"{name}.html"
    assert html_file.is_file(), f"{html_file.relative_to(ROOT)} is missing: rebuild the book"
    html = html_file.read_text(encoding="utf-8")
    page, log = open_page(browser, html_file.as_uri())
    try:
        assert page.locator("article.bd-article").count() == 1
        check_math(page)
        check_widgets(page, html)
        assert not log.external(), f"{name}: requests off the machine: {log.external()}"
        scripts = [u for u in log.failures if u.split("?")[0].endswith(".js")]
        assert not scripts, f"{name}: scripts failed to load from file://: {scripts}"
    finally:
        page.close()


def test_widget_config_points_at_local_assets() -> None:
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    sphinx = config["sphinx"]["config"]
    urls = list(sphinx["nb_ipywidgets_js"]) + [sphinx["mathjax_path"]]
    for url in urls:
        assert "://" not in url, f"{url} is not a local path"
    embed = sphinx["nb_ipywidgets_js"]["../_widgets/html-manager/embed-amd.js"]
    assert "://" not in json.dumps(embed), "the embed manager's CDN fallback must stay local"
