"""Chapter 5's exercises: repair what delivery lost, without counting anything twice.

Each run is the chapter's situation: some messages were lost, others are still in flight
(waiting in the queue, or held by a worker between its receive and its commit) when the repair
runs, and workers keep consuming afterwards. The engine's workers read the repair's fence,
``reconciled_events``, inside their effect's transaction, whatever their mode: one whose
effect and ACK share a transaction never reads the inbox, so a fence written to the inbox does
not stop it. A repair's design is the reader's: it may count every order and fence them all,
count only what no worker can still apply and fence that, or add only what was never applied.
What it fenced is what it counted: the grader records those orders as counted by the repair, so
the engine's checker sees an event that still takes effect afterwards as that order's second
application. The repair works in batches: no transaction of it may write more than
:data:`BATCH` rows (what ``total_changes`` counts), so that the workers commit between its
batches instead of waiting for the whole repair. Once the queue is quiet the outcome is judged: the projection equals the truth
(an item that does has every order's effect once, whatever the log says), and a repair run
twice in a row changes nothing the second time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from ..book.lab import ITEMS
from ..book.toolkit import WhileWorking
from ..brokers.base import Delivery
from ..engine import reconcile
from ..engine.check import event_states, projection_vs_truth
from ..engine.faults import Faults
from ..engine.store import transaction
from ..engine.worker import Mode, Worker, apply_order_placed
from .crew import course_lab, drain, drift_text, errors_of, hold_one_while, log_counted
from .grader import CourseLab, Exercise, Ops, Trial, describe_faults, judge, order_trace, register

# The workers' faults: each mode gets the ones that strike it.
FAULTS = {Mode.IDEMPOTENT: dict(ack_fail=0.3, ack_answer_lost=0.1, crash_after_receive=0.1,
                              crash_after_commit=0.05),
          Mode.TRANSACTIONAL: dict(crash_after_receive=0.2)}
WORKERS = 2
# The repair's lock budget: the rows one of its transactions may write (insert, update or
# delete, as the connection's total_changes counts them). SQLite has one writer: while the
# repair holds the lock, every worker waits.
BATCH = 8
RUSH = 9      # the orders of the rush on one item: more than one batch of the budget fences
ARRIVALS = 4  # one order placed every ARRIVALS gaps between the repair's statements


def _mode(seed: int) -> Mode:
    """Even seeds: idempotent workers (an inbox); odd seeds: transactional ones (effect and
    ACK in one transaction, no inbox)."""
    return Mode.IDEMPOTENT if seed % 2 == 0 else Mode.TRANSACTIONAL


def _lab(seed: int) -> tuple[CourseLab, Faults, str]:
    mode = _mode(seed)
    faults = Faults(seed=seed, **FAULTS[mode])
    lab = CourseLab(seed=seed, mode=mode, faults=faults, workers=WORKERS)
    return lab, faults, f"{mode} workers on this seed (idempotent on even seeds, transactional" \
                        " on odd ones)"


def _hold_while(lab: CourseLab, faults: Faults, action: Callable[[], Any], *,
                mode: Mode | None = None) -> None:
    """One more worker (of the lab's mode, or ``mode``) receives a message and runs ``action``
    while it holds it (between its receive and its commit); ``action`` runs anyway if it got
    nothing."""
    clock = WhileWorking(lab.clock, action)
    mode = lab.mode if mode is None else mode
    Worker(store=lab.store, clock=clock, broker=lab.broker, mode=mode,
           faults=faults if mode is lab.mode else Faults(seed=lab.seed),
           name=f"worker-{len(lab.workers) + 1}", work_time=lab.tick / 2).step()
    if clock.action is not None:
        clock.action = None
        action()


def _orders(conn: sqlite3.Connection, item: str | None = None) -> list[tuple[str, str]]:
    sql = "SELECT order_id, event_id FROM orders"
    args: tuple[Any, ...] = ()
    if item is not None:
        sql += " WHERE item_id = ?"
        args = (item,)
    return [tuple(r) for r in conn.execute(sql + " ORDER BY created_at, order_id", args)]


def _wrong_items(conn: sqlite3.Connection, items: list[str] | None = None) -> list[str]:
    return [r[0] for r in projection_vs_truth(conn)
            if r[3] != 0 and (items is None or r[0] in items)]


def _orders_of(conn: sqlite3.Connection, items: list[str]) -> tuple[str, ...]:
    marks = ", ".join("?" * len(items))
    return tuple(r[0] for r in conn.execute(
        f"SELECT order_id FROM orders WHERE item_id IN ({marks})"
        " ORDER BY created_at, order_id", items))


def _applications(conn: sqlite3.Connection, order_id: str) -> int:
    return next(n for o, *_, n, _ in event_states(conn) if o == order_id)


# -- the repair's connection, shared with the workers -------------------------------------
class Interleaved:
    """The connection a repair gets: the lab's own, with the rest of the system in between.

    Before each statement the repair runs *outside* a transaction, the next worker of the
    crew takes one whole step: nothing holds the write lock then, so in a real deployment any
    worker could commit there. Inside a transaction nobody can (``BEGIN IMMEDIATE`` took the
    lock). A repair split over two transactions, run with none, or that reads first and writes
    later, meets a worker's commit in the gap. ``lock_at`` makes that statement (counted from 0,
    ``BEGIN`` included) fail with "database is locked", once: a store failure that is not a
    duplicate, which a repair must not swallow.

    It also measures how long the repair holds the write lock: the rows each of its
    transactions writes (``total_changes`` from the statement that opens it to the first
    statement, or the end of the call, that finds it closed; a statement outside a
    transaction is one of its own). ``largest`` is the most rows one of them wrote. The
    workers run only while no transaction is open, so their writes are never counted."""

    connection_view = True  # the sandbox hands it over as a connection (see crew)

    def __init__(self, conn: sqlite3.Connection, between: Callable[[], Any], *,
                 lock_at: int | None = None) -> None:
        self._conn, self._between, self.lock_at = conn, between, lock_at
        self.statements = 0
        self.locked = False
        self.largest = 0
        self._mark: int | None = None  # total_changes when the open transaction began

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    @property
    def connection(self) -> sqlite3.Connection:
        return self._conn

    def before_statement(self, sql: Any = "") -> None:
        self._gap()

    def _gap(self) -> None:
        n, self.statements = self.statements, self.statements + 1
        if not self._conn.in_transaction:
            self.finish()
        if self.lock_at is not None and n == self.lock_at:
            self.lock_at, self.locked = None, True
            raise sqlite3.OperationalError("database is locked")
        if not self._conn.in_transaction:
            self._between()
            self._mark = self._conn.total_changes

    def finish(self) -> None:
        """Close the measure of the transaction that ended (the repair's last, at the end
        of its call)."""
        if self._mark is not None:
            self.largest = max(self.largest, self._conn.total_changes - self._mark)
            self._mark = None

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        self._gap()
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        self._gap()
        return self._conn.executemany(sql, rows)

    def cursor(self) -> Interleaved:
        return self

    def commit(self) -> None:
        self._conn.commit()

    def rollback(self) -> None:
        self._conn.rollback()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _interleaver(lab: CourseLab, crew: list[Worker]) -> Callable[[], None]:
    """One step of the next worker of ``crew``, round robin, on the lab's clock."""
    turn = [0]

    def between() -> None:
        w = crew[turn[0] % len(crew)]
        turn[0] += 1
        if w.step():
            lab.clock.advance(lab.tick / 2)

    return between


