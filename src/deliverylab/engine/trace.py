"""The trace: every delivery leaves rows in ``delivery_log``.

Each row carries the correlation id (the order id), the event id, the message id, the
delivery count and the outcome, stamped with the injected clock. A row that records a state
change is written in the same transaction as the change, so the log never claims an effect
that did not commit. This module writes the rows; ``deliverylab.book.traceviews`` reads and
draws them.
"""

from __future__ import annotations

import functools
import json
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .store import dialect_of

if TYPE_CHECKING:
    from .broker import Delivery
    from .store import Store


class Outcome(StrEnum):
    RECEIVED = "received"
    APPLIED = "applied"
    DUPLICATE_SKIPPED = "duplicate_skipped"
    ACK_FAILED = "ack_failed"
    ACKED = "acked"
    ACK_REJECTED = "ack_rejected"
    CRASHED = "crashed"
    LOST = "lost"
    NACKED = "nacked"
    EXTENDED = "extended"
    DEAD_LETTERED = "dead_lettered"
    REDRIVEN = "redriven"
    RECONCILED = "reconciled"
    FENCED = "fenced"  # not applied: a repair already counted the event (reconcile.py)


# Below this many seconds a time is a fake clock's (the chapters start at 0), not the epoch's.
_REAL_CLOCK_S = 10 * 365 * 86400


def lease_detail(until: float) -> str:
    """The detail of a ``received`` or ``extended`` row: when the lease ends. On a fake clock
    the plain number (``lease until 2``); on the wall clock the exact seconds and the local
    time of day (``lease until 1796630187.118 (10:36:27.118)``), not a rounded float. The
    number comes first either way, for the readers that parse it."""
    if until < _REAL_CLOCK_S:
        return f"lease until {until:g}"
    return f"lease until {until:.3f} ({_time_of_day(int(until))}.{int(until * 1000) % 1000:03d})"


@functools.lru_cache(maxsize=8)
def _time_of_day(second: int) -> str:
    """The local time of day of an epoch second: one ``strftime`` per second, not one per
    receive (a worker receives thousands of times a second)."""
    return time.strftime("%H:%M:%S", time.localtime(second))


_INSERT = ("INSERT INTO delivery_log (at, worker, correlation_id, event_id, message_id,"
           " delivery_count, outcome, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def log(conn: Store, *, at: float, worker: str, event_id: str,
        correlation_id: str | None, message_id: str | None, delivery_count: int,
        outcome: Outcome, detail: str = "") -> None:
    """Append one row. Call it inside the transaction whose change it records."""
    conn.execute(_INSERT, (at, worker, correlation_id, event_id, message_id, delivery_count,
                           outcome, detail))


def log_delivery(conn: Store, d: Delivery, *, at: float, worker: str,
                 outcome: Outcome, detail: str = "") -> None:
    """:func:`log` for one delivery: its event, order, message and count."""
    log(conn, at=at, worker=worker, event_id=d.event_id, correlation_id=d.correlation_id,
        message_id=d.message_id, delivery_count=d.delivery_count, outcome=outcome, detail=detail)


# PostgreSQL: the rows as one JSON parameter. psycopg parses a statement with more than 50
# parameters again at every call (it caches none of them): 8 per row, so a VALUES row per
# delivery cost more to parse than to run for a batch of a hundred.
_INSERT_JSON = ("INSERT INTO delivery_log (at, worker, correlation_id, event_id, message_id,"
                " delivery_count, outcome, detail)"
                " SELECT CAST(value ->> 0 AS double precision), value ->> 1, value ->> 2,"
                " value ->> 3, value ->> 4, CAST(value ->> 5 AS integer), value ->> 6,"
                " value ->> 7 FROM json_array_elements(CAST(? AS json)) WITH ORDINALITY"
                " ORDER BY ordinality")


def log_many(conn: Store, rows: list[tuple[Any, ...]]) -> None:

    """Rows of (at, worker, correlation_id, event_id, message_id, delivery_count, outcome,
    detail), appended in order by one INSERT: on SQLite with a VALUES row for each (half the
    cost of ``executemany`` for a batch of a hundred, measured), on PostgreSQL from one JSON
    list (:data:`_INSERT_JSON`)."""
    if not rows:
        return
    if len(rows) > 1 and dialect_of(conn).rows_as_json:
        conn.execute(_INSERT_JSON, (json.dumps(rows),))
    else:
        conn.execute(_insert_rows(len(rows)), [value for row in rows for value in row])


@functools.lru_cache(maxsize=64)
def _insert_rows(n: int) -> str:
    return _INSERT + ", (?, ?, ?, ?, ?, ?, ?, ?)" * (n - 1)
