"""Exercises that ask for design, not for an edit of the starter.

An exercise whose model solution is a few lines away from its starter asks the reader to find
a token, not to design anything. This test measures how many lines every exercise's solution
changes in its starter (``deliverylab.course.mutate.diff_lines``: docstrings, comments, blank
lines and the signature left out), prints the table, and fails when more than a third of all
exercises are edits of :data:`~deliverylab.course.mutate.EDIT_LINES` lines or fewer.
"""

from __future__ import annotations

from deliverylab.course import EXERCISES
from deliverylab.course.mutate import EDIT_LINES, diff_lines


def sample_starter(conn, delivery):
    """Reserve the order's stock, once per order, whatever the queue redelivers."""


def sample_edit(conn, delivery):
    """Reserve the order's stock."""
    # a comment does not count
    conn.execute("INSERT INTO inbox_processed VALUES (?)", (delivery.event_id,))


def sample_edit_changed(conn, delivery):

    conn.execute("INSERT OR IGNORE INTO inbox_processed VALUES (?)",
                 (delivery.event_id,))  # the same statement, one token changed


def sample_design(conn, delivery):
    key = delivery.event_id
    seen = conn.execute("SELECT 1 FROM inbox_processed WHERE event_id = ?", (key,)).fetchone()
    if seen:
        return
    conn.execute("INSERT INTO inbox_processed VALUES (?)", (key,))
    conn.execute("UPDATE inventory_projection SET reserved_qty = reserved_qty + 1")


def test_the_measure_counts_code_lines_only():
    assert diff_lines(sample_edit, sample_edit) == 0
    # a one-token edit of one statement written over two lines: the larger side, 2 lines
    assert diff_lines(sample_edit, sample_edit_changed) == 2
    # a docstring-only starter: every line of the solution is new
    assert diff_lines(sample_starter, sample_design) == 6
    assert diff_lines(sample_starter, sample_edit) == 1


def test_at_most_a_third_of_the_exercises_are_small_edits():
    rows = sorted((ex.chapter, ex_id, diff_lines(ex.starter, ex.solution))
                  for ex_id, ex in EXERCISES.items() if ex.starter is not None)
    assert rows, "no exercise has a starter"
    print(f"\n{'chapter':>7}  {'exercise':<28} {'diff lines':>10}  kind")
    for chapter, ex_id, n in rows:
        print(f"{chapter:>7}  {ex_id:<28} {n:>10}  {'edit' if n <= EDIT_LINES else 'design'}")
    edits = [ex_id for _, ex_id, n in rows if n <= EDIT_LINES]
    print(f"{len(edits)} of {len(rows)} exercises are edits of {EDIT_LINES} lines or fewer")
    missing = sorted(k for k, ex in EXERCISES.items() if ex.starter is None)
    assert not missing, f"exercises without a starter to measure: {missing}"
    assert len(edits) * 3 <= len(rows), (
        f"{len(edits)} of {len(rows)} exercises are edits of {EDIT_LINES} lines or fewer"
        f" (at most a third may be): {', '.join(edits)}")
