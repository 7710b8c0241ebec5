"""How long a chapter takes, derived from the chapter itself by one stated rule.

The rule, which the introduction states beside the chapter map and a test holds every stated
time to:

* **reading**: the words of the chapter's prose (its markdown cells, code blocks and markup
  left out) at
  :data:`WORDS_PER_MINUTE`, the pace of careful reading of technical text with tables;
* **running**: :data:`MINUTES_PER_CELL` for each code cell outside the exercises, to run it and
  read what it prints or draws;
* **exercises**: :data:`MINUTES_PER_EXERCISE` for each graded exercise (a ``### Exercise``
  heading), to read it, predict, write the code and read the verdict;

summed and rounded up to the next multiple of five minutes. Terminal work outside the book
(chapter 4's four terminals) is not in the sum: it takes as long as the reader lets it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..engine.errors import InvalidInput

WORDS_PER_MINUTE = 150
MINUTES_PER_CELL = 1
MINUTES_PER_EXERCISE = 15
ROUND_TO = 5

_FENCE = re.compile(r"^(`{3,}|~{3,})")
_EXERCISES = re.compile(r"^##\s+Exercises\b", re.M)
_SECTION = re.compile(r"^##\s+\S", re.M)
_EXERCISE = re.compile(r"^###\s+Exercise\b", re.M)


def prose_words(markdown: str) -> int:
    """Whitespace-separated words outside code blocks. The prose inside a MyST directive (an
    answer in an admonition) counts; the directive's own markup (its fence lines, ``:class:``
    options, ``:::`` fences) and any code block, nested in it or not, do not."""
    words = 0
    stack: list[tuple[str, bool]] = []  # open fences: (its backticks or tildes, is code)
    for line in markdown.splitlines():
        text = line.strip()
        m = _FENCE.match(text)
        if m:
            mark, info = m.group(1), text[len(m.group(1)):].strip()
            closes = (not info and stack and mark[0] == stack[-1][0][0]
                      and len(mark) >= len(stack[-1][0]))
            if closes:
                stack.pop()
            elif not (stack and stack[-1][1]):  # a fence inside code is code
                stack.append((mark, not info.startswith("{")))
            continue
        if (stack and stack[-1][1]) or text.startswith(":"):
            continue
        words += len(line.split())
    return words


@dataclass(frozen=True, slots=True)
class Estimate:
    """A chapter's counts and the minutes the rule gives for them."""

    words: int
    code_cells: int  # outside the exercises
    exercises: int

    @property
    def minutes(self) -> int:
        raw = (self.words / WORDS_PER_MINUTE + self.code_cells * MINUTES_PER_CELL
               + self.exercises * MINUTES_PER_EXERCISE)
        return ROUND_TO * math.ceil(raw / ROUND_TO)


def estimate(notebook: str | Path) -> Estimate:
    """The counts of one chapter notebook: prose words, code cells outside its exercises
    section (from a ``## Exercises`` heading to the next ``##`` heading), graded exercises."""
    path = Path(notebook)
    if path.suffix != ".ipynb" or not path.is_file():
        raise InvalidInput("notebook", str(notebook), "a chapter's .ipynb file")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    words = cells_out = exercises = 0
    in_exercises = False
    for cell in cells:
        text = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            words += prose_words(text)
            exercises += len(_EXERCISE.findall(text))
            start = _EXERCISES.search(text)
            if start is not None:  # a later ``##`` heading in the same cell ends it again
                in_exercises = not _SECTION.search(text[start.end():])
            elif _SECTION.search(text):
                in_exercises = False
        elif cell["cell_type"] == "code" and not in_exercises:
            cells_out += 1
    return Estimate(words=words, code_cells=cells_out, exercises=exercises)
