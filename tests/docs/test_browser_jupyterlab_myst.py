"""JupyterLab shows the chapters as the HTML book does: MyST directives render, answers hide.

The chapters are written in MyST: admonitions, notes, and answers in ``:class: dropdown``
admonitions. Plain JupyterLab shows those as raw code blocks, with every answer in plain view;
the ``jupyterlab-myst`` extension (pinned in requirements.txt) renders them. For every chapter,
in a real JupyterLab driven by headless Chromium, this checks that:

- no rendered markdown cell shows a raw directive fence (```` ```{ ```` or ``:::{``);
- every answer dropdown in the notebook's source is on the page as a closed ``<details>``
  whose text is hidden, and a click on its title opens it and shows the text;
- every exercise's model-solution cell (``ex-<id>-check``, or a hidden-input cell that calls
  ``grade(``) shows neither its source nor its verdict until its collapsed input is clicked,
  and then shows its source.

The server is the same one the panel test starts (``jupyterlab`` fixture): a free loopback
port, a random token, a copy of the chapters, and nothing off the machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from support import ROOT
from support.jupyterlab import (
    ACTION_TIMEOUT_MS,
    CHROMIUM,
    CHROMIUM_ARGS,
    SHOTS,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
DROPDOWN = re.compile(r"^(```+|:::+)\{(admonition|note|tip|hint|important)\}[^\n]*\n"
                      r"(?::[a-z-]+:[^\n]*\n)*:class:[^\n]*\bdropdown\b", re.MULTILINE)
FENCE = re.compile(r"(```|:::)\{[a-z-]+\}")
CHECK = re.compile(r"ex-.+-check")


def solution_cells(notebook: Path) -> list[tuple[int, list[str]]]:
    """(index among the code cells, the lines of its source no other code cell shows) for
    every model-solution cell of the notebook."""
    code = [c for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"]
            if c["cell_type"] == "code"]
    def solution(c: dict) -> bool:
        return bool(CHECK.fullmatch(c.get("id", ""))) or (
            "grade(" in "".join(c["source"]) and "hide-input" in c["metadata"].get("tags", []))

    shown = "\n".join("".join(c["source"]) for c in code if not solution(c))
    out = []
    for i, c in enumerate(code):
        if solution(c):
            lines = [s.strip() for s in "".join(c["source"]).splitlines()]
            out.append((i, [s for s in lines if len(s) > 8 and s not in shown]))
    return out


def dropdowns_per_cell(notebook: Path) -> list[int]:
    """How many dropdown directives each markdown cell of the notebook holds, in order."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return [len(DROPDOWN.findall("".join(c["source"])))
            for c in cells if c["cell_type"] == "markdown"]


def dropdowns_in_source(notebook: Path) -> int:
    return sum(dropdowns_per_cell(notebook))


def test_every_chapter_has_answers_to_check() -> None:
    # The browser test below is only as good as what it finds: chapters exist and hold
    # dropdowns, and the pattern that counts them in the source matches them.
    assert CHAPTERS, "no chapters found"
    assert sum(dropdowns_in_source(nb) for nb in CHAPTERS) >= len(CHAPTERS)


