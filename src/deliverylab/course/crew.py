"""Building blocks shared by the chapters' exercises, and the nemesis they run under.

:func:`~deliverylab.course.grader.run_workers` places orders and runs until idle in one go.
The later chapters' exercises need the steps in between (lose messages, leave events in
flight, repair while a worker holds one, redrive the dead letters), so here the same
:class:`~deliverylab.course.grader.CourseWorker` crew is set up without running it.

The nemesis (in the spirit of Jepsen's): a peer consumer between any two statements of a
handler (:func:`nemesis_handler`), workers of every mode between any two statements of a
job (:func:`workers_between`, :func:`rivals`), writes that fail for a reason other than a
repeat (:data:`STORE_FAILURES`), stalls of about one lease between two verbs of a
process, and renewals that take a moment to reach the queue (:func:`pausing_process`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from ..brokers.base import Delivery
from ..engine.check import projection_vs_truth
from ..engine.clock import Clock
from ..engine.errors import InvalidInput, check_int, check_number
from ..engine.faults import NO_FAULTS, Faults
from ..engine.settings import DEFAULT_MAX_RECEIVES
from ..engine.trace import Outcome, log_many
from ..engine.worker import CONSUMER, Mode, Worker, apply_order_placed
from .grader import CourseLab, CourseWorker, Ops, at_least_once, schedule

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
               workers: int = 2, max_receives: int = DEFAULT_MAX_RECEIVES,
               visibility_timeout: float = 2.0,
               process: Callable[[Delivery, Ops], Any] = at_least_once,
               mode: Mode | str = Mode.IDEMPOTENT) -> CourseLab:
    """A lab whose ``workers`` are :class:`CourseWorker` objects running ``process`` with
    ``handler`` (default: :func:`inbox_consumer`) under ``faults``, interleaved on one fake
    clock. Nothing is placed or run yet."""
    for name, fn in (("handler", handler), ("process", process)):
        if fn is not None and not callable(fn):
            raise InvalidInput(name, fn, "a function")
    lab = CourseLab(seed=seed, mode=mode, faults=faults, visibility_timeout=visibility_timeout,
              max_receives=max_receives)
    lab.workers = list(crew(lab, handler or inbox_consumer(lab.clock), faults=faults,
                            workers=workers, process=process))
    # The lab's clock in SQL, for a handler that stamps rows (an inbox's processed_at).
    lab.store.create_function("clock_now", 0, lab.clock.now, deterministic=False)
    return lab


def drain(lab: CourseLab) -> None:
    """Run the lab's course workers until the queue is empty and nobody holds a delivery."""
    schedule(lab, course_workers(lab))


def course_workers(lab: CourseLab) -> list[CourseWorker]:
    """The workers of a lab that :func:`course_lab` made: course workers, every one."""
    team = [w for w in lab.workers if isinstance(w, CourseWorker)]
    if len(team) != len(lab.workers):
        raise InvalidInput("lab", lab, "a lab of course workers (deliverylab.course.crew"
                                       ".course_lab)")
    return team


def crew(lab: CourseLab, handler: Handler, *, faults: Faults = NO_FAULTS, workers: int = 1,
         process: Callable[[Delivery, Ops], Any] = at_least_once,
         first: int = 1) -> list[CourseWorker]:
    """``workers`` course workers on ``lab``'s queue and clock."""
    if not isinstance(lab, CourseLab):
        raise InvalidInput("lab", lab, "a deliverylab.course.grader.CourseLab")
    check_int("workers", workers, minimum=1, maximum=16)
    check_int("first", first, minimum=1)
    team = [CourseWorker(store=lab.store, clock=lab.clock, mode=lab.mode, faults=faults,
                         visibility_timeout=lab.workers[0].visibility_timeout,
                         name=f"worker-{first + i}", broker=lab.broker, process=process,
                         effect_handler=handler)
            for i in range(workers)]
    return team


