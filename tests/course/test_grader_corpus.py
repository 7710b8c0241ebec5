"""Every exercise against its corpus of wrong answers and other correct designs.

The corpus lives in ``tests/course/corpus/chapterN.py`` (format in ``tests/course/corpus/__init__.py``):
wrong answers must FAIL for their stated reason, correct designs other than the model
solution must PASS, all over 25 seeds; and every exercise of a chapter that has a corpus
module must be covered by enough of both.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from corpus import MIN_CORRECT, MIN_NEMESES, MIN_WRONG, NEMESES, SEEDS

from deliverylab.course import EXERCISES, grade

pytestmark = pytest.mark.slow

MODULES = [importlib.import_module(f"corpus.{p.stem}")
           for p in sorted((Path(__file__).parent / "corpus").glob("chapter*.py"))]


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", repr(fn))


WRONG = [pytest.param(ex_id, fn, reason, id=f"{ex_id}:{_name(fn)}")
         for m in MODULES for ex_id, fn, reason, _ in m.WRONG]
CORRECT = [pytest.param(ex_id, fn, id=f"{ex_id}:{_name(fn)}")
           for m in MODULES for ex_id, fn in m.CORRECT]


def test_the_corpus_is_well_formed() -> None:
    assert MODULES, "no corpus module found"
    for m in MODULES:
        where = m.__name__
        assert isinstance(m.CHAPTER, int), where
        for entry in m.WRONG:
            assert len(entry) == 4, (where, entry)
            ex_id, fn, reason, nemesis = entry
            assert ex_id in EXERCISES, (where, ex_id)
            assert callable(fn) and isinstance(reason, str) and reason, (where, entry)
            assert nemesis in NEMESES, (where, ex_id, _name(fn), nemesis)
        for entry in m.CORRECT:
            assert len(entry) == 2, (where, entry)
            ex_id, fn = entry
            assert ex_id in EXERCISES and callable(fn), (where, entry)
            assert fn is not EXERCISES[ex_id].solution, (where, ex_id, "the model itself")
        names = [(e[0], _name(e[1])) for e in [*m.WRONG, *m.CORRECT]]
        assert len(names) == len(set(names)), (where, "a submission listed twice")


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.split(".")[-1])
def test_every_exercise_of_the_chapter_has_a_full_corpus(module: Any) -> None:
    ids = sorted(k for k, ex in EXERCISES.items() if ex.chapter == module.CHAPTER)
    assert ids, f"chapter {module.CHAPTER} has no exercise"
    short = []
    for ex_id in ids:
        wrong = [e for e in module.WRONG if e[0] == ex_id]
        nemeses = {e[3] for e in wrong} - {"baseline"}
        correct = [e for e in module.CORRECT if e[0] == ex_id]
        if (len(wrong) < MIN_WRONG or len(nemeses) < MIN_NEMESES
                or len(correct) < MIN_CORRECT):
            short.append(f"{ex_id}: {len(wrong)} wrong over {sorted(nemeses)},"
                         f" {len(correct)} correct")
    assert not short, "; ".join(short)


@pytest.mark.parametrize(("ex_id", "submission", "reason"), WRONG)
def test_a_wrong_answer_fails_for_its_reason(ex_id: str, submission: Callable[..., Any],
                                             reason: str) -> None:
    verdict = grade(ex_id, submission, seeds=SEEDS)
    assert not verdict.passed, str(verdict)
    assert reason in verdict.failed[0].reason, (reason, str(verdict))


@pytest.mark.parametrize(("ex_id", "submission"), CORRECT)
def test_a_correct_design_passes(ex_id: str, submission: Callable[..., Any]) -> None:
    verdict = grade(ex_id, submission, seeds=SEEDS)
    assert verdict.passed, str(verdict)
