"""The Japanese edition, built into ``_build/html/ja/`` by ``make book`` (``scripts/i18n.py
build``), in a real browser and as files.

Every page of the edition, translated yet or not, is checked as tests/docs/test_book_offline.py
checks the English pages (with its helpers): nothing requested off the machine, no failed
request, no script or console error, content, tables and images visible, maths and widgets
rendered, from ``http://`` and from ``file://``; and the page says ``<html lang="ja">``. The
language switcher goes from each English page to the same Japanese page and back.

The check that no English prose paragraph is left on a Japanese page runs on every page whose
catalog translates all of the English as last extracted (``_build/gettext/``, which the build
refreshes): today the pages translated so far, after the translation every page. It catches
English that no catalog can translate (text the extraction misses, or that reaches the page
after the translation, as the sidebar's part titles did). That every catalog is complete is
``make i18n-check``'s job (tested in tests/docs/test_i18n.py): a page whose English changed drops
out of this check and is named there, so that until the check joins ``make test`` a change to
the English does not fail the tests, and afterwards the two cover every page.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from bs4 import BeautifulSoup
from support import ROOT
from support.book_server import serve
from support.built_book import (
    BUILD,
    PAGES,
    check_math,
    check_visible_content,
    check_widgets,
    open_page,
    screenshot,
)
from support.translations import i18n

LANGUAGE = "ja"
EDITION = BUILD / LANGUAGE

# The pages whose catalog translates every message: the English-prose check runs on these.
TRANSLATED = [p for p in PAGES if p in set(i18n.complete_pages(LANGUAGE))]
NOT_YET = ("no page's catalog translates all of its English, or the templates are missing "
           f"({i18n.TEMPLATES.relative_to(ROOT)}/): run `make book`")

JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")
LATIN_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]+")
# Words no name, identifier or title-case heading is made of, but any English sentence is.
ENGLISH_GLUE = {"the", "a", "an", "is", "are", "was", "be", "of", "to", "in", "on", "for",
                "with", "and", "or", "that", "this", "it", "its", "not", "by", "as", "from",
                "what", "when", "which", "you", "your", "can", "does", "do"}
# The blocks of prose on a page, and what inside them is not prose: code, maths, the
# engine's outputs, and bibliography entries (authors and titles stay as published).
PROSE_JS = """() => {
    const article = document.querySelector('article.bd-article');
    const skip = '.cell_output, .cell_input, .output, pre, .highlight, .citation, '
        + '[role=doc-biblioentry], script, style';
    const strip = 'code, kbd, .math, mjx-container, .headerlink, ul, ol, dl, p, table, '
        + '.cell_output, .cell_input, pre, .highlight';
    const blocks = article.querySelectorAll(
        'p, li, dt, dd, h1, h2, h3, h4, h5, h6, th, td, caption, figcaption, summary, '
        + '.admonition-title, .sd-card-title, .sd-summary-title');
    const out = [];
    for (const block of blocks) {
        if (block.closest(skip)) continue;
        const copy = block.cloneNode(true);
        copy.querySelectorAll(strip).forEach(e => e.remove());
        const text = copy.textContent.replace(/\\s+/g, ' ').trim();
        if (text) out.push(text);
    }
    return out;
}"""


def _help_texts() -> set[str]:
    """Every description and help text of the CLI's parser. The command reference page shows
    them as ``deliverylab COMMAND --help`` prints them, in English, like the engine's other
    output (the Japanese front page says so); they are the CLI's text, not the page's prose."""
    import argparse

    from deliverylab.app.cli import build_parser

    found: set[str] = set()
    todo = [build_parser()]
    while todo:
        parser = todo.pop()
        for text in (parser.description, parser.epilog):
            if text:
                found.add(" ".join(text.split()))
        for action in parser._actions:
            if action.help and action.help != argparse.SUPPRESS:
                found.add(" ".join(str(action.help).replace("%%", "%").split()))
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
                for choice in action._choices_actions:
                    if choice.help:
                        found.add(" ".join(choice.help.split()))
    return found


CLI_HELP = _help_texts()


def english_prose(texts: list[str]) -> list[str]:
    """The texts that read as English sentences: no Japanese character, three Latin words or
    more, one of them English glue (``the``, ``of``, ``is`` ...). Names and titles such as
    ``Amazon SQS FIFO`` or a glossary term kept in English are not prose."""
    found = []
    for text in texts:
        if JAPANESE.search(text):
            continue
        words = [w.lower() for w in LATIN_WORD.findall(text)]
        if len(words) >= 3 and ENGLISH_GLUE & set(words):
            found.append(text)
    return found


def test_english_prose_is_told_from_japanese_and_from_names() -> None:
    assert english_prose(["Every chapter drives the same small package."]) == [
        "Every chapter drives the same small package."]
    assert english_prose(["どの章も、同じ小さなパッケージ deliverylab を動かします。",
                          "Amazon SQS FIFO", "at-least-once", "ACK", "Kafka 3.9"]) == []


@pytest.fixture(scope="module")
def built_edition() -> Path:
    for page in ("intro", f"{LANGUAGE}/intro"):
        if not (BUILD / f"{page}.html").is_file():
            pytest.fail(
                f"the built book is missing {BUILD.relative_to(ROOT)}/{page}.html: run `make "
                "book` (both editions), or `make book-ja` for the Japanese one after an "
                "English build",
                pytrace=False,
            )
    return EDITION


@pytest.fixture(scope="module")
def server(built_edition: Path) -> Iterator[str]:
    # Both editions from one server, as they are published: the switcher links across.
    with serve(BUILD) as url:
        yield url


def page_file(name: str) -> Path:
    path = EDITION / f"{name}.html"
    assert path.is_file(), (f"{path.relative_to(ROOT)} is missing: the Japanese build is older "
                            "than _toc.yml; run `make book-ja`")
    return path


@pytest.mark.browser
@pytest.mark.parametrize("name", PAGES)
def test_japanese_page_is_offline_and_complete(name: str, built_edition: Path, server: str,
                                               browser) -> None:
    html = page_file(name).read_text(encoding="utf-8")
    page, log = open_page(browser, f"{server}/{LANGUAGE}/{name}.html")
    try:
        assert page.evaluate("document.documentElement.lang") == LANGUAGE
        check_math(page)
        widgets = check_widgets(page, html)
        if widgets:
            served = [u for u in log.requests
                      if f"/{LANGUAGE}/_widgets/html-manager/embed-amd.js" in u]
            assert served, "widgets rendered but the edition's own embed-amd.js was not loaded"
        screenshot(page, f"{LANGUAGE}/{name}")
        check_visible_content(page, name)
        assert not log.external(), f"{name}: requests off the machine: {log.external()}"
        assert not log.failures, f"{name}: failed requests: {log.failures}"
        assert not log.errors, f"{name}: script errors: {log.errors}"
        assert not log.console_errors, f"{name}: console errors: {log.console_errors}"
    finally:
        page.close()


def switch(page: object, label: str) -> None:
    """Follow the sidebar's link to the edition called ``label``."""
    link = page.locator(".edition-switcher a.edition-link", has_text=label)
    assert link.count() == 1, f"no switcher link to {label}"
    with page.expect_navigation():
        link.click()
    page.wait_for_load_state("networkidle")


