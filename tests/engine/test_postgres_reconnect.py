"""A worker and a relay on PostgreSQL whose connections are terminated, or whose server goes
away for a while or crashes and restarts: one line, a backoff, a new connection, and on;
every order applied once.
And ``--busy-timeout`` on a PostgreSQL store: a lock held elsewhere past it is exit 2,
"locked", as on SQLite.

The backends are ended with ``pg_terminate_backend``, the outage made by a gate in front of
the shared server (``pg_gate``); the shared server itself is never touched. The restart is of
a cluster the test makes with ``initdb`` (``pg_cluster``)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest
from support.api import serve
from support.pg_cluster import Cluster
from support.pg_gate import Gate
from support.processes import Proc, cli, request

from deliverylab.brokers.postgres import PostgresBroker
from deliverylab.engine import store
from deliverylab.engine import store_postgres as pgstore
from deliverylab.engine.check import check
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order


def _place(url: str, n: int, start: int = 0) -> None:
    with pgstore.connect(url) as conn:
        q = PostgresBroker(conn, clock=SystemClock(), ids=Ids())
        for i in range(start, start + n):
            place_order(q, order_id=f"o-{i}", item_id=f"item-{i % 3}", qty=1)


def _until(done, timeout: float = 60) -> None:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.1)
    raise AssertionError(f"not done after {timeout:g}s")


def _attack(gate: Gate, proc: Proc) -> None:
    """Terminate the process's backends three times, then take the server away for 1.5 s."""
    for _ in range(3):
        time.sleep(0.3)
        gate.terminate()
        assert proc.alive(), proc.output()[-3000:]
    gate.close()
    time.sleep(1.5)
    assert proc.alive(), proc.output()[-3000:]
    gate.open()


@pytest.mark.slow
def test_a_worker_whose_connection_is_terminated_reconnects_and_applies_each_order_once(
        pg_url, gate, tmp_path):
    _place(pg_url, 40)
    worker = Proc(tmp_path / "worker.log", "worker", "--db", gate.url(pg_url), "--name", "w-1",
                  "--poll-interval", "0.02", "--work-time", "0.02", "--visibility-timeout", "1",
                  "--backoff-base", "0.05", "--backoff-cap", "0.5")
    try:
        _until(lambda: "started:" in worker.output())
        _attack(gate, worker)
        _place(pg_url, 20, start=40)  # orders placed after the outage are taken too

        def drained() -> bool:
            with pgstore.connect(pg_url) as conn:
                return check(conn).correct == 60

        _until(drained)
        assert worker.terminate() == 0
    finally:
        worker.stop()
    out = worker.log.read_text()
    assert "Traceback" not in out, out[-3000:]
    waits = [line for line in out.splitlines() if "database unavailable:" in line]
    assert waits and all("→ retry in" in line for line in waits), out[-3000:]
    assert "the connection to PostgreSQL was lost" in out
    stopped = next(line for line in out.splitlines() if "[w-1] stopped:" in line)
    assert f"store_waits={len(waits)}" in stopped, stopped
    with pgstore.connect(pg_url) as conn:
        result = check(conn)
        assert (result.correct, result.duplicated, result.lost) == (60, 0, 0)
        assert result.ok


@pytest.mark.slow
def test_a_relay_whose_store_connection_is_terminated_reconnects_and_publishes_all(
        pg_url, gate, tmp_path):
    broker_file = tmp_path / "broker.db"
    assert cli("init-db", "--db", str(broker_file)).returncode == 0
    with pgstore.connect(pg_url) as conn:
        for i in range(30):
            place_order(None, order_id=f"o-{i}", item_id="tea", qty=1, store=conn,
                        clock=SystemClock(), ids=Ids())
    relay = Proc(tmp_path / "relay.log", "relay", "--store", gate.url(pg_url), "--broker",
                 str(broker_file), "--poll-interval", "0.02", "--name", "r-1", "--batch", "1")
    try:
        _until(lambda: "started:" in relay.output())
        _attack(gate, relay)
        with pgstore.connect(pg_url) as conn:
            for i in range(30, 40):
                place_order(None, order_id=f"o-{i}", item_id="tea", qty=1, store=conn,
                            clock=SystemClock(), ids=Ids())

        def sent() -> bool:
            with pgstore.connect(pg_url) as conn:
                return conn.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL"
                                    ).fetchone()[0] == 0

        _until(sent)
        assert relay.terminate() == 0
    finally:
        relay.stop()
    out = relay.log.read_text()
    assert "Traceback" not in out, out[-3000:]
    assert "database unavailable:" in out and "→ retry in" in out
    conn = store.connect(broker_file)
    try:  # every order's event reached the broker (a republish is a second message)
        events = {r[0] for r in conn.execute("SELECT event_id FROM queue_messages")}
    finally:
        conn.close()
    with pgstore.connect(pg_url) as pg:
        assert events == {r[0] for r in pg.execute("SELECT event_id FROM orders")}
        assert len(events) == 40


@pytest.mark.parametrize("command", [["status"], ["reconcile"], ["drop", "--count", "1"],
                                     ["trace", "o-0"]])
