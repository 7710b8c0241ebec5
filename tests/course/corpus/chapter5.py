"""Chapter 5's corpus: answers an expert learner might write, graded as a reader's would be.

``WRONG`` holds plausible wrong answers, each with the substring its FAIL reason must hold
and the nemesis class that catches it; ``CORRECT`` holds correct designs other than the
model solution, which must PASS.
"""

from __future__ import annotations

import sqlite3

from deliverylab.course import apply_order_placed, transaction
from deliverylab.course.ex05 import (
    fence_by_order_of_the_last_repair,
    fence_ignored,
    fence_read_from_inbox,
    repair_fence_only,
    repair_item_clears_all,
    repair_item_fence_all,
    repair_item_unfenced,
    repair_rebuild_only,
    repair_reports_from_outside,
)

CHAPTER = 5

# -- in-flight-repair: wrong ---------------------------------------------------------------
COUNTS = "SELECT item_id, reserved_qty FROM inventory_projection"
REBUILD = ("INSERT INTO inventory_projection (item_id, reserved_qty)"
           " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
FENCE_ALL = ("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
             " SELECT 'inventory', event_id, ? FROM orders WHERE true"
             " ON CONFLICT (consumer, event_id) DO NOTHING")


FENCED = "SELECT event_id FROM reconciled_events WHERE consumer = 'inventory'"


def snapshot(conn):
    return dict(conn.execute(COUNTS)), {r[0] for r in conn.execute(FENCED)}


def report_since(conn, before):
    """A true report: how much each item moved and which events were fenced since
    ``before`` (a snapshot)."""
    counts, fence = before
    after, fence_now = snapshot(conn)
    return {"moved": {k: after.get(k, 0) - counts.get(k, 0) for k in counts.keys() | after.keys()
                      if after.get(k, 0) != counts.get(k, 0)},
            "fenced": sorted(fence_now - fence)}


def repair_two_transactions(conn, now):
    with transaction(conn):
        before = snapshot(conn)
        conn.execute("DELETE FROM inventory_projection")
        conn.execute(REBUILD)
        report = report_since(conn, before)
    with transaction(conn):  # the fence, a moment later
        conn.execute(FENCE_ALL, (now,))
    return report


def repair_no_transaction(conn, now):
    before = snapshot(conn)
    conn.execute("DELETE FROM inventory_projection")
    conn.execute(REBUILD)
    conn.execute(FENCE_ALL, (now,))
    return report_since(conn, before)


def repair_fences_only_queued(conn, now):
    with transaction(conn):
        before = snapshot(conn)
        conn.execute("DELETE FROM inventory_projection")
        conn.execute(REBUILD)
        # Only what could still arrive... from the queue.
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     " SELECT 'inventory', event_id, ? FROM queue_messages WHERE true"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))
        return report_since(conn, before)


def repair_swallows_lock(conn, now):
    try:
        with transaction(conn):
            before = snapshot(conn)
            conn.execute("DELETE FROM inventory_projection")
            conn.execute(REBUILD)
            conn.execute(FENCE_ALL, (now,))
            return report_since(conn, before)
    except sqlite3.OperationalError:
        return {"moved": {}, "fenced": []}  # another repair holds the lock: it will do the job


def repair_reads_then_writes(conn, now):
    # Which events are still queued? Look first, then count the others in a short write.
    queued = {r[0] for r in conn.execute("SELECT event_id FROM queue_messages")}
    applied = {r[0] for r in conn.execute("SELECT event_id FROM inbox_processed")}
    with transaction(conn):
        before = snapshot(conn)
        rows = conn.execute("SELECT item_id, qty, event_id FROM orders").fetchall()
        counted = [r for r in rows if r[2] not in queued or r[2] in applied]
        sums: dict[str, int] = {}
        for item, qty, _ in counted:
            sums[item] = sums.get(item, 0) + qty
        conn.execute("DELETE FROM inventory_projection")
        conn.executemany("INSERT INTO inventory_projection (item_id, reserved_qty)"
                         " VALUES (?, ?)", sorted(sums.items()))
        conn.executemany("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                         " VALUES ('inventory', ?, ?) ON CONFLICT DO NOTHING",
                         [(r[2], now) for r in counted])
        return report_since(conn, before)


