"""The course's grader and every registered exercise.

Parametrised over ``EXERCISES``, so an exercise added in any chapter module is tested here:
its model solution must pass on 25 seeds, each of its plausible wrong answers (and the
chapter's starter) must fail for the stated reason, and the verdict text must come out the
same on every run (the chapters keep it as saved output).
"""

from __future__ import annotations

import pytest

from deliverylab.course import EXERCISES, Exercise, grade, register
from deliverylab.course.grader import describe_faults, run_workers
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults

IDS = sorted(EXERCISES)
WRONG = [(ex_id, i) for ex_id in IDS for i in range(len(EXERCISES[ex_id].wrong))]

pytestmark = pytest.mark.slow


def test_registry_holds_three_exercises_per_chapter_so_far() -> None:
    chapters: dict[int, int] = {}
    for ex in EXERCISES.values():
        chapters[ex.chapter] = chapters.get(ex.chapter, 0) + 1
    for chapter in (1, 2, 3):
        assert chapters.get(chapter, 0) >= 3, chapters
    for ex in EXERCISES.values():
        assert ex.wrong, f"{ex.id} has no wrong answer to reject"
        assert ex.starter is not None, f"{ex.id} has no starter for its chapter cell"


@pytest.mark.parametrize("ex_id", IDS)
def test_model_solution_passes_on_many_seeds(ex_id: str) -> None:
    verdict = grade(ex_id, EXERCISES[ex_id].solution, seeds=range(25))
    assert verdict.passed, str(verdict)
    assert len(verdict.trials) == 25
    assert str(verdict).startswith(f"PASS: {EXERCISES[ex_id].title} held on all 25 seeds (")


@pytest.mark.parametrize(("ex_id", "index"), WRONG)
def test_wrong_answer_fails_with_its_reason(ex_id: str, index: int) -> None:
    reason, wrong = EXERCISES[ex_id].wrong[index]
    verdict = grade(ex_id, wrong)
    assert not verdict.passed
    first = verdict.failed[0]
    assert reason in first.reason, (reason, str(verdict))
    text = str(verdict)
    assert text.startswith(f"FAIL: {EXERCISES[ex_id].title} failed on {len(verdict.failed)}"
                           " of 20 seeds\n")
    assert f"First failing seed: {first.seed} ({first.faults})" in text
    assert f"Why: {first.reason}" in text
    # The learner is shown something to follow: a trace, or at least the orders involved.
    assert first.trace or first.lost or first.duplicated
    if first.trace:
        assert first.trace in text


@pytest.mark.parametrize("ex_id", IDS)
def test_starter_fails(ex_id: str) -> None:
    ex = EXERCISES[ex_id]
    assert not grade(ex_id, ex.starter).passed


@pytest.mark.parametrize("ex_id", IDS)
def test_verdict_text_is_deterministic(ex_id: str) -> None:
    ex = EXERCISES[ex_id]
    seeds = range(3, 9)
    assert str(grade(ex_id, ex.starter, seeds=seeds)) == str(grade(ex_id, ex.starter,
                                                                    seeds=seeds))


def test_lost_and_duplicated_orders_are_named_with_a_trace() -> None:
    from deliverylab.course import ex01, ex03

    lost = grade("ack-after", ex01.ack_first, seeds=[0]).trials[0]
    assert lost.lost and lost.lost[0] in lost.trace
    assert "acked" in lost.trace and "crashed" in lost.trace
    dup = grade("idempotent-handler", ex03.plain_handler, seeds=[0]).trials[0]
    assert dup.duplicated and dup.duplicated[0] in dup.trace
    assert dup.trace.count("effect made") >= 2


def test_a_submission_that_raises_is_reported_not_crashed() -> None:
    def broken(delivery, ops):  # noqa: ANN001 - a reader's code
        raise KeyError("itemid")

    verdict = grade("ack-after", broken, seeds=[0, 1])
    assert not verdict.passed
    assert "your code raised KeyError: 'itemid'" in verdict.failed[0].reason


def test_heartbeat_needs_workers_interleaved_on_one_clock() -> None:
    """Without interleaving a slow worker is never overtaken: the starter would pass."""
    from deliverylab.course import ex03

    faults = Faults(seed=0, **ex03.BEAT)  # a crash staggers the two workers
    run, result = run_workers(process=ex03.no_heartbeat, seed=0, faults=faults, orders=20,
                              workers=2, work=ex03.beat_work(faults))
    overtaken = run.lab.store.execute(
        "SELECT count(*) FROM delivery_log WHERE outcome = 'ack_rejected'").fetchone()[0]
    assert overtaken > 0 and result.duplicated > 0
    run, result = run_workers(process=ex03.heartbeat_solution, seed=0, faults=faults,
                              orders=20, workers=2, work=ex03.beat_work(faults))
    assert result.ok and {w.name for w in run.workers} == {"worker-1", "worker-2"}
    busy = {r[0] for r in run.lab.store.execute(
        "SELECT worker FROM delivery_log WHERE outcome = 'applied'")}
    assert busy == {"worker-1", "worker-2"}


