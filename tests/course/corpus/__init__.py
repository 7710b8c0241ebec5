"""Submissions the grader must judge right: one module per chapter, ``chapterN.py``.

Each module defines:

* ``CHAPTER``: the chapter number; every exercise registered for that chapter must be
  covered by the module;
* ``WRONG``: ``[(exercise_id, submission, reason, nemesis), ...]``, plausible wrong answers
  (the ones a tired engineer writes). Graded over :data:`SEEDS`, each must FAIL, and the
  first failing seed's reason (the verdict's "Why:" line) must contain ``reason``.
  ``nemesis`` names the class of fault that catches it, one of :data:`NEMESES`;
* ``CORRECT``: ``[(exercise_id, submission), ...]``, correct designs other than the model
  solution. Graded over :data:`SEEDS`, each must PASS.

Each exercise needs at least :data:`MIN_WRONG` wrong answers spread over at least
:data:`MIN_NEMESES` classes other than ``baseline``, and at least :data:`MIN_CORRECT` correct designs.
Submissions are module-level functions, so that the grader may run them in another process.
"""

SEEDS = range(25)
MIN_WRONG = 4
MIN_NEMESES = 2
MIN_CORRECT = 2

NEMESES = {
    # other workers (of every mode) run between two store statements of the submission
    "interleaving": "another worker ran between two of the submission's statements",
    # an INSERT fails for a reason other than a repeat: constraint, locked, disk full
    "store-failure": "the store failed for a reason that is not a duplicate",
    # a lost request or a lost answer (ACK, producer request, payment call)
    "lost-message": "one half of a lost message",
    # the worker dies at a fault point, or the run is stopped and judged mid-flight
    "stopped": "the run stopped at some moment, with work held",
    # versions >= 10, lease boundaries, clocks finer than the obvious granularity
    "past-range": "a value past the happy range",
    # wrong even when nothing fails (does not count towards the spread)
    "baseline": "wrong with no fault at all",
}
