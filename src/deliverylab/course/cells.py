"""The code a chapter shows for an exercise: its starter, and its model solution.

A chapter's exercise cell holds the starter under the name the reader uses (``repair``, not
``repair_rebuild_only``), and its "Model solution" dropdown holds the solution. Both are
generated from the functions the grader tests, so the chapter cannot drift from them
(``tests/course/test_course_late.py`` checks it). Type hints are left out of the header: a notebook
has not imported the names they mention.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import Any

from ..engine.errors import InvalidInput, check_text


def plain_source(fn: Callable[..., Any], name: str) -> str:
    """``fn``'s source, renamed to ``name``, with a header free of type hints."""
    if not callable(fn):
        raise InvalidInput("fn", fn, "a function")
    check_text("name", name)
    lines = textwrap.dedent(inspect.getsource(fn)).splitlines()
    end = 0  # the header may span lines: it ends at the first line ending with ':'
    while not lines[end].rstrip().endswith(":"):
        end += 1
    params = ", ".join(inspect.signature(fn).parameters)
    body = lines[end + 1:]
    return "\n".join([f"def {name}({params}):", *body]).rstrip() + "\n"
