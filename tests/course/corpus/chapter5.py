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
    repair_fence_in_inbox,
    repair_fence_only,
    repair_in_one_transaction,
    repair_item_clears_all,
    repair_item_fence_all,
    repair_item_unfenced,
    repair_one_item_per_transaction,
    repair_rebuild_only,
    repair_reports_from_outside,
)

CHAPTER = 5

# -- in-flight-repair: wrong ---------------------------------------------------------------
# Each of them works in batches of at most 8 rows written (the exercise's budget), unless
# the budget is its mistake.
COUNTS = "SELECT item_id, reserved_qty FROM inventory_projection"
ITEMS = "SELECT item_id FROM orders UNION SELECT item_id FROM inventory_projection"
FENCED = "SELECT event_id FROM reconciled_events WHERE consumer = 'inventory'"
UNFENCED = "event_id NOT IN (SELECT event_id FROM reconciled_events WHERE consumer = 'inventory')"
FENCE_ITEM = ("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
              " SELECT 'inventory', event_id, ? FROM orders WHERE item_id = ?"
              f" AND {UNFENCED} LIMIT 7")
COUNT_ITEM = ("INSERT INTO inventory_projection (item_id, reserved_qty)"
              " SELECT ?, coalesce(sum(qty), 0) FROM orders WHERE item_id = ?"
              " ON CONFLICT (item_id) DO UPDATE SET reserved_qty = excluded.reserved_qty")


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


def add(report, more):
    """The report of one more batch added to the run's."""
    for k, v in more["moved"].items():
        report["moved"][k] = report["moved"].get(k, 0) + v
        if not report["moved"][k]:
            del report["moved"][k]
    report["fenced"] = sorted({*report["fenced"], *more["fenced"]})
    return report


def items_of(conn):
    return [item for (item,) in conn.execute(ITEMS).fetchall()]


def repair_two_transactions(conn, now):
    report = {"moved": {}, "fenced": []}
    for item in items_of(conn):
        with transaction(conn):
            before = snapshot(conn)
            conn.execute(COUNT_ITEM, (item, item))
            add(report, report_since(conn, before))
        while True:  # the fence, a moment later, 7 at a time
            with transaction(conn):
                before = snapshot(conn)
                n = conn.execute(FENCE_ITEM, (now, item)).rowcount
                add(report, report_since(conn, before))
            if n < 7:
                break
    return report


def repair_no_transaction(conn, now):
    # Every statement commits on its own: each writes few rows.
    report = {"moved": {}, "fenced": []}
    for item in items_of(conn):
        before = snapshot(conn)
        conn.execute("DELETE FROM inventory_projection WHERE item_id = ?", (item,))
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders WHERE item_id = ?"
                     " GROUP BY item_id", (item,))
        while conn.execute(FENCE_ITEM, (now, item)).rowcount == 7:
            pass
        add(report, report_since(conn, before))
    return report


def repair_fences_only_queued(conn, now):
    report = {"moved": {}, "fenced": []}
    for item in items_of(conn):
        while True:
            with transaction(conn):
                before = snapshot(conn)
                # Only what could still arrive... from the queue.
                n = conn.execute(
                    "INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                    " SELECT 'inventory', event_id, ? FROM orders WHERE item_id = ?"
                    " AND event_id IN (SELECT event_id FROM queue_messages)"
                    f" AND {UNFENCED} LIMIT 7", (now, item)).rowcount
                if n < 7:
                    conn.execute(COUNT_ITEM, (item, item))
                add(report, report_since(conn, before))
            if n < 7:
                break
    return report


def repair_swallows_lock(conn, now):
    try:
        return repair_fence_then_count(conn, now)
    except sqlite3.OperationalError:
        return {"moved": {}, "fenced": []}  # another repair holds the lock: it will do the job


def repair_reads_then_writes(conn, now):
    # Which events are still queued, which applied? Look first, then write in short batches.
    queued = {r[0] for r in conn.execute("SELECT event_id FROM queue_messages")}
    applied = {r[0] for r in conn.execute("SELECT event_id FROM inbox_processed")}
    report = {"moved": {}, "fenced": []}
    for item in items_of(conn):
        with transaction(conn):
            before = snapshot(conn)
            rows = conn.execute("SELECT qty, event_id FROM orders WHERE item_id = ?",
                                (item,)).fetchall()
            counted = [r for r in rows if r[1] not in queued or r[1] in applied]
            conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                         " VALUES (?, ?) ON CONFLICT (item_id) DO UPDATE"
                         " SET reserved_qty = excluded.reserved_qty",
                         (item, sum(q for q, _ in counted)))
            fence = [(e, now) for _, e in counted if e not in before[1]]
            add(report, report_since(conn, before))
        for i in range(0, len(fence), 7):
            with transaction(conn):
                before = snapshot(conn)
                conn.executemany("INSERT INTO reconciled_events (consumer, event_id,"
                                 " reconciled_at) VALUES ('inventory', ?, ?)"
                                 " ON CONFLICT DO NOTHING", fence[i:i + 7])
                add(report, report_since(conn, before))
    return report


