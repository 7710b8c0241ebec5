"""The grader: the reader's code, run by the engine under a seeded fault schedule.

In the spirit of Jepsen's Maelstrom checker: a submission is not read, it is *run*. The
grader places orders on a real queue (SQLite, in memory), lets one or several workers
consume them on one :class:`~deliverylab.clock.FakeClock` with the reader's function in the
loop, injects faults from a seed (lost ACKs, crashes at named points), and asks the engine's
checker what happened to every order. One run is a :class:`Trial`; :func:`grade` runs one per
seed and returns a :class:`Verdict` whose text says which orders were lost or duplicated,
under which faults, and how one failing order's deliveries went.

Everything is a function of (submission, seed): the same submission and seeds give the same
verdict text, so a chapter can keep its graded output and nbval can compare it.

Two kinds of submission plug into the worker here:

* a **process** function ``process(delivery, ops)``: what a worker does with one delivery,
  through the verbs of :class:`Ops` (apply the effect, ack, extend, nack, work, one
  transaction);
* a **handler** ``handler(conn, delivery)``: the effect itself, run inside the worker's
  transaction. The grader counts what it did to the projection, so a handler that skips a
  duplicate is seen skipping it.

Exercises that need another shape (a reconcile, a producer, a projection) write their own
``run`` and reuse :func:`judge`, :func:`describe_faults` and :func:`order_trace`.
"""

from __future__ import annotations

import inspect
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..book.lab import Lab
from ..brokers.base import Delivery
from ..engine.check import CheckResult, check, event_states
from ..engine.errors import STORE_ERRORS, InvalidInput, check_int, check_number, check_text
from ..engine.faults import FAULT_POINTS, NO_FAULTS, Faults
from ..engine.store import transaction
from ..engine.trace import Outcome, log_delivery
from ..engine.worker import Mode, Worker, apply_order_placed
from .sandbox import REQUESTS, Ended, Raised, Rollback, Sandbox

SEEDS = range(20)
MAX_SEEDS = 1000
SHOWN_IDS = 5  # order ids listed in a verdict before "(+N more)"


# -- the lab ---------------------------------------------------------------------------------
class CourseLab(Lab):
    """The lab every exercise runs on: an in-memory SQLite store, always. The grader's SQL
    guard (an SQLite authorizer), its clock function and the child's copy of the database
    are SQLite's own, so a PostgreSQL path is refused here, naming it."""

    store: sqlite3.Connection

    def __init__(self, path: str | Path = ":memory:", **kw: Any) -> None:
        super().__init__(path, **kw)
        if not isinstance(self.store, sqlite3.Connection):
            self.close()
            raise InvalidInput("path", path, "a SQLite database (the course grades on SQLite)")


# -- results -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trial:
    """One run of a submission under one seed."""

    seed: int
    faults: str          # the conditions, e.g. "ack_fail=0.3, crash_after_receive=0.1; 2 workers"
    passed: bool
    reason: str          # why it failed ("" when it passed)
    lost: tuple[str, ...] = ()
    duplicated: tuple[str, ...] = ()
    trace: str = ""      # one failing order's deliveries, from the delivery log


@dataclass(frozen=True)
class Exercise:
    """One exercise: ``run(submission, seed) -> Trial`` grades one seed.

    ``wrong`` holds plausible wrong answers, each with a substring its FAIL reason must
    contain; ``params`` names the arguments a submission is called with (checked before
    anything runs); ``starter`` is the wrong answer the chapter's code cell starts from."""

    id: str
    chapter: int
    title: str
    run: Callable[[Callable[..., Any], int], Trial]
    solution: Callable[..., Any]
    wrong: tuple[tuple[str, Callable[..., Any]], ...]
    params: tuple[str, ...] = ("delivery", "ops")
    starter: Callable[..., Any] | None = None
    requests: int = REQUESTS  # the budget of requests to the grader's objects per seed


