"""The built HTML book (``_build/html/``): its pages, Chromium (the ``browser`` fixture, for
every test through ``tests/conftest.py``), and the checks every page passes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from support import ROOT

BUILD = ROOT / "_build" / "html"
SHOTS = ROOT / "test-output"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def toc_files(toc: dict) -> list[str]:
    """Every `file:` entry of a jb-book `_toc.yml`, root first, in reading order."""
    found = [toc["root"]]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                walk(node.get(key, []))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return found


def strip_suffix(name: str) -> str:
    return name.removesuffix(".ipynb").removesuffix(".md")


TOC = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
PAGES = [strip_suffix(f) for f in toc_files(TOC)]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it (`apt-get install -y chromium`, "
            "which `make test` does) or set CHROMIUM to its path",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class PageLog:
    """Everything one page asked for, and everything that went wrong while it loaded."""

    def __init__(self, page: object) -> None:
        self.requests: list[str] = []
        self.failures: list[str] = []
        self.errors: list[str] = []
        self.console_errors: list[str] = []
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("requestfailed", lambda r: self.failures.append(f"{r.url} ({r.failure})"))
        page.on(
            "response",
            lambda r: (
                self.failures.append(f"{r.url} (HTTP {r.status})") if r.status >= 400 else None
            ),
        )
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        # Console errors too: a 404 the page never saw as a response (the favicon) and the
        # theme's complaints show up only here.
        page.on(
            "console",
            lambda m: self.console_errors.append(m.text) if m.type == "error" else None,
        )

    def external(self) -> list[str]:
        out = []
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme in ("data", "blob", "about", "file"):
                continue
            if parts.hostname not in LOCAL_HOSTS:
                out.append(url)
        return out


def open_page(browser: object, url: str) -> tuple[object, PageLog]:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    log = PageLog(page)
    page.goto(url, wait_until="networkidle")
    return page, log


def check_widgets(page: object, html: str) -> int:
    """Every saved widget view is rendered by the embed manager, once. Returns the count."""
    if WIDGET_VIEW not in html:
        return 0
    assert WIDGET_STATE in html, "widget views on the page but no saved widget state"
    # Wait until every view whose model is in the saved state has a rendered widget
    # next to it (the manager inserts a .widget-subarea before each view's script tag).
    page.wait_for_function(
        """([viewType, stateType]) => {
            const state = document.querySelector(`script[type="${stateType}"]`);
            const models = Object.keys(JSON.parse(state.textContent).state);
            const views = [...document.querySelectorAll(`script[type="${viewType}"]`)]
                .filter(s => models.includes(JSON.parse(s.textContent).model_id));
            return views.length > 0 && views.every(s => {
                const prev = s.previousElementSibling;
                return prev && prev.classList.contains('widget-subarea')
                    && prev.querySelector('.jupyter-widgets') !== null;
            });
        }""",
        arg=[WIDGET_VIEW, WIDGET_STATE],
        timeout=30_000,
    )
    page.wait_for_timeout(500)  # a second manager would render a second copy by now
    counts = page.evaluate(
        """(viewType) => [...document.querySelectorAll(`script[type="${viewType}"]`)].map(s =>
            [...s.parentElement.children].filter(c => c.classList.contains('widget-subarea'))
                .length)""",
        WIDGET_VIEW,
    )
    assert counts and all(c <= 1 for c in counts), f"widgets rendered more than once: {counts}"
    assert page.locator(".widget-subarea .jupyter-widgets").first.is_visible()
    return len(counts)


def check_math(page: object) -> int:
    math = page.locator("article .math").count()
    if math:
        page.wait_for_selector("mjx-container", timeout=30_000)
    return math


def check_visible_content(page: object, name: str) -> None:
    article = page.locator("article.bd-article")
    assert article.count() == 1, f"{name}: no article element"
    text = article.inner_text().strip()
    assert len(text) > 200, f"{name}: page has almost no text ({len(text)} characters)"
    assert page.locator("article h1").count() >= 1, f"{name}: no title"
    # Open every toggle ("show the answer", hidden cell inputs/outputs) before looking.
    page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    page.evaluate(
        "document.querySelectorAll('.toggle-hidden')"
        ".forEach(e => e.classList.remove('toggle-hidden'))"
    )
    tables = article.locator("table")
    for i in range(tables.count()):
        table = tables.nth(i)
        table.scroll_into_view_if_needed()
        assert table.is_visible(), f"{name}: table {i} is not visible"
    images = article.locator("img")
    for i in range(images.count()):
        img = images.nth(i)
        img.scroll_into_view_if_needed()
        assert img.is_visible(), f"{name}: image {i} is not visible"
        loaded = img.evaluate("el => el.complete && el.naturalWidth > 0")
        assert loaded, f"{name}: image {i} ({img.get_attribute('src')}) did not load"


def screenshot(page: object, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SHOTS / f"{name.replace('/', '__')}.png"), full_page=True)