def repair_pages_by_offset(conn, now):
    # The unfenced events a page of 8 at a time, by OFFSET: but each page fenced shrinks
    # the set the next page is counted in.
    report = {"moved": {}, "fenced": []}
    page = 0
    while True:
        with transaction(conn):
            before = snapshot(conn)
            events = [(e, now) for (e,) in conn.execute(
                f"SELECT event_id FROM orders WHERE {UNFENCED} ORDER BY order_id"
                " LIMIT 8 OFFSET ?", (page * 8,)).fetchall()]
            conn.executemany("INSERT INTO reconciled_events (consumer, event_id,"
                             " reconciled_at) VALUES ('inventory', ?, ?)", events)
            add(report, report_since(conn, before))
        if not events:
            break
        page += 1
    for item in items_of(conn):  # then every count, the item's orders all fenced
        with transaction(conn):
            before = snapshot(conn)
            conn.execute(COUNT_ITEM, (item, item))
            add(report, report_since(conn, before))
    return report


def repair_fence_and_count_one_row_over(conn, now):
    # 8 events fenced and the count in the same batch: 9 rows.
    report = {"moved": {}, "fenced": []}
    for item in items_of(conn):
        while True:
            with transaction(conn):
                before = snapshot(conn)
                n = conn.execute(FENCE_ITEM.replace("LIMIT 7", "LIMIT 8"),
                                 (now, item)).rowcount
                conn.execute(COUNT_ITEM, (item, item))
                add(report, report_since(conn, before))
            if n < 8:
                break
    return report


def repair_reports_new_counts(conn, now):
    report = repair_fence_then_count(conn, now)
    # The counts it wrote, not how much they moved.
    return report | {"moved": {k: v for k, v in conn.execute(COUNTS) if k in report["moved"]}}


def repair_reports_every_item(conn, now):
    report = repair_fence_then_count(conn, now)
    for (item,) in conn.execute(ITEMS).fetchall():
        report["moved"].setdefault(item, 0)  # 0 if untouched
    return report


def repair_reports_the_plan(conn, now):
    # The drift as the diff saw it a moment before the repair: workers move on meanwhile.
    truth = dict(conn.execute("SELECT item_id, sum(qty) FROM orders GROUP BY item_id"))
    have = dict(conn.execute(COUNTS))
    report = repair_fence_then_count(conn, now)
    report["moved"] = {k: truth.get(k, 0) - have.get(k, 0) for k in truth.keys() | have.keys()
                       if truth.get(k, 0) != have.get(k, 0)}
    return report


def repair_reports_every_fenced_event(conn, now):
    report = repair_fence_then_count(conn, now)
    # The whole fence, not what this run added to it.
    report["fenced"] = sorted(r[0] for r in conn.execute(FENCED))
    return report


def repair_reports_the_last_batch(conn, now):
    report = {"moved": {}, "fenced": []}
    for item in items_of(conn):
        while True:
            with transaction(conn):
                before = snapshot(conn)
                n = conn.execute(FENCE_ITEM, (now, item)).rowcount
                if n < 7:
                    conn.execute(COUNT_ITEM, (item, item))
                report = report_since(conn, before)  # this batch's, not the run's
            if n < 7:
                break
    return report


# -- in-flight-repair: correct designs ------------------------------------------------------


