"""Chapter 5's exercises: repair what delivery lost, without counting anything twice.

Each run is the chapter's situation: some messages were lost, others are still in flight
(waiting in the queue, or held by a worker) when the repair runs, and idempotent workers keep
consuming afterwards. After each repair the grader compares the projection with the truth;
if they agree it records the repair as each order's one application, so the engine's checker
then sees an event that still takes effect afterwards as that order's second application.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from ..book.lab import Lab
from ..brokers.base import Delivery
from ..engine.check import event_states, projection_vs_truth
from ..engine.clock import Clock
from ..engine.faults import Faults
from ..engine.store import transaction
from ..engine.worker import CONSUMER, apply_order_placed
from .crew import (
    call,
    course_lab,
    drain,
    drift_text,
    errors_of,
    hold_one_while,
    inbox_consumer,
    log_counted,
)
from .grader import Exercise, Trial, describe_faults, judge, register

FAULTS = dict(ack_fail=0.3, crash_after_receive=0.1, crash_after_commit=0.05)
WORKERS = 2


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
        # The fence: every order's event is now processed, so one still in flight is skipped.
        conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE true"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))


def repair_rebuild_only(conn: sqlite3.Connection, now: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")


def repair_fence_only(conn: sqlite3.Connection, now: float) -> None:
    with transaction(conn):
        conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE true"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))


def repair_fence_the_lost(conn: sqlite3.Connection, now: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
        # Only the events that will never arrive: the ones no longer in the queue.
        conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                     " SELECT 'inventory', event_id, ? FROM orders"
                     " WHERE event_id NOT IN (SELECT event_id FROM queue_messages)"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))


class _Repairs:
    """Runs the reader's repair and checks the projection right after each run."""

    def __init__(self, lab: Lab, repair: Callable[..., Any]) -> None:
        self.lab, self.repair = lab, repair
        self.errors: list[str] = []
        self.failures: list[str] = []
        self.suspects: list[str] = []

    def __call__(self) -> None:
        lab = self.lab
        now = lab.clock.now()
        call(self.errors, self.repair, lab.conn, now)
        wrong = _wrong_items(lab.conn)
        if wrong:
            if not self.failures:
                self.failures.append(f"right after your repair at t={now:g} the projection"
                                     f" differs from the truth ({drift_text(lab.conn)})")
                self.suspects.extend(_orders_of(lab.conn, wrong))
        off = set(_orders_of(lab.conn, wrong)) if wrong else set()
        with transaction(lab.conn):
            log_counted(lab.conn, [o for o in _orders(lab.conn) if o[0] not in off], at=now,
                        detail="counted by your repair")


def run_repair(repair: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **FAULTS)
    lab = course_lab(seed=seed, faults=faults, workers=WORKERS)
    handler = inbox_consumer(lab.clock)
    repairs = _Repairs(lab, repair)
    lab.place_orders(10)
    lab.lose_messages(2)      # deleted behind the workers' backs: only a repair brings them back
    drain(lab)
    lab.place_orders(6)       # in flight: waiting in the queue when the repair runs...
    held = hold_one_while(lab, handler, repairs, faults=faults)  # ...and one held by a worker
    drain(lab)
    lab.place_orders(4)       # a second incident later: new events in flight again
    repairs()
    repairs()                 # a repair run twice must change nothing the second time
    drain(lab)
    where = describe_faults(faults, workers=WORKERS, orders=20,
                            extra="2 messages lost on purpose; your repair runs 3 times with"
                                  " events in flight")
    return judge(lab, seed=seed, faults=where, errors=[*repairs.errors, *held, *errors_of(lab)],
                 extra_failures=repairs.failures, focus=repairs.suspects)


register(Exercise(
    id="in-flight-repair", chapter=5, title="A repair that survives events in flight",
    run=run_repair, solution=repair_solution, starter=repair_rebuild_only,
    params=("conn", "now"),
    wrong=(("duplicated", repair_rebuild_only), ("differs from the truth", repair_fence_only),
           ("duplicated", repair_fence_the_lost))))


# -- 5.2 the consumer's side of a watermark ------------------------------------------------
WATERMARK_SCHEMA = ("CREATE TABLE IF NOT EXISTS rebuild_watermark ("
                    " last_order INTEGER NOT NULL) STRICT")


def rebuild_with_watermark(conn: sqlite3.Connection) -> int:
    """The rebuild of the watermark design: the projection from ``orders``, and the rowid of
    the last order it counted, in one transaction. Returns that watermark."""
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
        conn.execute("UPDATE rebuild_watermark"
                     " SET last_order = (SELECT coalesce(max(rowid), 0) FROM orders)")
        return conn.execute("SELECT last_order FROM rebuild_watermark").fetchone()[0]


def watermark_solution(conn: sqlite3.Connection, delivery: Delivery) -> None:
    order = conn.execute("SELECT rowid FROM orders WHERE event_id = ?",
                         (delivery.event_id,)).fetchone()[0]
    last = conn.execute("SELECT last_order FROM rebuild_watermark").fetchone()[0]
    if order <= last:
        return  # the rebuild already counted this order
    apply_order_placed(conn, delivery)


def watermark_ignored(conn: sqlite3.Connection, delivery: Delivery) -> None:
    apply_order_placed(conn, delivery)


def watermark_off_by_one(conn: sqlite3.Connection, delivery: Delivery) -> None:
    order = conn.execute("SELECT rowid FROM orders WHERE event_id = ?",
                         (delivery.event_id,)).fetchone()[0]
    last = conn.execute("SELECT last_order FROM rebuild_watermark").fetchone()[0]
    if order < last:
        return
    apply_order_placed(conn, delivery)