def test_ops_refuse_work_in_a_transaction_and_apply_before_the_work() -> None:
    def work_in_tx(delivery, ops):  # noqa: ANN001
        with ops.transaction():
            ops.work(1.0)

    verdict = grade("late-worker", work_in_tx, seeds=[0])
    assert "ops.work() inside a transaction" in verdict.failed[0].reason


def test_describe_faults_names_rates_workers_and_orders() -> None:
    text = describe_faults(Faults(seed=5, ack_fail=0.3, crash_after_commit=0.1), workers=2,
                           orders=30)
    assert text == "ack_fail=0.3, crash_after_commit=0.1; 2 workers; 30 orders"
    assert describe_faults(Faults(seed=1)) == "no faults; 1 worker"


def test_verdict_prints_its_text_in_a_notebook() -> None:
    verdict = grade("classify", EXERCISES["classify"].starter, seeds=[0])

    class Printer:
        def __init__(self) -> None:
            self.out = ""

        def text(self, s: str) -> None:
            self.out += s

    p = Printer()
    verdict._repr_pretty_(p, False)
    assert p.out == str(verdict) == repr(verdict)


# -- input validation ------------------------------------------------------------------------
def test_unknown_exercise_id_is_named() -> None:
    with pytest.raises(InvalidInput) as err:
        grade("no-such-exercise", lambda delivery, ops: None)
    assert err.value.field == "exercise_id" and err.value.value == "no-such-exercise"
    assert "ack-after" in str(err.value)
    with pytest.raises(InvalidInput) as err:
        grade(3, lambda delivery, ops: None)  # type: ignore[arg-type]
    assert err.value.field == "exercise_id"


@pytest.mark.parametrize("submission", [None, 42, "ops.apply(delivery)"])
def test_a_submission_that_is_not_callable_is_named(submission: object) -> None:
    with pytest.raises(InvalidInput) as err:
        grade("ack-after", submission)  # type: ignore[arg-type]
    assert err.value.field == "submission" and err.value.value == submission
    assert "a function taking (delivery, ops)" in str(err.value)


@pytest.mark.parametrize(("ex_id", "submission"), [
    ("ack-after", lambda delivery: None),
    ("ack-after", lambda delivery, ops, extra: None),
    ("idempotent-handler", lambda delivery, ops, conn: None),
    ("classify", lambda: "correct"),
])
def test_a_submission_with_the_wrong_signature_is_named(ex_id: str, submission: object) -> None:
    with pytest.raises(InvalidInput) as err:
        grade(ex_id, submission)  # type: ignore[arg-type]
    assert err.value.field == "submission"
    assert ", ".join(EXERCISES[ex_id].params) in str(err.value)


def test_defaults_and_star_args_are_accepted() -> None:
    from deliverylab.course import ex01

    def flexible(delivery, ops, verbose=False, *rest):  # noqa: ANN001
        ex01.ack_after_solution(delivery, ops)

    assert grade("ack-after", flexible, seeds=[0]).passed


@pytest.mark.parametrize("seeds", [[], [-1], [1.5], "abc", 7, [True], range(1001)])
def test_bad_seeds_are_named(seeds: object) -> None:
    with pytest.raises(InvalidInput) as err:
        grade("ack-after", EXERCISES["ack-after"].solution, seeds=seeds)  # type: ignore[arg-type]
    assert err.value.field == "seeds"


def test_register_refuses_a_second_exercise_with_the_same_id() -> None:
    ex = EXERCISES["ack-after"]
    assert register(ex) is ex  # registering the same object again is harmless
    twin = Exercise(id=ex.id, chapter=9, title="twin", run=ex.run, solution=ex.solution,
                    wrong=ex.wrong)
    with pytest.raises(InvalidInput) as err:
        register(twin)
    assert err.value.field == "exercise.id"
    assert EXERCISES["ack-after"] is ex
    with pytest.raises(InvalidInput) as err:
        register("ack-after")  # type: ignore[arg-type]
    assert err.value.field == "exercise"


def test_a_submission_that_never_finishes_is_stopped_and_reported() -> None:
    import threading

    def forever(delivery, ops):  # noqa: ANN001
        while True:
            ops.work(1.0)

    before = threading.active_count()
    verdict = grade("ack-after", forever, seeds=[0])
    assert "ran past the grader's budget: more than 2,000 requests" in verdict.failed[0].reason
    assert "ops.work(1.0)" in verdict.failed[0].reason  # the line it was stuck on
    assert threading.active_count() == before  # no task thread left waiting


def test_a_producer_that_retries_without_end_is_stopped_even_if_it_catches_everything() -> None:
    def stubborn(send, request, clock):  # noqa: ANN001
        while True:
            try:
                send("no-such-item-" + "x" * 200, request["qty"])  # refused every time
            except Exception:  # noqa: BLE001, S112 - the mistake under test
                continue

    verdict = grade("producer-retries", stubborn, seeds=[0])
    assert "no end of retries" in verdict.failed[0].reason
    assert "never placed" in verdict.failed[0].reason


