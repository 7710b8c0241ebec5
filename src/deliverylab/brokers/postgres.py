"""The queue table on PostgreSQL: the SQLite broker's verbs, with a claim that locks.

SQLite has one writer at a time, so its claim (``UPDATE … WHERE seq = (SELECT seq … LIMIT 1)``)
cannot hand a message to two workers: the second claim starts after the first committed and
sees the new ``visible_at``. PostgreSQL runs the two claims at once. Under READ COMMITTED both
subqueries pick the same row from their snapshots; the second ``UPDATE`` waits for the first's
row lock, and when the first commits it re-checks only its own ``WHERE seq = …`` against the
new row version — still true — and claims the message again: two workers, one message, two
receipts (see :data:`NAIVE_CLAIM` and the tests).

The claim here locks the rows it picks and skips rows another claim holds
(``FOR UPDATE SKIP LOCKED``): two concurrent claims take different messages, and neither waits.
The lease is committed at once, in its own transaction, as on SQLite: a worker that crashes
keeps the delivery count it was given, so a poison message reaches ``max_receives`` and is
dead-lettered instead of looping (holding the row lock for the whole processing instead would
roll the count back with every crash).

Times come from the injected clock, never the server's ``now()``, so a FakeClock drives it.
"""

from __future__ import annotations

import json
from typing import Any

from ..engine.dialect import Dialect
from ..engine.errors import InvalidInput, check_int, check_number
from ..engine.store_postgres import POSTGRESQL, PgConnection
from ..engine.trace import Outcome, lease_detail
from .base import MAX_VISIBILITY_TIMEOUT_S, Delivery, Received, Removal, check_delivery
from .sqlite import _DELIVERY_COLUMNS, Queue, _deliveries

# The claim, as on SQLite, plus the row lock: the subquery locks what it picks and skips what
# another claim has locked. LIMIT before the lock: it locks only the rows it returns.
CLAIM = f"""
    UPDATE queue_messages
       SET visible_at = :lease_until,
           lease_until = :lease_until,
           receipt = :token || '.' || (delivery_count + 1),
           delivery_count = delivery_count + 1
     WHERE seq IN (SELECT seq FROM queue_messages
                    WHERE visible_at <= :now
                    ORDER BY visible_at, seq
                    LIMIT :n
                      FOR UPDATE SKIP LOCKED)
    RETURNING {_DELIVERY_COLUMNS}
"""

# SQLite's claim for one message, unchanged: safe with one writer, not on PostgreSQL.
NAIVE_CLAIM = Queue._CLAIM_ONE

# Ack by [seq, receipt] pairs passed as one JSON list, as on SQLite: one statement for the
# whole batch, one primary-key probe for each pair.
_ACK_MANY = """
    DELETE FROM queue_messages AS q
     USING json_array_elements(CAST(:pairs AS json)) AS j
     WHERE q.seq = CAST(j.value ->> 0 AS bigint) AND q.receipt = j.value ->> 1
    RETURNING q.seq, q.receipt
"""

_LOG_COLUMNS = ("at, worker, correlation_id, event_id, message_id, delivery_count, outcome,"
                " detail")

# The claim and its ``received`` rows in one statement, so one round trip and, outside a
# caller's transaction, its own transaction: the rows it picks are locked as CLAIM locks them.
# Unless one of them is due for the dead letters (this receive would exceed max_receives):
# then it claims nothing and returns one row of NULLs, and the receive takes the general path
# (claim, moves and rows in one transaction, the trace in the SQLite broker's order).
CLAIM_LOGGED = f"""
    WITH picked AS (SELECT seq, delivery_count FROM queue_messages
                     WHERE visible_at <= :now
                     ORDER BY visible_at, seq
                     LIMIT :n
                       FOR UPDATE SKIP LOCKED),
         claimed AS (UPDATE queue_messages
                        SET visible_at = :lease_until,
                            lease_until = :lease_until,
                            receipt = :token || '.' || (delivery_count + 1),
                            delivery_count = delivery_count + 1
                      WHERE seq IN (SELECT seq FROM picked)
                        AND NOT EXISTS (SELECT 1 FROM picked WHERE delivery_count >= :max)
                     RETURNING {_DELIVERY_COLUMNS}),
         logged AS (INSERT INTO delivery_log ({_LOG_COLUMNS})
                    SELECT :now, :worker, correlation_id, event_id, message_id, delivery_count,
                           :outcome, :detail
                      FROM claimed ORDER BY seq)
    SELECT {_DELIVERY_COLUMNS} FROM claimed
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
     WHERE EXISTS (SELECT 1 FROM picked WHERE delivery_count >= :max)
"""

# The ack and its trace rows in one statement: the deliveries as one JSON list of [seq,
# receipt, correlation id, event id, message id, delivery count], each row deleted while its
# receipt matches, and an ``acked`` or ``ack_rejected`` row for each delivery, in order. For
# deliveries of distinct messages (the same message twice takes the general path, which
# decides which of them acks).
ACK_LOGGED = f"""
    WITH j AS (SELECT CAST(value ->> 0 AS bigint) AS seq, value ->> 1 AS receipt,
                      value ->> 2 AS correlation_id, value ->> 3 AS event_id,
                      value ->> 4 AS message_id, CAST(value ->> 5 AS integer) AS delivery_count,
                      ordinality AS i
                 FROM json_array_elements(CAST(:deliveries AS json)) WITH ORDINALITY),
         gone AS (DELETE FROM queue_messages AS q USING j
                   WHERE q.seq = j.seq AND q.receipt = j.receipt
                  RETURNING q.seq, q.receipt),
         logged AS (INSERT INTO delivery_log ({_LOG_COLUMNS})
                    SELECT :now, :worker, j.correlation_id, j.event_id, j.message_id,
                           j.delivery_count,
                           CASE WHEN g.seq IS NULL THEN :rejected ELSE :acked END,
                           CASE WHEN g.seq IS NULL THEN :stale ELSE '' END
                      FROM j LEFT JOIN gone AS g ON g.seq = j.seq
                     ORDER BY j.i)
    SELECT seq, receipt FROM gone
"""


