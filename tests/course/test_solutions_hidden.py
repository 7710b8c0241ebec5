"""Model solutions stay hidden until asked for, in JupyterLab as in the HTML book.

Every exercise's model solution is graded in a code cell (``ex-<id>-check``, or any cell that
calls ``grade(`` with its input hidden in the book) after the "Model solution" dropdown. The book hides its input (``hide-input``, behind a click); JupyterLab
reads ``jupyter.source_hidden`` and ``jupyter.outputs_hidden`` and shows the cell collapsed
until the reader clicks it. A solution cell without both would put the answer in plain view
under its exercise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deliverylab.course import EXERCISES

ROOT = Path(__file__).resolve().parents[2]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
GRADED = re.compile(r"""grade\(\s*["'](?P<id>[^"']+)["']""")


def solution_cells(notebook: Path) -> list[dict]:
    """The cells that grade a model solution: a code cell ``ex-<id>-check``, or any code
    cell that calls ``grade(`` with its input hidden in the book."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return [c for c in cells if c["cell_type"] == "code" and (
        re.fullmatch(r"ex-.+-check", c.get("id", "")) or (
            "grade(" in "".join(c["source"]) and "hide-input" in c["metadata"].get("tags", [])))]


def test_every_exercise_has_one_solution_cell_in_its_chapter() -> None:
    found: dict[str, list[str]] = {}
    for nb in CHAPTERS:
        for c in solution_cells(nb):
            m = GRADED.search("".join(c["source"]))
            assert m, f"{nb.name}, cell {c.get('id')}: a solution cell that grades nothing"
            found.setdefault(m["id"], []).append(nb.name)
    for ex_id, ex in EXERCISES.items():
        where = found.get(ex_id, [])
        assert len(where) == 1, f"{ex_id}: solution cells in {where or 'no chapter'}"
        assert where[0].startswith(f"{ex.chapter:02d}_"), (ex_id, where)


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_solution_cells_are_collapsed_in_jupyterlab_and_hidden_in_the_book(
        notebook: Path) -> None:
    for c in solution_cells(notebook):
        meta = c["metadata"]
        where = f"{notebook.name}, cell {c.get('id')}"
        assert meta.get("jupyter", {}).get("source_hidden") is True, (
            f"{where}: its source shows in JupyterLab (metadata jupyter.source_hidden)")
        assert meta.get("jupyter", {}).get("outputs_hidden") is True, (
            f"{where}: its output shows in JupyterLab (metadata jupyter.outputs_hidden)")
        assert "hide-input" in meta.get("tags", []), f"{where}: its source shows in the book"