@pytest.mark.parametrize(("field", "change"), [
    ("exercise.id", {"id": ""}),
    ("exercise.chapter", {"chapter": "1"}),
    ("exercise.title", {"title": None}),
    ("exercise.run", {"run": "run"}),
    ("exercise.solution", {"solution": None}),
    ("exercise.wrong", {"wrong": [("lost", print)]}),
    ("exercise.wrong", {"wrong": (("", print),)}),
    ("exercise.params", {"params": ("delivery", "not a name")}),
])
def test_register_names_a_bad_exercise_field(field: str, change: dict) -> None:
    import dataclasses

    ex = dataclasses.replace(EXERCISES["ack-after"], **{"id": "a-new-id", **change})
    with pytest.raises(InvalidInput) as err:
        register(ex)
    assert err.value.field == field
    assert "a-new-id" not in EXERCISES


def test_a_crash_cannot_be_caught_by_the_submission() -> None:
    """A worker that 'survives' its crash would ack an effect that never happened."""
    def carry_on(delivery, ops):  # noqa: ANN001
        try:
            ops.apply(delivery)
        except Exception:  # noqa: BLE001, S110 - the mistake under test
            pass
        ops.ack(delivery)

    verdict = grade("ack-after", carry_on, seeds=range(5))
    assert verdict.passed, str(verdict)  # the crash ended it: redelivered, nothing lost


# -- the chapters ----------------------------------------------------------------------------
def _chapter_cells(chapter: int) -> list[dict]:
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "chapters"
    (path,) = root.glob(f"{chapter:02d}_*.ipynb")
    return json.loads(path.read_text())["cells"]


def _text(cell: dict) -> str:
    return "".join(cell["source"])


def _output(cell: dict) -> str:
    return "".join("".join(o.get("data", {}).get("text/plain", o.get("text", "")))
                   for o in cell.get("outputs", []))


@pytest.mark.parametrize("ex_id", IDS)
def test_chapter_shows_the_failing_starter_then_the_graded_model_solution(ex_id: str) -> None:
    """In its chapter: a cell grading the starter (saved FAIL), the model solution in a
    dropdown, and a hidden-input cell grading exactly that code (saved PASS)."""
    ex = EXERCISES[ex_id]
    cells = _chapter_cells(ex.chapter)
    call = f'grade("{ex_id}", '
    graded = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and call in _text(c)]
    assert len(graded) == 2, f"{ex_id}: expected a starter cell and a solution cell"
    tried, checked = graded
    assert _output(cells[tried]).startswith(f"FAIL: {ex.title} failed on ")
    assert "hide-input" in cells[checked]["metadata"].get("tags", [])
    assert _output(cells[checked]).startswith(f"PASS: {ex.title} held on all 20 seeds")
    dropdown = [c for c in cells[tried + 1:checked] if c["cell_type"] == "markdown"]
    assert len(dropdown) == 1
    text = _text(dropdown[0])
    assert "{admonition} Model solution" in text and ":class: dropdown" in text
    solution = _text(cells[checked]).split(call)[0].strip()
    assert solution and solution in text


def test_the_meter_decides_what_counts_as_an_effect() -> None:
    from deliverylab.course import ex03

    faults = Faults(seed=2, ack_fail=0.5)
    _, metered = run_workers(handler=ex03.idempotent_handler_solution, seed=2, faults=faults,
                             orders=10)
    assert metered.ok  # the skipped repeats left the projection alone: not counted
    run, blind = run_workers(handler=ex03.idempotent_handler_solution, seed=2, faults=faults,
                             orders=10, meter=None)
    assert blind.duplicated > 0  # without a meter every return counts, as in the engine
    assert not run.lab.store.execute(
        "SELECT count(*) FROM delivery_log WHERE outcome = 'duplicate_skipped'").fetchone()[0]


@pytest.mark.parametrize(("field", "kwargs"), [
    ("process", {"process": "apply then ack"}),
    ("handler", {"handler": None}),
    ("meter", {"meter": 3}),
    ("work", {"work": -1}),
    ("faults", {"faults": {"ack_fail": 0.5}}),
    ("orders", {"orders": 2.5}),
    ("workers", {"workers": 0}),
    ("seed", {"seed": "7"}),
    ("mode", {"mode": "exactly-once"}),
])
def test_run_workers_names_a_bad_argument(field: str, kwargs: dict) -> None:
    with pytest.raises(InvalidInput) as err:
        run_workers(**{"seed": 0, **kwargs})
    assert err.value.field == field


def test_the_text_helpers_name_a_bad_argument() -> None:
    from deliverylab.course.grader import order_trace

    with pytest.raises(InvalidInput) as err:
        describe_faults("ack_fail=0.3")  # type: ignore[arg-type]
    assert err.value.field == "faults"
    with pytest.raises(InvalidInput) as err:
        describe_faults(Faults(seed=1), workers=0)
    assert err.value.field == "workers"
    run, _ = run_workers(seed=0, orders=1)
    with pytest.raises(InvalidInput) as err:
        order_trace(run.lab.store, "")
    assert err.value.field == "order_id"