class PostgresBroker(Queue):
    """The queue table in a PostgreSQL schema (a :class:`~deliverylab.engine.store_postgres.PgConnection`).
    Every verb but the claim and the batched ack runs the SQLite broker's own SQL."""

    dialect: Dialect = POSTGRESQL
    _CLAIM = CLAIM  # what the SQLite broker's receive runs, for a batch and for one
    _CLAIM_ONE = CLAIM
    _ACK_MANY = _ACK_MANY

    def __init__(self, conn: PgConnection, **kw: Any) -> None:
        super().__init__(conn, **kw)

    def receive(self, visibility_timeout: float, max_messages: int = 1, *,
                worker: str = "worker") -> Received:
        """The SQLite broker's receive, same rows, same trace. With the trace on, the claim
        and its ``received`` rows are one statement (:data:`CLAIM_LOGGED`): one round trip
        instead of four (``BEGIN``, claim, rows, ``COMMIT``)."""
        vt = check_number("visibility_timeout", visibility_timeout, minimum=0,
                          maximum=MAX_VISIBILITY_TIMEOUT_S)
        n = check_int("max_messages", max_messages, minimum=1, maximum=1000)
        now, token = self.clock.now(), self.ids.receipt()
        if not self.writes_trace:
            return self._claim(now, vt, n, token, worker)
        cur = self.conn.cursor()
        cur.row_factory = None  # plain tuples, in Delivery's field order
        rows = cur.execute(CLAIM_LOGGED, {
            "lease_until": now + vt, "token": token, "now": now, "n": n,
            "max": self.max_receives, "worker": worker, "outcome": Outcome.RECEIVED,
            "detail": lease_detail(now + vt)}).fetchall()
        if any(r[0] is None for r in rows):  # one to dead-letter: the general path
            return self._claim(now, vt, n, token, worker)
        rows.sort()  # by seq: RETURNING promises no order
        self.parked = []
        return Received(_deliveries(rows) if rows else ())

    def ack_many(self, deliveries: list[Delivery], *, worker: str = "worker") -> list[bool]:
        """The SQLite broker's ack_many, same answers, same trace. With the trace on and
        distinct messages, the delete and its rows are one statement (:data:`ACK_LOGGED`):
        one round trip instead of four."""
        if not isinstance(deliveries, list | tuple):
            raise InvalidInput("deliveries", deliveries, "a list of deliveries")
        for d in deliveries:
            check_delivery(d)
        if (not self.writes_trace or not deliveries
                or len({d.seq for d in deliveries}) < len(deliveries)):
            return super().ack_many(deliveries, worker=worker)
        cur = self.conn.cursor()
        cur.row_factory = None
        gone = dict(cur.execute(ACK_LOGGED, {
            "deliveries": json.dumps([[d.seq, d.receipt, d.correlation_id, d.event_id,
                                       d.message_id, d.delivery_count] for d in deliveries]),
            "now": self.clock.now(), "worker": worker, "acked": Outcome.ACKED,
            "rejected": Outcome.ACK_REJECTED, "stale": "receipt is no longer current"}))
        return [gone.get(d.seq) == d.receipt for d in deliveries]


# The name the SQLite broker's alias (Queue) suggests.
PostgresQueue = PostgresBroker


# -- for the registry ---------------------------------------------------------------------------
def removal_of(url: str, *, field: str = "store") -> Removal:
    """What ``deliverylab cleanup`` removes for the ``postgresql://`` URL ``url``: its schema,
    ``DROP SCHEMA … CASCADE`` (never ``public``). Reads only. A bad URL, a server that does
    not answer, or a schema holding other tables than a lab's is InvalidInput naming
    ``field``; a schema already gone is said, not refused."""
    import psycopg

    from ..engine.store_postgres import CONNECT_TIMEOUT_S, schema_of

    schema = schema_of(url, field)
    if schema == "public":
        raise InvalidInput(field, url, "the URL of a lab's own schema: 'deliverylab cleanup'"
                                       " never drops the schema 'public'")
    try:
        raw = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0].removeprefix("connection failed: ") if text else \
            type(exc).__name__
        raise InvalidInput(field, url, f"the URL of a reachable PostgreSQL server ({reason})"
                           ) from None
    try:
        found = raw.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                            (schema,)).fetchone()
        tables = {r[0] for r in raw.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema,))}
        counted = raw.execute(f'SELECT count(*) FROM "{schema}".orders').fetchone() \
            if "orders" in tables else None
        orders = None if counted is None else counted[0]
    finally:
        raw.close()
    if found is None:
        return Removal(f"PostgreSQL schema {schema} (not there: nothing to remove)")
    if tables and not tables & {"orders", "queue_messages"}:
        raise InvalidInput(field, url, f"the URL of a deliverylab schema, and schema {schema!r}"
                                       f" holds other tables ({', '.join(sorted(tables)[:5])});"
                                       f" drop it yourself if it is yours")

    def drop() -> None:
        with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    detail = "" if orders is None else f" ({orders} orders)"
    return Removal(f"PostgreSQL schema {schema}{detail}", drop, [f"{len(tables)} tables"])
