"""Reconciliation: find the drift between the truth and the projection, and repair it.

The seed's reconcile emptied the projection and rebuilt it from ``orders`` — while events for
those orders could still be in the queue. When such an event arrived afterwards it was applied
again, and the repair itself created a double count.

:func:`repair` closes that race: in **one** transaction it rebuilds the projection from the
truth *and* writes an inbox row for every order's event. An event still in flight is then a
duplicate the idempotent consumer skips. Orders placed after the repair commit are not in the
rebuild and not in the inbox, so their events apply normally.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .check import drift_frame, event_states, projection_vs_truth
from .clock import Clock
from .db import transaction
from .errors import check_text
from .trace import Outcome, log_many
from .worker import CONSUMER

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Drift:
    items: pd.DataFrame           # item_id, truth, projection, delta: only items that differ
    unapplied: pd.DataFrame       # orders whose event has not taken effect, and where it is

    @property
    def clean(self) -> bool:
        return self.items.empty and self.unapplied.empty


def diff(conn: sqlite3.Connection) -> Drift:
    """The drift, read-only: items whose projection differs from the truth, and the events
    never applied (lost, dead-lettered, or still pending)."""
    import pandas as pd

    items = drift_frame(conn)
    items = items[items["delta"] != 0].reset_index(drop=True)
    rows = [(o, i, q, e, s) for o, i, q, e, n, s in event_states(conn) if n == 0]
    unapplied = pd.DataFrame(rows, columns=["order_id", "item_id", "qty", "event_id", "state"])
    return Drift(items=items, unapplied=unapplied)


@dataclass(frozen=True, slots=True)
class RepairResult:
    items_changed: int     # projection rows whose value the rebuild changed (or removed)
    events_marked: int     # events the inbox did not have yet: in flight or lost
    orders: int


def repair(conn: sqlite3.Connection, *, clock: Clock, consumer: str = CONSUMER,
           worker: str = "reconcile") -> RepairResult:
    """Rebuild the projection from ``orders`` and mark every order's event processed, in one
    transaction. Safe to run while workers run; running it twice changes nothing the second
    time."""
    check_text("consumer", consumer)
    with transaction(conn):
        before = projection_vs_truth(conn)
        changed = sum(1 for row in before if row[3] != 0)
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
        now = clock.now()
        newly = conn.execute(
            "SELECT o.order_id, o.event_id FROM orders AS o"
            " WHERE NOT EXISTS (SELECT 1 FROM inbox_processed AS i"
            "                    WHERE i.consumer = ? AND i.event_id = o.event_id)"
            " ORDER BY o.created_at, o.order_id", (consumer,)).fetchall()
        conn.executemany(
            "INSERT INTO inbox_processed (consumer, event_id, processed_at) VALUES (?, ?, ?)",
            [(consumer, event_id, now) for _, event_id in newly])
        # The checker restarts its count at a 'reconciled' row: log one for every order whose
        # count was not exactly one (missing or double), so the repair's effect is visible.
        wrong = [(o, e) for o, _, _, e, n, _ in event_states(conn) if n != 1]
        log_many(conn, [(now, worker, order_id, event_id, None, 0, Outcome.RECONCILED,
                         "counted by the rebuild from orders") for order_id, event_id in wrong])
        total = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    return RepairResult(items_changed=changed, events_marked=len(newly), orders=total)