def repair_reports_new_counts(conn, now):
    with transaction(conn):
        before = snapshot(conn)
        conn.execute("DELETE FROM inventory_projection")
        conn.execute(REBUILD)
        conn.execute(FENCE_ALL, (now,))
        # The counts it wrote, not how much they moved.
        return report_since(conn, before) | {"moved": dict(conn.execute(COUNTS))}


def repair_reports_every_item(conn, now):
    with transaction(conn):
        before = snapshot(conn)
        conn.execute("DELETE FROM inventory_projection")
        conn.execute(REBUILD)
        conn.execute(FENCE_ALL, (now,))
        report = report_since(conn, before)
        after = dict(conn.execute(COUNTS))
    report["moved"] = {k: after[k] - before[0].get(k, 0) for k in after}  # 0 if untouched
    return report


def repair_reports_the_plan(conn, now):
    # The drift as the diff saw it a moment before the repair: workers move on meanwhile.
    truth = dict(conn.execute("SELECT item_id, sum(qty) FROM orders GROUP BY item_id"))
    have = dict(conn.execute(COUNTS))
    with transaction(conn):
        before = snapshot(conn)
        conn.execute("DELETE FROM inventory_projection")
        conn.execute(REBUILD)
        conn.execute(FENCE_ALL, (now,))
        report = report_since(conn, before)
    report["moved"] = {k: truth.get(k, 0) - have.get(k, 0) for k in truth.keys() | have.keys()
                       if truth.get(k, 0) != have.get(k, 0)}
    return report


def repair_reports_every_fenced_event(conn, now):
    with transaction(conn):
        before = snapshot(conn)
        conn.execute("DELETE FROM inventory_projection")
        conn.execute(REBUILD)
        conn.execute(FENCE_ALL, (now,))
        report = report_since(conn, before)
        # The whole fence, not what this run added to it.
        report["fenced"] = sorted(r[0] for r in conn.execute(FENCED))
    return report


# -- in-flight-repair: correct designs ------------------------------------------------------


def repair_counts_what_is_not_in_flight(conn, now):
    """Count the orders whose event can no longer take effect on its own (its message is
    gone, parked, or already applied or fenced), fence exactly those, and leave the events
    still queued and unapplied to the workers."""
    settled = ("(event_id NOT IN (SELECT event_id FROM queue_messages)"
               " OR event_id IN (SELECT event_id FROM inbox_processed)"
               " OR event_id IN (SELECT event_id FROM reconciled_events))")
    with transaction(conn):
        before = snapshot(conn)
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     f" SELECT item_id, sum(qty) FROM orders WHERE {settled}"
                     " GROUP BY item_id")
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     f" SELECT 'inventory', event_id, ? FROM orders WHERE {settled}"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))
        return report_since(conn, before)


def repair_adds_never_applied(conn, now):
    """A compensating delta: add only the orders no one applied and no queued message will
    apply, and fence exactly those; the report is the sum it added per item."""
    never = ("event_id NOT IN (SELECT event_id FROM queue_messages)"
             " AND event_id NOT IN (SELECT event_id FROM reconciled_events)"
             " AND event_id NOT IN (SELECT event_id FROM delivery_log"
             "                      WHERE outcome = 'applied')")
    added = {}
    with transaction(conn):
        fenced = [r[0] for r in conn.execute(f"SELECT event_id FROM orders WHERE {never}")]
        for item, qty in conn.execute(f"SELECT item_id, sum(qty) FROM orders WHERE {never}"
                                      " GROUP BY item_id").fetchall():
            conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                         " VALUES (?, ?) ON CONFLICT (item_id) DO UPDATE"
                         " SET reserved_qty = reserved_qty + excluded.reserved_qty",
                         (item, qty))
            added[item] = qty
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     f" SELECT 'inventory', event_id, ? FROM orders WHERE {never}", (now,))
    return {"moved": added, "fenced": fenced}


