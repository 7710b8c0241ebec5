"""The live panel in a real JupyterLab, driven by a real browser.

Starts JupyterLab on 127.0.0.1 (a free port, a random token, a temporary copy of the chapters
and temporary Jupyter settings), opens chapter 4 in headless Chromium, runs all cells, and then
uses the panel the way a reader does:

1. reset the lab, pick the idempotent mode, type 0.9 into the ACK failure slider's readout,
   place orders, press *run until idle*: the duplicates counter and the inbox table change, and
   the checker says the projection equals the truth;
2. press *auto-run*: the timer in the browser steps the worker until the queue is empty;
3. switch to at-least-once, place orders, run: the checker reports duplicated effects.

Before anything runs, the test waits until the kernel is really there: the server reports a
session for the notebook whose kernel is idle and has the page's connection, and the page
shows it idle. A "Run All" sent earlier, while the session has no kernel yet, is lost, and on a
loaded machine each of its cells throws "Session has no kernel." in the page (any script error
fails the test). Every wait is bounded, and JupyterLab is stopped in ``finally``.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from support.jupyterlab import (
    ACTION_TIMEOUT_MS,
    CHAPTER,
    CHROMIUM,
    CHROMIUM_ARGS,
    SHOTS,
    START_TIMEOUT_S,
)

ROOT = Path(__file__).resolve().parents[2]
RUN_ALL_TIMEOUT_MS = 150_000

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def menu(page, top: str, item: str) -> None:
    """Open a top-level menu and click the item whose label starts with ``item``."""
    page.locator(".lm-MenuBar-itemLabel").filter(has_text=re.compile(f"^{top}$")).click()
    page.locator(".lm-Menu-itemLabel").filter(
        has_text=re.compile("^" + re.escape(item))).first.click()


def wait_idle(page, timeout_ms: int) -> None:
    """Wait until the notebook's Python kernel is connected and idle. If JupyterLab still
    asks which kernel to start, accept its choice (the notebook's own, Python 3)."""
    idle = (".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']")
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog:has-text('Select Kernel')")
        if dialog.count() and dialog.first.is_visible():
            dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
        kernel = page.locator(".jp-NotebookPanel .jp-KernelName").first
        if (page.locator(idle).count() and kernel.count()
                and "Python" in kernel.inner_text()):
            return
        page.wait_for_timeout(250)
    raise TimeoutError(f"the kernel was not idle within {timeout_ms} ms")


def wait_kernel(page, base: str, token: str, notebook: str, timeout_ms: int) -> None:
    """Wait until the server has a session for ``notebook`` whose kernel is started, idle and
    connected to (the page's websocket): only then can the page execute a cell. If JupyterLab
    asks which kernel to start, accept its choice (the notebook's own, Python 3)."""
    deadline = time.monotonic() + timeout_ms / 1000
    seen: object = None
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog:has-text('Select Kernel')")
        if dialog.count() and dialog.first.is_visible():
            dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
        try:
            with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=5) as r:
                sessions = json.load(r)
            kernel = next((s["kernel"] for s in sessions
                           if s.get("path", "").endswith(notebook) and s.get("kernel")), None)
            if kernel is not None:
                with urllib.request.urlopen(f"{base}/api/kernels/{kernel['id']}?token={token}",
                                            timeout=5) as r:
                    seen = json.load(r)
                if seen["execution_state"] == "idle" and seen.get("connections", 0) >= 1:
                    return
            else:
                seen = sessions
        except OSError as exc:  # the server busy starting the kernel: ask again
            seen = exc
        page.wait_for_timeout(250)
    raise TimeoutError(f"no idle, connected kernel for {notebook} within {timeout_ms} ms:"
                       f" {seen}")


def run_all(page) -> None:
    """Run all cells until the chapter's last cell has driven the panel (the reconcile)."""
    done = ".dl-live .dl-status:has-text('Reconciled from the 40 orders')"
    menu(page, "Run", "Run All Cells")  # the Run menu lists it before "Restart …"
    page.wait_for_selector(done, timeout=RUN_ALL_TIMEOUT_MS)
    wait_idle(page, RUN_ALL_TIMEOUT_MS)


def state(page) -> str:
    """What the panel shows, for assertion messages."""
    return " | ".join([page.locator(".dl-live .dl-status").inner_text(),
                       page.locator(".dl-live .dl-verdict").inner_text(),
                       " ".join(page.locator(".dl-live .dl-counter").all_inner_texts())])


def counter(page, name: str) -> int:
    return int(page.locator(f".dl-live .dl-count-{name} .dl-counter-value").inner_text())


def rows(page, table: str) -> int:
    return int(page.locator(f".dl-live .dl-{table} .dl-rows").get_attribute("data-rows"))


def seq(page) -> int:
    """How many actions the panel has answered (its status line's ``data-seq``)."""
    return int(page.locator(".dl-live .dl-status-line").get_attribute("data-seq"))


def answered(page, before: int, action: str, text: str = "") -> None:
    """Wait for the panel's answer to the next action after ``before``: the status line is
    written after every other view, so the tables and counters are then up to date."""
    page.wait_for_function(
        "n => Number(document.querySelector('.dl-live .dl-status-line')"
        ".getAttribute('data-seq')) > n", arg=before, timeout=ACTION_TIMEOUT_MS)
    line = page.locator(".dl-live .dl-status-line")
    assert line.get_attribute("data-action") == action, state(page)
    assert text in line.inner_text(), state(page)


