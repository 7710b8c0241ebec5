"""What the lab looks like right now: status and trace, as plain data and as text.

``deliverylab status`` and ``GET /status`` show the same report, and ``deliverylab trace`` and
``GET /orders/{id}`` the same story of one order, so both are built here once. Every report is
read inside one read transaction: a snapshot, so a worker committing halfway through cannot make
the truth and the projection disagree on the page when they agree in the file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from ..brokers.base import NO_MESSAGE_ID
from ..engine.check import check, event_states, projection_vs_truth
from ..engine.display import safe_text
from ..engine.store import OUTBOX_TABLE, Store, dialect_of, missing_tables
from ..engine.worker import CONSUMER

if TYPE_CHECKING:
    from ..brokers.base import Broker

MAX_ITEM_ROWS = 20   # a status page lists at most this many items (drifted ones first)
MAX_DEAD_ROWS = 10


@contextmanager
def snapshot(conn: Store) -> Iterator[Store]:
    """A read transaction: every SELECT inside sees the same committed state (WAL snapshot)."""
    if conn.in_transaction:
        yield conn
        return
    dialect_of(conn).begin_snapshot(conn)
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


# -- one order ---------------------------------------------------------------------------------
def applications(rows: list[tuple[int, str]]) -> int:
    """How many times an event took effect, from its log rows as (seq, outcome): its 'applied'
    rows after its last 'reconciled' row, plus one for that row — the checker's count."""
    last_rec = max((seq for seq, outcome in rows if outcome == "reconciled"), default=None)
    applied = sum(1 for seq, outcome in rows if outcome == "applied" and seq > (last_rec or 0))
    return applied + (last_rec is not None)


def event_state(conn: Store, event_id: str,
                log_rows: list[tuple[int, str]] | None = None) -> tuple[int, str]:
    """(applications, state) of one event, counted exactly as :func:`deliverylab.engine.check` does.

    ``delivery_log`` has no index (see schema.sql): this reads it once, or not at all when the
    caller already holds the event's rows as (seq, outcome)."""
    if log_rows is None:
        log_rows = [tuple(r) for r in conn.execute(
            "SELECT seq, outcome FROM delivery_log WHERE event_id = ?"
            " AND outcome IN ('applied', 'reconciled')", (event_id,))]
    n = applications(log_rows)
    if n == 1:
        return n, "correct"
    if n > 1:
        return n, "duplicated"
    if conn.execute("SELECT 1 FROM queue_messages WHERE event_id = ?", (event_id,)).fetchone():
        return n, "pending"
    if not missing_tables(conn, (OUTBOX_TABLE,)) and conn.execute(  # not yet relayed
            "SELECT 1 FROM outbox WHERE event_id = ? AND sent_at IS NULL", (event_id,)).fetchone():
        return n, "pending"
    if conn.execute("SELECT 1 FROM dead_letters WHERE event_id = ?", (event_id,)).fetchone():
        return n, "dead_lettered"
    return n, "lost"


def order_view(conn: Store, row: sqlite3.Row,
               log_rows: list[tuple[int, str]] | None = None) -> dict[str, Any]:
    """An order row as the API shows it, with what became of its event."""
    applications, state = event_state(conn, row["event_id"], log_rows)
    return {"orderId": row["order_id"], "itemId": row["item_id"], "qty": row["qty"],
            "eventId": row["event_id"], "createdAt": row["created_at"],
            "applications": applications, "state": state}


def find_order(conn: Store, ref: str) -> sqlite3.Row | None:
    """The order with id ``ref``, or the order whose event id is ``ref``."""
    row = conn.execute("SELECT * FROM orders WHERE order_id = ?", (ref,)).fetchone()
    if row is None:
        row = conn.execute("SELECT * FROM orders WHERE event_id = ?", (ref,)).fetchone()
    return row


TRACE_KEYS = ("seq", "at", "worker", "deliveryCount", "outcome", "detail", "messageId")


def trace(conn: Store, ref: str) -> dict[str, Any] | None:
    """Every delivery-log row of one order's event, in order; None when there is no such order.

    ``ref`` is an order id or an event id."""
    with snapshot(conn):
        row = find_order(conn, ref)
        if row is None:
            return None
        rows = conn.execute(
            "SELECT seq, at, worker, delivery_count, outcome, detail, message_id"
            " FROM delivery_log WHERE event_id = ? ORDER BY seq", (row["event_id"],)).fetchall()
        return {"order": order_view(conn, row, [(r["seq"], r["outcome"]) for r in rows]),
                "deliveries": [dict(zip(TRACE_KEYS, tuple(r), strict=True)) for r in rows]}