def _bystanders(lab: CourseLab) -> list[Worker]:
    """Fault-free workers of the two modes without an inbox, beside the lab's own: they read
    the fence too, and an at-most-once one deletes the message before its effect."""
    return [Worker(store=lab.store, clock=lab.clock, broker=lab.broker, mode=mode,
                   name=f"worker-{mode}", work_time=lab.tick / 2)
            for mode in (Mode.AT_MOST_ONCE, Mode.AT_LEAST_ONCE)]


class _Caller:
    """Calls the reader's repair on an :class:`Interleaved` connection; notes its errors (an
    injected lock it let escape is not one: the operator just runs the repair again)."""

    def __init__(self, lab: CourseLab, repair: Callable[..., Any], between: Callable[[], None]
                 ) -> None:
        self.lab, self.repair, self.between = lab, repair, between
        self.errors: list[str] = []
        self.returned: Any = None  # what the last call that ended without an error returned
        self.largest = 0  # the most rows one transaction of the last call wrote

    def __call__(self, *args: Any, lock_at: int | None = None) -> bool:
        """Run the repair (again, after the lock ``lock_at`` made); True if it returned."""
        lab = self.lab
        self.returned = None
        self.largest = 0
        for attempt in (1, 2):
            conn = Interleaved(lab.store, self.between, lock_at=lock_at if attempt == 1 else None)
            now = lab.clock.now()
            try:
                result = self.repair(conn, *args, now)
            except (Exception, SystemExit) as exc:  # the reader's code: report it, go on
                conn.finish()
                self.largest = max(self.largest, conn.largest)
                # By name: from the sandbox it comes back as another object of that name.
                if lab.store.in_transaction:
                    lab.store.rollback()
                if type(exc).__name__ == "OperationalError" and conn.locked and attempt == 1 \
                        and "locked" in str(exc):
                    continue  # the lock we made: the operator runs the repair again
                self._note(f"{type(exc).__name__}: {exc} (your repair at t={now:g})")
                return False
            else:
                conn.finish()
                self.largest = max(self.largest, conn.largest)
                if lab.store.in_transaction:
                    lab.store.rollback()
                    self._note("your repair left a transaction open (it was rolled back)")
                    return False
            self.returned = result
            return True
        return False

    def _note(self, text: str) -> None:
        if text not in self.errors:
            self.errors.append(text)


