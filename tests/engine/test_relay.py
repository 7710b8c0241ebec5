"""The outbox and its relay: an order and its event commit together in the store; the relay
publishes the event to a broker outside it, at least once.

A relay that dies between the publish and the mark publishes again when it restarts. On a
broker without producer dedup (``dedup_window`` None: a SQLite file, PostgreSQL) the
duplicate is delivered, and only the consumer's inbox keeps the effect once. The same holds
with real processes: a relay that exits for real (``--crash-exits``) is restarted, and the
idempotent worker process applies each order once. On JetStream the republish carries the
same ``Nats-Msg-Id``: within the stream's duplicate window the broker stores it once; after
the window it is stored again, and the inbox absorbs it.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.brokers import BROKER_ENGINES
from support.cli import run
from support.pg import schema
from support.processes import env

from deliverylab.app import cli
from deliverylab.brokers.base import Broker
from deliverylab.brokers.postgres import PostgresBroker
from deliverylab.brokers.sqlite import SQLiteBroker
from deliverylab.engine import store
from deliverylab.engine import store_postgres as pgstore
from deliverylab.engine.check import check
from deliverylab.engine.clock import FakeClock, SystemClock
from deliverylab.engine.errors import InvalidInput, OrderConflict
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.relay import CRASH_EXIT_STATUS, Relay, unsent
from deliverylab.engine.worker import Worker

# The brokers apart from the store without producer dedup: the inbox is the only defence.
NO_DEDUP = ["sqlite-file", "postgresql"]


@pytest.fixture(params=NO_DEDUP)
def apart(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """A broker of this engine in a database of its own, on a FakeClock, max_receives 50."""
    broker, close = BROKER_ENGINES[request.param](tmp_path, FakeClock(), Ids(7), 50)
    assert broker.dedup_window is None and not broker.joins(store.init_db())
    yield broker
    close()


def queued_per_event(broker: Broker) -> dict[str, int]:
    """How many messages each event has in the broker's queue table (both engines here keep
    one on their own connection)."""
    rows = broker.conn.execute(  # type: ignore[attr-defined]
        "SELECT event_id, count(*) FROM queue_messages GROUP BY event_id").fetchall()
    return {r[0]: r[1] for r in rows}


def place(conn: sqlite3.Connection, broker: Broker, n: int) -> list[str]:
    return [place_order(broker, item_id=f"item-{i % 3}", qty=1 + i % 2, store=conn).event_id
            for i in range(n)]


# -- the producer: order and outbox row in one transaction ----------------------------------
def test_place_order_writes_the_event_to_the_outbox_and_sends_nothing(apart):
    conn = store.init_db()
    placed = place_order(apart, item_id="tea", qty=2, store=conn, order_id="o-1")
    row = conn.execute("SELECT * FROM outbox").fetchone()
    assert (row["event_id"], row["correlation_id"], row["sent_at"], row["attempts"]) == \
        (placed.event_id, "o-1", None, 0)
    assert json.loads(row["payload"]) == {"orderId": "o-1", "itemId": "tea", "qty": 2}
    assert apart.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}
    # Not relayed yet: the checker calls it pending, not lost.
    assert check(conn, apart).pending == 1
    # A replay writes nothing; a conflict writes nothing.
    assert not place_order(apart, item_id="tea", qty=2, store=conn, order_id="o-1").created
    with pytest.raises(OrderConflict):
        place_order(apart, item_id="tea", qty=3, store=conn, order_id="o-1")
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1
    conn.close()


def test_the_order_and_its_outbox_row_roll_back_together():
    """The caller's transaction fails after place_order: neither row stays."""
    conn = store.init_db()
    clock, ids = FakeClock(), Ids(3)
    with pytest.raises(RuntimeError, match="after the order"), store.transaction(conn):
        place_order(None, item_id="tea", qty=1, store=conn, clock=clock, ids=ids)
        assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1
        raise RuntimeError("the caller fails after the order")
    assert store.table_counts(conn)["orders"] == 0
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0
    conn.close()


def test_without_a_broker_place_order_needs_a_store_a_clock_and_ids():
    conn = store.init_db()
    for kw, field in [({"store": conn, "ids": Ids(1)}, "clock"),
                      ({"store": conn, "clock": FakeClock()}, "ids"),
                      ({"clock": FakeClock(), "ids": Ids(1)}, "store")]:
        with pytest.raises(InvalidInput) as bad:
            place_order(None, item_id="tea", qty=1, **kw)
        assert bad.value.field == field
    assert store.table_counts(conn)["orders"] == 0
    conn.close()


