"""Each database's dialect, on the real database: what it is asked for is what happens.

One fixture opens a fresh store on each database (a SQLite file; a PostgreSQL schema made and
dropped per test). The invariants are the engine's own: a snapshot read sees one state while
another connection commits; a plain ``BEGIN`` means what the database means by it (never
silently a stronger isolation); a lock held elsewhere past the wait is the dialect's
"locked"; the repair's lock orders it against an effect that read the fence.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from deliverylab.brokers.postgres import PostgresBroker
from deliverylab.brokers.registry import table_broker
from deliverylab.brokers.sqlite import SQLiteBroker
from deliverylab.engine import store, store_postgres
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.dialect import Dialect
from deliverylab.engine.errors import STORE_ERRORS, InvalidInput
from deliverylab.engine.ids import Ids
from deliverylab.engine.store import SQLITE, Store, dialect_of
from deliverylab.engine.store_postgres import POSTGRESQL, for_store


@pytest.fixture
def two(db: str) -> Iterator[tuple[Dialect, Store, Store]]:
    """The store's dialect and two connections to it (two processes, as far as the database
    can tell)."""
    dialect = for_store(db)
    a, b = dialect.connect(db), dialect.connect(db)
    try:
        yield dialect, a, b
    finally:
        for conn in (a, b):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()


def orders(conn: Store) -> int:
    n: int = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    return n


def place(conn: Store, order_id: str) -> None:
    conn.execute("INSERT INTO orders (order_id, item_id, qty, event_id, request_hash,"
                 " created_at) VALUES (?, 'tea', 1, ?, 'h', 0)", (order_id, f"evt-{order_id}"))


def test_each_store_names_its_own_dialect(db: str) -> None:
    dialect = for_store(db)
    conn = dialect.connect(db)
    try:
        assert dialect_of(conn) is dialect
        assert dialect.missing_tables(conn, store.TABLES) == []
        assert dialect.missing_tables(conn, ("orders", "no_such_table")) == ["no_such_table"]
    finally:
        conn.close()
    assert {for_store("lab.db"), for_store(db)} <= {SQLITE, POSTGRESQL}


def test_a_snapshot_read_sees_one_state_while_another_connection_commits(two) -> None:
    dialect, reader, writer = two
    dialect.begin_snapshot(reader)
    assert orders(reader) == 0  # the first read fixes the snapshot
    place(writer, "o-1")  # autocommit: committed at once
    assert orders(writer) == 1
    assert orders(reader) == 0  # still the snapshot
    reader.execute("COMMIT")
    assert orders(reader) == 1


def test_a_plain_begin_is_the_database_default_not_a_snapshot_on_postgresql(pg_url: str) -> None:
    """On PostgreSQL a plain ``BEGIN`` is READ COMMITTED, as PostgreSQL means it: each
    statement sees what committed before it. Only ``begin_snapshot`` asks for more."""
    reader, writer = POSTGRESQL.connect(pg_url), POSTGRESQL.connect(pg_url)
    try:
        reader.execute("BEGIN")
        level = reader.execute("SHOW transaction_isolation").fetchone()[0]
        assert level == "read committed"
        assert orders(reader) == 0
        place(writer, "o-1")
        assert orders(reader) == 1  # a newer snapshot for the next statement
        reader.execute("COMMIT")
        POSTGRESQL.begin_snapshot(reader)
        assert reader.execute("SHOW transaction_isolation").fetchone()[0] == "repeatable read"
        reader.execute("COMMIT")
    finally:
        reader.close()
        writer.close()


def test_only_spelling_is_translated() -> None:
    assert store_postgres.translate("BEGIN") == ("BEGIN", None)
    assert store_postgres.translate("BEGIN IMMEDIATE") == ("BEGIN", None)
    assert store_postgres.translate("SELECT ?1, ?2, ?1") == ("SELECT %(_1)s, %(_2)s, %(_1)s",
                                                            (1, 2))


def test_a_write_held_up_past_the_wait_is_the_dialects_locked(two) -> None:
    dialect, holder, waiter = two
    holder.execute("BEGIN IMMEDIATE")
    place(holder, "o-1")  # a row (PostgreSQL) or the database (SQLite) is locked until commit
    dialect.wait_at_most(waiter, 0.1)
    with pytest.raises(STORE_ERRORS) as caught:
        with store.transaction(waiter):
            place(waiter, "o-1")  # the same key: it waits for the holder's commit
    assert dialect.timed_out(caught.value), caught.value
    holder.execute("ROLLBACK")
    assert not waiter.in_transaction and orders(waiter) == 0


def test_the_write_probe_says_locked_behind_a_held_lock_and_writes_nothing(db: str) -> None:
    dialect = for_store(db)
    holder = dialect.connect(db)
    probe = dialect.connect(db, busy_timeout=0.05)
    tables = ("orders", "idempotency_keys", "queue_messages")
    try:
        assert dialect.probe_write(probe, tables) == "ok"
        holder.execute("BEGIN IMMEDIATE")
        holder.execute({"sqlite": "DELETE FROM orders",
                        "postgresql": "LOCK TABLE orders IN EXCLUSIVE MODE"}[dialect.name])
        assert dialect.probe_write(probe, tables) == "locked"
        holder.execute("ROLLBACK")
        assert dialect.probe_write(probe, tables) == "ok"
        assert not probe.in_transaction and orders(probe) == 0
    finally:
        holder.close()
        probe.close()


def test_durability_is_read_back_and_a_level_the_database_lacks_is_refused(db: str) -> None:
    dialect = for_store(db)
    for level in dialect.durabilities:
        conn = dialect.connect(db, synchronous=level)
        try:
            assert dialect.durability(conn) == level
        finally:
            conn.close()
    missing = {"NORMAL", "FULL", "EXTRA"} - set(dialect.durabilities)
    for level in missing:
        with pytest.raises(InvalidInput, match=f"on {dialect.title}") as bad:
            dialect.connect(db, synchronous=level)
        assert bad.value.field == "synchronous"
    assert missing == ({"EXTRA"} if dialect is POSTGRESQL else set())


def test_the_queue_table_gets_the_broker_written_for_its_database(two) -> None:
    dialect, conn, _ = two
    broker = table_broker(conn, clock=FakeClock(), ids=Ids(1))
    assert broker.dialect is dialect
    assert type(broker) is {SQLITE: SQLiteBroker, POSTGRESQL: PostgresBroker}[dialect]
    other = PostgresBroker if dialect is SQLITE else SQLiteBroker
    with pytest.raises(InvalidInput, match=f"a {dialect.name} store takes its own broker"):
        other(conn, clock=FakeClock(), ids=Ids(1))


def test_the_repair_lock_makes_the_repair_wait_for_an_effect_that_read_the_fence(
        two) -> None:
    """The effect's transaction reads the fence table; the repair's lock (PostgreSQL) or its
    write lock (SQLite) waits until that transaction ends, so the repair cannot run between
    the effect's read and its commit."""
    dialect, effect, repair = two
    effect.execute("BEGIN IMMEDIATE")
    effect.execute("SELECT count(*) FROM reconciled_events").fetchone()
    started, done = threading.Event(), threading.Event()

    def run_repair() -> None:
        started.set()
        with store.transaction(repair):
            dialect.lock_for_repair(repair)
            repair.execute("DELETE FROM inventory_projection")
        done.set()

    t = threading.Thread(target=run_repair)
    t.start()
    started.wait(5)
    assert not done.wait(0.5), "the repair ran inside the effect's transaction"
    effect.execute("COMMIT")
    t.join(10)
    assert done.is_set()