def holding(action: Callable[[], Any], then: Callable[[Delivery, Ops], Any] = at_least_once,
            ) -> Callable[[Delivery, Ops], None]:
    """A process that runs ``action`` while it holds the delivery it received (leased, not
    applied yet), then goes on with ``then``: something else happening mid-flight."""

    def process(delivery: Delivery, ops: Ops) -> None:
        action()
        then(delivery, ops)

    return process


def hold_one_while(lab: CourseLab, handler: Handler, action: Callable[[], Any], *,
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


def errors_of(lab: CourseLab) -> list[str]:
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


# -- the nemesis ---------------------------------------------------------------------------
# What real systems do to a handler between, and instead of, its statements (in the spirit
# of Jepsen's nemesis). Each is decided by the run's seeded Faults, per event, delivery and
# statement, so a run is a function of (submission, seed).

# Failures of a write that are not a repeat: never a reason to call an event "processed".
STORE_FAILURES: tuple[tuple[type[sqlite3.Error], str], ...] = (
    (sqlite3.OperationalError, "database is locked"),
    (sqlite3.OperationalError, "database or disk is full"),
    (sqlite3.IntegrityError, "CHECK constraint failed: qty > 0"),
    (sqlite3.IntegrityError, "FOREIGN KEY constraint failed"),
)
STORE_FAILED = "store_failed"  # the point a propagated store failure is logged at
WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "UPSERT")


class HookedConnection:
    """A connection as the submission sees it: every ``execute`` first calls
    ``before(sql, n)`` (``n``: how many statements the submission ran before this one), then
    runs on the real connection. Everything else is the real connection's. The sandbox
    hands it to a submission as it hands a connection (``connection_view``): under the same
    guard, with COMMIT and ROLLBACK refused inside the worker's transaction."""

    connection_view = True

    def __init__(self, conn: sqlite3.Connection,
                 before: Callable[[str, int], None]) -> None:
        self._conn, self._before = conn, before
        self.statements = 0

    @property
    def connection(self) -> sqlite3.Connection:
        return self._conn

    def before_statement(self, sql: Any) -> None:
        self._next(sql)

    def _next(self, sql: Any) -> None:
        n = self.statements
        self.statements += 1
        self._before(sql if isinstance(sql, str) else "", n)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._next(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._next(sql)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def is_write(sql: str) -> bool:
    """Whether ``sql`` writes (its first keyword, or a WITH … INSERT/UPDATE/DELETE)."""
    words = sql.lstrip().upper().split(None, 1)
    if not words:
        return False
    if words[0] == "WITH":
        return any(f" {w} " in f" {sql.upper()} " for w in WRITES[:3])
    return words[0] in WRITES


def inbox_rival(conn: sqlite3.Connection, delivery: Delivery) -> None:
    """Another worker of the same consumer handling a duplicate of ``delivery`` (its lease
    ran out, or the broker delivered it twice) and committing before the submission's next
    statement, as on PostgreSQL at READ COMMITTED: the inbox row, then the effect if new."""
    if conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                    " VALUES (?, ?, clock_now()) ON CONFLICT (consumer, event_id) DO NOTHING",
                    (CONSUMER, delivery.event_id)).rowcount:
        apply_order_placed(conn, delivery)