def _quiet_verdict(lab: CourseLab, *, seed: int, faults: str, errors: list[str],
                   since: float = 0.0, failures: list[str] | None = None) -> Trial:
    """The exercise's invariant once the queue is quiet: the projection equals the truth on
    every item. Over means an order counted twice; under, an order counted by no one."""
    reasons = [f"your code raised {e}" for e in errors] + list(failures or ())
    off = [r for r in projection_vs_truth(lab.store) if r[3] != 0]
    focus: tuple[str, ...] = ()
    if off:
        parts = []
        for item, truth, proj, delta in off:
            why = (f"over by {delta}: an order counted twice" if delta > 0
                   else f"{-delta} missing: an order counted by no one")
            parts.append(f"{item} truth {truth}, projection {proj} ({why})")
        reasons.append("once the queue is quiet the projection differs from the truth: "
                       + "; ".join(parts))
        focus = _busiest_orders(lab.store, off[0][0], since)
    if not reasons:
        return Trial(seed=seed, faults=faults, passed=True, reason="")
    if not focus:
        focus = tuple(o for o, _ in _orders(lab.store))[:1]
    trace = order_trace(lab.store, focus[0]) if focus else ""
    return Trial(seed=seed, faults=faults, passed=False, reason="; ".join(reasons),
                 trace=trace)


def _busiest_orders(conn: sqlite3.Connection, item: str, since: float) -> tuple[str, ...]:
    """The item's orders, the one with the most effects and deliveries after ``since`` first
    (the likeliest to have been counted twice, or skipped)."""
    return tuple(r[0] for r in conn.execute(
        "SELECT o.order_id FROM orders AS o LEFT JOIN delivery_log AS l"
        " ON l.correlation_id = o.order_id AND l.at >= ?"
        " WHERE o.item_id = ? GROUP BY o.order_id"
        " ORDER BY sum(l.outcome = 'applied') DESC, count(l.seq) DESC, o.created_at",
        (since, item)))


def _park_one(lab: CourseLab) -> None:
    """Place one order and park its message in the dead letters unapplied (a poison message
    an operator set aside): not queued, not applied, and redriven after the repairs."""
    lab.place_orders(1)
    for d in lab.broker.receive(lab.workers[0].visibility_timeout, 1, worker="operator"):
        lab.broker.dead_letter(d, "set aside by the operator", worker="operator")


