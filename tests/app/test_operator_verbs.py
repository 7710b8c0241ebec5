"""The operator's verbs (``deliverylab redrive``, ``drop``) on a broker outside the store: the
broker writes no trace there, so the command writes the rows into the store right after the
verb, as the worker does for its verbs; on the store's own queue table the broker writes
them, once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from support.cli import run
from support.pg import schema

from deliverylab.brokers.postgres import PostgresBroker
from deliverylab.brokers.sqlite import SQLiteBroker
from deliverylab.engine import store
from deliverylab.engine import store_postgres as pgstore
from deliverylab.engine.check import check
from deliverylab.engine.clock import FakeClock, SystemClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.relay import Relay

TRACE = "SELECT worker, correlation_id, event_id, outcome FROM delivery_log ORDER BY seq"


@pytest.fixture(params=["sqlite-file", "postgresql"])
def apart(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A store file with 3 orders relayed to a broker outside it (a SQLite file or a
    PostgreSQL schema): (store file, broker as --broker names it)."""
    store_file = tmp_path / "store.db"
    with ExitStack() as stack:
        if request.param == "postgresql":
            where = stack.enter_context(schema())
        else:
            where = str(tmp_path / "broker.db")
            store.init_db(where).close()
        conn = store.init_db(store_file)
        broker = _broker(where, SystemClock())
        for i in range(3):
            place_order(broker, item_id="tea", qty=1, order_id=f"o-{i}", store=conn)
        Relay(conn, broker, clock=broker.clock).run_until_idle()
        conn.close()
        broker.conn.close()
        yield store_file, where


def _broker(where: str, clock: FakeClock | SystemClock, **kw) -> SQLiteBroker:
    if pgstore.is_url(where):
        return PostgresBroker(pgstore.connect(where), clock=clock, ids=Ids(), trace=False, **kw)
    return SQLiteBroker(store.connect(where), clock=clock, ids=Ids(), trace=False, **kw)


def test_drop_on_a_broker_apart_writes_lost_into_the_stores_trace(capsys, apart):
    store_file, where = apart
    code, out, err = run(capsys, "drop", "o-1", "--store", str(store_file), "--broker", where)
    assert code == 0, err
    assert "order=o-1 (logged as lost)" in out
    conn = store.connect(store_file)
    event = conn.execute("SELECT event_id FROM orders WHERE order_id = 'o-1'").fetchone()[0]
    assert [tuple(r) for r in conn.execute(TRACE) if r[3] == "lost"] == \
        [("chaos", "o-1", event, "lost")]
    broker = _broker(where, SystemClock())
    result = check(conn, broker)
    assert (result.lost, result.pending) == (1, 2)
    # Nothing in the broker's own database: it writes no trace there.
    assert broker.conn.execute("SELECT count(*) FROM delivery_log").fetchone()[0] == 0
    conn.close()
    broker.conn.close()


def test_redrive_on_a_broker_apart_writes_redriven_into_the_stores_trace(capsys, apart):
    store_file, where = apart
    clock = FakeClock(start=SystemClock().now())
    broker = _broker(where, clock, max_receives=1)
    got = broker.receive(1.0)
    clock.advance(2)
    assert broker.receive(1.0, 10) != [] and len(broker.parked) == 1  # one parked
    dead_event = broker.parked[0][0].event_id
    assert got[0].event_id == dead_event
    broker.conn.close()

    code, out, err = run(capsys, "redrive", "--store", str(store_file), "--broker", where)
    assert code == 0 and out.startswith("redrove 1 dead letter(s)"), err
    conn = store.connect(store_file)
    order = conn.execute("SELECT order_id FROM orders WHERE event_id = ?",
                         (dead_event,)).fetchone()[0]
    redriven = [tuple(r) for r in conn.execute(TRACE) if r[3] == "redriven"]
    assert redriven == [("operator", order, dead_event, "redriven")]
    conn.close()
    code, out, _ = run(capsys, "redrive", "--store", str(store_file), "--broker", where)
    assert code == 0 and out.startswith("redrove 0 dead letter(s)")


def test_on_the_stores_own_queue_the_broker_writes_the_row_once(capsys, tmp_path):
    path = tmp_path / "app.db"
    conn = store.init_db(path)
    place_order(SQLiteBroker(conn, clock=SystemClock(), ids=Ids()), item_id="tea", qty=1,
                order_id="o-1")
    conn.close()
    assert run(capsys, "drop", "o-1", "--db", str(path))[0] == 0
    conn = store.connect(path)
    assert [r[3] for r in conn.execute(TRACE)] == ["lost"]
    conn.close()


def test_drop_needs_a_broker_it_can_list(capsys, apart):
    store_file, _ = apart
    code, _, err = run(capsys, "drop", "--store", str(store_file), "--broker",
                       str(store_file.parent / "nope.db"))
    assert code == 2 and "no database at" in err


def test_status_reads_the_broker_it_is_given(capsys, apart):
    """The store alone cannot tell a relayed event waiting in the broker from a lost one;
    ``status --broker`` reads the broker's depth and dead letters, and calls them pending."""
    store_file, where = apart
    code, out, _ = run(capsys, "status", "--store", str(store_file))
    assert code == 0 and "0 pending" in out and "3 lost" in out
    code, out, _ = run(capsys, "status", "--store", str(store_file), "--broker", where)
    assert code == 0, out
    assert "queue        3 visible, 0 in flight" in out
    assert "0 lost, 3 pending, 0 dead-lettered" in out
    assert "verdict      PENDING: 3 pending" in out

    clock = FakeClock(start=SystemClock().now())
    broker = _broker(where, clock, max_receives=1)
    broker.receive(1.0)
    clock.advance(2)
    broker.receive(1.0, 10)  # parks the first, leases the other two
    dead_event = broker.parked[0][0].event_id
    broker.conn.close()
    code, out, _ = run(capsys, "status", "--json", "--store", str(store_file), "--broker", where)
    report = json.loads(out)
    assert [d["eventId"] for d in report["deadLetters"]] == [dead_event]
    assert report["deadLetters"][0]["orderId"] is not None
    assert report["check"]["dead_lettered"] == 1 and report["check"]["pending"] == 2
    code, out, _ = run(capsys, "status", "--store", str(store_file), "--broker", where)
    assert f"(in the broker)  event={dead_event}" in out