def test_a_database_made_before_the_outbox_opens_and_asks_for_init_db(tmp_path, capsys):
    """An older file (no outbox table) still serves a lab; what needs the outbox says to run
    init-db, which adds it and keeps the data."""
    path = tmp_path / "old.db"
    conn = store.init_db(path)
    place_order(SQLiteBroker(conn, clock=FakeClock(), ids=Ids(1)), item_id="tea", qty=1)
    conn.execute("DROP TABLE outbox")
    store.check_schema(conn)  # a lab database still
    broker = SQLiteBroker(store.init_db(tmp_path / "b.db"), clock=FakeClock(), ids=Ids(2))
    for attempt in (lambda: Relay(conn, broker, clock=FakeClock()),
                    lambda: place_order(broker, item_id="tea", qty=1, store=conn)):
        with pytest.raises(InvalidInput, match="run 'deliverylab init-db'") as old:
            attempt()
        assert old.value.field == "store"
    assert check(conn).verdict.startswith("PENDING")  # the checker reads it too
    conn.close()
    assert cli.main(["status", "--db", str(path)]) == 0
    assert cli.main(["relay", "--store", str(path), "--broker", str(tmp_path / "b.db")]) == 2
    assert "run 'deliverylab init-db'" in capsys.readouterr().err
    assert cli.main(["init-db", "--db", str(path)]) == 0
    conn = store.connect(path)
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0
    assert store.table_counts(conn)["orders"] == 1
    conn.close()


# -- the relay, in process ------------------------------------------------------------------
def test_a_crash_between_publish_and_mark_publishes_twice_and_the_inbox_applies_once(apart):
    conn = store.init_db()
    events = place(conn, apart, 30)
    relay = Relay(conn, apart, clock=apart.clock, crash_after_publish=0.2, seed=5)
    stats = relay.run_until_idle(batch=4)
    assert stats.crashed > 0  # the fault fired
    assert unsent(conn) == 0 and stats.marked == 30
    per_event = queued_per_event(apart)
    assert set(per_event) == set(events)
    # What the relay published is what the broker holds: every publish one message.
    assert sum(per_event.values()) == stats.published > 30
    twice = {e for e, n in per_event.items() if n > 1}
    assert twice  # published more than once
    # attempts counts every time the relay took a row: at least its publishes.
    attempts = dict(conn.execute("SELECT event_id, attempts FROM outbox").fetchall())
    assert all(attempts[e] >= n for e, n in per_event.items())

    worker = Worker(store=conn, broker=apart, clock=apart.clock, name="w-1")
    worker.run_until_idle()
    assert worker.stats.received == stats.published
    assert worker.stats.applied == 30
    assert worker.stats.duplicates_skipped == stats.published - 30
    result = check(conn, apart)
    assert result.ok and result.verdict.startswith("OK: all 30 orders applied exactly once")
    conn.close()


def test_without_the_inbox_the_relays_duplicates_are_applied_twice(apart):
    """The same crash schedule with an at-least-once worker: no defence, BROKEN."""
    conn = store.init_db()
    place(conn, apart, 30)
    stats = Relay(conn, apart, clock=apart.clock, crash_after_publish=0.2,
                  seed=5).run_until_idle(batch=4)
    Worker(store=conn, broker=apart, clock=apart.clock, mode="at-least-once").run_until_idle()
    result = check(conn, apart)
    assert result.extra_applications == stats.published - 30 > 0
    assert result.verdict.startswith("BROKEN")
    conn.close()


def test_the_same_seed_gives_the_same_crash_schedule(tmp_path):
    def one_run(where: Path) -> tuple[dict[str, int], dict[str, int]]:
        where.mkdir()
        conn = store.init_db(where / "store.db")
        broker = SQLiteBroker(store.init_db(where / "broker.db"), clock=FakeClock(),
                              ids=Ids(4), trace=False)
        place(conn, broker, 20)
        stats = Relay(conn, broker, clock=broker.clock, crash_after_publish=0.3,
                      seed=9).run_until_idle(batch=3)
        out = queued_per_event(broker), stats.as_dict()
        conn.close()
        broker.conn.close()
        return out

    assert one_run(tmp_path / "a") == one_run(tmp_path / "b")


def test_a_store_on_postgresql_relays_to_a_sqlite_file(tmp_path):
    """The store in PostgreSQL (its outbox there), the broker a SQLite file."""
    clock = FakeClock()
    with schema() as url:
        conn = pgstore.connect(url)
        broker = SQLiteBroker(store.init_db(tmp_path / "broker.db"), clock=clock, ids=Ids(2),
                              trace=False)
        place(conn, broker, 12)
        stats = Relay(conn, broker, clock=clock, crash_after_publish=0.3,
                      seed=2).run_until_idle(batch=5)
        assert stats.crashed > 0 and unsent(conn) == 0
        Worker(store=conn, broker=broker, clock=clock).run_until_idle()
        assert check(conn, broker).verdict.startswith("OK: all 12 orders applied exactly once")
        conn.close()
        broker.conn.close()


