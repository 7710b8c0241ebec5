"""Exercises the reader writes, graded by the engine: ``grade("ex-id", your_function)``.

Importing the package registers every chapter's exercises in :data:`EXERCISES`.
``apply_order_placed`` is the effect a handler exercise builds on, ``transaction`` the one
transaction a repair writes in, and ``retention`` the inbox's pruning tools, re-exported so a
chapter needs one import.
"""

from __future__ import annotations

from ..engine import retention
from ..engine.store import transaction
from ..engine.worker import apply_order_placed
from . import ex01, ex02, ex03, ex04, ex05, ex06, ex07, ex08  # noqa: F401  (each registers its exercises)
from .grader import EXERCISES, Exercise, Ops, Trial, Verdict, grade, register

__all__ = ["EXERCISES", "Exercise", "Ops", "Trial", "Verdict", "apply_order_placed", "grade",
           "register", "retention", "transaction"]
