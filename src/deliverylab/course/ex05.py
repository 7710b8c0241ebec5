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
application. Once the queue is quiet the outcome is judged: the projection equals the truth
(an item that does has every order's effect once, whatever the log says), and a repair run
twice in a row changes nothing the second time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..book.lab import Lab
from ..book.toolkit import WhileWorking
from ..brokers.base import Delivery
from ..engine import reconcile
from ..engine.check import event_states, projection_vs_truth
from ..engine.faults import Faults
from ..engine.store import transaction
from ..engine.worker import Mode, Worker, apply_order_placed
from .crew import call, course_lab, drain, drift_text, errors_of, hold_one_while, log_counted
from .grader import Exercise, Ops, Trial, describe_faults, judge, register

# The workers' faults: each mode gets the ones that strike it.
FAULTS = {Mode.IDEMPOTENT: dict(ack_fail=0.3, crash_after_receive=0.1, crash_after_commit=0.05),
          Mode.TRANSACTIONAL: dict(crash_after_receive=0.2)}
WORKERS = 2


def _mode(seed: int) -> Mode:
    """Even seeds: idempotent workers (an inbox); odd seeds: transactional ones (effect and
    ACK in one transaction, no inbox)."""
    return Mode.IDEMPOTENT if seed % 2 == 0 else Mode.TRANSACTIONAL


def _lab(seed: int) -> tuple[Lab, Faults, str]:
    mode = _mode(seed)
    faults = Faults(seed=seed, **FAULTS[mode])
    lab = Lab(seed=seed, mode=mode, faults=faults, workers=WORKERS)
    return lab, faults, f"{mode} workers on this seed (idempotent on even seeds, transactional" \
                        " on odd ones)"


def _hold_while(lab: Lab, faults: Faults, action: Callable[[], Any]) -> None:
    """One more worker of the lab's mode receives a message and runs ``action`` while it holds
    it (between its receive and its commit); ``action`` runs anyway if it got nothing."""
    clock = WhileWorking(lab.clock, action)
    Worker(lab.conn, clock=clock, ids=lab.ids, queue=lab.queue, mode=lab.mode, faults=faults,
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


# -- 5.1 a repair that survives the in-flight race -----------------------------------------
def repair_solution(conn: sqlite3.Connection, now: float) -> None:
    with transaction(conn):  # the rebuild and the fence commit together
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
        # The fence: every order counted here; a worker does not apply its event again.
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE true"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))


def repair_rebuild_only(conn: sqlite3.Connection, now: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")


def repair_fence_only(conn: sqlite3.Connection, now: float) -> None:
    with transaction(conn):
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE true"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))


def repair_fence_in_inbox(conn: sqlite3.Connection, now: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
        # The idempotent consumer skips what its inbox holds...
        conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE true"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))


class _Repairs:
    """Runs the reader's repair; what it counted is what it fenced.

    A repair may count every order (and fence them all), or only the orders no worker can
    still apply (and fence those), or add only what was never applied: the grader does not
    judge one design. After each run it records the orders the repair newly fenced as counted
    by it, so the checker sees a worker that applies one of them afterwards as its second
    application; the outcome is judged once the queue is quiet (:func:`_quiet_verdict`)."""

    def __init__(self, lab: Lab, repair: Callable[..., Any]) -> None:
        self.lab, self.repair = lab, repair
        self.errors: list[str] = []
        self.failures: list[str] = []
        self.first_at: float | None = None
        self.times: list[float] = []
        self.counted: set[str] = set()

    def __call__(self) -> None:
        lab = self.lab
        now = lab.clock.now()
        if self.first_at is None:
            self.first_at = now
        self.times.append(now)
        before = projection_vs_truth(lab.conn)
        call(self.errors, self.repair, lab.conn, now)
        fenced = [o for o in _fenced(lab.conn) if o[0] not in self.counted]
        self.counted.update(o for o, _ in fenced)
        with transaction(lab.conn):
            log_counted(lab.conn, fenced, at=now, detail="counted (and fenced) by your repair")
        self.last = (now, before, projection_vs_truth(lab.conn))

    def again(self) -> None:
        """Run the repair once more right away: nothing happened since, so it must change
        nothing."""
        now, _, after = self.last
        self()
        changed = [(a[0], a[2], b[2]) for a, b in zip(after, self.last[2], strict=False)
                   if a[2] != b[2]]
        if changed and not self.failures:
            self.failures.append(
                f"your repair, run a second time at t={now:g} with nothing in between, changed"
                " the projection again: " + "; ".join(f"{i} {x} -> {y}" for i, x, y in changed))


def _fenced(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    return [tuple(r) for r in conn.execute(
        "SELECT o.order_id, o.event_id FROM orders AS o JOIN reconciled_events AS f"
        " ON f.event_id = o.event_id AND f.consumer = 'inventory'"
        " ORDER BY o.created_at, o.order_id")]


def _quiet_verdict(lab: Lab, times: list[float],
                   ) -> tuple[list[str], tuple[str, ...], tuple[str, ...]]:
    """The outcome once the queue is quiet: (failures, lost, duplicated). An item whose
    projection equals its truth has every one of its orders' effects, once: none of its
    orders is called lost or duplicated, whatever the log says counted it."""
    conn = lab.conn
    drift = {item: d for item, _, _, d in projection_vs_truth(conn)}
    states = event_states(conn)
    short = [i for i, d in drift.items() if d < 0]
    over = [i for i, d in drift.items() if d > 0]
    failures: list[str] = []
    lost: tuple[str, ...] = ()
    dup: tuple[str, ...] = ()
    if over:
        late = {r[0] for r in conn.execute(
            "SELECT DISTINCT correlation_id FROM delivery_log WHERE outcome = 'applied'"
            " AND at >= ?", (times[0] if times else 0.0,))}
        dup = tuple(o for o, item, _, _, n, _ in states
                    if drift.get(item, 0) > 0 and (n > 1 or o in late))
        failures.append(
            f"{len(over)} item(s) duplicated once the queue is quiet: the projection reserves"
            f" more than the orders ({drift_text(conn, over)}); an order your repair counted"
            " was applied again by a worker (or the repair counted it twice); your repair ran"
            f" at t={_times(times)}")
    if short:
        applied = {r[0] for r in conn.execute(
            "SELECT DISTINCT correlation_id FROM delivery_log WHERE outcome = 'applied'")}
        # Never applied by a worker: not counted at all, or fenced by a repair that did not
        # put its effect in the projection.
        lost = tuple(o for o, item, _, _, n, _ in states
                     if drift.get(item, 0) < 0 and (n == 0 or o not in applied))
        failures.append(
            f"{len(short)} item(s) lost orders once the queue is quiet: the projection differs"
            f" from the truth ({drift_text(conn, short)}); an order neither your repair nor a"
            f" worker counted; your repair ran at t={_times(times)}")
    return failures, lost, dup


def _times(times: list[float]) -> str:
    return ", ".join(f"{t:g}" for t in times)


def run_repair(repair: Callable[..., Any], seed: int) -> Trial:
    lab, faults, modes = _lab(seed)
    repairs = _Repairs(lab, repair)
    lab.place_orders(10)
    lab.lose_messages(2)      # deleted behind the workers' backs: only a repair brings them back
    lab.run_until_idle()
    lab.place_orders(6)       # in flight: waiting in the queue when the repair runs...
    _hold_while(lab, faults, repairs)  # ...and one held by a worker, received, not committed
    lab.run_until_idle()
    lab.place_orders(4)       # a second incident later: new events in flight again
    repairs()
    repairs.again()           # a repair run twice must change nothing the second time
    lab.run_until_idle()
    where = describe_faults(faults, workers=WORKERS, orders=20,
                            extra=f"{modes}; 2 messages lost on purpose; your repair runs 3"
                                  " times with events in flight")
    failures, lost, dup = _quiet_verdict(lab, repairs.times)
    base = judge(lab, seed=seed, faults=where, errors=repairs.errors, allow_lost=True,
                 allow_duplicates=True, drift=False,
                 extra_failures=[*failures, *repairs.failures], focus=(*dup, *lost))
    return replace(base, lost=lost, duplicated=dup)


register(Exercise(
    id="in-flight-repair", chapter=5, title="A repair that survives events in flight",
    run=run_repair, solution=repair_solution, starter=repair_rebuild_only,
    params=("conn", "now"),
    wrong=(("duplicated", repair_rebuild_only), ("differs from the truth", repair_fence_only),
           ("duplicated", repair_fence_in_inbox))))


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
        reconcile.repair(lab.conn, clock=lab.clock)  # the engine's repair: rebuild and fence

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
    errors: list[str] = []
    failures: list[str] = []
    suspects: list[str] = []
    lab.place_orders(15)
    lab.lose_messages(2)
    lab.run_until_idle()
    job = _wrong_items(lab.conn)     # the items the diff found drifted: the job's to-do list
    lab.place_orders(6)              # orders keep arriving while the job walks the items
    repaired: dict[float, str] = {}
    for n, item in enumerate(job):
        if n:
            lab.place_orders(2)
            lab.step()
        now = lab.clock.now()
        repaired.setdefault(now, item)
        before = {r[0]: r[2] for r in projection_vs_truth(lab.conn) if r[0] != item}
        call(errors, repair_item, lab.conn, item, now)
        after = {r[0]: r[2] for r in projection_vs_truth(lab.conn) if r[0] != item}
        touched = sorted(k for k in before.keys() | after.keys()
                         if before.get(k, 0) != after.get(k, 0))
        if touched and not failures:
            failures.append(f"repairing {item} changed other items too: "
                            + "; ".join(f"{k} {before.get(k, 0)} -> {after.get(k, 0)}"
                                        for k in touched))
            suspects.extend(_orders_of(lab.conn, touched))
        if _wrong_items(lab.conn, [item]):
            if not failures:
                failures.append(f"right after your repair of {item} at t={now:g} it differs"
                                f" from the truth ({drift_text(lab.conn, [item])})")
                suspects.extend(_orders_of(lab.conn, [item]))
            continue
        with transaction(lab.conn):
            log_counted(lab.conn, _orders(lab.conn, item), at=now,
                        detail=f"counted by your repair of {item}")
    lab.run_until_idle()
    # A lost order whose event was fenced by the repair of another item: say so.
    fenced = [(o, item, repaired[t]) for o, item, t in lab.conn.execute(
        "SELECT o.order_id, o.item_id, f.reconciled_at FROM orders AS o"
        " JOIN reconciled_events AS f USING (event_id) ORDER BY o.created_at, o.order_id")
        if t in repaired and repaired[t] != item
        and _applications(lab.conn, o) == 0]
    if fenced and not failures:
        o, item, by = fenced[0]
        failures.append(f"{len(fenced)} events were fenced by the repair of another"
                        f" item: order {o} ({item}) by your repair of {by}, which did not"
                        " count it")
    where = describe_faults(faults, workers=WORKERS, orders=15,
                            extra=f"{modes}; 2 messages lost on purpose; the drifted items"
                                  " repaired one"
                                  " at a time while orders keep arriving (6, then 2 between"
                                  " repairs)")
    return judge(lab, seed=seed, faults=where, errors=errors, extra_failures=failures,
                 focus=suspects)


register(Exercise(
    id="repair-item", chapter=5, title="Repair one item at a time",
    run=run_repair_item, solution=repair_item_solution, starter=repair_item_fence_all,
    params=("conn", "item_id", "now"),
    wrong=(("lost", repair_item_fence_all), ("changed other items", repair_item_clears_all),
           ("duplicated", repair_item_unfenced))))