@pytest.mark.parametrize(("kw", "field"), [
    ({"crash_after_publish": 1.5}, "crash_after_publish"),
    ({"crash_after_publish": "0.1"}, "crash_after_publish"),
    ({"seed": "7"}, "seed"),
    ({"crash_exits": "yes"}, "crash_exits"),
    ({"name": "r\n1"}, "name"),
])
def test_bad_relay_arguments_name_the_field(apart, kw, field):
    conn = store.init_db()
    with pytest.raises(InvalidInput) as bad:
        Relay(conn, apart, clock=apart.clock, **kw)
    assert bad.value.field == field
    relay = Relay(conn, apart, clock=apart.clock)
    for batch in (0, 1001, 2.5):
        with pytest.raises(InvalidInput, match="batch"):
            relay.step(batch)
    conn.close()


def test_a_relay_refuses_the_stores_own_queue_table():
    """With the queue table in the store's database the event commits with the order: there
    is nothing to relay, and a relay there is a mistake."""
    conn = store.init_db()
    own = SQLiteBroker(conn, clock=FakeClock(), ids=Ids(1))
    with pytest.raises(InvalidInput, match="nothing to relay") as bad:
        Relay(conn, own, clock=own.clock)
    assert bad.value.field == "broker"
    with pytest.raises(InvalidInput) as bad:
        Relay("lab.db", own, clock=own.clock)  # type: ignore[arg-type]
    assert bad.value.field == "store"
    conn.close()


# -- the command ----------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A store with 3 orders in its outbox, and a broker file."""
    store_file, broker_file = tmp_path / "store.db", tmp_path / "broker.db"
    conn, bconn = store.init_db(store_file), store.init_db(broker_file)
    place(conn, SQLiteBroker(bconn, clock=SystemClock(), ids=Ids(), trace=False), 3)
    conn.close()
    bconn.close()
    return store_file, broker_file


@pytest.mark.parametrize(("extra", "says"), [
    (["--batch", "0"], "argument --batch: must be an integer >= 1"),
    (["--crash-after-publish-rate", "2"], "argument --crash-after-publish-rate: must be a number"),
    (["--seed", "x"], "argument --seed: must be an integer"),
    (["--poll-interval", "0"], "argument --poll-interval: must be a number"),
    (["--broker", "postgresql://127.0.0.1:1/test?options=-csearch_path%3Ddl_x"],
     "--broker must be a reachable PostgreSQL server"),
    (["--broker", "{store}"], "--broker must be a broker outside the store"),
    (["--broker", "{missing}"], "no database at"),
    (["--db", "{broker}"], "--store and --db name the same thing"),
])
def test_bad_relay_flags_are_exit_2_and_write_nothing(capsys, files, extra, says):
    store_file, broker_file = files
    extra = [e.format(store=store_file, broker=broker_file, missing=broker_file.parent / "no.db")
             for e in extra]
    argv = ["relay", "--store", str(store_file)]
    if "--broker" not in extra:
        argv += ["--broker", str(broker_file)]
    code, _, err = run(capsys, *argv, *extra)
    assert code == 2, err
    assert says in err
    conn, bconn = store.connect(store_file), store.connect(broker_file)
    assert unsent(conn) == 3 and store.table_counts(bconn)["queue_messages"] == 0
    conn.close()
    bconn.close()


def test_relay_without_a_broker_is_exit_2(capsys, files):
    code, _, err = run(capsys, "relay", "--store", str(files[0]))
    assert code == 2 and "--broker" in err


# -- real processes -------------------------------------------------------------------------
def _relay_until_done(store_file: Path, broker: str, *extra: str,
                      timeout: float = 60.0) -> list[int]:
    """Run ``deliverylab relay`` again each time it dies, until the outbox has no unsent row;
    then stop it with SIGTERM. The exit status of every run, in order."""
    codes: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deliverylab", "relay", "--store", str(store_file),
             "--broker", broker, "--poll-interval", "0.02", *extra],
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and time.monotonic() < deadline:
            conn = store.connect(store_file)
            done = unsent(conn) == 0
            conn.close()
            if done:
                proc.terminate()
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=30)
        codes.append(proc.returncode)
        if proc.returncode == 0:
            assert "stopped: steps=" in out, (out, err)
            return codes
        assert proc.returncode == CRASH_EXIT_STATUS, (out, err)
        assert "crashed (after_publish)" in out
    raise AssertionError(f"the relay did not empty the outbox in {timeout:g}s: {codes}")


