"""Chapters 4 to 7's exercises, beyond the parametrised suite in ``test_course.py``.

The chapters show each exercise's starter and model solution as code generated from the
functions the grader tests; these tests hold the chapters to that. The others check that a
run really contains the situation its exercise is about (a repair while a worker holds an
event, answers lost after a charge, a redrive after the window), so a right answer passes for
the right reason.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from deliverylab.book.effects import PaymentService
from deliverylab.course import EXERCISES, cells, ex04, ex05, ex06, grade
from deliverylab.course.crew import course_lab, drain
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults

CHAPTERS = Path(__file__).resolve().parents[2] / "chapters"
# exercise id -> (chapter file, the name the reader's function has in the chapter)
SHOWN = {
    "drain": ("04_lab.ipynb", "drain"),
    "redrive-inbox": ("04_lab.ipynb", "handler"),
    "really-missing": ("04_lab.ipynb", "missing"),
    "in-flight-repair": ("05_reconciliation.ipynb", "repair"),
    "fenced-worker": ("05_reconciliation.ipynb", "handler"),
    "repair-item": ("05_reconciliation.ipynb", "repair_item"),
    "charge-once": ("06_beyond_the_inbox.ipynb", "charge"),
    "newer-wins": ("06_beyond_the_inbox.ipynb", "apply_status"),
    "inbox-cleanup": ("06_beyond_the_inbox.ipynb", "nightly"),
    "external-inbox": ("07_beyond_one_machine.ipynb", "consume"),
    "relay-publish": ("07_beyond_one_machine.ipynb", "relay"),
    "poison-or-retry": ("07_beyond_one_machine.ipynb", "consume"),
}


def _cell(nb: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
    found = [c for c in nb.cells if c.get("id") == cell_id]
    assert len(found) == 1, f"cell {cell_id} missing or repeated"
    return found[0]


def _text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "")
                   for o in cell.get("outputs", []))


def test_every_late_chapter_has_three_exercises() -> None:
    for chapter in (4, 5, 6, 7):
        assert sum(ex.chapter == chapter for ex in EXERCISES.values()) >= 3
    assert {ex_id for ex_id, ex in EXERCISES.items() if 4 <= ex.chapter <= 7} == set(SHOWN)


@pytest.mark.parametrize("ex_id", sorted(SHOWN))
def test_chapter_shows_the_graded_starter_and_solution(ex_id: str) -> None:
    """The cell the reader edits is the starter the tests reject; the dropdown and the hidden
    cell hold the solution they accept; the saved outputs are a FAIL and a PASS."""
    chapter, name = SHOWN[ex_id]
    ex = EXERCISES[ex_id]
    nb = nbformat.read(CHAPTERS / chapter, as_version=4)
    call = f'grade("{ex_id}", {name})'
    tried = _cell(nb, f"ex-{ex_id}-try")
    assert tried.source == f"{cells.plain_source(ex.starter, name)}\n\n{call}"
    assert _text(tried).startswith(f"FAIL: {ex.title} failed on ")
    solution = _cell(nb, f"ex-{ex_id}-solution")
    assert solution.cell_type == "markdown"
    assert solution.source.startswith("````{admonition} Model solution\n:class: dropdown\n")
    assert cells.plain_source(ex.solution, name) in solution.source
    check = _cell(nb, f"ex-{ex_id}-check")
    assert check.metadata.get("tags") == ["hide-input"]
    assert check.source == f"{cells.plain_source(ex.solution, name)}\n\n{call}"
    assert _text(check).startswith(f"PASS: {ex.title} held on all 20 seeds (")


def test_exercises_come_after_the_chapter() -> None:
    """The section is added at the end: no cell of the chapter moved."""
    for chapter in {c for c, _ in SHOWN.values()}:
        nb = nbformat.read(CHAPTERS / chapter, as_version=4)
        ids = [c.get("id") for c in nb.cells]
        start = next(i for i, c in enumerate(nb.cells) if c.source.startswith("## Exercises"))
        assert all(str(i).startswith("ex") for i in ids[start:])
        assert not any(str(i).startswith(("ex-", "ex4-", "ex5-", "ex6-", "ex7-"))
                       for i in ids[:start])


def test_plain_source_renames_and_drops_type_hints() -> None:
    text = cells.plain_source(ex05.repair_solution, "repair")
    assert text.startswith("def repair(conn, now):\n    # Batches of at most 8 rows")
    assert "sqlite3" not in text.splitlines()[0]
    with pytest.raises(InvalidInput) as err:
        cells.plain_source("repair", "repair")
    assert err.value.field == "fn"
    with pytest.raises(InvalidInput) as err:
        cells.plain_source(ex05.repair_solution, "")
    assert err.value.field == "name"


def test_a_submission_with_the_wrong_signature_is_named() -> None:
    with pytest.raises(InvalidInput) as err:
        grade("in-flight-repair", lambda conn: None)
    assert err.value.field == "submission" and "(conn, now)" in str(err.value)
    with pytest.raises(InvalidInput) as err:
        grade("inbox-cleanup", "nightly")
    assert err.value.field == "submission"


# -- the runs contain what the exercises are about -----------------------------------------
def test_the_repair_runs_while_a_worker_holds_an_event() -> None:
    """The held event was received before the repair and reaches its effect after it: with
    the fence it is refused, without it applied a second time; in either mode."""
    for seed in (2, 3):  # an idempotent crew, then a transactional one
        for repair, outcome in ((ex05.repair_solution, "fenced"),
                                (ex05.repair_rebuild_only, "applied")):
            lab, faults, _ = ex05._lab(seed)
            lab.place_orders(4)
            ex05._hold_while(lab, Faults(seed=seed),
                             lambda lab=lab, repair=repair: repair(lab.store, lab.clock.now()))
            held = lab.store.execute(
                "SELECT outcome FROM delivery_log WHERE worker = 'worker-3'"
                " AND outcome IN ('applied', 'duplicate_skipped', 'fenced')").fetchall()
            assert [r[0] for r in held] == [outcome], (seed, repair.__name__)


def test_a_fence_in_the_inbox_fails_wherever_a_worker_does_not_read_the_inbox() -> None:
    """Every transactional crew counts an inbox-fenced event twice; an idempotent crew only
    when a bystander without an inbox (at-most-once, at-least-once) takes one between the
    repair's batches: the failures are all of one kind, double counts."""
    verdict = grade("in-flight-repair", ex05.repair_fence_in_inbox, seeds=range(12))
    transactional = [s for s in range(12) if s % 2]
    assert set(transactional) <= {t.seed for t in verdict.failed}
    assert all("counted twice" in t.reason and "counted by no one" not in t.reason
               for t in verdict.failed), str(verdict)