@dataclass(frozen=True)
class Verdict:
    """The grade: passed on every seed, or not. ``str()`` is the learner's report."""

    exercise: Exercise
    passed: bool
    trials: tuple[Trial, ...]
    note: str = ""       # e.g. the seeds not run after a budget ran out

    @property
    def failed(self) -> tuple[Trial, ...]:
        return tuple(t for t in self.trials if not t.passed)

    def __str__(self) -> str:
        n = len(self.trials)
        title = self.exercise.title
        if self.passed:
            return (f"PASS: {title} held on all {n} seeds ({_seed_span(self.trials)};"
                    f" {self.trials[0].faults})")
        if not self.failed:
            return f"FAIL: {title}: {self.note}"

        bad = self.failed
        first = bad[0]
        lines = [f"FAIL: {title} failed on {len(bad)} of {n} seeds",
                 f"First failing seed: {first.seed} ({first.faults})",
                 f"Why: {first.reason}"]
        if first.lost:
            lines.append(f"Lost: {_ids(first.lost)}")
        if first.duplicated:
            lines.append(f"Duplicated: {_ids(first.duplicated)}")
        if first.trace:
            lines.append(first.trace)
        lines.append(f"Failing seeds: {', '.join(str(t.seed) for t in bad)}")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))


def _ids(ids: tuple[str, ...]) -> str:
    shown = ", ".join(ids[:SHOWN_IDS])
    more = len(ids) - SHOWN_IDS
    return shown + (f" (+{more} more)" if more > 0 else "")


def _seed_span(trials: tuple[Trial, ...]) -> str:
    seeds = [t.seed for t in trials]
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 1:
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds))


# -- the registry --------------------------------------------------------------------------
EXERCISES: dict[str, Exercise] = {}


def register(exercise: Exercise) -> Exercise:
    """Add ``exercise`` to :data:`EXERCISES`; an id used twice is an error."""
    if not isinstance(exercise, Exercise):
        raise InvalidInput("exercise", exercise, "a deliverylab.course.grader.Exercise")
    check_text("exercise.id", exercise.id)
    check_int("exercise.chapter", exercise.chapter, minimum=1, maximum=99)
    check_text("exercise.title", exercise.title, max_length=200)
    for name in ("run", "solution"):
        if not callable(getattr(exercise, name)):
            raise InvalidInput(f"exercise.{name}", getattr(exercise, name), "a function")
    if not isinstance(exercise.wrong, tuple) or not all(
            isinstance(w, tuple) and len(w) == 2 and isinstance(w[0], str) and w[0]
            and callable(w[1]) for w in exercise.wrong):
        raise InvalidInput("exercise.wrong", exercise.wrong,
                           "a tuple of (reason substring, wrong submission) pairs")
    if not isinstance(exercise.params, tuple) or not all(
            isinstance(p, str) and p.isidentifier() for p in exercise.params):
        raise InvalidInput("exercise.params", exercise.params, "a tuple of argument names")
    check_int("exercise.requests", exercise.requests, minimum=1, maximum=1_000_000)
    if exercise.id in EXERCISES and EXERCISES[exercise.id] is not exercise:
        raise InvalidInput("exercise.id", exercise.id, "an id not registered yet")
    EXERCISES[exercise.id] = exercise
    return exercise


def exercise(exercise_id: Any) -> Exercise:
    """The registered exercise ``exercise_id``, or InvalidInput listing the known ids."""
    if not isinstance(exercise_id, str) or exercise_id not in EXERCISES:
        raise InvalidInput("exercise_id", exercise_id,
                           "one of " + ", ".join(sorted(EXERCISES)))
    return EXERCISES[exercise_id]


def check_submission(ex: Exercise, submission: Any) -> Callable[..., Any]:
    """A callable that accepts the exercise's arguments, or InvalidInput naming it."""
    expected = f"a function taking ({', '.join(ex.params)})"
    if not callable(submission):
        raise InvalidInput("submission", submission, expected)
    try:
        sig = inspect.signature(submission)
    except (TypeError, ValueError):
        return submission  # a builtin without a signature: let the run say what went wrong
    try:
        sig.bind(*ex.params)
    except TypeError:
        raise InvalidInput("submission", submission,
                           f"{expected}; its signature is {sig}") from None
    return submission


