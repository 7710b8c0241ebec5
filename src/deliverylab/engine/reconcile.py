"""Reconciliation: find the drift between the truth and the projection, and repair it.

The seed's reconcile emptied the projection and rebuilt it from ``orders`` — while events for
those orders could still be in the queue. When such an event arrived afterwards it was applied
again, and the repair itself created a double count.

:func:`repair` closes that race for every worker mode with one mechanism, a **fence**. In
**one** ``BEGIN IMMEDIATE`` transaction it rebuilds the projection from the truth *and*
inserts a ``reconciled_events`` row for the event of every order it counted. Every worker mode
(at-most-once, at-least-once, idempotent, transactional, one by one or batched) reads the fence
inside the transaction of its effect, and does not apply a fenced event: it logs the delivery
as ``fenced`` and acknowledges it as usual. Why that is enough, for any interleaving:

* Both transactions take SQLite's write lock up front, so a worker's effect commits either
  wholly before the repair or wholly after it; a read inside a write transaction sees every
  commit before it. The whole argument rests on this ordering. PostgreSQL has no such lock, so
  there the repair takes one (``LOCK TABLE reconciled_events IN ACCESS EXCLUSIVE MODE``, the
  dialect's ``lock_for_repair``); without it, at READ COMMITTED, an effect that read the fence
  before the repair committed applies on top of the rebuild
  (``deliverylab.book.pgdemo.repair_race``).
* An effect that committed **before** the repair is overwritten: the rebuild replaces the
  projection with the sum over ``orders``, which counts that order once.
* An effect that would commit **after** the repair reads the fence row the repair committed,
  and is refused. This is why the fence holds *every* counted order, not only those whose
  message is still queued: an at-most-once worker applies after it acked (the message is
  gone, the effect still to come), a lost ACK redelivers an applied event, a redrive brings a
  dead letter back.
* The rebuild and the fence are computed from the same ``orders`` rows in the same
  transaction, so an order is either in both (counted once, never applied again) or in neither
  (placed after the repair: its event applies normally). No order falls between the two.

The inbox stays the idempotent consumer's own record of what *it* processed: the repair does
not write to it. A watermark ("skip events of orders up to the last one rebuilt") is not a
substitute for the fence in general: order ids are random, and where ids come from a sequence
(PostgreSQL, MySQL) sequence order is not commit order, so an order committed late with a
small id is neither in the rebuild nor above the watermark. It holds with a single writer.

A database file made before the fence existed has no ``reconciled_events`` table; the repair
then refuses, naming it, and writes nothing (``deliverylab init-db`` adds the table).

Every statement here is set-based (``INSERT … SELECT``), so the repair does the same few
statements for ten orders or a hundred thousand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .check import APPLICATIONS_CTE, drift_frame, event_states
from .clock import Clock
from .errors import check_text
from .store import Store, check_schema, dialect_of, transaction
from .trace import Outcome
from .worker import CONSUMER

if TYPE_CHECKING:
    import pandas as pd

    from .broker import Broker


@dataclass(frozen=True)
class Drift:
    items: pd.DataFrame           # item_id, truth, projection, delta: only items that differ
    unapplied: pd.DataFrame       # orders whose event has not taken effect, and where it is

    @property
    def clean(self) -> bool:
        return bool(self.items.empty and self.unapplied.empty)


def diff(conn: Store, broker: Broker | None = None) -> Drift:
    """The drift, read-only: items whose projection differs from the truth, and the events
    never applied (lost, dead-lettered, or still pending in the queue tables on ``conn`` or
    in ``broker``). The repair itself needs no broker: it reads and writes the store only."""
    import pandas as pd

    items = drift_frame(conn)
    items = items[items["delta"] != 0].reset_index(drop=True)
    rows = [(o, i, q, e, s) for o, i, q, e, n, s in event_states(conn, broker)
            if n == 0]
    unapplied = pd.DataFrame(rows, columns=["order_id", "item_id", "qty", "event_id", "state"])
    return Drift(items=items, unapplied=unapplied)


@dataclass(frozen=True, slots=True)
class RepairResult:
    items_changed: int     # projection rows whose value the rebuild changed (or removed)
    events_fenced: int     # events newly fenced: a late delivery of one is not applied
    orders_recounted: int  # orders whose count was not exactly one (lost, pending, doubled)
    orders: int


_CHANGED = """
    WITH truth AS (SELECT item_id, sum(qty) AS qty FROM orders GROUP BY item_id)
    SELECT count(*) FROM (
        SELECT item_id FROM truth AS t LEFT JOIN inventory_projection AS p USING (item_id)
         WHERE p.reserved_qty IS NULL OR p.reserved_qty != t.qty
        UNION
        SELECT item_id FROM inventory_projection AS p LEFT JOIN truth AS t USING (item_id)
         WHERE t.item_id IS NULL) AS changed
"""
_FENCE = """
    INSERT INTO reconciled_events (consumer, event_id, reconciled_at)
    SELECT ?1, o.event_id, ?2 FROM orders AS o
     WHERE NOT EXISTS (SELECT 1 FROM reconciled_events AS f
                        WHERE f.consumer = ?1 AND f.event_id = o.event_id)
"""
# The checker restarts its count at a 'reconciled' row: one for every order whose count was
# not exactly one (missing or doubled), so the repair's effect is visible in the trace.
_LOG_RECOUNTED = ("INSERT INTO delivery_log (at, worker, correlation_id, event_id, message_id,"
                  " delivery_count, outcome, detail)" + APPLICATIONS_CTE + """
    SELECT ?1, ?2, o.order_id, o.event_id, NULL, 0, ?3, 'counted by the rebuild from orders'
      FROM orders AS o
      LEFT JOIN applied AS a USING (event_id)
      LEFT JOIN last_rec AS r USING (event_id)
     WHERE coalesce(a.n, 0) + (CASE WHEN r.rs IS NULL THEN 0 ELSE 1 END) != 1
     ORDER BY o.created_at, o.order_id
""")


def repair(conn: Store, *, clock: Clock, consumer: str = CONSUMER,
           worker: str = "reconcile") -> RepairResult:
    """Rebuild the projection from ``orders`` and fence every order's event, in one
    transaction. Safe to run while workers of any mode run; running it twice changes nothing
    the second time."""
    check_text("consumer", consumer)
    check_text("worker", worker)
    check_schema(conn)  # before any write: without the fence table no mode is protected
    with transaction(conn):
        # SQLite's BEGIN IMMEDIATE already orders the repair against every effect; PostgreSQL
        # locks the fence table for it (``LOCK TABLE … IN ACCESS EXCLUSIVE MODE``).
        dialect_of(conn).lock_for_repair(conn)
        changed = conn.execute(_CHANGED).fetchone()[0]
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
        now = clock.now()
        fenced = conn.execute(_FENCE, (consumer, now)).rowcount
        recounted = conn.execute(_LOG_RECOUNTED, (now, worker, str(Outcome.RECONCILED))).rowcount
        total = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    return RepairResult(items_changed=changed, events_fenced=fenced,
                        orders_recounted=recounted, orders=total)
