"""Exercises the reader writes, graded by the engine: ``grade("ex-id", your_function)``.

Importing the package registers every chapter's exercises in :data:`EXERCISES`.
"""

from __future__ import annotations

from . import ex01, ex02, ex03, ex04, ex05, ex06  # noqa: F401  (each registers its exercises)
from .grader import EXERCISES, Exercise, Ops, Trial, Verdict, grade, register

__all__ = ["EXERCISES", "Exercise", "Ops", "Trial", "Verdict", "grade", "register"]