def test_the_lock_budget_is_measured_per_transaction() -> None:
    """The grader counts the rows each of the repair's transactions writes, never the
    workers' between them: the model's batches stay within the budget, one transaction for
    everything does not, and a rush on one item breaks a batch per item."""
    from deliverylab.course.ex05 import BATCH, Interleaved, _Caller, _lab

    for seed in range(4):
        sizes = {}
        for repair in (ex05.repair_solution, ex05.repair_in_one_transaction,
                       ex05.repair_one_item_per_transaction):
            lab, _, _ = _lab(seed)
            lab.place_orders(12)
            lab.place_orders(ex05.RUSH, items=("oat-milk",))
            stepped = []

            def between(lab=lab, stepped=stepped) -> None:
                stepped.append(lab.workers[0].step())

            caller = _Caller(lab, repair, between)
            assert caller() and not caller.errors, caller.errors
            sizes[repair.__name__] = caller.largest
            assert any(stepped)  # the workers wrote between the statements, uncounted
        assert 0 < sizes["repair_solution"] <= BATCH, sizes
        assert sizes["repair_in_one_transaction"] > BATCH, sizes
        assert sizes["repair_one_item_per_transaction"] > BATCH, sizes
    conn = Interleaved(lab.store, lambda: None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO inventory_projection VALUES ('x', 1), ('y', 2)")
    conn.execute("COMMIT")
    conn.execute("DELETE FROM inventory_projection WHERE item_id IN ('x', 'y')")
    conn.finish()
    assert conn.largest == 2


def test_a_crashing_submission_is_reported_with_its_error() -> None:
    def broken(conn, now):  # noqa: ANN001 - a reader's code
        raise KeyError("qty")

    verdict = grade("in-flight-repair", broken, seeds=[0])
    assert "your code raised KeyError: 'qty'" in verdict.failed[0].reason


def test_the_payment_network_loses_answers_after_charging() -> None:
    """A lost answer is a charge made: the keyed retry gets it back instead of a new one."""
    lab = course_lab(seed=0)
    service = PaymentService(clock=lab.clock, seed=0)
    flaky = ex06.FlakyPayments(service, seed=0, rate=1.0)
    with pytest.raises(ex06.LostAnswer):
        flaky.charge(order_id="o-1", amount=500, idempotency_key="evt-1")
    assert service.charge_count() == 1
    retry = service.charge(order_id="o-1", amount=500, idempotency_key="evt-1")
    assert retry.replayed and service.charge_count() == 1
    verdict = grade("charge-once", ex06.charge_solution, seeds=range(5))
    assert verdict.passed, str(verdict)


def test_status_runs_use_both_consumers() -> None:
    faults = {t.faults for t in grade("newer-wins", ex06.status_solution, seeds=[0, 1]).trials}
    assert any("(here idempotent)" in f for f in faults)
    assert any("(here at-least-once)" in f for f in faults)


def test_status_runs_hold_both_sides_of_the_cancellation_rule() -> None:
    """Most seeds hold a change that arrives after the order's cancellation is in place, whatever
    its version (refused), and a cancellation that arrives after a newer change is in place
    (it wins): a solution that ignores either half of the rule meets it on those seeds."""
    seeds = range(25)
    refused: set[int] = set()
    wins: set[int] = set()
    for seed in seeds:
        def probe(conn, order_id, status, version, now, seed=seed):
            row = conn.execute("SELECT status, version FROM order_status WHERE order_id = ?",
                               (order_id,)).fetchone()
            if row is not None and row[0] == "cancelled" and version > row[1]:
                refused.add(seed)
            if row is not None and status == "cancelled" and version < row[1]:
                wins.add(seed)
            ex06.status_solution(conn, order_id, status, version, now)
        trial = ex06.run_status(probe, seed)
        assert trial.passed, trial.reason
    assert len(refused) * 3 >= len(seeds) * 2, sorted(refused)
    assert len(wins) * 2 >= len(seeds), sorted(wins)


def test_cleanup_that_keeps_dead_letters_fails_on_the_late_redrive() -> None:
    """Its inbox horizon is right; what it misses is the dead letters older than the window,
    redriven on the last day after their inbox rows were pruned."""
    trial = grade("inbox-cleanup", ex06.cleanup_keeps_dead_letters, seeds=[0]).trials[0]
    assert not trial.passed and trial.duplicated
    assert "redriven" in trial.trace
    late = float(trial.trace.split("redriven")[0].splitlines()[-1].split()[0])
    assert late >= 5 * ex06.DAY  # the redrive of day 6, not the one inside the window


def test_drain_stops_a_loop_that_never_lets_time_pass() -> None:
    verdict = grade("drain", ex04.drain_without_time, seeds=[0])
    assert "the clock never moved" in verdict.failed[0].reason


def test_missing_counts_applied_dead_letters_as_done() -> None:
    """The run has dead letters whose event was applied: the trap the exercise is about."""
    lab = course_lab(seed=1, faults=Faults(seed=1, ack_fail=0.7), max_receives=3)
    lab.place_orders(20)
    drain(lab)
    applied_dead = lab.store.execute(
        "SELECT count(*) FROM dead_letters AS d JOIN inbox_processed AS i USING (event_id)"
    ).fetchone()[0]
    assert applied_dead > 0
    assert not (ex04.missing_solution(lab.store) & ex04.missing_dead_letters(lab.store))


def test_drain_stops_a_loop_that_never_steps() -> None:
    def wait_forever(workers, queue, clock):  # noqa: ANN001 - a reader's code
        while queue.next_visible_at() is not None:
            clock.advance(1.0)

    verdict = grade("drain", wait_forever, seeds=[0])
    assert "ran past the grader's budget" in verdict.failed[0].reason
    reason = verdict.failed[0].reason
    assert "clock.advance(1.0)" in reason or "queue.next_visible_at()" in reason


def test_helpers_name_a_bad_argument() -> None:
    from deliverylab.course import crew

    with pytest.raises(InvalidInput) as err:
        crew.course_lab(seed=0, handler="apply")
    assert err.value.field == "handler"
    with pytest.raises(InvalidInput) as err:
        crew.crew(course_lab(seed=0), crew.inbox_consumer(None), workers=0)
    assert err.value.field == "workers"
    with pytest.raises(InvalidInput) as err:
        ex06.FlakyPayments("stripe", seed=0, rate=0.3)
    assert err.value.field == "service"
    lab = course_lab(seed=0)
    with pytest.raises(InvalidInput) as err:
        ex06.FlakyPayments(PaymentService(clock=lab.clock), seed=0, rate=1.5)
    assert err.value.field == "rate"
    with pytest.raises(InvalidInput) as err:
        ex06.QueuePolicy(visibility_timeout=2.0, max_receives=0, backoff_cap=10.0,
                         redrive_window=0.0)
    assert err.value.field == "max_receives"
