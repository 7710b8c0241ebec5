"""Chapter 5's corpus: answers an expert learner might write, graded as a reader's would be.

``WRONG`` holds plausible wrong answers, each with the substring its FAIL reason must hold
and the nemesis class that catches it; ``CORRECT`` holds correct designs other than the
model solution, which must PASS.
"""

from __future__ import annotations

import sqlite3

from deliverylab.course import apply_order_placed, transaction

# -- in-flight-repair: wrong ---------------------------------------------------------------


def repair_two_transactions(conn, now):
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
    with transaction(conn):  # the fence, a moment later
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE true"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))


def repair_no_transaction(conn, now):
    conn.execute("DELETE FROM inventory_projection")
    conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                 " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
    conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                 " SELECT 'inventory', event_id, ? FROM orders WHERE true"
                 " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))


def repair_fences_only_queued(conn, now):
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
        # Only what could still arrive... from the queue.
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     " SELECT 'inventory', event_id, ? FROM queue_messages WHERE true"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))


def repair_swallows_lock(conn, now):
    try:
        with transaction(conn):
            conn.execute("DELETE FROM inventory_projection")
            conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                         " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
            conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                         " SELECT 'inventory', event_id, ? FROM orders WHERE true"
                         " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))
    except sqlite3.OperationalError:
        pass  # another repair holds the lock: it will do the job


def repair_reads_then_writes(conn, now):
    # Which events are still queued? Look first, then count the others in a short write.
    queued = {r[0] for r in conn.execute("SELECT event_id FROM queue_messages")}
    applied = {r[0] for r in conn.execute("SELECT event_id FROM inbox_processed")}
    with transaction(conn):
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


# -- in-flight-repair: correct designs ------------------------------------------------------


def repair_counts_what_is_not_in_flight(conn, now):
    """Count the orders whose event can no longer take effect on its own (its message is
    gone, parked, or already applied or fenced), fence exactly those, and leave the events
    still queued and unapplied to the workers."""
    settled = ("(event_id NOT IN (SELECT event_id FROM queue_messages)"
               " OR event_id IN (SELECT event_id FROM inbox_processed)"
               " OR event_id IN (SELECT event_id FROM reconciled_events))")
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     f" SELECT item_id, sum(qty) FROM orders WHERE {settled}"
                     " GROUP BY item_id")
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     f" SELECT 'inventory', event_id, ? FROM orders WHERE {settled}"
                     " ON CONFLICT (consumer, event_id) DO NOTHING", (now,))


def repair_adds_never_applied(conn, now):
    """A compensating delta: add only the orders no one applied and no queued message will
    apply, and fence exactly those."""
    never = ("event_id NOT IN (SELECT event_id FROM queue_messages)"
             " AND event_id NOT IN (SELECT event_id FROM reconciled_events)"
             " AND event_id NOT IN (SELECT event_id FROM delivery_log"
             "                      WHERE outcome = 'applied')")
    with transaction(conn):
        for item, qty in conn.execute(f"SELECT item_id, sum(qty) FROM orders WHERE {never}"
                                      " GROUP BY item_id").fetchall():
            conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                         " VALUES (?, ?) ON CONFLICT (item_id) DO UPDATE"
                         " SET reserved_qty = reserved_qty + excluded.reserved_qty",
                         (item, qty))
        conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                     f" SELECT 'inventory', event_id, ? FROM orders WHERE {never}", (now,))


def repair_delta_per_item(conn, now):
    """Move each drifted item by its difference from the truth, and fence every order."""
    with transaction(conn):
        truth = dict(conn.execute("SELECT item_id, sum(qty) FROM orders GROUP BY item_id"))
        have = dict(conn.execute("SELECT item_id, reserved_qty FROM inventory_projection"))
        for item in sorted(truth.keys() | have.keys()):
            gap = truth.get(item, 0) - have.get(item, 0)
            if gap:
                conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                             " VALUES (?, ?) ON CONFLICT (item_id) DO UPDATE"
                             " SET reserved_qty = reserved_qty + ?", (item, gap, gap))
        conn.execute("INSERT OR IGNORE INTO reconciled_events"
                     " (consumer, event_id, reconciled_at)"
                     " SELECT 'inventory', event_id, ? FROM orders", (now,))


WRONG = [
    ("in-flight-repair", repair_two_transactions, "counted twice", "interleaving"),
    ("in-flight-repair", repair_no_transaction, "UNIQUE constraint failed", "interleaving"),
    ("in-flight-repair", repair_reads_then_writes, "missing", "interleaving"),
    ("in-flight-repair", repair_fences_only_queued, "counted twice", "lost message"),
    ("in-flight-repair", repair_swallows_lock, "missing", "store failure"),
]
CORRECT = [
    ("in-flight-repair", repair_counts_what_is_not_in_flight),
    ("in-flight-repair", repair_adds_never_applied),
    ("in-flight-repair", repair_delta_per_item),
]
