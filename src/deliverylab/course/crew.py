"""Building blocks shared by chapters 4 to 6's exercises.

:func:`~deliverylab.course.grader.run_workers` places orders and runs until idle in one go.
The later chapters' exercises need the steps in between (lose messages, leave events in
flight, repair while a worker holds one, redrive the dead letters), so here the same
:class:`~deliverylab.course.grader.CourseWorker` crew is set up without running it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from ..book.lab import Lab
from ..brokers.base import Delivery
from ..engine.check import projection_vs_truth
from ..engine.clock import Clock
from ..engine.errors import InvalidInput, check_int
from ..engine.faults import NO_FAULTS, Faults
from ..engine.trace import Outcome, log_many
from ..engine.worker import CONSUMER, Mode, apply_order_placed
from .grader import CourseWorker, Ops, at_least_once, schedule

Handler = Callable[[sqlite3.Connection, Delivery], Any]


def inbox_consumer(clock: Clock) -> Handler:
    """The engine's idempotent consumer as a handler: the inbox row, then the effect only if
    that row is new (both inside the worker's transaction)."""

    def handle(conn: sqlite3.Connection, delivery: Delivery) -> None:
        if conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                        " VALUES (?, ?, ?) ON CONFLICT (consumer, event_id) DO NOTHING",
                        (CONSUMER, delivery.event_id, clock.now())).rowcount:
            apply_order_placed(conn, delivery)

    return handle


def course_lab(*, seed: int, handler: Handler | None = None, faults: Faults = NO_FAULTS,
               workers: int = 2, max_receives: int = 5, visibility_timeout: float = 2.0,
               process: Callable[[Delivery, Ops], Any] = at_least_once,
               mode: Mode | str = Mode.IDEMPOTENT) -> Lab:
    """A lab whose ``workers`` are :class:`CourseWorker` objects running ``process`` with
    ``handler`` (default: :func:`inbox_consumer`) under ``faults``, interleaved on one fake
    clock. Nothing is placed or run yet."""
    for name, fn in (("handler", handler), ("process", process)):
        if fn is not None and not callable(fn):
            raise InvalidInput(name, fn, "a function")
    lab = Lab(seed=seed, mode=mode, faults=faults, visibility_timeout=visibility_timeout,
              max_receives=max_receives)
    lab.workers = crew(lab, handler or inbox_consumer(lab.clock), faults=faults,
                       workers=workers, process=process)
    # The lab's clock in SQL, for a handler that stamps rows (an inbox's processed_at).
    lab.conn.create_function("clock_now", 0, lab.clock.now, deterministic=False)
    return lab


def drain(lab: Lab) -> None:
    """Run the lab's course workers until the queue is empty and nobody holds a delivery."""
    schedule(lab, lab.workers)


def crew(lab: Lab, handler: Handler, *, faults: Faults = NO_FAULTS, workers: int = 1,
         process: Callable[[Delivery, Ops], Any] = at_least_once,
         first: int = 1) -> list[CourseWorker]:
    """``workers`` course workers on ``lab``'s queue and clock, each the others' peer."""
    if not isinstance(lab, Lab):
        raise InvalidInput("lab", lab, "a deliverylab.book.lab.Lab")
    check_int("workers", workers, minimum=1, maximum=16)
    check_int("first", first, minimum=1)
    team = [CourseWorker(lab.conn, clock=lab.clock, ids=lab.ids, mode=lab.mode, faults=faults,
                         visibility_timeout=lab.workers[0].visibility_timeout,
                         name=f"worker-{first + i}", queue=lab.queue, process=process,
                         effect_handler=handler)
            for i in range(workers)]
    for w in team:
        w.peers = team
    return team


def holding(action: Callable[[], Any], then: Callable[[Delivery, Ops], Any] = at_least_once,
            ) -> Callable[[Delivery, Ops], None]:
    """A process that runs ``action`` while it holds the delivery it received (leased, not
    applied yet), then goes on with ``then``: something else happening mid-flight."""

    def process(delivery: Delivery, ops: Ops) -> None:
        action()
        then(delivery, ops)

    return process


def hold_one_while(lab: Lab, handler: Handler, action: Callable[[], Any], *,
                   faults: Faults = NO_FAULTS,
                   process: Callable[[Delivery, Ops], Any] = at_least_once) -> list[str]:
    """One more worker receives a message and holds it while ``action`` runs; ``action`` runs
    anyway if that worker got nothing to hold. Returns that worker's errors."""
    done: list[bool] = []

    def once() -> None:
        done.append(True)
        action()

    holder = crew(lab, handler, faults=faults, process=holding(once, process),
                  first=len(lab.workers) + 1)[0]
    holder.step()
    if not done:
        action()
    return holder.errors


def log_counted(conn: sqlite3.Connection, orders: list[tuple[str, str]], *, at: float,
                detail: str) -> None:
    """Record that a rebuild counted these (order_id, event_id): the checker then counts the
    rebuild as each order's one application and any later effect as a second one."""
    log_many(conn, [(at, "reconcile", order_id, event_id, None, 0, Outcome.RECONCILED, detail)
                    for order_id, event_id in orders])


def drift_text(conn: sqlite3.Connection, items: list[str] | None = None) -> str:
    """``"coffee-beans truth 7, projection 6; …"`` for the items whose projection is off."""
    rows = [r for r in projection_vs_truth(conn)
            if r[3] != 0 and (items is None or r[0] in items)]
    return "; ".join(f"{item} truth {truth}, projection {proj}" for item, truth, proj, _ in rows)


def errors_of(lab: Lab) -> list[str]:
    out: list[str] = []
    for w in lab.workers:
        out.extend(e for e in getattr(w, "errors", []) if e not in out)
    return out


def call(errors: list[str], fn: Callable[..., Any], *args: Any) -> bool:
    """Call the reader's ``fn``; on an exception note it (once), roll back what it left open
    and return False."""
    conn = next((a for a in args if isinstance(a, sqlite3.Connection)), None)
    try:
        fn(*args)
    except Exception as exc:  # the reader's code: report it, keep grading
        text = f"{type(exc).__name__}: {exc}"
        if text not in errors:
            errors.append(text)
        if conn is not None and conn.in_transaction:
            conn.rollback()
        return False
    if conn is not None and conn.in_transaction:
        conn.rollback()
        text = "your function left a transaction open (it was rolled back)"
        if text not in errors:
            errors.append(text)
        return False
    return True