def watermark_by_order_id(conn: sqlite3.Connection, delivery: Delivery) -> None:
    # Compares order ids instead of the table's order of insertion.
    last = conn.execute("SELECT o.order_id FROM orders AS o JOIN rebuild_watermark AS w"
                        " ON o.rowid = w.last_order").fetchone()
    if last is not None and delivery.payload["orderId"] <= last[0]:
        return
    apply_order_placed(conn, delivery)


def _behind_inbox(handler: Callable[..., Any], clock: Clock) -> Callable[..., None]:
    """The reader's effect behind the engine's inbox (lost ACKs are not this exercise's)."""

    def handle(conn: sqlite3.Connection, delivery: Delivery) -> None:
        if conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                        " VALUES (?, ?, ?) ON CONFLICT (consumer, event_id) DO NOTHING",
                        (CONSUMER, delivery.event_id, clock.now())).rowcount:
            handler(conn, delivery)

    return handle


def run_watermark(handler: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **FAULTS)
    lab = course_lab(seed=seed, faults=faults, workers=WORKERS)
    consumer = _behind_inbox(handler, lab.clock)
    for w in lab.workers:
        w.effect_handler = consumer
    lab.conn.execute(WATERMARK_SCHEMA)
    lab.conn.execute("INSERT INTO rebuild_watermark (last_order) VALUES (0)")

    def rebuild() -> None:
        rebuild_with_watermark(lab.conn)
        with transaction(lab.conn):
            log_counted(lab.conn, _orders(lab.conn), at=lab.clock.now(),
                        detail="counted by the rebuild (watermark)")

    lab.place_orders(10)
    lab.lose_messages(2)
    drain(lab)
    lab.place_orders(6)
    held = hold_one_while(lab, consumer, rebuild, faults=faults)
    drain(lab)
    lab.place_orders(4)
    rebuild()
    lab.place_orders(3)       # placed after the rebuild: their events must still count
    drain(lab)
    where = describe_faults(faults, workers=WORKERS, orders=23,
                            extra="2 messages lost on purpose; rebuilt twice with events in flight")
    return judge(lab, seed=seed, faults=where, errors=[*held, *errors_of(lab)])


register(Exercise(
    id="watermark", chapter=5, title="The consumer's side of a rebuild watermark",
    run=run_watermark, solution=watermark_solution, starter=watermark_ignored,
    params=("conn", "delivery"),
    wrong=(("duplicated", watermark_ignored), ("duplicated", watermark_off_by_one),
           ("lost", watermark_by_order_id))))


# -- 5.3 one item at a time ----------------------------------------------------------------
def repair_item_solution(conn: sqlite3.Connection, item_id: str, now: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection WHERE item_id = ?", (item_id,))
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders WHERE item_id = ?"
                     " GROUP BY item_id", (item_id,))
        # Fence this item's events, and only this item's: the others are not rebuilt here.
        conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE item_id = ?"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now, item_id))


def repair_item_fence_all(conn: sqlite3.Connection, item_id: str, now: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection WHERE item_id = ?", (item_id,))
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders WHERE item_id = ?"
                     " GROUP BY item_id", (item_id,))
        conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE true"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))


def repair_item_clears_all(conn: sqlite3.Connection, item_id: str, now: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders WHERE item_id = ?"
                     " GROUP BY item_id", (item_id,))
        conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE item_id = ?"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now, item_id))


def repair_item_unfenced(conn: sqlite3.Connection, item_id: str, now: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection WHERE item_id = ?", (item_id,))
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders WHERE item_id = ?"
                     " GROUP BY item_id", (item_id,))


def run_repair_item(repair_item: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **FAULTS)
    lab = course_lab(seed=seed, faults=faults, workers=WORKERS)
    errors: list[str] = []
    failures: list[str] = []
    suspects: list[str] = []
    lab.place_orders(15)
    lab.lose_messages(2)
    drain(lab)
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
    drain(lab)
    # A lost order whose inbox row was written by the repair of another item: say so.
    fenced = [(o, item, repaired[t]) for o, item, t in lab.conn.execute(
        "SELECT o.order_id, o.item_id, i.processed_at FROM orders AS o"
        " JOIN inbox_processed AS i USING (event_id) ORDER BY o.created_at, o.order_id")
        if t in repaired and repaired[t] != item
        and _applications(lab.conn, o) == 0]
    if fenced and not failures:
        o, item, by = fenced[0]
        failures.append(f"{len(fenced)} events were marked processed by the repair of another"
                        f" item: order {o} ({item}) by your repair of {by}, which did not"
                        " count it")
    where = describe_faults(faults, workers=WORKERS, orders=15,
                            extra="2 messages lost on purpose; the drifted items repaired one"
                                  " at a time while orders keep arriving (6, then 2 between"
                                  " repairs)")
    return judge(lab, seed=seed, faults=where, errors=[*errors, *errors_of(lab)],
                 extra_failures=failures, focus=suspects)


register(Exercise(
    id="repair-item", chapter=5, title="Repair one item at a time",
    run=run_repair_item, solution=repair_item_solution, starter=repair_item_fence_all,
    params=("conn", "item_id", "now"),
    wrong=(("lost", repair_item_fence_all), ("changed other items", repair_item_clears_all),
           ("duplicated", repair_item_unfenced))))
