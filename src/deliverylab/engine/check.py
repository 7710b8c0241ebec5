"""The checker: which guarantee did this run actually deliver?

For every order (the source of truth) it counts how many times the order's event took effect,
read from ``delivery_log`` rows that were committed in the effect's own transaction. A repair
by ``reconcile`` counts as one application and restarts the count; a delivery the repair's
fence refused (``fenced``) is not an application. Then:

* **correct**: applied exactly once;
* **duplicated**: applied more than once;
* **lost**: never applied, and no message left that could still apply it;
* **pending**: not applied yet, its message still in the queue (or its event still in the
  store's outbox, not yet published by the relay);
* **dead-lettered**: not applied, parked in ``dead_letters``.

It also compares the projection with the truth item by item, and reads the history a repair
cannot undo: the orders whose effect had run more than once, or never, before the repair
counted them. A repaired projection is correct; the emails sent twice stay sent, and the
verdict says so.

Where messages wait is the broker's business: by default the queue tables on the same
connection; pass ``broker=`` (any :class:`~deliverylab.engine.broker.Broker`) when they wait
elsewhere. The broker is then read outside the store's snapshot, so while workers run an
event may move between *pending* and *correct* between the two reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .store import OUTBOX_TABLE, Store, dialect_of, missing_tables

if TYPE_CHECKING:
    import pandas as pd

    from .broker import Broker

EVENT_COLUMNS = ["order_id", "item_id", "qty", "event_id", "applications", "state"]
# An order's applications: its event's 'applied' rows after its last 'reconciled' row (CTE
# ``applied``, column ``n``), plus one for that row (CTE ``last_rec``). The same scan counts the
# 'applied' rows before that row (``before``): the history a repair hid from the projection.
# Shared with labviews' counters and the repair. (CASE, not SQLite's sum of a comparison: the
# same SQL runs on PostgreSQL.)
APPLICATIONS_CTE = """
    WITH last_rec AS (
        SELECT event_id, max(seq) AS rs FROM delivery_log
         WHERE outcome = 'reconciled' GROUP BY event_id),
    applied AS (
        SELECT l.event_id,
               sum(CASE WHEN l.seq > coalesce(r.rs, 0) THEN 1 ELSE 0 END) AS n,
               sum(CASE WHEN l.seq < r.rs THEN 1 ELSE 0 END) AS before
          FROM delivery_log AS l
          LEFT JOIN last_rec AS r USING (event_id)
         WHERE l.outcome = 'applied'
         GROUP BY l.event_id)
"""
_EVENTS_SQL = APPLICATIONS_CTE + """
    SELECT o.order_id, o.item_id, o.qty, o.event_id,
           coalesce(a.n, 0) + (CASE WHEN r.rs IS NULL THEN 0 ELSE 1 END) AS applications,
           r.rs IS NOT NULL AS repaired, coalesce(a.before, 0) AS before
      FROM orders AS o
      LEFT JOIN applied AS a USING (event_id)
      LEFT JOIN last_rec AS r USING (event_id)
     ORDER BY o.created_at, o.order_id
"""


def _read_events(conn: Store, broker: Broker | None,
                 ) -> tuple[list[tuple[str, str, int, str, int, str]], tuple[int, int, int]]:
    """Every order's state, and the history of its repairs, from one read of the log."""
    if broker is None:
        queued = {r[0] for r in conn.execute("SELECT event_id FROM queue_messages")}
        dead = {r[0] for r in conn.execute("SELECT event_id FROM dead_letters")}
    else:
        queued, dead = broker.queued_event_ids(), broker.dead_lettered_event_ids()
    if not missing_tables(conn, (OUTBOX_TABLE,)):  # not yet relayed: on its way too
        queued = queued | {r[0] for r in conn.execute(
            "SELECT event_id FROM outbox WHERE sent_at IS NULL")}
    out = []
    duplicated = extra = never = 0
    for order_id, item_id, qty, event_id, n, repaired, before in conn.execute(_EVENTS_SQL):
        if repaired:  # ran more than once before its repair, or never: the repair hid it
            if before > 1:
                duplicated, extra = duplicated + 1, extra + before - 1
            elif before == 0:
                never += 1
        if n == 1:
            state = "correct"
        elif n > 1:
            state = "duplicated"
        elif event_id in queued:
            state = "pending"
        elif event_id in dead:
            state = "dead_lettered"
        else:
            state = "lost"
        out.append((order_id, item_id, qty, event_id, n, state))
    return out, (duplicated, extra, never)


def event_states(conn: Store, broker: Broker | None = None,
                 ) -> list[tuple[str, str, int, str, int, str]]:
    """(order_id, item_id, qty, event_id, applications, state) for every order; the queued
    and dead-lettered events are read from ``broker``, or from the queue tables on ``conn``."""
    return _read_events(conn, broker)[0]


