"""Chapter 4's exercises: running the lab.

The loop that drives the workers until the queue is really empty (a message that is leased or
waiting out a backoff is not visible, and not gone either); an inbox that still recognises an
event after an operator redrives its dead letter (the redrive sends a new message); and the
question a status page must answer, which orders' effects are really missing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from ..brokers.base import Delivery
from ..brokers.sqlite import Queue
from ..engine.check import event_states
from ..engine.clock import FakeClock
from ..engine.faults import Faults
from ..engine.worker import Worker, apply_order_placed
from .crew import course_lab, drain, errors_of, nemesis_handler
from .grader import (
    CourseLab,
    Exercise,
    SubmissionError,
    Trial,
    describe_faults,
    judge,
    order_trace,
    register,
)

# -- 4.1 run until idle --------------------------------------------------------------------
DRAIN_FAULTS = dict(ack_fail=0.3, process_error=0.2, crash_after_receive=0.1)
DRAIN_ORDERS = 20
DRAIN_WORKERS = 2
MAX_IDLE_STEPS = 200    # steps in a row that receive nothing while the clock stands still
MAX_STEPS = 20_000
MAX_CALLS = 200_000


def drain_solution(workers: list[Any], queue: Queue, clock: FakeClock) -> None:
    turn = 0
    idle = 0  # workers in a row that found nothing to do at this moment
    while True:
        got = workers[turn % len(workers)].step()
        turn += 1
        if got:
            idle = 0
            continue
        idle += 1
        if idle < len(workers):
            continue  # the others may still have something at this moment
        idle = 0
        nxt = queue.next_visible_at()
        if nxt is None:
            return  # nothing visible, nothing leased, nothing waiting out a backoff
        if nxt > clock.now():
            # Nothing visible yet: let the lease or the backoff run out, to the exact
            # moment (a lease may end at a fraction of a second).
            clock.sleep_until(nxt)


def drain_starter(workers: list[Any], queue: Queue, clock: FakeClock) -> None:
    """Run the ``workers`` (each has ``step()``, which returns how many deliveries it moved
    forward) until the queue is really empty: no message visible, leased or waiting out a
    retry's backoff. ``queue.next_visible_at()`` is when the next message becomes visible
    (None when there is none); ``clock.now()``, ``clock.sleep_until(t)`` and
    ``clock.advance(s)`` move the lab's time."""


def drain_until_nothing_visible(workers: list[Any], queue: Queue, clock: FakeClock) -> None:
    while sum(w.step() for w in workers):
        pass


def drain_without_time(workers: list[Any], queue: Queue, clock: FakeClock) -> None:
    while queue.next_visible_at() is not None:
        for w in workers:
            w.step()


def drain_with_patience(workers: list[Any], queue: Queue, clock: FakeClock) -> None:
    idle = 0
    while idle < 3:  # give up after a second and a half with nothing to do
        if sum(w.step() for w in workers):
            idle = 0
        else:
            idle += 1
            clock.advance(0.5)


class _Watched:
    """A worker as the reader's loop sees it: ``step()`` and ``name``. It counts the steps,
    and stops a loop that keeps stepping while the clock stands still."""

    def __init__(self, worker: Worker, guard: _Guard) -> None:
        self._worker, self._guard = worker, guard
        self.name = worker.name

    def step(self) -> int:
        got = self._worker.step()
        self._guard.stepped(got)
        return got

    def __repr__(self) -> str:
        return f"<worker {self.name}>"


class _WatchedQueue:
    """The queue as the reader's loop sees it: when the next message is visible, its depth."""

    def __init__(self, queue: Queue, guard: _Guard) -> None:
        self._queue, self._guard = queue, guard

    def next_visible_at(self) -> float | None:
        self._guard.called()
        return self._queue.next_visible_at()

    def depth(self) -> dict[str, int]:
        self._guard.called()
        return self._queue.depth()