def check_seeds(seeds: Any) -> tuple[int, ...]:
    try:
        out = tuple(seeds)
    except TypeError:
        raise InvalidInput("seeds", seeds, "an iterable of integers >= 0") from None
    if not out or len(out) > MAX_SEEDS or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in out):
        raise InvalidInput("seeds", seeds,
                           f"1 to {MAX_SEEDS} integers >= 0, such as range(20)")
    return out


def grade(exercise_id: str, submission: Callable[..., Any], *,
          seeds: Iterable[int] = SEEDS, broker: str | None = None) -> Verdict:
    """Run ``submission`` for exercise ``exercise_id`` once per seed and judge it.
    ``broker`` (a URL) runs an exercise on the broker contract on that engine instead of
    its default (chapter 7's exercises).

    The submission runs in a child process (:mod:`deliverylab.course.sandbox`); this process
    keeps the database and judges it. Whatever the submission does ends in a verdict: once a
    budget has run out on one seed, the remaining seeds are not run (each would take as
    long) and the verdict says so."""
    ex = exercise(exercise_id)
    check_submission(ex, submission)
    todo = check_seeds(seeds)
    extra: dict[str, Any] = {}
    if broker is not None:
        if "broker" not in inspect.signature(ex.run).parameters:
            raise InvalidInput("broker", broker, f"None: {exercise_id} runs on the lab's own"
                                                 " queue, not on a broker you choose")
        from .external import check_broker_url

        extra["broker"] = check_broker_url(broker)
    trials: list[Trial] = []
    with Sandbox(submission, ex.params, requests=ex.requests) as box:
        fn = box.function()
        for seed in todo:
            box.new_trial()
            trials.append(_trial(ex, fn, seed, **extra))
            if box.budget_ended:
                break
    left = todo[len(trials):]
    note = ""
    if left:
        note = (f"Not run: {len(left)} more seed{'s' if len(left) != 1 else ''}"
                f" ({_seed_span(tuple(Trial(s, '', False, '') for s in left))}): a budget ran"
                f" out on seed {trials[-1].seed}, and each would take as long")
    return Verdict(ex, all(t.passed for t in trials) and not left, tuple(trials), note)


def _trial(ex: Exercise, fn: Callable[..., Any], seed: int, **extra: Any) -> Trial:
    """One seed; a run the submission ended early (a budget, SystemExit, a dead process) or
    broke (the grader could not go on) is a FAIL that says so, never a traceback."""
    try:
        return ex.run(fn, seed, **extra)
    except Ended as end:
        return Trial(seed=seed, faults="the run stopped there", passed=False, reason=end.reason)
    except Exception as exc:  # noqa: BLE001 - whatever the submission broke, a verdict
        return Trial(seed=seed, faults="the run stopped there", passed=False,
                     reason=f"the grader could not finish this seed: {type(exc).__name__}:"
                            f" {exc}")


# -- describing a run ----------------------------------------------------------------------
def describe_faults(faults: Faults, *, workers: int = 1, orders: int | None = None,
                    extra: str = "") -> str:
    """``"ack_fail=0.3, crash_after_receive=0.1; 2 workers; 30 orders"``: the conditions of a
    run, without the seed (a trial shows that beside it)."""
    if not isinstance(faults, Faults):
        raise InvalidInput("faults", faults, "a deliverylab.engine.faults.Faults")
    check_int("workers", workers, minimum=1)
    if orders is not None:
        check_int("orders", orders, minimum=0)
    rates = [f"{p}={faults.rate(p):g}" for p in FAULT_POINTS if faults.rate(p) > 0]
    parts = [", ".join(rates) or "no faults", f"{workers} worker{'s' if workers != 1 else ''}"]
    if orders is not None:
        parts.append(f"{orders} orders")
    if extra:
        parts.append(extra)
    return "; ".join(parts)