# -- the whole lab -----------------------------------------------------------------------------
class Unlisted:
    """A broker apart from the store, as the status report reads it: every verb passed
    through, except that :meth:`queued_event_ids` never fails for a broker that cannot list
    its waiting messages without receiving them (RabbitMQ: a receive counts a delivery).

    There, while messages wait, the events the store has not applied and the broker has not
    dead-lettered are taken as waiting (pending): the report can say how many messages wait
    and how many orders are not applied, not which message is which. ``unlisted`` tells the
    report that it guessed (how many messages were ready then); 0 when the broker listed."""

    def __init__(self, broker: Broker, conn: Store) -> None:
        self._broker, self._conn, self.unlisted = broker, conn, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    def queued_event_ids(self) -> set[str]:
        try:
            return self._broker.queued_event_ids()
        except NotImplementedError:
            self.unlisted = max(1, self._broker.depth()["visible"])
        dead = self._broker.dead_lettered_event_ids()
        return {r[0] for r in self._conn.execute(
            "SELECT event_id FROM orders WHERE event_id NOT IN (SELECT event_id FROM"
            " delivery_log WHERE outcome IN ('applied', 'reconciled'))")} - dead


def collect(conn: Store, *, now: float | None = None,
            broker: Broker | None = None) -> dict[str, Any]:
    """The status report as plain, JSON-ready data. ``broker``: where the messages wait, when
    not in the queue table of the store's own database; its depth and its dead letters (by
    event: the contract names no more) are read outside the store's snapshot."""
    now = time.time() if now is None else now
    with snapshot(conn):
        if broker is None:
            total = conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
            visible = conn.execute("SELECT count(*) FROM queue_messages WHERE visible_at <= ?",
                                   (now,)).fetchone()[0]
        else:
            if not isinstance(broker, Unlisted):
                broker = cast("Broker", Unlisted(broker, conn))  # every verb passed through
            depth = broker.depth()
            visible, total = depth["visible"], depth["visible"] + depth["in_flight"]
        inbox = conn.execute("SELECT count(*) FROM inbox_processed WHERE consumer = ?",
                             (CONSUMER,)).fetchone()[0]
        result = check(conn, broker)
        items = [{"itemId": i, "truth": t, "projection": p, "delta": d}
                 for i, t, p, d in projection_vs_truth(conn)]
        if broker is None:
            rows = [(r["message_id"], r["event_id"], r["correlation_id"], r["delivery_count"],
                     r["last_error"]) for r in conn.execute(
                        "SELECT * FROM dead_letters ORDER BY dead_at, message_id")]
        else:
            events = sorted(broker.dead_lettered_event_ids())
            orders = dict(conn.execute(
                "SELECT event_id, order_id FROM orders WHERE event_id IN"
                " (SELECT value FROM json_each(?))", (json.dumps(events),)).fetchall())
            rows = [(None, e, orders.get(e), None, None) for e in events]
            rows += [(None, None, None, 1, NO_MESSAGE_ID)] * broker.dead_letters_without_id()
        applied = {e for _, _, _, e, n, _ in event_states(conn, broker) if n >= 1} \
            if rows else set()
        dead = [{"messageId": m, "eventId": e, "orderId": o, "receives": n, "lastError": error,
                 "alreadyApplied": e in applied} for m, e, o, n, error in rows]
        log_rows = conn.execute("SELECT count(*) FROM delivery_log").fetchone()[0]
        verdict = _verdict(conn, result)
    queue: dict[str, Any] = {"visible": visible, "inFlight": total - visible, "total": total}
    if broker is not None:  # whether its waiting messages could be listed (see Unlisted)
        queue["listed"] = not getattr(broker, "unlisted", 0)
    return {
        "orders": result.orders,
        "queue": queue,
        "inbox": inbox,
        "deadLetters": dead,
        "items": items,
        "deliveryLogRows": log_rows,
        "check": {k: v for k, v in result.as_dict().items()},
        "ok": result.ok,
        "verdict": verdict,
    }


def strangers(conn: Store) -> int:
    """How many events took effect here whose order is not in this store: their orders were
    placed in another database (a worker whose --store is not the API's --db, or whose
    --broker is another lab's queue). Nothing the store holds can explain their effect."""
    return conn.execute(
        "SELECT count(DISTINCT event_id) FROM delivery_log WHERE outcome = 'applied'"
        " AND event_id NOT IN (SELECT event_id FROM orders)").fetchone()[0]