def press(page, button: str, action: str, text: str = "") -> None:
    """Click a panel button and wait for its answer."""
    before = seq(page)
    page.locator(f".dl-live .dl-{button}-button").click()
    answered(page, before, action, text)


def choose_mode(page, mode: str) -> None:
    before = seq(page)
    page.locator(".dl-live .dl-mode-dropdown select").select_option(mode)
    answered(page, before, "set", f"mode is now {mode}")


def type_into_readout(page, css: str, text: str) -> None:
    """Type a value into a slider's editable readout, as a reader can, and press Enter."""
    before = seq(page)
    readout = page.locator(f".dl-live .{css} .widget-readout")
    readout.click()
    readout.evaluate("""el => { const r = document.createRange(); r.selectNodeContents(el);
                              const s = window.getSelection(); s.removeAllRanges();
                              s.addRange(r); }""")
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    answered(page, before, "set")


def test_the_panel_in_jupyterlab(jupyterlab, tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install -y chromium` (which"
                    " `make test` does) or set CHROMIUM to its path", pytrace=False)
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab
    local = urlsplit(base).netloc
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2200})
            page.set_default_timeout(ACTION_TIMEOUT_MS)
            # JupyterLab and the kernel are local; anything else is refused.
            page.route("**/*", lambda r: r.continue_() if urlsplit(r.request.url).netloc
                       in ("", local) else r.abort())
            page.on("pageerror", lambda e: errors.append(str(e)))
            try:
                use_the_panel(page, base, token)
            except Exception as exc:
                SHOTS.mkdir(exist_ok=True)
                page.screenshot(path=str(SHOTS / "jupyterlab_failure.png"))
                dialogs = page.locator(".jp-Dialog").all_inner_texts()
                raise AssertionError(f"{exc}\nopen dialogs: {dialogs}; script errors:"
                                     f" {errors}; screenshot:"
                                     " test-output/jupyterlab_failure.png") from exc
            assert not errors, f"script errors: {errors}"
        finally:
            browser.close()


def use_the_panel(page, base: str, token: str) -> None:
    page.goto(f"{base}/lab/tree/04_lab.ipynb?token={token}",
              wait_until="domcontentloaded", timeout=ACTION_TIMEOUT_MS)
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell",
                           timeout=ACTION_TIMEOUT_MS)
    wait_kernel(page, base, token, CHAPTER.name, START_TIMEOUT_S * 1000)
    wait_idle(page, ACTION_TIMEOUT_MS)
    run_all(page)
    panel = page.locator(".dl-live")
    assert panel.is_visible()
    assert page.locator(".dl-live .dl-mode-dropdown select").input_value() == \
        "at-least-once"

    # 1. Idempotent, ACK failure rate 0.9: duplicates skipped, projection = truth.
    press(page, "reset", "reset", "Reset: a fresh lab with seed 7")
    assert rows(page, "inbox") == 0 and counter(page, "duplicates-skipped") == 0
    choose_mode(page, "idempotent")
    type_into_readout(page, "dl-ack-slider", "0.9")
    assert "ACK failure rate is now 0.90" in state(page)
    assert page.locator(".dl-live .dl-ack-slider .widget-readout").inner_text() == \
        "0.90"
    press(page, "place", "place", "Placed 20 orders")
    assert rows(page, "queue") == 20 and rows(page, "inbox") == 0
    press(page, "run", "run", "Ran ")
    assert counter(page, "duplicates-skipped") > 0, state(page)
    assert rows(page, "inbox") == 20 and rows(page, "queue") == 0
    verdict = page.locator(".dl-live .dl-verdict").inner_text()
    assert verdict.startswith("checker: OK: all 20 orders applied exactly once")
    assert "projection equals truth" in verdict
    deltas = page.locator(".dl-live .dl-projection tbody tr td:last-child")
    assert set(deltas.all_inner_texts()) == {"0"}

    # 2. Auto-run: the browser's timer steps the worker until the queue is empty.
    press(page, "place", "place", "Placed 20 orders")
    before = counter(page, "deliveries")
    page.locator(".dl-live .dl-autorun-button").click()
    page.wait_for_function(
        "n => Number(document.querySelector('.dl-live .dl-count-deliveries"
        " .dl-counter-value').textContent) >= n", arg=before + 3, timeout=ACTION_TIMEOUT_MS)
    assert page.locator(".dl-live .dl-status-line").get_attribute("data-action") == "step"
    page.locator(".dl-live .dl-autorun-button").click()  # pause
    page.wait_for_selector(".dl-live .dl-autorun-button:not(.mod-active)")
    page.wait_for_timeout(1000)  # a tick already on its way may still land
    press(page, "run", "run")
    assert rows(page, "inbox") == 40 and counter(page, "deliveries") > before

    # 3. At-least-once: the checker reports duplicated effects.
    choose_mode(page, "at-least-once")
    press(page, "place", "place", "Placed 20 orders")
    press(page, "run", "run", "Ran ")
    verdict = page.locator(".dl-live .dl-verdict").inner_text()
    assert verdict.startswith("checker: BROKEN") and "duplicated" in verdict, verdict
    assert counter(page, "duplicated") > 0
    assert "projection differs from truth" in verdict

    SHOTS.mkdir(exist_ok=True)
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(SHOTS / "jupyterlab_lab_panel.png"))
    page.screenshot(path=str(SHOTS / "jupyterlab_lab.png"))