def order_trace(conn: sqlite3.Connection, order_id: str, *, limit: int = 40) -> str:
    """One order's deliveries from the delivery log, as aligned text."""
    check_text("order_id", order_id)
    check_int("limit", limit, minimum=1)
    rows = conn.execute(
        "SELECT at, worker, delivery_count, outcome, detail FROM delivery_log"
        " WHERE correlation_id = ? ORDER BY seq", (order_id,)).fetchall()
    lines = [f"Trace of order {order_id} (its deliveries, from the delivery log):",
             f"  {'t':>8}  {'worker':<9} {'delivery':>8}  {'outcome':<17} detail"]
    for at, worker, count, outcome, detail in rows[:limit]:
        lines.append(f"  {at:8.3f}  {worker:<9} {count:>8}  {outcome:<17} {detail}".rstrip())
    if len(rows) > limit:
        lines.append(f"  … {len(rows) - limit} more rows")
    if not rows:
        lines.append("  (no rows: no worker ever received its event)")
    return "\n".join(lines)


def judge(lab: CourseLab, *, seed: int, faults: str, allow_lost: bool = False,
          allow_duplicates: bool = False, errors: Iterable[str] = (),
          extra_failures: Iterable[str] = (), focus: Iterable[str] = (),
          drift: bool = True) -> Trial:
    """A Trial from the engine's checker on ``lab``'s database.

    Lost means never applied with no message left to apply it (dead-lettered included: the
    effect never happened); duplicated means applied more than once. ``errors`` are the
    submission's own exceptions (reported first: they are the likeliest cause);
    ``extra_failures`` are an exercise's own findings; ``focus`` orders whose trace to show
    when nothing is lost or duplicated; ``drift=False`` when the exercise judges the
    projection against the truth itself."""
    states = event_states(lab.store)
    lost = tuple(o for o, _, _, _, _, s in states if s in ("lost", "dead_lettered"))
    pending = tuple(o for o, _, _, _, _, s in states if s == "pending")
    dup = tuple(o for o, _, _, _, n, s in states if s == "duplicated")
    result = check(lab.store)
    reasons = [f"your code raised {e}" for e in _grouped(errors)]
    if lost and not allow_lost:
        reasons.append(f"{len(lost)} of {len(states)} orders lost: never applied, and no"
                       " message is left to apply them")
    if dup and not allow_duplicates:
        reasons.append(f"{len(dup)} of {len(states)} orders duplicated: applied more than"
                       f" once ({result.extra_applications} extra applications)")
    if pending:
        reasons.append(f"{len(pending)} orders still pending when the run ended (a delivery"
                       " your code never finished holds the worker up)")
        seen = {r[0] for r in lab.store.execute(
            "SELECT DISTINCT correlation_id FROM delivery_log WHERE outcome = 'received'")}
        pending = tuple(sorted(pending, key=lambda o: o not in seen))  # a received one first
    if (drift and not result.projection_equals_truth and not (lost and allow_lost)
            and not (dup and allow_duplicates)):
        reasons.append(f"the projection differs from the truth on {result.drifted_items}"
                       " item(s)")
    reasons.extend(extra_failures)
    shown_lost = () if allow_lost else lost
    shown_dup = () if allow_duplicates else dup
    candidates = [*shown_lost, *shown_dup, *focus, *pending]
    trace = order_trace(lab.store, candidates[0]) if reasons and candidates else ""
    return Trial(seed=seed, faults=faults, passed=not reasons, reason="; ".join(reasons),
                 lost=shown_lost, duplicated=shown_dup, trace=trace)


_AT_DELIVERY = re.compile(r" \(delivery \d+ of order [^()]*\)$")


def _grouped(errors: Iterable[str]) -> list[str]:
    """One line per distinct error: the first delivery it struck, and how many more."""
    groups: dict[str, list[str]] = {}
    for e in errors:
        m = _AT_DELIVERY.search(e)
        groups.setdefault(e[:m.start()] if m else e, []).append(e)
    return [es[0] if len(es) == 1 else
            f"{es[0]}, and the same on {len(es) - 1} more deliver"
            f"{'ies' if len(es) > 2 else 'y'}" for es in groups.values()]