def repair_delta_per_item(conn, now):
    """Move each drifted item by its difference from the truth, fence every order, and
    report the differences it applied."""
    gaps = {}
    with transaction(conn):
        fence = {r[0] for r in conn.execute(FENCED)}
        truth = dict(conn.execute("SELECT item_id, sum(qty) FROM orders GROUP BY item_id"))
        have = dict(conn.execute(COUNTS))
        for item in sorted(truth.keys() | have.keys()):
            gap = truth.get(item, 0) - have.get(item, 0)
            if gap:
                conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                             " VALUES (?, ?) ON CONFLICT (item_id) DO UPDATE"
                             " SET reserved_qty = reserved_qty + ?", (item, gap, gap))
                gaps[item] = gap
        conn.execute("INSERT OR IGNORE INTO reconciled_events"
                     " (consumer, event_id, reconciled_at)"
                     " SELECT 'inventory', event_id, ? FROM orders", (now,))
        fenced = {r[0] for r in conn.execute(FENCED)} - fence
    return {"moved": gaps, "fenced": list(fenced)}


# -- fenced-worker ---------------------------------------------------------------------------


def fence_only_on_redelivery(conn, delivery):
    # A first delivery cannot have been counted by a repair... can it?
    if delivery.delivery_count > 1 and conn.execute(
            "SELECT 1 FROM reconciled_events WHERE consumer = 'inventory' AND event_id = ?",
            (delivery.event_id,)).fetchone():
        return
    apply_order_placed(conn, delivery)


def fence_by_repair_time(conn, delivery):
    # Skip the events of orders placed before the last repair: it counted them all.
    last = conn.execute("SELECT max(reconciled_at) FROM reconciled_events").fetchone()[0]
    placed = conn.execute("SELECT created_at FROM orders WHERE event_id = ?",
                          (delivery.event_id,)).fetchone()[0]
    if last is None or placed > last:
        apply_order_placed(conn, delivery)


def fence_by_repair_time_inclusive(conn, delivery):
    last = conn.execute("SELECT max(reconciled_at) FROM reconciled_events").fetchone()[0]
    placed = conn.execute("SELECT created_at FROM orders WHERE event_id = ?",
                          (delivery.event_id,)).fetchone()[0]
    if last is None or placed >= last:
        apply_order_placed(conn, delivery)


def fence_in_one_statement(conn, delivery):
    p = delivery.payload
    conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                 " SELECT ?, ? WHERE NOT EXISTS (SELECT 1 FROM reconciled_events"
                 "  WHERE consumer = 'inventory' AND event_id = ?)"
                 " ON CONFLICT (item_id) DO UPDATE"
                 " SET reserved_qty = reserved_qty + excluded.reserved_qty",
                 (p["itemId"], p["qty"], delivery.event_id))


def fence_counted(conn, delivery):
    n = conn.execute("SELECT count(*) FROM reconciled_events AS f JOIN orders AS o"
                     " USING (event_id) WHERE f.consumer = 'inventory'"
                     " AND o.order_id = ?", (delivery.payload["orderId"],)).fetchone()[0]
    if n == 0:
        apply_order_placed(conn, delivery)


# -- repair-item ------------------------------------------------------------------------------


def repair_item_swallows_lock(conn, item_id, now):
    try:
        with transaction(conn):
            conn.execute("DELETE FROM inventory_projection WHERE item_id = ?", (item_id,))
            conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                         " SELECT item_id, sum(qty) FROM orders WHERE item_id = ?"
                         " GROUP BY item_id", (item_id,))
            conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                         " SELECT 'inventory', event_id, ? FROM orders WHERE item_id = ?"
                         " ON CONFLICT (consumer, event_id) DO NOTHING", (now, item_id))
    except sqlite3.OperationalError:
        pass  # busy: the next night's job will get it