def repair_fence_then_count(conn, now):
    """Fence first, count after: every unfenced event 8 to a batch, whatever its item; then
    each item in a batch of its own that fences what arrived since and sets the count to the
    truth (every order of the item fenced in that batch, so each is counted once)."""
    report = {"moved": {}, "fenced": []}
    while True:
        with transaction(conn):
            before = snapshot(conn)
            n = conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                             f" SELECT 'inventory', event_id, ? FROM orders WHERE {UNFENCED}"
                             " LIMIT 8", (now,)).rowcount
            add(report, report_since(conn, before))
        if n < 8:
            break
    for item in items_of(conn):
        while True:
            with transaction(conn):
                before = snapshot(conn)
                n = conn.execute(FENCE_ITEM, (now, item)).rowcount
                if n < 7:
                    truth, have = conn.execute(
                        "SELECT (SELECT coalesce(sum(qty), 0) FROM orders WHERE item_id = ?),"
                        " (SELECT coalesce(sum(reserved_qty), 0) FROM inventory_projection"
                        "  WHERE item_id = ?)", (item, item)).fetchone()
                    if truth != have:
                        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                                     " VALUES (?, ?) ON CONFLICT (item_id) DO UPDATE"
                                     " SET reserved_qty = reserved_qty + ?",
                                     (item, truth, truth - have))
                add(report, report_since(conn, before))
            if n < 7:
                break
    return report


def repair_counts_what_is_not_in_flight(conn, now):
    """Count the orders whose event can no longer take effect on its own (its message is
    gone, parked, or already applied or fenced), fence exactly those, 7 to a batch, and leave
    the events still queued and unapplied to the workers: an item's count, in the batch that
    fences its last settled events, is the sum of its fenced orders."""
    settled = ("(event_id NOT IN (SELECT event_id FROM queue_messages)"
               " OR event_id IN (SELECT event_id FROM inbox_processed))")
    report = {"moved": {}, "fenced": []}
    for item in items_of(conn):
        while True:
            with transaction(conn):
                before = snapshot(conn)
                n = conn.execute(
                    "INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                    " SELECT 'inventory', event_id, ? FROM orders WHERE item_id = ?"
                    f" AND {settled} AND {UNFENCED} LIMIT 7", (now, item)).rowcount
                if n < 7:
                    conn.execute(
                        "INSERT INTO inventory_projection (item_id, reserved_qty)"
                        " SELECT ?, coalesce(sum(qty), 0) FROM orders WHERE item_id = ?"
                        " AND event_id IN (SELECT event_id FROM reconciled_events"
                        "  WHERE consumer = 'inventory') ON CONFLICT (item_id)"
                        " DO UPDATE SET reserved_qty = excluded.reserved_qty", (item, item))
                add(report, report_since(conn, before))
            if n < 7:
                break
    return report


def repair_adds_never_applied(conn, now):
    """A compensating delta, 4 orders to a batch: add only the orders no one applied and no
    queued message will apply, and fence exactly those (at most 4 fence rows and 4 counts
    a batch); the report is the sum it added per item."""
    never = ("event_id NOT IN (SELECT event_id FROM queue_messages)"
             " AND event_id NOT IN (SELECT event_id FROM reconciled_events)"
             " AND event_id NOT IN (SELECT event_id FROM delivery_log"
             "                      WHERE outcome = 'applied')")
    added, fenced = {}, []
    while True:
        with transaction(conn):
            batch = conn.execute(f"SELECT item_id, qty, event_id FROM orders WHERE {never}"
                                 " ORDER BY order_id LIMIT 4").fetchall()
            for item, qty, event_id in batch:
                conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                             " VALUES (?, ?) ON CONFLICT (item_id) DO UPDATE"
                             " SET reserved_qty = reserved_qty + excluded.reserved_qty",
                             (item, qty))
                conn.execute("INSERT INTO reconciled_events (consumer, event_id,"
                             " reconciled_at) VALUES ('inventory', ?, ?)", (event_id, now))
                added[item] = added.get(item, 0) + qty
                fenced.append(event_id)
        if not batch:
            return {"moved": added, "fenced": fenced}


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
    ("in-flight-repair", repair_fence_in_inbox, "counted twice", "stopped"),
    ("in-flight-repair", repair_pages_by_offset, "counted twice", "past-range"),
    ("in-flight-repair", repair_in_one_transaction, "held the write lock for", "baseline"),
    ("in-flight-repair", repair_one_item_per_transaction, "held the write lock for",
     "past-range"),
    ("in-flight-repair", repair_fence_and_count_one_row_over, "held the write lock for 9 rows",
     "past-range"),
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
    ("in-flight-repair", repair_reports_the_last_batch, "reported", "baseline"),
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
    ("in-flight-repair", repair_fence_then_count),
    ("in-flight-repair", repair_counts_what_is_not_in_flight),
    ("in-flight-repair", repair_adds_never_applied),
    ("fenced-worker", fence_in_one_statement),
    ("fenced-worker", fence_counted),
    ("repair-item", repair_item_upsert),
    ("repair-item", repair_item_delta),
]