def projection_vs_truth(conn: Store) -> list[tuple[str, int, int, int]]:
    """(item_id, truth, projection, delta) for every item in either, sorted by item."""
    rows = conn.execute("""
        WITH truth AS (SELECT item_id, sum(qty) AS qty FROM orders GROUP BY item_id),
        items AS (SELECT item_id FROM truth UNION SELECT item_id FROM inventory_projection)
        SELECT i.item_id, coalesce(t.qty, 0), coalesce(p.reserved_qty, 0)
          FROM items AS i
          LEFT JOIN truth AS t USING (item_id)
          LEFT JOIN inventory_projection AS p USING (item_id)
         ORDER BY i.item_id""").fetchall()
    return [(item, truth, proj, proj - truth) for item, truth, proj in rows]


@dataclass(frozen=True, slots=True)
class CheckResult:
    orders: int
    correct: int
    duplicated: int
    lost: int
    pending: int
    dead_lettered: int
    extra_applications: int
    drifted_items: int
    projection_equals_truth: bool
    # History a repair cannot undo (see _read_events): zero when no repair ever ran.
    repaired_duplicated: int = 0
    repaired_extra_applications: int = 0
    repaired_never_applied: int = 0

    @property
    def ok(self) -> bool:
        """Every order applied exactly once and the projection equals the truth."""
        return self.correct == self.orders and self.projection_equals_truth

    @property
    def repaired(self) -> bool:
        """A repair hid wrong effects from the projection; they still happened."""
        return bool(self.repaired_duplicated or self.repaired_never_applied)

    def _history(self) -> str:
        parts = []
        if self.repaired_duplicated:
            n = self.repaired_duplicated
            parts.append(f"{_orders(n)} had duplicated effects before the repair"
                         f" (+{self.repaired_extra_applications} extra)")
        if self.repaired_never_applied:
            n = self.repaired_never_applied
            parts.append(f"{_orders(n)} {'was' if n == 1 else 'were'} never applied"
                         " (lost or in flight) and counted by the repair")
        return "; ".join(parts)

    @property
    def verdict(self) -> str:
        if self.ok and self.repaired:
            return f"OK (repaired): projection equals truth; {self._history()}"
        if self.ok:
            return (f"OK: all {self.orders} orders applied exactly once;"
                    " projection equals truth")
        parts = []
        if self.lost:
            parts.append(f"{self.lost} lost")
        if self.duplicated:
            parts.append(f"{self.duplicated} duplicated (+{self.extra_applications} extra)")
        if self.dead_lettered:
            parts.append(f"{self.dead_lettered} dead-lettered")
        if self.pending:
            parts.append(f"{self.pending} pending")
        drift = ("projection equals truth" if self.projection_equals_truth
                 else f"projection differs from truth on {self.drifted_items} item(s)")
        # PENDING: only events still on their way. A projection that differs with nothing on
        # its way (someone wrote to it, or skipped an event) is broken too.
        waiting = self.pending and not (self.lost or self.duplicated or self.dead_lettered)
        head = "PENDING" if waiting else "BROKEN"
        history = f"; {self._history()}" if self.repaired else ""
        return f"{head}: {', '.join(parts) or 'no event problems'}; {drift}{history}"

    def as_dict(self) -> dict[str, object]:
        d = {name: getattr(self, name) for name in self.__slots__}
        d["verdict"] = self.verdict
        return d


def check(conn: Store, broker: Broker | None = None) -> CheckResult:
    """Compare what happened with the truth. Reads only, from one snapshot (a read
    transaction) of the store, so it is consistent while workers run; ``broker``: where the
    messages wait, when not in the queue tables on ``conn``."""
    own = not conn.in_transaction
    if own:
        dialect_of(conn).begin_snapshot(conn)
    try:
        events, history = _read_events(conn, broker)
        items = projection_vs_truth(conn)
    finally:
        if own:
            conn.execute("COMMIT")
    states = [e[5] for e in events]
    extra = sum(max(0, e[4] - 1) for e in events)
    drifted = sum(1 for row in items if row[3] != 0)
    return CheckResult(
        orders=len(states), correct=states.count("correct"),
        duplicated=states.count("duplicated"), lost=states.count("lost"),
        pending=states.count("pending"), dead_lettered=states.count("dead_lettered"),
        extra_applications=extra, drifted_items=drifted, projection_equals_truth=drifted == 0,
        repaired_duplicated=history[0], repaired_extra_applications=history[1],
        repaired_never_applied=history[2],
    )


def _orders(n: int) -> str:
    return f"{n} order" if n == 1 else f"{n} orders"


def events_frame(conn: Store, broker: Broker | None = None) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(event_states(conn, broker), columns=EVENT_COLUMNS)


def drift_frame(conn: Store) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(projection_vs_truth(conn),
                        columns=["item_id", "truth", "projection", "delta"])
