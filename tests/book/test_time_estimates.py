"""Each chapter's stated time follows the rule the introduction states, from the chapter itself.

The rule (``deliverylab.book.estimates``): the prose at 150 words a minute, a minute for each
code cell outside the exercises, 15 minutes for each graded exercise, rounded up to five
minutes. When a chapter grows or loses prose, cells or exercises, its time in the chapter map
must follow; this test says which chapter and what the rule now gives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deliverylab.book.estimates import (
    MINUTES_PER_CELL,
    MINUTES_PER_EXERCISE,
    WORDS_PER_MINUTE,
    Estimate,
    estimate,
    prose_words,
)
from deliverylab.engine.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]
INTRO = ROOT / "intro.md"
STATED = re.compile(r"\(chapters/([0-9a-z_]+)\.ipynb\) \((\d+) minutes")


def stated() -> dict[str, int]:
    return {name: int(m) for name, m in STATED.findall(INTRO.read_text(encoding="utf-8"))}


def test_every_chapter_has_a_stated_time():
    chapters = {p.stem for p in (ROOT / "chapters").glob("*.ipynb")}
    assert set(stated()) == chapters


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "chapters").glob("*.ipynb")))
def test_each_stated_time_is_the_rules(name):
    got = estimate(ROOT / "chapters" / f"{name}.ipynb")
    assert stated()[name] == got.minutes, (
        f"{name}: the intro says {stated()[name]} minutes, the rule gives {got.minutes}"
        f" ({got.words} words, {got.code_cells} code cells, {got.exercises} exercises)")


def test_the_intro_states_the_rule_it_is_held_to():
    text = " ".join(INTRO.read_text(encoding="utf-8").split())
    assert f"its prose at {WORDS_PER_MINUTE} words a minute" in text
    assert f"{'one' if MINUTES_PER_CELL == 1 else MINUTES_PER_CELL} minute for each code cell" \
           " outside the exercises" in text
    assert f"{MINUTES_PER_EXERCISE} minutes for each graded exercise" in text
    assert "rounded up to five minutes" in text


def test_the_rule_adds_reading_running_and_exercises_and_rounds_up():
    assert Estimate(words=0, code_cells=0, exercises=0).minutes == 0
    assert Estimate(words=150, code_cells=0, exercises=0).minutes == 5
    assert Estimate(words=1500, code_cells=5, exercises=0).minutes == 15
    assert Estimate(words=1501, code_cells=5, exercises=0).minutes == 20
    assert Estimate(words=0, code_cells=0, exercises=3).minutes == 45


def test_words_leave_code_blocks_out():
    text = "one two\n```python\nx = 1  # not prose\n```\nthree\n````{admonition} A\n" \
           "four\n```python\ny = 2\n```\n````\n"
    # The admonition's prose counts, its fence lines and the code nested in it do not.
    assert prose_words(text) == 4
    assert prose_words(":::{admonition} Answer\n:class: dropdown\nfive six\n:::\n") == 2


def test_code_cells_in_the_exercises_are_not_counted_and_exercise_headings_are(tmp_path):
    cells = [
        {"cell_type": "markdown", "source": ["# Title\n", "\n", "Some prose here."]},
        {"cell_type": "code", "source": ["x = 1"]},
        {"cell_type": "markdown", "source": ["## Exercises\n", "\n", "### Exercise 1: a\n"]},
        {"cell_type": "code", "source": ["grade('a', f)"]},
        {"cell_type": "markdown", "source": ["### Exercise 2: b"]},
        {"cell_type": "code", "source": ["grade('b', f)"]},
        {"cell_type": "markdown", "source": ["## Summary\n", "\n", "Done."]},
        {"cell_type": "code", "source": ["cleanup()"]},
    ]
    path = tmp_path / "chapter.ipynb"
    path.write_text(json.dumps({"cells": cells}), encoding="utf-8")
    got = estimate(path)
    assert (got.code_cells, got.exercises) == (2, 2)
    assert got.words == 3 + 7 + 3 + 3 + 2


def test_estimate_names_a_bad_notebook(tmp_path):
    with pytest.raises(InvalidInput, match="^notebook must be a chapter's .ipynb file"):
        estimate(tmp_path / "missing.ipynb")
    with pytest.raises(InvalidInput, match="^notebook must be a chapter's .ipynb file"):
        estimate(INTRO)