def nemesis_handler(handler: Handler, faults: Faults, *, interleave: float = 0.0,
                    store_failure: float = 0.0,
                    rival: Handler = inbox_rival) -> Handler:
    """``handler`` under two nemeses, each at its rate per statement:

    * **interleaving**: before any statement but the first, ``rival`` (by default a peer
      consumer running the same event through the inbox) runs and commits, so a check made
      by an earlier statement may no longer hold;
    * **store failure**: a write fails with one of :data:`STORE_FAILURES` instead of running.
      A handler that lets it propagate rolls its transaction back and the delivery comes
      again (logged ``crashed`` at ``store_failed``); one that swallows it acknowledges a
      delivery whose effect never happened.

    A unique violation that a rival caused (its row won) aborts the submission's work as on a
    real database, and the rival's commit stands; the submission is not blamed for it.
    """
    from .grader import Crashed

    if not callable(handler) or not callable(rival):
        raise InvalidInput("handler", handler, "a function of (conn, delivery)")
    for name, rate in (("interleave", interleave), ("store_failure", store_failure)):
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 <= rate <= 1:
            raise InvalidInput(name, rate, "a rate from 0 to 1")

    def handle(conn: sqlite3.Connection, delivery: Delivery) -> Any:
        injected: list[BaseException] = []
        rivals: list[int] = []

        def before(sql: str, n: int) -> None:
            key = (delivery.event_id, delivery.delivery_count, n)
            if store_failure and is_write(sql) \
                    and faults.uniform("store_failure", *key) < store_failure:
                kind, text = STORE_FAILURES[int(faults.uniform("store_failure_kind", *key)
                                                * len(STORE_FAILURES))]
                injected.append(kind(text))
                raise injected[-1]
            if n and interleave and faults.uniform("interleave", *key) < interleave:
                rivals.append(n)
                rival(conn, delivery)

        _savepoint(conn, "SAVEPOINT nemesis")
        try:
            # The hooked connection passes every verb through to the real one.
            out = handler(cast(sqlite3.Connection, HookedConnection(conn, before)), delivery)
        except Exception as exc:
            _savepoint(conn, "ROLLBACK TO nemesis", "RELEASE nemesis")
            # Matched by text along the chain: the exception may come back re-raised (by
            # the submission, or from another process) as a different object.
            texts = _chain_texts(exc)
            cause = next((str(i) for i in injected if any(str(i) in t for t in texts)), None)
            if cause is not None:
                raise Crashed(f"{STORE_FAILED} ({cause}): rolled back") from None
            if rivals and any("UNIQUE constraint failed" in t for t in texts):
                # The peer's row won: the database aborts this transaction and the peer's
                # commit stands, as on a real database. Its work is all that remains.
                rival(conn, delivery)
                return None
            raise
        _savepoint(conn, "RELEASE nemesis")
        return out

    return handle


def _savepoint(conn: sqlite3.Connection, *statements: str) -> None:
    """Run savepoint statements, unless the submission already ended the transaction."""
    for sql in statements:
        try:
            conn.execute(sql)
        except sqlite3.OperationalError:
            return


def _chain_texts(exc: BaseException | None) -> list[str]:
    """The text of ``exc`` and of every exception it was raised from or during."""
    out: list[str] = []
    while exc is not None and len(out) < 20:
        out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return out


def pausing_process(process: Callable[[Delivery, Ops], Any], faults: Faults, *,
                    pause: float = 0.0, lease: float = 2.0,
                    latency: tuple[float, float] = (0.0, 0.0),
                    ) -> Callable[[Delivery, Ops], Any]:
    """``process`` whose deliveries may stall between two of its queue or store verbs
    (``apply``, ``ack``, ``extend``, ``nack``, the start of a ``transaction``), with the other
    workers running meanwhile: a GC
    pause, a slow disk, a preempted VM. At rate ``pause`` per verb (never the first one,
    never inside a transaction, only once the work is done) the delivery waits for a seeded
    share of ``lease``: a third of the time exactly the lease, otherwise a little less or a
    little more.

    ``latency`` (seconds, low and high) is how long a renewal takes to reach the queue: each
    ``extend`` made outside a transaction arrives a seeded time in that range after it is
    sent (work does not go on meanwhile, the other workers run). A heartbeat that renews
    only when its lease is up then renews a lease already gone, and an idle peer has taken
    the message in between."""
    check_number("pause", pause, minimum=0, maximum=1)
    check_number("lease", lease, minimum=0.001, maximum=3600)
    if not isinstance(latency, tuple) or len(latency) != 2:
        raise InvalidInput("latency", latency, "a (low, high) pair of seconds")
    lo = check_number("latency", latency[0], minimum=0, maximum=lease)
    hi = check_number("latency", latency[1], minimum=lo, maximum=lease)

    def run(delivery: Delivery, ops: Ops) -> Any:
        return process(delivery, cast(Ops, PausingOps(ops, delivery, faults, pause, lease,
                                                      (lo, hi))))

    return run