# -- the worker with the reader's code in the loop -----------------------------------------
class SubmissionError(Exception):
    """The submission broke a rule of the harness (said in the message)."""


class Crashed(BaseException):  # noqa: N818 - a fault, not an error
    """The worker died at a fault point. A BaseException, so that a submission's own
    ``except Exception`` cannot catch its own death and carry on."""

    def __init__(self, point: str) -> None:
        self.point = point
        super().__init__(f"simulated crash at {point}")


class Stopped(BaseException):  # noqa: N818 - not an error of the engine
    """The harness stops a submission that runs away (retries without end, works forever).
    A BaseException, so that a submission's own ``except Exception`` cannot swallow it."""


Meter = Callable[[sqlite3.Connection, Delivery], "float | None"]


def inventory_meter(conn: sqlite3.Connection, d: Delivery) -> float | None:
    """How many times ``d``'s reservation fits in its item's projection row: a handler that
    makes the effect once moves it by exactly 1. None for a delivery that is not an order's
    reservation (then every return of the handler counts as one effect)."""
    item, qty = d.payload.get("itemId"), d.payload.get("qty")
    if not isinstance(item, str) or not isinstance(qty, int) or isinstance(qty, bool) \
            or qty < 1:
        return None
    row = conn.execute("SELECT reserved_qty FROM inventory_projection WHERE item_id = ?",
                       (item,)).fetchone()
    return (row[0] if row is not None else 0) / qty


class Ops:
    """What a ``process(delivery, ops)`` function may do, each verb on the real queue.

    * ``apply(d)``: make the effect (reserve the order's stock in the projection) in its own
      transaction, or inside ``ops.transaction()``. A crash may strike before it
      (``crash_after_receive``) or right after its commit (``crash_after_commit``).
    * ``ack(d) -> bool``: delete the message. Outside a transaction the ACK travels to the
      queue and may be lost (``ack_fail``): then it returns False and the message comes
      back. Inside ``ops.transaction()`` it is a row delete in the same database: it cannot
      be lost, and it returns False only when another delivery now holds the message.
    * ``extend(d, seconds) -> bool``: push the lease ``seconds`` past now (a heartbeat).
    * ``nack(d, delay=0.0) -> bool``: give the message back, visible after ``delay``.
    * ``work(seconds)``: time passes while this worker works; the other workers run
      meanwhile. Never inside a transaction. ``work_left``: the seconds of work this
      delivery still needs before ``apply`` may run (0 unless the exercise says so).
    * ``transaction()``: a context manager; everything inside commits together or not at
      all. Raise ``ops.Rollback`` inside it to undo it.
    * ``now()``: the clock; ``visibility_timeout``: the lease a receive gives.
    """

    Rollback = Rollback

    def __init__(self, worker: CourseWorker, delivery: Delivery) -> None:
        self._w = worker
        self.visibility_timeout = worker.visibility_timeout
        work = worker.work
        self.work_left = float(work(delivery) if callable(work) else work)
        self._held: Delivery | None = None

    def now(self) -> float:
        return self._w.clock.now()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        w = self._w
        if w.conn.in_transaction:
            raise SubmissionError("ops.transaction() inside another transaction")
        w.in_tx = True
        committed = False
        try:
            with transaction(w.conn):
                yield
            committed = True
        except Rollback:
            if self._held is not None:
                w.log(self._held, Outcome.ACK_REJECTED, "rolled back: effect and ACK undone")
        finally:
            w.in_tx = False
        if committed and w.pending_crash:
            w.pending_crash = False
            raise Crashed("after_commit_before_ack")

    def apply(self, d: Delivery) -> None:
        w = self._w
        self._held = _check(d)
        if self.work_left > 1e-9:
            raise SubmissionError(f"ops.apply() with {self.work_left:g}s of work left: call"
                                  " ops.work() until ops.work_left is 0 first")
        if w.fires("crash_after_receive", d):
            raise Crashed("before_effect")
        if w.in_tx:
            w.effect(d)
            w.pending_crash = w.pending_crash or w.fires("crash_after_commit", d)
            return
        with transaction(w.conn):
            w.effect(d)
        if w.fires("crash_after_commit", d):
            raise Crashed("after_commit_before_ack")

    def ack(self, d: Delivery) -> bool:
        w = self._w
        self._held = _check(d)
        if w.in_tx:  # a local delete in the effect's transaction: nothing travels
            ok = w.broker.ack(d, worker=w.name)
        elif w.fires("ack_fail", d):
            w.stats.ack_failed += 1
            w.log(d, Outcome.ACK_FAILED, "the ACK never reached the queue")
            return False
        else:
            ok = w.broker.ack(d, worker=w.name)
            if w.fires("ack_answer_lost", d):  # deleted, but the answer never came back
                w.stats.ack_failed += 1
                w.log(d, Outcome.ACK_FAILED, "the queue deleted the message, but its answer"
                                              " never came back")
                return False
        if ok:
            w.stats.acked += 1
        else:
            w.stats.ack_rejected += 1
        return ok

    def extend(self, d: Delivery, seconds: float) -> bool:
        _check(d)
        return self._w.broker.extend(d, seconds, worker=self._w.name)

    def nack(self, d: Delivery, delay: float = 0.0) -> bool:
        _check(d)
        return self._w.broker.nack(d, delay, worker=self._w.name)

    def work(self, seconds: float) -> None:
        w = self._w
        if w.conn.in_transaction:
            raise SubmissionError("ops.work() inside a transaction (it would hold the"
                                  " database's write lock while working)")
        try:
            s = check_number("seconds", seconds, minimum=0, maximum=3600)
        except InvalidInput as exc:
            raise SubmissionError(f"ops.work(): {exc}") from None
        if w.task is None:
            raise SubmissionError("ops.work() outside the worker's own step")
        w.task.pause_until(w.clock.now() + s)  # the other workers run meanwhile
        self.work_left = max(0.0, round(self.work_left - s, 6))