def repair_item_upsert(conn, item_id, now):
    with transaction(conn):
        total = conn.execute("SELECT coalesce(sum(qty), 0) FROM orders WHERE item_id = ?",
                             (item_id,)).fetchone()[0]
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty) VALUES (?, ?)"
                     " ON CONFLICT (item_id) DO UPDATE SET reserved_qty = excluded.reserved_qty",
                     (item_id, total))
        conn.executemany("INSERT OR IGNORE INTO reconciled_events"
                         " (consumer, event_id, reconciled_at) VALUES ('inventory', ?, ?)",
                         [(e, now) for (e,) in conn.execute(
                             "SELECT event_id FROM orders WHERE item_id = ?",
                             (item_id,)).fetchall()])


def repair_item_delta(conn, item_id, now):
    with transaction(conn):
        truth = conn.execute("SELECT coalesce(sum(qty), 0) FROM orders WHERE item_id = ?",
                             (item_id,)).fetchone()[0]
        row = conn.execute("SELECT reserved_qty FROM inventory_projection WHERE item_id = ?",
                           (item_id,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO inventory_projection VALUES (?, ?)", (item_id, truth))
        elif row[0] != truth:
            conn.execute("UPDATE inventory_projection SET reserved_qty = reserved_qty + ?"
                         " WHERE item_id = ?", (truth - row[0], item_id))
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     " SELECT 'inventory', o.event_id, ? FROM orders AS o"
                     " WHERE o.item_id = ? AND NOT EXISTS (SELECT 1 FROM reconciled_events AS f"
                     "  WHERE f.consumer = 'inventory' AND f.event_id = o.event_id)",
                     (now, item_id))


WRONG = [
    ("in-flight-repair", repair_two_transactions, "counted twice", "interleaving"),
    ("in-flight-repair", repair_no_transaction, "UNIQUE constraint failed", "interleaving"),
    ("in-flight-repair", repair_reads_then_writes, "missing", "interleaving"),
    ("in-flight-repair", repair_fences_only_queued, "counted twice", "lost-message"),
    ("in-flight-repair", repair_swallows_lock, "missing", "store-failure"),
    ("in-flight-repair", repair_rebuild_only, "counted twice", "stopped"),
    ("in-flight-repair", repair_fence_only, "missing", "lost-message"),
    ("in-flight-repair", repair_reports_from_outside, "reported changes it did not make",
     "interleaving"),
    ("in-flight-repair", repair_reports_the_plan, "reported changes it did not make",
     "interleaving"),
    ("in-flight-repair", repair_reports_new_counts, "reported changes it did not make",
     "baseline"),
    ("in-flight-repair", repair_reports_every_item, "reported changes it did not make",
     "baseline"),
    ("in-flight-repair", repair_reports_every_fenced_event, "reported a fence it did not add",
     "baseline"),
    ("fenced-worker", fence_ignored, "duplicated", "stopped"),
    ("fenced-worker", fence_read_from_inbox, "duplicated", "stopped"),
    ("fenced-worker", fence_only_on_redelivery, "duplicated", "stopped"),
    ("fenced-worker", fence_by_order_of_the_last_repair, "lost", "baseline"),
    ("fenced-worker", fence_by_repair_time, "lost", "past-range"),
    ("fenced-worker", fence_by_repair_time_inclusive, "duplicated", "past-range"),
    ("repair-item", repair_item_fence_all, "lost", "baseline"),
    ("repair-item", repair_item_clears_all, "changed other items", "baseline"),
    ("repair-item", repair_item_unfenced, "duplicated", "stopped"),
    ("repair-item", repair_item_swallows_lock, "differs from the truth", "store-failure"),
]
CORRECT = [
    ("in-flight-repair", repair_counts_what_is_not_in_flight),
    ("in-flight-repair", repair_adds_never_applied),
    ("in-flight-repair", repair_delta_per_item),
    ("fenced-worker", fence_in_one_statement),
    ("fenced-worker", fence_counted),
    ("repair-item", repair_item_upsert),
    ("repair-item", repair_item_delta),
]
