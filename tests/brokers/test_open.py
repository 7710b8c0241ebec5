"""One opener for a store and a broker (``registry.open_store_and_broker``): every kind of URL,
joined or not, bad input named with nothing written, and ``close`` releasing what was opened.

Real files, a real PostgreSQL schema and real queues and streams on the servers ``make
services`` starts.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import psycopg
import pytest
from support.pg import SERVER as PG_SERVER
from support.pg import new_url

from deliverylab.brokers import registry
from deliverylab.brokers.postgres import PostgresBroker
from deliverylab.brokers.sqlite import SQLiteBroker
from deliverylab.engine import store
from deliverylab.engine import store_postgres as pgstore
from deliverylab.engine.clock import FakeClock, SystemClock
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.ids import Ids


def opener(store_url, broker_url=None, **kw):
    kw.setdefault("clock", FakeClock())
    kw.setdefault("ids", Ids(1))
    return registry.open_store_and_broker(store_url, broker_url, **kw)


def family(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.glob(path.name + "*"))


def schema_exists(url: str) -> bool:
    with psycopg.connect(PG_SERVER, autocommit=True) as raw:
        return raw.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                           (pgstore.schema_of(url),)).fetchone() is not None


def round_trip(opened) -> None:
    """A message sent and received on the broker, and the store written and read."""
    opened.broker.send("evt-1", "OrderPlaced", {"orderId": "o-1", "itemId": "tea", "qty": 1},
                       correlation_id="o-1")
    got = opened.broker.receive(5.0, 1, worker="test")
    assert [d.event_id for d in got] == ["evt-1"]
    assert opened.broker.ack(got[0], worker="test")
    with store.transaction(opened.store):
        opened.store.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                             " VALUES ('tea', 1)")
    assert opened.store.execute("SELECT reserved_qty FROM inventory_projection"
                                " WHERE item_id = 'tea'").fetchone()[0] == 1


# -- the store's own queue table: joined ------------------------------------------------------
def test_a_file_store_alone_is_joined_to_its_own_queue_table(tmp_path: Path) -> None:
    db = tmp_path / "lab.db"
    store.init_db(db).close()
    with opener(db) as opened:
        assert opened.joined and opened.store_kind == opened.broker_kind == "sqlite"
        assert isinstance(opened.broker, SQLiteBroker) and opened.broker.conn is opened.store
        assert opened.broker.joins(opened.store) and opened.broker.writes_trace
        assert opened.broker_store is None and opened.broker_url is None
        round_trip(opened)
        # Joined: the effect and the ACK commit in one transaction, or neither does.
        opened.broker.send("evt-2", "OrderPlaced", {"orderId": "o-2", "itemId": "tea",
                                                    "qty": 1})
        delivery = opened.broker.receive(5.0, 1, worker="test")[0]
        with pytest.raises(RuntimeError), store.transaction(opened.store):
            opened.store.execute("UPDATE inventory_projection SET reserved_qty = 99")
            opened.broker.ack(delivery, worker="test")
            raise RuntimeError("the worker dies before the commit")
        assert opened.broker.queued_event_ids() == {"evt-2"}
        assert opened.store.execute("SELECT reserved_qty FROM inventory_projection"
                                    ).fetchone()[0] == 1


@pytest.mark.parametrize("again", ["same", "other spelling"])
def test_the_store_named_again_as_the_broker_is_the_store_itself(tmp_path: Path,
                                                                  again: str) -> None:
    db = tmp_path / "lab.db"
    store.init_db(db).close()
    named = str(db) if again == "same" else str(tmp_path / "." / ".." / tmp_path.name / "lab.db")
    assert registry.same_database(db, named)
    with opener(str(db), named) as opened:
        assert opened.joined and opened.broker.conn is opened.store
        assert opened.broker_store is None


def test_an_in_memory_store_is_made_with_init_and_refused_without() -> None:
    with opener(":memory:", init=True) as opened:
        assert opened.joined
        round_trip(opened)
    with pytest.raises(InvalidInput) as refused:
        opener(":memory:")
    assert refused.value.field == "store" and refused.value.value == ":memory:"


def test_a_postgresql_store_alone_is_joined_to_its_own_queue_table(pg_url: str) -> None:
    with opener(pg_url, max_receives=3) as opened:
        assert opened.joined and opened.store_kind == opened.broker_kind == "postgresql"
        assert isinstance(opened.broker, PostgresBroker) and opened.broker.conn is opened.store
        assert opened.broker.max_receives == 3
        round_trip(opened)


# -- a broker apart --------------------------------------------------------------------------
def test_a_file_broker_apart_is_its_own_database_and_writes_no_trace(tmp_path: Path) -> None:
    db, queue = tmp_path / "store.db", tmp_path / "broker.db"
    store.init_db(db).close()
    store.init_db(queue).close()
    with opener(db, str(queue)) as opened:
        assert not opened.joined and opened.broker_kind == "sqlite"
        assert opened.broker_store is not None and opened.broker.conn is opened.broker_store
        assert not opened.broker.joins(opened.store) and not opened.broker.writes_trace
        assert opened.broker_url == str(queue)
        round_trip(opened)
    # The message went through the broker's file; the store's queue table never saw it.
    conn = store.connect(db)
    assert conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM delivery_log").fetchone()[0] == 0
    conn.close()


def test_a_postgresql_broker_beside_a_file_store_and_the_other_way_round(
        tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "store.db"
    store.init_db(db).close()
    with opener(db, pg_url) as opened:
        assert not opened.joined and (opened.store_kind, opened.broker_kind) == (
            "sqlite", "postgresql")
        assert isinstance(opened.broker, PostgresBroker)
        round_trip(opened)
    with opener(pg_url, str(db)) as opened:
        assert not opened.joined and (opened.store_kind, opened.broker_kind) == (
            "postgresql", "sqlite")
        assert type(opened.broker) is SQLiteBroker
        round_trip(opened)


@pytest.mark.parametrize("engine", list(registry.ENGINES))
def test_every_engine_of_the_registry_opens_apart_from_the_store(tmp_path: Path,
                                                                 engine: str) -> None:
    db = tmp_path / "store.db"
    store.init_db(db).close()
    url = registry.scratch_url(engine, lease=1.0, prefix="test-open")
    opened = opener(db, url, clock=SystemClock(), max_receives=4, worker="test-open")
    try:
        assert not opened.joined and opened.broker_kind == engine
        assert opened.store_kind == "sqlite" and opened.broker_store is None
        assert type(opened.broker) is registry._module(engine).BROKER
        assert opened.broker.max_receives == 4
        round_trip(opened)
    finally:
        opened.broker.destroy()
        opened.close()


# -- bad input: named, nothing written ----------------------------------------------------------
@pytest.mark.parametrize(("store_url", "broker_url", "field"), [
    ("amqp://guest:guest@127.0.0.1:5672/%2F?queue=q", None, "store"),
    ("nats://127.0.0.1:4222?stream=s", None, "store"),
    ("ftp://example.com/lab.db", None, "store"),
    ("", None, "store"),
    (42, None, "store"),
    ("{db}", "ftp://example.com/queue", "broker"),
    ("{db}", "mqtt://127.0.0.1:1883", "broker"),
    ("{db}", "{missing}", "broker"),
    ("{missing}", None, "store"),
    ("{db}", "nats://127.0.0.1:4222?stream=bad name", "broker"),
    ("{db}", "redis://127.0.0.1:6379/0?stream=s&lease=soon", "broker"),
    ("{db}", "postgresql://127.0.0.1:5432/test", "broker"),  # no schema named
    ("postgresql://127.0.0.1:5432/test", None, "store"),
])
def test_a_bad_value_is_named_and_nothing_is_written(tmp_path: Path, store_url, broker_url,
                                                     field: str) -> None:
    db, missing = tmp_path / "lab.db", tmp_path / "nowhere" / "missing.db"
    store.init_db(db).close()
    before = sorted(p.name for p in tmp_path.rglob("*"))

    def fill(value):
        return value.format(db=db, missing=missing) if isinstance(value, str) else value

    with pytest.raises(InvalidInput) as refused:
        opener(fill(store_url), fill(broker_url), clock=SystemClock())
    assert refused.value.field == field
    assert refused.value.value == fill(store_url if field == "store" else broker_url)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert not missing.parent.exists()


def test_fields_are_named_as_the_caller_names_them(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"^--broker must be") as refused:
        opener(":memory:", "gopher://x", init=True, store_field="--db", broker_field="--broker")
    assert refused.value.field == "--broker"
    with pytest.raises(InvalidInput, match=r"^--db must be"):
        opener(str(tmp_path / "none.db"), store_field="--db")


def test_a_refused_broker_removes_the_store_file_init_made_for_it(tmp_path: Path) -> None:
    db = tmp_path / "new" / "deeper" / "lab.db"
    with pytest.raises(InvalidInput) as refused:
        opener(db, "nats://127.0.0.1:4222?stream=bad name", init=True, clock=SystemClock())
    assert refused.value.field == "broker"
    assert not (tmp_path / "new").exists()
    # A store that was there before is kept, with its data.
    db.parent.mkdir(parents=True)
    conn = store.init_db(db)
    conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty) VALUES ('x', 2)")
    conn.close()
    with pytest.raises(InvalidInput):
        opener(db, "nats://127.0.0.1:4222?stream=bad name", init=True, clock=SystemClock())
    conn = store.connect(db)
    assert conn.execute("SELECT reserved_qty FROM inventory_projection").fetchone()[0] == 2
    conn.close()


def test_a_refused_broker_drops_the_schema_init_made_for_the_store() -> None:
    url = new_url()
    try:
        with pytest.raises(InvalidInput) as refused:
            opener(url, "redis://127.0.0.1:6379/0?stream=s&lease=soon", init=True,
                   clock=SystemClock())
        assert refused.value.field == "broker"
        assert not schema_exists(url)
    finally:
        pgstore.drop_schema(url)


def test_a_file_that_is_not_a_lab_database_is_named(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a database " * 200)
    with pytest.raises(registry.NotALabDatabase) as refused:
        opener(junk)
    assert refused.value.field == "store" and refused.value.missing == []
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(registry.NotALabDatabase) as refused:
        opener(empty)
    assert "orders" in refused.value.missing and "queue_messages" in refused.value.missing
    assert family(empty) == ["empty.db"]  # read, not written: no tables, no -wal left behind


# -- close -------------------------------------------------------------------------------------
def test_close_releases_every_connection_once(tmp_path: Path) -> None:
    db, queue = tmp_path / "store.db", tmp_path / "broker.db"
    store.init_db(db).close()
    store.init_db(queue).close()
    opened = opener(db, str(queue))
    round_trip(opened)
    assert family(db) == ["store.db", "store.db-shm", "store.db-wal"]
    opened.close()
    for conn in (opened.store, opened.broker_store):
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
    # The last connection to a WAL file checkpoints it and removes its -wal and -shm.
    assert family(db) == ["store.db"] and family(queue) == ["broker.db"]
    opened.close()  # a second close is nothing


def test_close_releases_a_postgresql_connection(pg_url: str) -> None:
    def sessions() -> int:
        with psycopg.connect(PG_SERVER, autocommit=True) as raw:
            return raw.execute("SELECT count(*) FROM pg_stat_activity WHERE datname ="
                               " current_database() AND pid <> pg_backend_pid()"
                               " AND application_name = %s", (name,)).fetchone()[0]

    name = f"test-open-{os.getpid()}"
    url = f"{pg_url}&application_name={name}"
    with opener(url) as opened:
        round_trip(opened)
        assert sessions() == 1
    assert sessions() == 0


def test_close_releases_a_broker_server_connection(tmp_path: Path) -> None:
    url = registry.scratch_url("rabbitmq", prefix="test-open")
    opened = opener(":memory:", url, init=True, clock=SystemClock())
    broker = opened.broker
    try:
        round_trip(opened)
        assert broker._conn.is_open
        opened.close()
        assert not broker._conn.is_open
    finally:
        registry.open_broker(url, clock=SystemClock(), ids=Ids(2)).destroy()


# -- what the registry says about a URL without opening it ---------------------------------
def test_the_fixed_lease_comes_from_the_url_for_the_engines_that_fix_it() -> None:
    assert registry.fixed_lease(None) is None
    assert registry.fixed_lease("data/app.db") is None
    assert registry.fixed_lease("postgresql://127.0.0.1/test?options=-csearch_path%3Dx") is None
    assert registry.fixed_lease("amqp://guest:guest@127.0.0.1:5672/%2F?queue=q") is None
    for name, engine in registry.ENGINES.items():
        default = registry.capabilities(name).fixed_lease
        if default is None:
            continue
        plain = registry.fixed_lease(registry.scratch_url(name, lease=default))
        assert plain is not None and plain.seconds == default
        given = registry.fixed_lease(registry.scratch_url(name, lease=2.5))
        assert given.seconds == 2.5 and given.given and f"{given.option}=2.5" in \
            registry.scratch_url(name, lease=2.5)
        assert f"{engine.scheme}://" in registry.known_urls()
    with pytest.raises(InvalidInput) as bad:
        registry.fixed_lease("redis://127.0.0.1:6379/0?stream=s&lease=soon", field="--broker")
    assert bad.value.field == "--broker"


def test_the_help_names_every_form_a_broker_takes() -> None:
    forms = registry.broker_forms()
    assert "SQLite file" in forms and "postgresql://" in forms
    for engine in registry.ENGINES.values():
        assert f"{engine.scheme}://… ({engine.title})" in forms