def _check(d: Any) -> Delivery:
    if not isinstance(d, Delivery):
        raise SubmissionError(f"expected the delivery the worker received, got {d!r}")
    return d


def at_least_once(delivery: Delivery, ops: Ops) -> None:
    """The engine's default process: apply, then ack."""
    ops.apply(delivery)
    ops.ack(delivery)


class _Task:
    """One delivery's process, in a thread of its own so that it can pause in ``ops.work``
    while other workers run. Only one thread ever runs at a time: the scheduler hands over
    and waits until the task pauses or ends, so a run is as deterministic as a
    single-threaded one."""

    def __init__(self, body: Callable[[], None]) -> None:
        self._body = body
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._started = False
        self.resume_at = 0.0
        self.done = False
        self.cancelled = False
        self.error: BaseException | None = None

    def _main(self) -> None:
        self._go.acquire()
        try:
            self._body()
        except Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised in the scheduler's thread
            self.error = exc
        finally:
            self.done = True
            self._back.release()

    def resume(self) -> None:
        """Run the task until it pauses or ends (called by the scheduler)."""
        if not self._started:
            self._started = True
            self._thread.start()
        self._go.release()
        self._back.acquire()
        if self.done:
            self._thread.join()
            if self.error is not None:
                raise self.error

    def pause_until(self, t: float) -> None:
        """Hand control back until the clock reaches ``t`` (called in the task's thread)."""
        self.resume_at = t
        self._back.release()
        self._go.acquire()
        if self.cancelled:
            raise Stopped("the run ended while this delivery was still being worked on")

    def cancel(self) -> None:
        """End a paused task (the run is over): it unwinds from its ``ops.work``."""
        if self._started and not self.done:
            self.cancelled = True
            self.resume()


