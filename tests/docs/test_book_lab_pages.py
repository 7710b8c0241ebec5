"""The "Running the lab" part of the built book: its walkthroughs show their commands, and its
command reference is the command's own parser.

`test_book_offline.py` opens every page of `_toc.yml` (these included) for what every page
must do: load nothing from the network, throw nothing, show its tables. This file checks what
only this part has, on the HTML the book build left in `_build/html/` (run `make book` first;
`make test` builds it before the tests):

- every code block of each lab page's source is on the rendered page, in order, visible, with
  the same text (a fence the Markdown parser swallowed, or a block that renders empty, fails);
- the command reference has one section per subcommand of the parser that `deliverylab` runs,
  and each section lists exactly that subcommand's arguments: nothing missing, nothing stale;
- in a browser, each subcommand's section and its usage line are visible, and the page's
  contents list links to every one.
"""

from __future__ import annotations

import argparse
import os
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from bs4 import BeautifulSoup
from support.book_server import serve

from deliverylab.app.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "_build" / "html"
LAB = ROOT / "lab"
SHOTS = ROOT / "test-output"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# A code block: a fence with a language (```bash, ```text), at any indent (in a list item too).
# Directives (```{argparse}) are not code blocks.
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[a-z]+)\n(?P<body>.*?)^(?P=indent)```",
                   re.M | re.S)
LAB_PAGES = sorted(p.stem for p in LAB.glob("*.md"))

pytestmark = pytest.mark.browser


def built(name: str) -> Path:
    page = BUILD / "lab" / f"{name}.html"
    if not page.is_file():
        pytest.fail(f"{page.relative_to(ROOT)} is missing: build the book first (`make book`, or"
                    " `jupyter-book build --all .`); `make test` does it for you", pytrace=False)
    return page


def source_blocks(name: str) -> list[str]:
    text = (LAB / f"{name}.md").read_text(encoding="utf-8")
    return [textwrap.dedent(m["indent"] + m["body"]) if m["indent"] else m["body"]
            for m in FENCE.finditer(text)]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def arguments(parser: argparse.ArgumentParser) -> set[str]:
    """What the reference lists for a parser: each option's strings, each positional's name."""
    out = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.option_strings:
            out |= set(action.option_strings)
        else:
            out.add(action.metavar or action.dest)
    return out


# --- the built HTML ------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAB_PAGES)
def test_every_code_block_of_a_lab_page_is_rendered(name: str) -> None:
    html = BeautifulSoup(built(name).read_text(encoding="utf-8"), "html.parser")
    article = html.select_one("article.bd-article")
    rendered = [pre.get_text() for pre in article.select("div.highlight pre")]
    if name == "cli":
        # Its blocks are the parser's usage lines, checked below; none is written by hand.
        assert not source_blocks(name) and rendered
        return
    expected = source_blocks(name)
    if name not in ("commands", "benchmarks", "reliability"):  # tables and prose only
        assert expected, f"lab/{name}.md has no code block"
    assert [r.strip() for r in rendered] == [e.strip() for e in expected], (
        f"lab/{name}: the rendered code blocks differ from the page's source")


def test_the_command_reference_lists_every_subcommand_and_argument_of_the_parser() -> None:
    html = BeautifulSoup(built("cli").read_text(encoding="utf-8"), "html.parser")
    parser = build_parser()
    article = html.select_one("article.bd-article")
    subs = subcommands()
    for name, sub in subs.items():
        section = article.select_one(f"section#deliverylab-{name}")
        assert section is not None, f"no section for `deliverylab {name}`"
        assert section.find("h3").get_text().rstrip("#").strip() == name
        listed = {part.strip() for kbd in section.select("dl.option-list kbd")
                  for part in kbd.get_text().split(",")}
        assert listed == arguments(sub), (
            f"`deliverylab {name}`: the page lists {sorted(listed)}, the parser has"
            f" {sorted(arguments(sub))}")
        usage = section.select_one("div.highlight pre").get_text()
        assert usage.startswith(f"deliverylab {name} ")
        for option in sub._option_string_actions:
            if option not in ("-h", "--help"):
                assert option in usage, f"`{option}` is not in the usage of `deliverylab {name}`"
    # And nothing the parser no longer has: one section per subcommand, no more.
    sections = {s["id"].removeprefix("deliverylab-") for s in article.select("section[id]")
                if s.find("h3", recursive=False)}
    assert sections == set(subs), f"sections {sorted(sections)}, subcommands {sorted(subs)}"
    # The command itself: its description, usage, options, and the list of its subcommands.
    assert parser.description in article.get_text()
    assert article.select_one("div#deliverylab pre").get_text().startswith("usage: deliverylab")
    top = {kbd.get_text() for id_ in ("positional", "named")
           for kbd in article.select(f"section#deliverylab-{id_}-arguments kbd")}
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert top == arguments(parser) | {commands.metavar}
    choices = article.select_one("section#deliverylab-positional-arguments").get_text()
    assert all(name in choices for name in subs)


# --- in a browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page() -> Iterator[object]:
    built("cli")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install -y chromium` (which"
                    " `make test` does) or set CHROMIUM to its path", pytrace=False)
    from playwright.sync_api import sync_playwright

    with serve(BUILD) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.goto(f"{url}/lab/cli.html", wait_until="networkidle")
            yield tab
        finally:
            browser.close()


def test_the_command_reference_shows_every_subcommand(page) -> None:
    for name in subcommands():
        heading = page.locator(f"section#deliverylab-{name} > h3")
        heading.scroll_into_view_if_needed()
        assert heading.is_visible(), f"the heading of `deliverylab {name}` is not visible"
        usage = page.locator(f"section#deliverylab-{name} > div div.highlight pre")
        assert usage.is_visible() and usage.inner_text().startswith(f"deliverylab {name}")
        # The page's contents (right-hand side) link to each subcommand.
        link = page.locator(f"nav.page-toc a[href='#deliverylab-{name}']")
        assert link.count() == 1, f"the page's contents do not link to `deliverylab {name}`"
    SHOTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SHOTS / "lab__cli__reference.png"), full_page=True)


def test_a_walkthrough_shows_its_commands_in_a_browser(page) -> None:
    # The first walkthrough as a reader sees it: every block visible, with a copy button.
    page.goto(page.url.replace("lab/cli.html", "lab/four_terminals.html"),
              wait_until="networkidle")
    blocks = page.locator("article div.highlight pre")
    assert blocks.count() == len(source_blocks("four_terminals"))
    for i in range(blocks.count()):
        block = blocks.nth(i)
        block.scroll_into_view_if_needed()
        assert block.is_visible(), f"code block {i} of the four-terminal walkthrough is hidden"
    first = blocks.nth(0).inner_text()
    assert "deliverylab init-db --db data/lab-sqlite.db" in first
    assert page.locator("article button.copybtn").count() == blocks.count()