class _WatchedClock:
    """The lab's fake clock as the reader's loop sees it."""

    def __init__(self, clock: FakeClock, guard: _Guard) -> None:
        self._clock, self._guard = clock, guard

    def now(self) -> float:
        self._guard.called()
        return self._clock.now()

    def advance(self, seconds: float) -> float:
        self._guard.called()
        return self._clock.advance(seconds)

    def sleep(self, seconds: float) -> None:
        self._guard.called()
        self._clock.sleep(seconds)

    def sleep_until(self, t: float) -> None:
        self._guard.called()
        self._clock.sleep_until(t)


class _Guard:
    """Stops a loop that would never end: one that steps with the clock standing still, or
    keeps calling the queue and the clock without the queue emptying."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.steps = 0
        self.calls = 0
        self.idle = 0
        self.idle_since = clock.now()

    def called(self) -> None:
        self.calls += 1
        if self.calls > MAX_CALLS:
            raise SubmissionError(f"more than {MAX_CALLS} calls to the queue and the clock:"
                                  " the loop never ended")

    def stepped(self, got: int) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise SubmissionError(f"more than {MAX_STEPS} steps: the loop never ended")
        if got or self.clock.now() != self.idle_since:
            self.idle, self.idle_since = 0, self.clock.now()
            return
        self.idle += 1
        if self.idle >= MAX_IDLE_STEPS:
            raise SubmissionError(
                f"{MAX_IDLE_STEPS} steps in a row received nothing at t={self.clock.now():g}"
                " and the clock never moved: nothing becomes visible until time passes")


DRAIN_GHOST_LEASE = 3.0  # the leases a crashed worker holds when the loop starts


def run_drain(drain_fn: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **DRAIN_FAULTS)
    lab = CourseLab(seed=seed, faults=faults, workers=DRAIN_WORKERS, max_receives=10)
    lab.place_orders(DRAIN_ORDERS)
    # One seed in five, a worker that crashed a moment ago still holds every message: nothing
    # is visible when the loop starts, and everything comes back when its leases run out.
    ghost = seed % 5 == 3
    if ghost:
        lab.broker.receive(DRAIN_GHOST_LEASE, DRAIN_ORDERS, worker="crashed-worker")
    guard = _Guard(lab.clock)
    errors: list[str] = []
    try:
        drain_fn([_Watched(w, guard) for w in lab.workers], _WatchedQueue(lab.broker, guard),
                 _WatchedClock(lab.clock, guard))
    except Exception as exc:  # the reader's loop: report it, judge what it left
        errors.append(f"{type(exc).__name__}: {exc}")
    extra = []
    left = [r[0] for r in lab.store.execute(
        "SELECT correlation_id FROM queue_messages ORDER BY seq")]
    if left and not errors:
        extra.append(f"your loop returned at t={lab.clock.now():g} with {len(left)} messages still"
                     " in the queue, none visible yet (leased, or waiting out a retry's"
                     " backoff)")
    where = describe_faults(faults, workers=DRAIN_WORKERS, orders=DRAIN_ORDERS,
                            extra="retries back off up to 10 s" + (
                                f"; at the start a crashed worker holds every message for"
                                f" {DRAIN_GHOST_LEASE:g} s" if ghost else ""))
    return judge(lab, seed=seed, faults=where, errors=errors, extra_failures=extra, focus=left)


register(Exercise(
    id="drain", chapter=4, title="Run until the queue is really empty",
    run=run_drain, solution=drain_solution, starter=drain_starter,
    params=("workers", "queue", "clock"),
    wrong=(("still in the queue", drain_until_nothing_visible),
           ("clock never moved", drain_without_time),
           ("still in the queue", drain_with_patience))))


# -- 4.2 an inbox that survives a redrive --------------------------------------------------
REDRIVE_ORDERS = 20
FLAKY = dict(ack_fail=0.7)
HEALED = dict(ack_fail=0.2)


REDRIVE_INTERLEAVE = 0.3     # a peer consumer runs the same event between two statements
REDRIVE_STORE_FAILURE = 0.1  # before the redrive: a write fails (locked, full, constraint)


def redrive_inbox_solution(conn: sqlite3.Connection, delivery: Delivery) -> None:
    # Key the inbox by what names the event, not the message: the event id is the same in
    # every message that carries the event, a redriven one too, while the redrive gives
    # the message a new id and every receive a new receipt.
    fresh = conn.execute(
        "INSERT INTO inbox_processed (consumer, event_id, processed_at)"
        " VALUES ('inventory', ?, clock_now())"
        " ON CONFLICT (consumer, event_id) DO NOTHING",
        (delivery.event_id,)).rowcount
    # Only a repeat (no row written) skips the effect; any other failure of the INSERT
    # propagates, and the delivery comes again.
    if fresh:
        apply_order_placed(conn, delivery)


def redrive_inbox_starter(conn: sqlite3.Connection, delivery: Delivery) -> None:
    """Make the order's effect (``apply_order_placed(conn, delivery)``) once per order, even
    after an operator redrives dead letters whose effect was already made. Runs inside the
    worker's transaction; the inbox table is ``inbox_processed(consumer, event_id,
    processed_at)``."""


def inbox_by_message_id(conn: sqlite3.Connection, delivery: Delivery) -> None:
    if conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                    " VALUES ('inventory', ?, clock_now()) ON CONFLICT DO NOTHING",
                    (delivery.message_id,)).rowcount:
        apply_order_placed(conn, delivery)


def inbox_by_receipt(conn: sqlite3.Connection, delivery: Delivery) -> None:
    if conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                    " VALUES ('inventory', ?, clock_now()) ON CONFLICT DO NOTHING",
                    (delivery.receipt,)).rowcount:
        apply_order_placed(conn, delivery)


def run_redrive_inbox(handler: Callable[..., Any], seed: int) -> Trial:
    flaky = Faults(seed=seed, **FLAKY)
    healing = {"done": False}
    broken = nemesis_handler(handler, flaky, interleave=REDRIVE_INTERLEAVE,
                             store_failure=REDRIVE_STORE_FAILURE)
    mended = nemesis_handler(handler, flaky, interleave=REDRIVE_INTERLEAVE)

    def hostile(conn: sqlite3.Connection, delivery: Delivery) -> Any:
        return (mended if healing["done"] else broken)(conn, delivery)

    lab = course_lab(seed=seed, faults=flaky, workers=2, max_receives=3, handler=hostile)
    lab.place_orders(REDRIVE_ORDERS)
    drain(lab)  # most ACKs lost: many messages use up their receives, applied or not
    parked = lab.store.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    lab.broker.redrive()  # the operator moves every dead letter back to the queue
    healing["done"] = True
    healed = Faults(seed=seed, **HEALED)
    for w in lab.workers:
        w.faults = healed
    drain(lab)
    where = describe_faults(flaky, workers=2, orders=REDRIVE_ORDERS,
                            extra=f"a peer between statements {REDRIVE_INTERLEAVE:g}, store"
                                  f" failures {REDRIVE_STORE_FAILURE:g} per write; 3 receives,"
                                  f" then {parked} dead letters redriven"
                                  f" (ack_fail={HEALED['ack_fail']:g} afterwards)")
    return judge(lab, seed=seed, faults=where, errors=errors_of(lab))


register(Exercise(
    id="redrive-inbox", chapter=4, title="An inbox that survives a redrive",
    run=run_redrive_inbox, solution=redrive_inbox_solution, starter=redrive_inbox_starter,
    params=("conn", "delivery"),
    wrong=(("duplicated", inbox_by_message_id), ("duplicated", inbox_by_receipt))))


# -- 4.3 which orders are really missing ---------------------------------------------------
MISSING_FAULTS = dict(ack_fail=0.7, process_error=0.4, lose_message=0.05)
MISSING_ORDERS = 20
MISSING_LATE = 5


def missing_solution(conn: sqlite3.Connection) -> set[str]:
    # Missing: not in the inbox (never applied) and not in the queue (nothing left to apply
    # it: no message visible, leased to a worker mid-delivery, or waiting out a backoff).
    # A dead letter whose event is in the inbox was only never acknowledged; an order whose
    # message is still queued may yet be applied.
    rows = conn.execute(
        "SELECT o.order_id FROM orders AS o"
        " WHERE NOT EXISTS (SELECT 1 FROM inbox_processed AS i"
        "                    WHERE i.consumer = 'inventory'"
        "                      AND i.event_id = o.event_id)"
        "   AND NOT EXISTS (SELECT 1 FROM queue_messages AS q"
        "                    WHERE q.event_id = o.event_id)"
        " ORDER BY o.order_id")
    return {order_id for (order_id,) in rows}


def missing_starter(conn: sqlite3.Connection) -> set[str]:
    """The ids of the orders whose effect is really missing: never applied, with nothing
    left that could still apply it, read from the database of a run stopped at any moment
    (tables ``orders``, ``inbox_processed``, ``queue_messages``, ``dead_letters``)."""


def missing_dead_letters(conn: sqlite3.Connection) -> set[str]:
    return {order_id for (order_id,) in conn.execute(
        "SELECT correlation_id FROM dead_letters")}


def missing_not_in_inbox(conn: sqlite3.Connection) -> set[str]:
    return {order_id for (order_id,) in conn.execute(
        "SELECT order_id FROM orders WHERE event_id NOT IN"
        " (SELECT event_id FROM inbox_processed)")}


def missing_dead_letters_with_error(conn: sqlite3.Connection) -> set[str]:
    # "A dead letter that failed is missing; one that only lost its ACKs is not."
    return {order_id for (order_id,) in conn.execute(
        "SELECT correlation_id FROM dead_letters WHERE last_error NOT LIKE '%last error: none'")}


def run_missing(missing: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **MISSING_FAULTS)
    lab = CourseLab(seed=seed, faults=faults, workers=2, max_receives=3)
    lab.place_orders(MISSING_ORDERS)
    lab.run_until_idle()
    lab.place_orders(MISSING_LATE)
    for _ in range(seed % 4):  # stopped mid-run: the last orders' events are still on their way
        lab.step()
    truth = {o: s for o, *_, s in event_states(lab.store)}
    errors: list[str] = []
    try:
        said = missing(lab.store)
        said = {str(o) for o in said}
    except Exception as exc:  # the reader's code: report it
        errors.append(f"{type(exc).__name__}: {exc}")
        said = set()
    really = {o for o, s in truth.items() if s in ("lost", "dead_lettered")}
    missed = tuple(sorted(really - said))
    alarms = sorted(said - really)
    where = describe_faults(faults, workers=2, orders=MISSING_ORDERS + MISSING_LATE,
                            extra=f"3 receives; stopped with the last {MISSING_LATE} orders"
                                  " on their way")
    reasons = [f"your code raised {e}" for e in errors]
    if missed:
        reasons.append(f"{len(missed)} of {len(really)} missing orders not reported")
    if alarms:
        kinds: dict[str, int] = {}
        for o in alarms:
            kinds[truth.get(o, "unknown")] = kinds.get(truth.get(o, "unknown"), 0) + 1
        named = {"correct": "already applied (only never acknowledged)",
                 "duplicated": "already applied", "pending": "still in the queue",
                 "unknown": "not an order id"}
        reasons.append(f"{len(alarms)} orders reported missing that are not: "
                       + ", ".join(f"{n} {named.get(k, k)}" for k, n in sorted(kinds.items()))
                       + f" (for example {alarms[0]})")
    if not reasons:
        return Trial(seed=seed, faults=where, passed=True, reason="")
    focus = (missed or tuple(alarms) or ("",))[0]
    return Trial(seed=seed, faults=where, passed=False, reason="; ".join(reasons),
                 lost=missed, trace=order_trace(lab.store, focus) if focus else "")


register(Exercise(
    id="really-missing", chapter=4, title="Which orders are really missing?",
    run=run_missing, solution=missing_solution, starter=missing_starter,
    params=("conn",),
    wrong=(("already applied", missing_dead_letters), ("still in the queue", missing_not_in_inbox),
           ("already applied", missing_dead_letters_with_error))))