def _verdict(conn: Store, result: Any) -> str:
    """The checker's verdict, with the reason when it has none to give: a projection that
    differs from the truth with no event problem among this store's orders."""
    verdict = result.verdict
    if result.ok:
        return verdict
    n = strangers(conn)
    if n:
        why = (f"{_plural(n, 'event')} applied here {'is' if n == 1 else 'are'} no order of"
               f" this store: {'its order was' if n == 1 else 'their orders were'} placed in"
               f" another database (do the worker's --store and the API's --db name the same"
               f" store, and is its --broker this lab's?)")
    else:
        why = ("no event of this store's orders explains the drift: the projection was"
               " written outside the workers, or by events whose trace is gone")
    if "no event problems" in verdict:
        return verdict.replace("no event problems", why, 1)
    return f"{verdict}; {why}" if n else verdict


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def table(header: list[str], rows: list[list[Any]], right: set[int]) -> list[str]:
    """Aligned, indented text columns; the columns in ``right`` are right-aligned. Cells are
    escaped first (:func:`~deliverylab.engine.display.safe_text`), so the widths are the printed ones."""
    cells = [header] + [[safe_text(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("  " + "  ".join(parts).rstrip())
    return out


def render(report: dict[str, Any], *, db: str | None = None) -> str:
    """The status report as text for a terminal: one line per line, whatever the ids hold
    (each line goes through :func:`~deliverylab.engine.display.safe_text`)."""
    q, c = report["queue"], report["check"]
    lines = []
    if db is not None:
        lines.append(f"database     {db}")
    lines.append(f"orders       {report['orders']}  (the source of truth)")
    lines.append(f"queue        {q['visible']} visible, {q['inFlight']} in flight"
                 f" (leased or waiting to retry)")
    if not q.get("listed", True):
        lines.append("             (the broker cannot list waiting messages without receiving"
                     " them: orders not applied count as pending while messages wait)")
    lines.append(f"inbox        {_plural(report['inbox'], 'event')} processed"
                 f" by consumer '{CONSUMER}'")
    dead = report["deadLetters"]
    harmless = sum(1 for d in dead if d["alreadyApplied"])
    note = f" ({harmless} already applied: nothing missing)" if harmless else ""
    foreign = sum(1 for d in dead if d["eventId"] is None)
    if foreign:
        note += (f" ({foreign} with {NO_MESSAGE_ID}: a foreign producer's, refused at once,"
                 f" no order to apply)")
    lines.append(f"dead letters {len(dead)}{note}")
    for d in dead[:MAX_DEAD_ROWS]:
        receives = "" if d["receives"] is None else f" receives={d['receives']}"
        lines.append(f"  {d['messageId'] or '(in the broker)'}  event={d['eventId'] or '-'}"
                     f" order={d['orderId']}{receives}  {d['lastError'] or ''}".rstrip())
    if len(dead) > MAX_DEAD_ROWS:
        lines.append(f"  … {len(dead) - MAX_DEAD_ROWS} more")

    items = report["items"]
    lines.append("")
    lines.append("projection vs truth (reserved qty per item)")
    if not items:
        lines.append("  (no orders yet)")
    else:
        shown = items
        if len(items) > MAX_ITEM_ROWS:
            drifted = [i for i in items if i["delta"] != 0]
            shown = drifted[:MAX_ITEM_ROWS]
        rows = [[i["itemId"], i["truth"], i["projection"],
                 f"{i['delta']:+d}" if i["delta"] else "0"] for i in shown]
        if rows:
            lines += table(["item", "truth", "projection", "delta"], rows, {1, 2, 3})
        hidden = len(items) - len(shown)
        if hidden:
            lines.append(f"  … {hidden} more items"
                         + (", all equal to the truth" if len(shown) < MAX_ITEM_ROWS else ""))

    lines.append("")
    lines.append(f"events       {c['correct']} applied exactly once, {c['duplicated']} duplicated,"
                 f" {c['lost']} lost, {c['pending']} pending, {c['dead_lettered']} dead-lettered")
    # "no orders yet" only when nothing at all happened: a projection that moved, or a dead
    # letter, with no order here is a problem the verdict names.
    empty = not report["orders"] and not items and not dead
    waiting = (f"; {_plural(q['total'], 'message')} in the queue, for orders of another"
               f" database" if q["total"] else "")
    lines.append("verdict      " + (f"no orders yet: POST /orders or 'deliverylab order'{waiting}"
                                     if empty else report["verdict"]))
    return "\n".join(map(safe_text, lines))


def _clock_time(at: float) -> str:
    """Seconds since the epoch as local time of day; small numbers (a fake clock) as seconds."""
    if at < 10 * 365 * 86400:
        return f"t={at:.3f}"
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"


def render_trace(story: dict[str, Any]) -> str:
    """One order's deliveries as text, one line per logged step."""
    o = story["order"]
    lines = [f"order {o['orderId']}  item={o['itemId']} qty={o['qty']}  event={o['eventId']}",
             f"state {o['state']} (applied {o['applications']}×)"]
    rows = story["deliveries"]
    if not rows:
        lines.append("no deliveries yet: the event is waiting in the queue for a worker"
                     if o["state"] == "pending" else "no deliveries logged")
        return "\n".join(map(safe_text, lines))
    t0 = rows[0]["at"]
    cells = []
    for r in rows:
        detail = "" if r["outcome"] == "received" else r["detail"]
        cells.append([_clock_time(r["at"]), f"+{r['at'] - t0:.3f}s", r["worker"],
                      r["deliveryCount"], r["outcome"], detail])
    lines.append("")
    lines += table(["time", "since first", "worker", "delivery", "outcome", "detail"],
                    cells, {1, 3})
    return "\n".join(map(safe_text, lines))