def test_busy_timeout_bounds_the_wait_for_a_lock_on_postgresql(pg_url, command):
    _place(pg_url, 2)
    holder = pgstore.connect(pg_url)
    holder.execute("BEGIN")
    holder.execute("LOCK TABLE orders, queue_messages IN ACCESS EXCLUSIVE MODE")
    try:
        t = time.monotonic()
        done = cli(*command, "--db", pg_url, "--busy-timeout", "1", timeout=30)
        took = time.monotonic() - t
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "is locked" in done.stderr and "busy timeout (1s)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert took < 8, took
    with pgstore.connect(pg_url) as conn:  # nothing was written
        assert conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM reconciled_events").fetchone()[0] == 0


# -- a server of the test's own, restarted ---------------------------------------------------
@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.remove()


@pytest.mark.slow
def test_the_api_and_a_worker_through_a_crash_and_restart_of_the_server(cluster, tmp_path):
    """The lab on a server of its own; the server crashes (``pg_ctl stop -m immediate``) and
    starts again while clients post and a worker consumes. Neither process is restarted:
    every answer is a 201 or a 503, every 201 survives, each 503 retried afterwards places its
    order exactly once, and every order is applied exactly once."""
    url = pgstore.url_for(cluster.base, "dl_restart")
    pgstore.init_db(url).close()
    api, port = serve(tmp_path, "--db", url, "--no-access-log")
    worker = Proc(tmp_path / "worker.log", "worker", "--db", url, "--name", "w-1",
                  "--poll-interval", "0.02", "--backoff-base", "0.05", "--backoff-cap", "0.5")
    answers: dict[str, list[int]] = {}
    stop = threading.Event()

    def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            oid = f"c{c}-{i}"
            status = request("POST", "/orders", {"orderId": oid, "itemId": f"item-{i % 3}",
                                                 "qty": 1}, port=port, timeout=30)[0]
            answers.setdefault(oid, []).append(status)
            i += 1
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(3)]
    try:
        _until(lambda: "started:" in worker.output())  # a server away at start is exit 2
        for t in threads:
            t.start()
        time.sleep(1.5)
        cluster.stop("immediate")  # a crash: no checkpoint, every backend gone at once
        time.sleep(1.5)
        cluster.start()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(60)
        statuses = [s for got in answers.values() for s in got]
        assert set(statuses) <= {201, 503} and 503 in statuses, statuses
        assert statuses[-1] == 201  # taken up again with no restart of the API
        acked = {oid for oid, got in answers.items() if 201 in got}
        with pgstore.connect(url) as conn:
            assert acked <= {r[0] for r in conn.execute("SELECT order_id FROM orders")}
        for oid in sorted(set(answers) - acked):  # the retry finds out, never doubles
            assert request("POST", "/orders", {"orderId": oid, "itemId": "x", "qty": 1},
                           port=port)[0] in (200, 201, 422)

        def drained() -> bool:
            with pgstore.connect(url) as conn:
                return check(conn).correct == len(answers)

        _until(drained)
        assert worker.terminate() == 0
        assert api.terminate() in (0, -signal.SIGTERM)
    finally:
        stop.set()
        worker.stop()
        api.stop()
    with pgstore.connect(url) as conn:
        result = check(conn)
        assert (result.orders, result.correct, result.duplicated) == (len(answers),) * 2 + (0,)
    out = worker.log.read_text()
    assert "database unavailable:" in out and "Traceback" not in out, out[-3000:]
    assert "Traceback" not in api.log.read_text(), api.log.read_text()[-3000:]


@pytest.mark.slow
def test_a_worker_waits_out_a_lock_held_past_its_busy_timeout_on_postgresql(pg_url, tmp_path):
    """A lock held for 2 s against a worker with ``--busy-timeout 0.3``: it says "database is
    locked", backs off, counts ``lock_waits``, and drains the queue once the lock is gone."""
    _place(pg_url, 10)
    worker = Proc(tmp_path / "worker.log", "worker", "--db", pg_url, "--name", "w-1",
                  "--busy-timeout", "0.3", "--poll-interval", "0.02", "--backoff-base", "0.05",
                  "--backoff-cap", "0.3")
    holder = pgstore.connect(pg_url)
    try:
        _until(lambda: "started:" in worker.output())
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE queue_messages IN ACCESS EXCLUSIVE MODE")
        time.sleep(2)
        assert worker.alive(), worker.output()[-3000:]
        holder.execute("ROLLBACK")
        _place(pg_url, 5, start=10)  # and orders placed after it

        def drained() -> bool:
            with pgstore.connect(pg_url) as conn:
                return check(conn).correct == 15

        _until(drained)
        assert worker.terminate() == 0
    finally:
        holder.close()
        worker.stop()
    out = worker.log.read_text()
    assert "database is locked" in out and "Traceback" not in out, out[-3000:]
    stopped = next(line for line in out.splitlines() if "[w-1] stopped:" in line)
    assert "lock_waits=0" not in stopped, stopped