class CourseWorker(Worker):
    """An engine worker whose per-delivery steps are the submission's.

    Receives through the real queue (leases, receipts, max receives, dead letters), decides
    faults from the real fault schedule, logs every step to the delivery log, and counts
    an effect as *applied* only when the projection actually moved by the order's quantity,
    so the engine's checker judges what the code did, not what it meant to do."""

    conn: sqlite3.Connection  # a course lab's store (:class:`CourseLab`)

    def __init__(self, *args: Any, process: Callable[[Delivery, Ops], Any],
                 effect_handler: Callable[[sqlite3.Connection, Delivery], Any],
                 work: float | Callable[[Delivery], float] = 0.0,
                 meter: Meter | None = inventory_meter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.work = work
        self.meter = meter
        self.process = process
        self.effect_handler = effect_handler
        self.in_tx = False
        self.pending_crash = False
        self.task: _Task | None = None  # the delivery in hand, paused in ops.work
        self.errors: list[str] = []

    def effect(self, d: Delivery) -> None:
        """Run the handler under a savepoint and log one 'applied' row per effect it made,
        as the meter saw it (without a meter: one, whenever the handler returns)."""
        conn, meter = self.conn, self.meter
        before = meter(conn, d) if meter is not None else None
        conn.execute("SAVEPOINT effect")
        try:
            self.effect_handler(conn, d)
        except Exception:
            conn.execute("ROLLBACK TO effect")
            conn.execute("RELEASE effect")
            raise
        conn.execute("RELEASE effect")
        if meter is None or before is None:
            times = 1
        else:
            moved = (meter(conn, d) or 0.0) - before
            times = round(moved) if moved > 0 and abs(moved - round(moved)) < 1e-9 \
                else int(moved != 0)
        if times == 0:
            self.stats.duplicates_skipped += 1
            log_delivery(conn, d, at=self.clock.now(), worker=self.name,
                         outcome=Outcome.DUPLICATE_SKIPPED, detail="no change to the projection")
        for _ in range(times):
            self.stats.applied += 1
            log_delivery(conn, d, at=self.clock.now(), worker=self.name,
                         outcome=Outcome.APPLIED, detail="effect made")

    def step(self) -> int:
        """Go on with the delivery in hand once its work time has passed; with none in hand,
        receive one and start on it. Returns how many deliveries it moved forward."""
        if self.task is not None:
            if self.clock.now() + 1e-9 < self.task.resume_at:
                return 0
            self._resume()
            return 1
        deliveries = self.broker.receive(self.visibility_timeout, 1, worker=self.name)
        self.stats.steps += 1
        self.stats.dead_lettered += len(deliveries.parked)
        if not deliveries:
            return 0
        self.stats.received += 1
        d = deliveries[0]
        if self.fires("lose_message", d):
            self.broker.lose(d, reason="lost in transit (auto-ack)", worker=self.name)
            self.stats.lost += 1
            return 1
        self.task = _Task(lambda: self._process_one(d))
        self._resume()
        return 1

    def _resume(self) -> None:
        task = self.task
        assert task is not None
        try:
            task.resume()
        finally:
            if task.done:
                self.task = None

    def _process_one(self, d: Delivery) -> None:
        ops = Ops(self, d)
        try:
            self.process(d, ops)
        except Crashed as crash:
            self._rollback_open()
            self.crash([d], crash.point)
        except SubmissionError as exc:
            self._rollback_open()
            self._blame(d, f"SubmissionError: {exc}")
        except Raised as exc:  # the reader's code let a store error through (its SQL typo)
            self._rollback_open()
            self._blame(d, f"{type(exc).__name__}: {exc}")
        except STORE_ERRORS:
            raise
        except Exception as exc:  # the reader's code failed: its lease runs out, it retries
            self._rollback_open()
            self._blame(d, f"{type(exc).__name__}: {exc}")
        finally:
            self.in_tx = False
            self.pending_crash = False

    def _rollback_open(self) -> None:
        if self.conn.in_transaction:
            self.conn.rollback()

    def _blame(self, d: Delivery, error: str) -> None:
        where = f"{error} (delivery {d.delivery_count} of order {d.correlation_id})"
        if where not in self.errors:
            self.errors.append(where)
        self.log(d, Outcome.CRASHED, f"the code raised {error}")


@dataclass
class Run:
    """What :func:`run_workers` set up, to judge afterwards."""

    lab: CourseLab
    workers: list[CourseWorker] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        out: list[str] = []
        for w in self.workers:
            out.extend(e for e in w.errors if e not in out)
        return out


def run_workers(*, process: Callable[[Delivery, Ops], Any] = at_least_once,
                handler: Callable[[sqlite3.Connection, Delivery], Any] = apply_order_placed,
                seed: int, faults: Faults = NO_FAULTS, orders: int = 30, workers: int = 1,
                visibility_timeout: float = 2.0, max_receives: int = 5,
                work: float | Callable[[Delivery], float] = 0.0,
                meter: Meter | None = inventory_meter,
                mode: Mode | str = Mode.AT_LEAST_ONCE, max_steps: int = 20_000,
                ) -> tuple[Run, CheckResult]:
    """Place ``orders`` orders (from ``seed``) and let ``workers`` workers consume them with
    ``process`` (per delivery) and ``handler`` (the effect), interleaved on one fake clock,
    under ``faults``; then the engine's checker. Each delivery needs ``work`` seconds of
    ``ops.work`` before its effect (a number, or a function of the delivery). ``meter``
    reads how many times a delivery's effect is in the state, before and after the handler
    (default: the inventory projection; None counts every return of the handler as one
    effect). ``mode`` only labels the workers' runs."""
    for name, fn in (("process", process), ("handler", handler)):
        if not callable(fn):
            raise InvalidInput(name, fn, "a function")
    if meter is not None and not callable(meter):
        raise InvalidInput("meter", meter, "a function of (conn, delivery), or None")
    if not callable(work):
        check_number("work", work, minimum=0, maximum=3600)
    if not isinstance(faults, Faults):
        raise InvalidInput("faults", faults, "a deliverylab.engine.faults.Faults")
    check_int("orders", orders, minimum=0, maximum=10_000)
    check_int("workers", workers, minimum=1, maximum=16)
    check_int("max_steps", max_steps, minimum=1)
    lab = CourseLab(seed=seed, mode=mode, faults=faults, workers=1,
              visibility_timeout=visibility_timeout, max_receives=max_receives)
    crew = [CourseWorker(store=lab.store, clock=lab.clock, mode=lab.mode, faults=faults,
                         visibility_timeout=visibility_timeout, name=f"worker-{i + 1}",
                         broker=lab.broker, process=process, effect_handler=handler, work=work,
                         meter=meter)
            for i in range(workers)]
    lab.workers = list(crew)
    # The lab's clock in SQL, for a handler that stamps rows (an inbox's processed_at).
    lab.store.create_function("clock_now", 0, lab.clock.now, deterministic=False)
    lab.place_orders(orders)
    schedule(lab, crew, max_steps=max_steps)
    return Run(lab, crew), check(lab.store)


def schedule(lab: CourseLab, crew: list[CourseWorker], *, max_steps: int = 20_000) -> None:
    """Step the workers in turn on one clock until the queue is empty and nobody holds a
    delivery. When no one can move, the clock jumps to the next moment someone can: a
    paused worker's work is done, or a message becomes visible."""
    clock, queue = lab.clock, lab.broker
    try:
        for _ in range(max_steps):
            if sum(w.step() for w in crew):
                continue
            nxt = queue.next_visible_at()
            busy = [w.task.resume_at for w in crew if w.task is not None]
            if nxt is None and not busy:
                return
            later = [t for t in (*busy, nxt) if t is not None and t > clock.now()]
            if later:
                clock.sleep_until(min(later))
    finally:  # a submission that never finishes its work: no thread is left waiting
        for w in crew:
            if w.task is not None:
                w.task.cancel()
                w.task = None
                if w.conn.in_transaction:
                    w.conn.rollback()