# -- 5.1 a repair that survives the in-flight race -----------------------------------------
def repair_starter(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    """Make ``inventory_projection`` equal the truth in ``orders`` again, after messages
    were lost, while workers of any mode keep consuming: no event still in flight (queued,
    held by a worker, parked in the dead letters) may be counted twice, and no order may be
    counted by no one. The engine's fence is ``reconciled_events``; ``now`` is the lab's
    time. Work in batches: no transaction of the repair may write more than 8 rows (inserted,
    updated or deleted, as ``conn.total_changes`` counts them), so that the workers commit
    between its batches instead of waiting for the whole repair. Return what this run
    changed, for the operator's record: ``{"moved": {item_id: how much it moved that item's
    reserved_qty, for every item it changed and no other}, "fenced": [the event ids it added
    to the fence]}``."""


def repair_solution(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    # Batches of at most 8 rows, each its own transaction: the workers commit between them
    # instead of waiting for the whole repair (SQLite has one writer).
    moved: dict[str, int] = {}
    fenced: list[str] = []
    # The items to visit: only a plan, each batch reads again what it writes from.
    items = [item for (item,) in conn.execute(
        "SELECT item_id FROM orders UNION SELECT item_id FROM inventory_projection")]
    for item in items:
        while True:
            with transaction(conn):  # BEGIN IMMEDIATE: no worker commits inside a batch
                # Fence up to 8 of the item's events not fenced yet: from now on no worker
                # applies them, whatever state their message is in (queued, held, parked).
                batch = [event for (event,) in conn.execute(
                    "INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                    " SELECT 'inventory', event_id, ? FROM orders WHERE item_id = ?"
                    " AND event_id NOT IN (SELECT event_id FROM reconciled_events"
                    " WHERE consumer = 'inventory') LIMIT 8 RETURNING event_id", (now, item))]
                fenced += batch
                if len(batch) == 8:
                    continue  # the budget spent: commit, let the workers in, fence the rest
                # Every event of the item is fenced now, so its count is the truth: each
                # order once (at most 7 rows above, and this one). Read inside the batch: a
                # worker's commit before it is the worker's, not the repair's.
                (was,) = conn.execute("SELECT coalesce(sum(reserved_qty), 0)"
                                      " FROM inventory_projection WHERE item_id = ?",
                                      (item,)).fetchone()
                (truth,) = conn.execute("SELECT coalesce(sum(qty), 0) FROM orders"
                                        " WHERE item_id = ?", (item,)).fetchone()
                if truth != was:
                    conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                                 " VALUES (?, ?) ON CONFLICT (item_id)"
                                 " DO UPDATE SET reserved_qty = excluded.reserved_qty",
                                 (item, truth))
                    moved[item] = truth - was
                break
    return {"moved": moved, "fenced": sorted(fenced)}


def _fence_of(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT event_id FROM reconciled_events WHERE consumer = 'inventory'")}


def _changes(conn: sqlite3.Connection, before: dict[str, int], fence: set[str]
             ) -> dict[str, Any]:
    """A true report of what changed since ``before`` and ``fence`` (for wrong answers
    whose mistake is elsewhere), read in the transaction that made the change."""
    after = dict(conn.execute("SELECT item_id, reserved_qty FROM inventory_projection"))
    return {"moved": {k: after.get(k, 0) - before.get(k, 0) for k in before.keys() | after.keys()
                      if after.get(k, 0) != before.get(k, 0)},
            "fenced": sorted(_fence_of(conn) - fence)}


def _merge(report: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Two reports of one run (two of its batches) as one."""
    moved = dict(report["moved"])
    for k, v in more["moved"].items():
        moved[k] = moved.get(k, 0) + v
    return {"moved": {k: v for k, v in moved.items() if v},
            "fenced": sorted({*report["fenced"], *more["fenced"]})}


_ITEMS = "SELECT item_id FROM orders UNION SELECT item_id FROM inventory_projection"
_COUNT_ITEM = ("INSERT INTO inventory_projection (item_id, reserved_qty)"
               " SELECT ?, coalesce(sum(qty), 0) FROM orders WHERE item_id = ?"
               " ON CONFLICT (item_id) DO UPDATE SET reserved_qty = excluded.reserved_qty")
_FENCE_SOME = ("INSERT INTO {table} (consumer, event_id, {at})"
               " SELECT 'inventory', event_id, ? FROM orders WHERE item_id = ?"
               " AND event_id NOT IN (SELECT event_id FROM {table}"
               " WHERE consumer = 'inventory') LIMIT 7")


def _by_item(conn: sqlite3.Connection, now: float, *, fence: str | None = "reconciled_events",
             count: bool = True) -> dict[str, Any]:
    """The model's batches for the wrong answers whose mistake is elsewhere: per item, its
    unfenced events 7 at a time into ``fence`` (None: none), then its count (unless not
    ``count``), with a true report of each batch."""
    report: dict[str, Any] = {"moved": {}, "fenced": []}
    at = "processed_at" if fence == "inbox_processed" else "reconciled_at"
    for (item,) in conn.execute(_ITEMS).fetchall():
        while True:
            with transaction(conn):
                before, was = _projection(conn), _fence_of(conn)
                n = 0 if fence is None else conn.execute(
                    _FENCE_SOME.format(table=fence, at=at), (now, item)).rowcount
                if n < 7 and count:
                    conn.execute(_COUNT_ITEM, (item, item))
                report = _merge(report, _changes(conn, before, was))
            if n < 7:
                break
    return report


def repair_rebuild_only(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    return _by_item(conn, now, fence=None)


def repair_fence_only(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    return _by_item(conn, now, count=False)


def repair_fence_in_inbox(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    # The idempotent consumer skips what its inbox holds...
    return _by_item(conn, now, fence="inbox_processed")


def repair_reports_from_outside(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    # The report's "before" is read before the first batch and its "after" after the last:
    # the workers commit between the batches.
    before, fence = _projection(conn), _fence_of(conn)
    _by_item(conn, now)
    return _changes(conn, before, fence)


def repair_in_one_transaction(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    # Rebuild and fence everything in one transaction: right, and every worker waits.
    with transaction(conn):
        before, fence = _projection(conn), _fence_of(conn)
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE true"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))
        return _changes(conn, before, fence)


def repair_one_item_per_transaction(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    # A batch per item: small, until an item has more unfenced orders than the budget.
    report: dict[str, Any] = {"moved": {}, "fenced": []}
    for (item,) in conn.execute(_ITEMS).fetchall():
        with transaction(conn):
            before, fence = _projection(conn), _fence_of(conn)
            conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                         " SELECT 'inventory', event_id, ? FROM orders WHERE item_id = ?"
                         " ON CONFLICT (consumer, event_id) DO NOTHING", (now, item))
            conn.execute(_COUNT_ITEM, (item, item))
            report = _merge(report, _changes(conn, before, fence))
    return report


def _projection(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT item_id, reserved_qty FROM inventory_projection"))


def _report_error(report: Any, changed: dict[str, int], fenced: set[str]) -> str:
    """Why ``report`` is not what the repair changed ("" when it is)."""
    moved = report.get("moved") if isinstance(report, dict) else None
    listed = report.get("fenced") if isinstance(report, dict) else None
    if not isinstance(moved, dict) or not isinstance(listed, list | tuple | set) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in moved.items()):
        return (f"returned {report!r}, not a report: {{'moved': {{item id: how much it moved"
                " that item}, 'fenced': [the event ids it fenced]}")
    wrong = sorted(k for k in moved.keys() | changed.keys()
                   if moved.get(k, 0) != changed.get(k, 0) or (k in moved) != (k in changed))
    if wrong:
        shown = "; ".join(f"{k} {moved[k]:+g}" if k in moved else f"{k} missing"
                          for k in wrong[:3])
        really = ", ".join(f"{k} {changed[k]:+g}" for k in sorted(changed)) or "nothing"
        return f"reported changes it did not make ({shown}; it changed {really})"
    extra, missed = set(listed) - fenced, fenced - set(listed)
    if extra or missed:
        return (f"reported a fence it did not add ({len(fenced)} events fenced by this run;"
                f" {len(extra)} listed that it did not fence, {len(missed)} fenced and not"
                " listed)")
    return ""


def run_repair(repair: Callable[..., Any], seed: int) -> Trial:
    lab, faults, modes = _lab(seed)
    # Seeds 3, 7, 11…: the worker holding an event while the repair runs is an at-most-once
    # one, which deleted the message before its effect (in flight, yet in no queue).
    holder = Mode.AT_MOST_ONCE if seed % 4 == 3 else lab.mode
    step = _interleaver(lab, [*lab.workers, *_bystanders(lab)])
    moved: dict[str, int] = {}  # what the workers changed between the repair's statements
    gaps = [0]

    def between() -> None:
        gaps[0] += 1
        if gaps[0] % ARRIVALS == 0:
            lab.place_orders(1)  # orders keep arriving while the repair runs
        was = _projection(lab.store)
        step()
        for item, qty in _projection(lab.store).items():
            moved[item] = moved.get(item, 0) + qty - was.get(item, 0)

    repairs = _Caller(lab, repair, between)
    bad_reports: list[str] = []
    over: list[str] = []

    def call(lock_at: int | None = None) -> None:
        was, fence = _projection(lab.store), _fence_of(lab.store)
        moved.clear()
        now = lab.clock.now()
        returned = repairs(lock_at=lock_at)
        if repairs.largest > BATCH and not over:
            over.append(f"your repair at t={now:g} held the write lock for {repairs.largest}"
                        f" rows in one transaction (at most {BATCH}: every worker waits while"
                        " it holds the lock; work in batches)")
        if not returned:
            return
        after = _projection(lab.store)
        changed = {k: after.get(k, 0) - was.get(k, 0) - moved.get(k, 0)
                   for k in sorted(was.keys() | after.keys() | moved.keys())}
        why = _report_error(repairs.returned, {k: v for k, v in changed.items() if v},
                            _fence_of(lab.store) - fence)
        if why and not bad_reports:
            bad_reports.append(f"your repair at t={now:g} {why}")

    lab.place_orders(10)
    lab.lose_messages(2)      # deleted behind the workers' backs: only a repair brings them back
    lab.run_until_idle()
    _park_one(lab)            # a dead letter, redriven after the repairs
    start = lab.clock.now()
    lab.place_orders(6)       # in flight: waiting in the queue when the repair runs...
    _hold_while(lab, faults, call, mode=holder)  # ...one held by a worker mid-processing
    lab.run_until_idle()
    lab.place_orders(4)       # a second incident later: new events in flight again, and a
    lab.place_orders(RUSH, items=(ITEMS[seed % len(ITEMS)],))  # rush on one item: more
    call()                    # unfenced orders of one item than one batch may write
    call()                    # a repair run twice must change nothing the second time
    lab.place_orders(3)
    lab.lose_messages(1)      # a third incident; the database is locked at one statement
    call(lock_at=seed % 3)    # of the repair (BEGIN on seeds 0, 3, 6…): it is run again
    lab.broker.redrive()       # the operator redrives the dead letter
    lab.run_until_idle()
    (orders,) = lab.store.execute("SELECT count(*) FROM orders").fetchone()
    where = describe_faults(
        faults, workers=WORKERS, orders=orders,
        extra=f"{modes}; messages lost on purpose, one parked and redriven; your repair runs"
              " 4 times with events in flight, once while a worker in"
              f" {holder} mode holds one, once after a rush of {RUSH} orders for one item,"
              " other workers stepping between its statements and orders arriving, and"
              f" 'database is locked' at statement {seed % 3} of the last run; at most"
              f" {BATCH} rows written per transaction")
    return _quiet_verdict(lab, seed=seed, faults=where, errors=repairs.errors, since=start,
                          failures=[*over, *bad_reports])


register(Exercise(
    id="in-flight-repair", chapter=5, title="A repair that survives events in flight",
    run=run_repair, solution=repair_solution, starter=repair_starter,
    params=("conn", "now"),
    wrong=(("counted twice", repair_rebuild_only), ("missing", repair_fence_only),
           ("counted twice", repair_fence_in_inbox),
           ("reported changes it did not make", repair_reports_from_outside),
           ("held the write lock", repair_in_one_transaction),
           ("held the write lock", repair_one_item_per_transaction))))


# -- 5.2 the worker's side of the fence ----------------------------------------------------
def fence_solution(conn: sqlite3.Connection, delivery: Delivery) -> None:
    # Read inside the effect's transaction: a repair that committed first is seen.
    fenced = conn.execute("SELECT 1 FROM reconciled_events"
                          " WHERE consumer = 'inventory' AND event_id = ?",
                          (delivery.event_id,)).fetchone()
    if fenced is None:
        apply_order_placed(conn, delivery)


def fence_ignored(conn: sqlite3.Connection, delivery: Delivery) -> None:
    apply_order_placed(conn, delivery)


def fence_read_from_inbox(conn: sqlite3.Connection, delivery: Delivery) -> None:
    seen = conn.execute("SELECT 1 FROM inbox_processed"
                        " WHERE consumer = 'inventory' AND event_id = ?",
                        (delivery.event_id,)).fetchone()
    if seen is None:
        apply_order_placed(conn, delivery)


def fence_by_order_of_the_last_repair(conn: sqlite3.Connection, delivery: Delivery) -> None:
    # "Skip what is older than the last repair": a watermark by order id.
    last = conn.execute("SELECT max(o.order_id) FROM reconciled_events AS f"
                        " JOIN orders AS o USING (event_id)").fetchone()[0]
    if last is None or delivery.payload["orderId"] > last:
        apply_order_placed(conn, delivery)


def tx_process(delivery: Delivery, ops: Ops) -> None:
    """Effect and ACK in one transaction: exactly once inside one database, no inbox."""
    with ops.transaction():
        ops.apply(delivery)
        ops.ack(delivery)


def run_fence(handler: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, crash_after_receive=0.2)
    lab = course_lab(seed=seed, handler=handler, faults=faults, workers=WORKERS,
                     process=tx_process, mode=Mode.TRANSACTIONAL)

    def repair() -> None:
        reconcile.repair(lab.store, clock=lab.clock)  # the engine's repair: rebuild and fence

    lab.place_orders(10)
    lab.lose_messages(2)
    drain(lab)
    lab.place_orders(6)
    held = hold_one_while(lab, handler, repair, faults=faults, process=tx_process)
    drain(lab)
    lab.place_orders(4)
    repair()
    lab.place_orders(3)       # placed after the last repair: their events must still count
    drain(lab)
    where = describe_faults(faults, workers=WORKERS, orders=23,
                            extra="effect and ACK in one transaction, no inbox; 2 messages lost"
                                  " on purpose; the engine's repair runs twice with events in"
                                  " flight")
    return judge(lab, seed=seed, faults=where, errors=[*held, *errors_of(lab)])


register(Exercise(
    id="fenced-worker", chapter=5, title="The worker's side of the fence",
    run=run_fence, solution=fence_solution, starter=fence_ignored,
    params=("conn", "delivery"),
    wrong=(("duplicated", fence_ignored), ("duplicated", fence_read_from_inbox),
           ("lost", fence_by_order_of_the_last_repair))))


# -- 5.3 one item at a time ----------------------------------------------------------------
def repair_item_solution(conn: sqlite3.Connection, item_id: str, now: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection WHERE item_id = ?", (item_id,))
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders WHERE item_id = ?"
                     " GROUP BY item_id", (item_id,))
        # Fence this item's events, and only this item's: the others are not rebuilt here.
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE item_id = ?"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now, item_id))


def repair_item_fence_all(conn: sqlite3.Connection, item_id: str, now: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection WHERE item_id = ?", (item_id,))
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders WHERE item_id = ?"
                     " GROUP BY item_id", (item_id,))
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE true"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))


def repair_item_clears_all(conn: sqlite3.Connection, item_id: str, now: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders WHERE item_id = ?"
                     " GROUP BY item_id", (item_id,))
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE item_id = ?"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now, item_id))


def repair_item_unfenced(conn: sqlite3.Connection, item_id: str, now: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection WHERE item_id = ?", (item_id,))
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders WHERE item_id = ?"
                     " GROUP BY item_id", (item_id,))


def run_repair_item(repair_item: Callable[..., Any], seed: int) -> Trial:
    lab, faults, modes = _lab(seed)
    # Workers step between the repair's statements (outside its transaction, as another
    # process would); what they change meanwhile is theirs, not the repair's.
    step = _interleaver(lab, list(lab.workers))
    moved: dict[str, int] = {}

    def between() -> None:
        was = {r[0]: r[2] for r in projection_vs_truth(lab.store)}
        step()
        for r in projection_vs_truth(lab.store):
            if r[2] != was.get(r[0], 0):
                moved[r[0]] = moved.get(r[0], 0) + r[2] - was.get(r[0], 0)

    caller = _Caller(lab, repair_item, between)
    errors = caller.errors
    failures: list[str] = []
    suspects: list[str] = []
    lab.place_orders(15)
    lab.lose_messages(2)
    lab.run_until_idle()
    job = _wrong_items(lab.store)     # the items the diff found drifted: the job's to-do list
    lab.place_orders(6)              # orders keep arriving while the job walks the items
    repaired: dict[float, str] = {}
    for n, item in enumerate(job):
        if n:
            lab.place_orders(2)
            lab.step()
        now = lab.clock.now()
        repaired.setdefault(now, item)
        before = {r[0]: r[2] for r in projection_vs_truth(lab.store) if r[0] != item}
        moved.clear()
        # The database is locked at one statement of the first repair (BEGIN on seeds 0, 3,
        # 6…): the job runs that repair again.
        caller(item, lock_at=seed % 3 if n == 0 else None)
        after = {r[0]: r[2] - moved.get(r[0], 0) for r in projection_vs_truth(lab.store)
                 if r[0] != item}
        touched = sorted(k for k in before.keys() | after.keys()
                         if before.get(k, 0) != after.get(k, 0))
        if touched and not failures:
            failures.append(f"repairing {item} changed other items too: "
                            + "; ".join(f"{k} {before.get(k, 0)} -> {after.get(k, 0)}"
                                        for k in touched))
            suspects.extend(_orders_of(lab.store, touched))
        if _wrong_items(lab.store, [item]):
            if not failures:
                failures.append(f"right after your repair of {item} at t={now:g} it differs"
                                f" from the truth ({drift_text(lab.store, [item])})")
                suspects.extend(_orders_of(lab.store, [item]))
            continue
        with transaction(lab.store):
            log_counted(lab.store, _orders(lab.store, item), at=now,
                        detail=f"counted by your repair of {item}")
    lab.run_until_idle()
    # A lost order whose event was fenced by the repair of another item: say so.
    fenced = [(o, item, repaired[t]) for o, item, t in lab.store.execute(
        "SELECT o.order_id, o.item_id, f.reconciled_at FROM orders AS o"
        " JOIN reconciled_events AS f USING (event_id) ORDER BY o.created_at, o.order_id")
        if t in repaired and repaired[t] != item
        and _applications(lab.store, o) == 0]
    if fenced and not failures:
        o, item, by = fenced[0]
        failures.append(f"{len(fenced)} events were fenced by the repair of another"
                        f" item: order {o} ({item}) by your repair of {by}, which did not"
                        " count it")
    where = describe_faults(faults, workers=WORKERS, orders=15,
                            extra=f"{modes}; 2 messages lost on purpose; the drifted items"
                                  " repaired one"
                                  " at a time while orders keep arriving (6, then 2 between"
                                  " repairs); 'database is locked' at one statement of the"
                                  " first repair")
    return judge(lab, seed=seed, faults=where, errors=errors, extra_failures=failures,
                 focus=suspects)


register(Exercise(
    id="repair-item", chapter=5, title="Repair one item at a time",
    run=run_repair_item, solution=repair_item_solution, starter=repair_item_fence_all,
    params=("conn", "item_id", "now"),
    wrong=(("lost", repair_item_fence_all), ("changed other items", repair_item_clears_all),
           ("duplicated", repair_item_unfenced))))
