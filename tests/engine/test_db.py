"""The store: connections, the schema, explicit transactions, and the dump used for replays."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from deliverylab.engine import store
from deliverylab.engine.errors import InvalidInput


def test_init_db_twice_on_a_file_keeps_the_data(tmp_path):
    path = tmp_path / "lab.db"
    first = store.init_db(path)
    first.execute("INSERT INTO inventory_projection VALUES ('coffee-beans', 3)")
    schema_before = first.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    first.close()

    second = store.init_db(path)
    assert [tuple(r) for r in second.execute("SELECT * FROM inventory_projection")] == [
        ("coffee-beans", 3)]
    schema_after = second.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    assert [tuple(r) for r in schema_after] == [tuple(r) for r in schema_before]
    second.close()


def test_a_new_file_gets_small_pages_and_an_old_file_keeps_its_own(tmp_path):
    fresh = store.init_db(tmp_path / "new.db")
    assert fresh.execute("PRAGMA page_size").fetchone()[0] == store.PAGE_SIZE == 1024
    # A file made elsewhere with SQLite's default 4 KiB pages opens and works unchanged.
    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("PRAGMA journal_mode = WAL")
    old.execute("CREATE TABLE note (x INTEGER)")
    old.close()
    conn = store.init_db(tmp_path / "old.db")
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    conn.execute("INSERT INTO inventory_projection VALUES ('coffee-beans', 3)")
    assert conn.execute("SELECT reserved_qty FROM inventory_projection").fetchone()[0] == 3


def test_memory_database_has_every_table():
    conn = store.init_db(":memory:")
    store.check_schema(conn)
    assert store.table_counts(conn) == {t: 0 for t in store.TABLES}
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "memory"


def test_file_database_runs_in_wal_with_a_busy_timeout(tmp_path):
    conn = store.init_db(tmp_path / "lab.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == int(store.BUSY_TIMEOUT_S * 1000)
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] >= 1000
    assert conn.execute("PRAGMA cache_size").fetchone()[0] <= -2000  # KiB, >= the default
    assert conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    # A fresh connection to the same file sees WAL too: it is a property of the file.
    other = store.connect(tmp_path / "lab.db")
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_every_table_is_strict(lab):
    # table_list: schema, name, type, ncol, wr (WITHOUT ROWID), strict
    strict = {r[1]: r[5] == 1 for r in lab.store.execute("PRAGMA main.table_list")}
    assert set(store.TABLES) <= set(strict)
    assert all(strict[t] for t in store.TABLES)
    with pytest.raises(sqlite3.IntegrityError):  # STRICT: no text in an INTEGER column
        lab.store.execute("INSERT INTO inventory_projection VALUES ('x', 'three')")


def test_schema_ships_inside_the_package():
    sql = store.schema_sql()
    for table in store.TABLES:
        assert f"CREATE TABLE IF NOT EXISTS {table}" in sql


def test_missing_file_with_must_exist_names_the_path_and_creates_nothing(tmp_path):
    path = tmp_path / "nope" / "lab.db"
    with pytest.raises(InvalidInput) as info:
        store.connect(path)
    assert info.value.field == "db"
    assert str(path) in str(info.value)
    assert "db must be" in str(info.value)
    assert not path.exists() and not path.parent.exists()


@pytest.mark.parametrize("bad", ["", None, 3])
def test_bad_path_is_refused(bad):
    with pytest.raises(InvalidInput, match=r"^db must be .*, got " + repr(bad).replace("'", ".")):
        store.connect(bad)


def test_check_schema_refuses_a_database_that_is_not_ours(tmp_path):
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    conn = store.connect(path)
    with pytest.raises(InvalidInput, match="missing tables") as info:
        store.check_schema(conn)
    assert "queue_messages" in str(info.value)


# -- transactions ------------------------------------------------------------------------------

def _rows(conn):
    return [tuple(r) for r in conn.execute("SELECT item_id, reserved_qty FROM inventory_projection")]


def test_transaction_commits(lab):
    with store.transaction(lab.store):
        lab.store.execute("INSERT INTO inventory_projection VALUES ('a', 1)")
    assert not lab.store.in_transaction
    assert _rows(lab.store) == [("a", 1)]


@pytest.mark.parametrize("exc", [ValueError, RuntimeError, KeyboardInterrupt, sqlite3.Error])
def test_transaction_rolls_back_on_any_exception(lab, exc):
    with pytest.raises(exc):
        with store.transaction(lab.store):
            lab.store.execute("INSERT INTO inventory_projection VALUES ('a', 1)")
            raise exc("boom")
    assert not lab.store.in_transaction
    assert _rows(lab.store) == []


def test_transaction_rolls_back_after_a_failed_statement(lab):
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction(lab.store):
            lab.store.execute("INSERT INTO inventory_projection VALUES ('a', 1)")
            lab.store.execute("INSERT INTO inventory_projection VALUES ('a', 2)")  # duplicate key
    assert _rows(lab.store) == []


def test_inner_transaction_joins_the_outer_one(file_lab):
    other = file_lab.connect()
    conn = file_lab.store
    with store.transaction(conn):
        with store.transaction(conn):
            conn.execute("INSERT INTO inventory_projection VALUES ('a', 1)")
        assert conn.in_transaction  # the inner block did not commit
        assert _rows(other) == []   # and nobody else can see its write yet
    assert _rows(other) == [("a", 1)]


def test_outer_rollback_undoes_the_joined_inner_write(lab):
    with pytest.raises(RuntimeError):
        with store.transaction(lab.store):
            with store.transaction(lab.store):
                lab.store.execute("INSERT INTO inventory_projection VALUES ('a', 1)")
            raise RuntimeError("the caller fails after the inner block finished")
    assert _rows(lab.store) == []


def test_transaction_takes_the_write_lock_up_front(file_lab):
    """BEGIN IMMEDIATE: a second writer waits (here: times out) even before the first writes."""
    other = store.connect(file_lab.path, busy_timeout=0.05)
    with store.transaction(file_lab.store):
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            with store.transaction(other):
                pass
    with store.transaction(other):  # free again once the first commits
        other.execute("INSERT INTO inventory_projection VALUES ('b', 2)")
    assert _rows(file_lab.store) == [("b", 2)]


def test_a_waiting_writer_gets_through_after_the_holder_commits(file_lab):
    other = file_lab.connect()  # the default 30 s busy timeout
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with store.transaction(file_lab.store):
            file_lab.store.execute("INSERT INTO inventory_projection VALUES ('a', 1)")
            holding.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    holding.wait(5)
    threading.Timer(0.2, release.set).start()
    with store.transaction(other):  # blocks until the holder commits, then succeeds
        other.execute("UPDATE inventory_projection SET reserved_qty = reserved_qty + 1")
    t.join()
    assert _rows(file_lab.store) == [("a", 2)]


# -- dump and counts ---------------------------------------------------------------------------

def test_dump_and_counts_see_every_table(lab):
    lab.order("coffee-beans", 2, order_id="o-001")
    counts = store.table_counts(lab.store)
    assert counts["orders"] == 1 and counts["queue_messages"] == 1
    text = store.dump(lab.store)
    assert [line for line in text.splitlines() if line.startswith("-- ")] == [
        f"-- {t}" for t in store.TABLES]
    assert "'o-001'" in text
    assert store.dump(lab.store) == text  # reading does not change it
