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

from typing import Any

from ..engine.dialect import Dialect
from ..engine.store_postgres import POSTGRESQL, PgConnection
from ..engine.errors import InvalidInput
from ..engine.store_postgres import PgConnection
from .base import Removal
from .sqlite import _DELIVERY_COLUMNS, Queue

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


class PostgresBroker(Queue):
    """The queue table in a PostgreSQL schema (a :class:`~deliverylab.engine.store_postgres.PgConnection`).
    Every verb but the claim and the batched ack runs the SQLite broker's own SQL."""

    dialect: Dialect = POSTGRESQL
    _CLAIM = CLAIM  # what the SQLite broker's receive runs, for a batch and for one
    _CLAIM_ONE = CLAIM
    _ACK_MANY = _ACK_MANY

    def __init__(self, conn: PgConnection, **kw: Any) -> None:
        super().__init__(conn, **kw)


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
        orders = raw.execute(f'SELECT count(*) FROM "{schema}".orders').fetchone()[0] \
            if "orders" in tables else None
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