def test_a_relay_process_that_dies_after_publishing_is_restarted_and_the_worker_applies_once(
        tmp_path, capsys):
    """The relay exits for real between a publish and its mark (``--crash-exits``), again
    and again; restarted each time, it publishes those rows again. A worker process in
    idempotent mode then applies each of the 20 orders once."""
    store_file = tmp_path / "store.db"
    conn = store.init_db(store_file)
    with schema() as url:
        with pgstore.connect(url) as bconn:
            place(conn, PostgresBroker(bconn, clock=SystemClock(), ids=Ids(3)), 20)
        conn.close()
        codes = _relay_until_done(store_file, url, "--crash-after-publish-rate", "0.15",
                                  "--seed", "1", "--batch", "4", "--crash-exits")
        assert codes.count(CRASH_EXIT_STATUS) >= 1 and codes[-1] == 0
        with pgstore.connect(url) as bconn:
            published = bconn.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
            events = bconn.execute(
                "SELECT count(DISTINCT event_id) FROM queue_messages").fetchone()[0]
        assert events == 20 and published > 20  # every event, some more than once

        worker = subprocess.Popen(
            [sys.executable, "-m", "deliverylab", "worker", "--store", str(store_file),
             "--broker", url, "--seed", "2", "--poll-interval", "0.01", "--name", "w-1"],
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            with pgstore.connect(url) as bconn:
                for _ in range(600):
                    if bconn.execute("SELECT count(*) FROM queue_messages").fetchone()[0] == 0:
                        break
                    time.sleep(0.05)
        finally:
            worker.terminate()
            out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert out.count("applied projection (first time)") == 20
    assert out.count("duplicate skipped") == published - 20
    code, out, _ = run(capsys, "status", "--db", str(store_file))
    assert code == 0 and "20 applied exactly once, 0 duplicated, 0 lost" in out


# -- JetStream: the broker's own dedup, within its window and after it ----------------------
NATS = "nats://127.0.0.1:4222"


@pytest.fixture
def make_js() -> Iterator[Callable[..., Broker]]:
    """``make_js(dedup_window=…)``: a JetStream broker on a stream of its own, on the wall
    clock (the window is the server's), deleted after the test."""
    from deliverylab.brokers.jetstream import JetStreamBroker

    made: list[JetStreamBroker] = []

    def make(**kw: Any) -> Broker:
        made.append(JetStreamBroker(NATS, stream=f"relay-{uuid.uuid4().hex[:12]}",
                                    clock=SystemClock(), ids=Ids(5), max_receives=50, **kw))
        return made[-1]

    yield make
    for broker in made:
        broker.destroy()


def test_on_jetstream_a_republish_within_the_window_is_dropped_by_the_broker(make_js):
    """The relay publishes some events twice; JetStream stores each once (the same
    ``Nats-Msg-Id`` within the stream's duplicate window), so the worker never sees a
    duplicate."""
    broker = make_js(dedup_window=60.0)
    conn = store.init_db()
    events = place(conn, broker, 20)
    stats = Relay(conn, broker, clock=broker.clock, crash_after_publish=0.2,
                  seed=5).run_until_idle(batch=4)
    assert stats.crashed > 0 and stats.published > 20  # published more than once
    assert broker.depth()["visible"] == 20  # stored once each
    assert broker.queued_event_ids() == set(events)
    worker = Worker(store=conn, broker=broker, clock=broker.clock, name="w-1")
    worker.run_until_idle()
    assert (worker.stats.received, worker.stats.applied,
            worker.stats.duplicates_skipped) == (20, 20, 0)
    assert check(conn, broker).verdict.startswith("OK: all 20 orders applied exactly once")
    conn.close()


def test_on_jetstream_after_the_window_the_republish_is_stored_and_the_inbox_absorbs_it(
        make_js):
    """A relay that restarts after the window ran out publishes ids the server has
    forgotten: stored twice, delivered twice, applied once by the inbox."""
    broker = make_js(dedup_window=1.0)
    conn = store.init_db()
    place(conn, broker, 10)
    relay = Relay(conn, broker, clock=broker.clock, crash_after_publish=0.1, seed=8)
    crashed = 0
    while relay.step(3):
        if relay.stats.crashed > crashed:  # dead; restarted once the window has run out
            crashed = relay.stats.crashed
            time.sleep(1.5)
    assert crashed > 0
    stored = broker.depth()["visible"]
    assert stored == relay.stats.published > 10  # every republish stored again
    worker = Worker(store=conn, broker=broker, clock=broker.clock, name="w-1")
    worker.run_until_idle()
    assert worker.stats.received == stored
    assert worker.stats.duplicates_skipped == stored - 10
    assert check(conn, broker).verdict.startswith("OK: all 10 orders applied exactly once")
    conn.close()