@pytest.mark.browser
@pytest.mark.parametrize("name", PAGES)
def test_the_switcher_goes_to_the_same_page_and_back(name: str, built_edition: Path,
                                                     server: str, browser) -> None:
    page, log = open_page(browser, f"{server}/{name}.html")
    try:
        english_title = page.locator("article h1").first.inner_text()
        switch(page, "日本語")
        assert page.url == f"{server}/{LANGUAGE}/{name}.html"
        assert page.evaluate("document.documentElement.lang") == LANGUAGE
        assert page.locator(".edition-switcher [aria-current]").inner_text() == "日本語"
        switch(page, "English")
        assert page.url == f"{server}/{name}.html"
        assert page.evaluate("document.documentElement.lang") == "en"
        assert page.locator("article h1").first.inner_text() == english_title
        assert not log.failures, f"{name}: failed requests: {log.failures}"
    finally:
        page.close()


@pytest.mark.browser
@pytest.mark.parametrize("name", PAGES)
def test_japanese_page_works_from_file_url(name: str, built_edition: Path,
                                           browser) -> None:
    path = page_file(name)
    page, log = open_page(browser, path.as_uri())
    try:
        assert page.locator("article.bd-article").count() == 1
        check_math(page)
        check_widgets(page, path.read_text(encoding="utf-8"))
        assert not log.external(), f"{name}: requests off the machine: {log.external()}"
        scripts = [u for u in log.failures if u.split("?")[0].endswith(".js")]
        assert not scripts, f"{name}: scripts failed to load from file://: {scripts}"
        switch(page, "English")  # relative links hold from disk too
        assert page.url == (BUILD / f"{name}.html").as_uri()
    finally:
        page.close()