def test_myst_renders_in_jupyterlab_and_answers_stay_closed(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install -y chromium` (which"
                    " `make test` does) or set CHROMIUM to its path", pytrace=False)
    from playwright.sync_api import sync_playwright

    base, token = request.getfixturevalue("jupyterlab")
    # JupyterLab keeps only the cells near the viewport in the page; render them all, so
    # every cell can be found and counted (the fixture's settings live under tmp_path and are
    # read when the page loads).
    tracker = tmp_path / "lab-settings/@jupyterlab/notebook-extension/tracker.jupyterlab-settings"
    settings = json.loads(tracker.read_text())
    tracker.write_text(json.dumps({**settings, "windowingMode": "none"}))
    local = urlsplit(base).netloc
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(ACTION_TIMEOUT_MS)
            page.route("**/*", lambda r: r.continue_() if urlsplit(r.request.url).netloc
                       in ("", local) else r.abort())
            for notebook in CHAPTERS:
                try:
                    check_chapter(page, base, token, notebook)
                except Exception as exc:
                    SHOTS.mkdir(exist_ok=True)
                    shot = SHOTS / f"jupyterlab_myst_{notebook.stem}.png"
                    page.screenshot(path=str(shot))
                    raise AssertionError(f"{notebook.name}: {exc}; screenshot: "
                                         f"test-output/{shot.name}") from exc
        finally:
            browser.close()


def check_chapter(page, base: str, token: str, notebook: Path) -> None:
    expected = dropdowns_per_cell(notebook)
    # A workspace of its own per chapter: the page holds this notebook and no other.
    page.goto(f"{base}/lab/workspaces/{notebook.stem}/tree/{notebook.name}?token={token}",
              wait_until="domcontentloaded")
    page.wait_for_function(
        "n => document.querySelectorAll('.jp-NotebookPanel .jp-MarkdownCell').length === n",
        arg=len(expected))
    check_solutions_hidden(page, notebook)
    # JupyterLab renders (and may detach) cells as they scroll in and out of view: check
    # each markdown cell while it is on screen, top to bottom.
    cells = page.locator(".jp-NotebookPanel:visible .jp-MarkdownCell")
    assert cells.count() == len(expected), (
        f"{cells.count()} markdown cells on the page, {len(expected)} in the notebook")
    found = 0
    for i in range(cells.count()):
        cell = cells.nth(i)
        cell.scroll_into_view_if_needed()
        try:
            cell.locator(".myst").first.wait_for(timeout=20_000)
        except Exception as exc:
            raise AssertionError(f"cell {i} was not rendered as MyST: is jupyterlab-myst"
                                 " installed and enabled?") from exc
        # MyST renders asynchronously: wait for this cell's dropdowns, by the source's count.
        page.wait_for_function(
            "([el, n]) => el.querySelectorAll('details.myst-admonition').length >= n",
            arg=[cell.element_handle(), expected[i]])
        text = cell.locator(".myst").first.inner_text()
        assert not FENCE.search(text), f"cell {i} shows a raw MyST directive: {text[:80]!r}"
        answers = cell.locator("details.myst-admonition")
        for j in range(answers.count()):
            found += 1
            answer = answers.nth(j)
            assert answer.get_attribute("open") is None, f"cell {i}: open before a click"
            body = answer.locator(":scope > :not(summary)").first
            assert not body.is_visible(), f"cell {i}: the answer shows before a click"
            answer.locator(":scope > summary").click()
            page.wait_for_function("el => el.open", arg=answer.element_handle())
            assert body.is_visible(), f"cell {i}: the answer is hidden after a click"
    assert found == sum(expected), f"{found} dropdowns rendered, {sum(expected)} in the source"


def check_solutions_hidden(page, notebook: Path) -> None:
    """No model solution's source or verdict is on screen before a click on its collapsed
    input; after the click its source is."""
    code = page.locator(".jp-NotebookPanel:visible .jp-CodeCell")
    for index, lines in solution_cells(notebook):
        assert lines, f"code cell {index}: a solution cell with nothing of its own to hide"
        cell = code.nth(index)
        cell.scroll_into_view_if_needed()
        placeholder = cell.locator(".jp-InputPlaceholder")
        cell.locator(".jp-InputPlaceholder:visible, .jp-InputArea-editor:visible"
                     ).first.wait_for()
        assert placeholder.is_visible() and not cell.locator(
            ".jp-InputArea-editor").is_visible(), (
            f"code cell {index}: the solution's source is not collapsed before a click")
        text = cell.inner_text()
        seen = [s for s in lines if s in text]
        assert not seen, f"code cell {index}: solution source on screen: {seen[0]!r}"
        assert "PASS:" not in text, f"code cell {index}: the solution's verdict shows"
        placeholder.click()
        editor = cell.locator(".jp-InputArea-editor")
        editor.wait_for(state="visible")
        page.wait_for_function("([el, s]) => el.innerText.includes(s)",
                               arg=[editor.element_handle(), lines[0]])