class PausingOps:
    """The :class:`~deliverylab.course.grader.Ops` a :func:`pausing_process` hands on: the
    same verbs, with a seeded stall before some of them."""

    def __init__(self, ops: Ops, delivery: Delivery, faults: Faults, rate: float,
                 lease: float, latency: tuple[float, float] = (0.0, 0.0)) -> None:
        self._ops, self._d, self._faults, self._rate, self._lease = (
            ops, delivery, faults, rate, lease)
        self._latency = latency
        self._verbs = 0
        self._extends = 0
        self._in_tx = False
        self.Rollback = ops.Rollback
        self.visibility_timeout = ops.visibility_timeout

    @property
    def work_left(self) -> float:
        return self._ops.work_left

    def _stall(self) -> None:
        n = self._verbs
        self._verbs += 1
        if not n or self._in_tx or self._ops.work_left > 1e-9:
            return
        key = (self._d.event_id, self._d.delivery_count, n)
        if self._faults.uniform("pause", *key) >= self._rate:
            return
        u = self._faults.uniform("pause_length", *key)
        length = self._lease if u < 1 / 3 else self._lease * (0.9 + 0.2 * u)
        self._ops.work(round(length, 6))  # work_left is 0: only time passes, others run

    def now(self) -> float:
        return self._ops.now()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._stall()  # between a check made before it and its BEGIN
        with self._ops.transaction():
            self._in_tx = True
            try:
                yield
            finally:
                self._in_tx = False

    def work(self, seconds: float) -> None:
        self._ops.work(seconds)

    def apply(self, d: Delivery) -> None:
        self._stall()
        self._ops.apply(d)

    def ack(self, d: Delivery) -> bool:
        self._stall()
        return self._ops.ack(d)

    def extend(self, d: Delivery, seconds: float) -> bool:
        self._stall()
        self._travel()
        return self._ops.extend(d, seconds)

    def _travel(self) -> None:
        """The renewal on its way to the queue: time passes, no work is done."""
        lo, hi = self._latency
        if hi <= 0 or self._in_tx:
            return
        self._extends += 1
        u = self._faults.uniform("latency", self._d.event_id, self._d.delivery_count,
                                 self._extends)
        left = self._ops.work_left
        self._ops.work(round(lo + (hi - lo) * u, 6))  # the other workers run meanwhile
        self._ops.work_left = left

    def nack(self, d: Delivery, delay: float = 0.0) -> bool:
        self._stall()
        return self._ops.nack(d, delay)


def rivals(lab: CourseLab, *, faults: Faults = NO_FAULTS,
           modes: tuple[Mode | str, ...] = tuple(Mode)) -> list[Worker]:
    """One engine worker per mode (at-most-once and at-least-once included) on ``lab``'s
    store, queue and clock: the other consumers a submission shares the queue with."""
    if not isinstance(lab, CourseLab):
        raise InvalidInput("lab", lab, "a deliverylab.course.grader.CourseLab")
    return [Worker(store=lab.store, clock=lab.clock, mode=Mode.parse(mode),
                   faults=faults, visibility_timeout=lab.workers[0].visibility_timeout,
                   broker=lab.broker, name=f"rival-{Mode.parse(mode).value}")
            for mode in modes]


def workers_between(conn: sqlite3.Connection, workers: list[Any], faults: Faults, *,
                    rate: float = 1.0, key: str = "") -> HookedConnection:
    """``conn`` as a submission (a repair, a nightly job) sees it: before any statement but
    the first, at ``rate`` per statement, each of ``workers`` takes one step, whenever the
    submission holds no open transaction (on a real database a worker would wait for its
    commit). A job split over two transactions, or a check made in one transaction and
    acted on in the next, is then raced as it would be in production."""
    check_number("rate", rate, minimum=0, maximum=1)
    if not isinstance(workers, list) or not all(hasattr(w, "step") for w in workers):
        raise InvalidInput("workers", workers, "a list of workers (each with step())")

    def before(sql: str, n: int) -> None:
        if n and not conn.in_transaction and faults.uniform("between", key, n) < rate:
            for w in workers:
                w.step()

    return HookedConnection(conn, before)