@pytest.mark.browser
@pytest.mark.parametrize("name", TRANSLATED or ["(none)"])
def test_no_english_prose_is_left_on_a_translated_page(name: str, built_edition: Path,
                                                       server: str, browser) -> None:
    assert TRANSLATED, NOT_YET
    page_file(name)
    page, _ = open_page(browser, f"{server}/{LANGUAGE}/{name}.html")
    try:
        left = [t for t in english_prose(page.evaluate(PROSE_JS)) if t not in CLI_HELP]
    finally:
        page.close()
    assert not left, f"{name}: English prose on the Japanese page: {left}"
    # The same look at the English page finds its prose: the check sees what it should.
    page, _ = open_page(browser, f"{server}/{name}.html")
    try:
        assert english_prose(page.evaluate(PROSE_JS)), f"{name}: no prose found in English"
    finally:
        page.close()


# --- the built files (no browser) -----------------------------------------------------------


def catalog(page: str) -> dict[str, str]:
    path = i18n.catalog_path(LANGUAGE, page)
    return {m.id: m.string for m in i18n.read_catalog(path, LANGUAGE)
            if m.id and m.string and not m.fuzzy}


def test_the_sidebar_part_titles_and_the_book_title_are_translated(built_edition: Path) -> None:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    root = catalog(toc["root"])
    captions = [part["caption"] for part in toc["parts"]]
    assert all(c in root for c in captions), "a part title has no translation in the catalog"
    for name in ("intro", "chapters/01_guarantees", "reference/glossary"):
        soup = BeautifulSoup(page_file(name).read_text(encoding="utf-8"), "html.parser")
        shown = [c.get_text(strip=True) for c in soup.select("nav.bd-links p.caption")]
        assert shown == [root[c] for c in captions], name
        assert soup.title.get_text().endswith(root[config["title"]]), name
        assert soup.html["lang"] == LANGUAGE


def test_the_toggles_over_hidden_cells_are_translated(built_edition: Path) -> None:
    # myst-nb writes them past the translation, as sphinx-external-toc does the part titles.
    labels = set()
    for path in built_edition.rglob("*.html"):
        soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
        labels |= {p.get_text(strip=True) for p in soup.select("details.hide summary p")}
    assert labels, "no toggle over a hidden cell in the Japanese edition"
    untranslated = sorted(label for label in labels if not JAPANESE.search(label))
    assert not untranslated, f"toggles left in English: {untranslated}"


def search_index(edition: Path) -> dict:
    text = (edition / "searchindex.js").read_text(encoding="utf-8")
    return json.loads(text[text.index("(") + 1:text.rindex(")")])


@pytest.mark.parametrize("term", ["確認応答", "冪等", "インボックス"])
def test_the_search_index_has_the_japanese_terms(term: str, built_edition: Path) -> None:
    index = search_index(built_edition)
    files = index["terms"].get(term)
    assert files is not None, f"{term} is not a term of the Japanese search index"
    files = files if isinstance(files, list) else [files]
    assert index["docnames"].index("reference/glossary") in files


@pytest.mark.browser
@pytest.mark.parametrize("term", ["確認応答", "冪等", "インボックス"])
def test_japanese_search_finds_the_glossary(term: str, built_edition: Path, server: str,
                                            browser) -> None:
    page, log = open_page(browser, f"{server}/{LANGUAGE}/search.html?q={term}")
    try:
        page.wait_for_selector("#search-results ul.search li", timeout=30_000)
        hits = page.locator("#search-results ul.search li a").evaluate_all(
            "links => links.map(a => a.getAttribute('href'))")
        assert any(h.startswith("reference/glossary.html") for h in hits), hits
        assert not log.console_errors, log.console_errors
    finally:
        page.close()


def saved_images() -> set[bytes]:
    import base64

    import nbformat

    found = set()
    for nb_path in sorted((ROOT / "chapters").glob("*.ipynb")):
        for cell in nbformat.read(nb_path, as_version=4).cells:
            for output in cell.get("outputs", []):
                data = output.get("data", {}).get("image/png")
                if data:
                    found.add(base64.b64decode(data))
    return found


def test_the_japanese_edition_shows_the_saved_outputs(built_edition: Path) -> None:
    # Nothing is executed for it (no plot drawn, so no font needed): every figure it shows is
    # one saved in a notebook, byte for byte.
    shown = {p.read_bytes() for p in (built_edition / "_images").glob("*.png")}
    assert shown, "no figure in the Japanese edition"
    assert shown <= saved_images()
