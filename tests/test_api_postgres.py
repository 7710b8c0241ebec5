"""The HTTP API on a PostgreSQL store: the SQLite API's answers and error codes, the queue
table (or, with the broker outside the store, the outbox) written in the order's
transaction; and the lab as real processes on a throwaway schema."""

from __future__ import annotations

import json
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import Proc, cli, free_port, request
from test_api import BAD_REQUESTS, post

from deliverylab.app.api import create_app
from deliverylab.brokers.postgres import PostgresBroker
from deliverylab.brokers.sqlite import SQLiteBroker
from deliverylab.engine import store
from deliverylab.engine import store_postgres as pgstore
from deliverylab.engine.check import check
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.ids import Ids
from deliverylab.engine.relay import Relay
from deliverylab.engine.worker import Worker

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*starlette.testclient")
    from fastapi.testclient import TestClient


def counts(url: str) -> dict[str, int]:
    with pgstore.connect(url) as conn:
        return {**store.table_counts(conn),  # type: ignore[arg-type]
                "outbox": conn.execute("SELECT count(*) FROM outbox").fetchone()[0]}


@pytest.fixture
def client(pg_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(pg_url)) as c:
        yield c


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_the_sqlite_apis_answer_and_writes_nothing(client, pg_url, case):
    _, method, path, headers, body, status, says = case
    r = client.request(method, path, headers=headers, content=body)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]
    assert counts(pg_url)["orders"] == 0 and counts(pg_url)["queue_messages"] == 0


def test_post_writes_the_order_and_its_event_in_one_transaction(client, pg_url):
    r = post(client, {"orderId": "o-001", "itemId": "coffee-beans", "qty": 1})
    assert r.status_code == 201
    with pgstore.connect(pg_url) as conn:
        order = conn.execute("SELECT * FROM orders").fetchone()
        message = conn.execute("SELECT * FROM queue_messages").fetchone()
    assert message["event_id"] == r.json()["eventId"] == order["event_id"]
    assert message["correlation_id"] == "o-001"
    assert json.loads(message["payload"]) == {"orderId": "o-001", "itemId": "coffee-beans",
                                              "qty": 1}
    assert counts(pg_url)["outbox"] == 0  # the queue table is the outbox here


def test_replays_conflicts_and_idempotency_keys_as_on_sqlite(client, pg_url):
    body = {"orderId": "o-001", "itemId": "coffee-beans", "qty": 1}
    first, again = post(client, body), post(client, body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["replayed"] is True and again.json()["eventId"] == first.json()["eventId"]
    r = post(client, {**body, "qty": 2})
    assert r.status_code == 422 and r.json() == {
        "ok": False, "field": "orderId",
        "error": "orderId 'o-001' was already used with a different request"}
    k1 = post(client, {"itemId": "tea", "qty": 2}, **{"Idempotency-Key": "k-1"})
    k2 = post(client, {"itemId": "tea", "qty": 2}, **{"Idempotency-Key": "k-1"})
    k3 = post(client, {"itemId": "tea", "qty": 3}, **{"Idempotency-Key": "k-1"})
    assert (k1.status_code, k2.status_code, k3.status_code) == (201, 201, 422)
    assert k2.json() == k1.json() and k2.headers["idempotent-replayed"] == "true"
    assert counts(pg_url)["orders"] == 2 and counts(pg_url)["queue_messages"] == 2


def test_read_endpoints_follow_the_worker(client, pg_url):
    post(client, {"orderId": "o-001", "itemId": "coffee-beans", "qty": 1})
    post(client, {"orderId": "o-002", "itemId": "tea", "qty": 3})
    listing = client.get("/orders?limit=1&offset=1").json()
    assert listing["total"] == 2 and [o["orderId"] for o in listing["orders"]] == ["o-002"]
    assert client.get("/orders/o-001").json()["order"]["state"] == "pending"
    assert client.get("/status").json()["check"]["pending"] == 2
    with pgstore.connect(pg_url) as conn:
        broker = PostgresBroker(conn, clock=SystemClock(), ids=Ids(1))
        Worker(store=conn, broker=broker, clock=broker.clock).run_until_idle()
    assert client.get("/orders/o-001").json()["order"]["state"] == "correct"
    status = client.get("/status").json()
    assert status["guaranteeHeld"] is True and status["check"]["correct"] == 2
    assert {i["itemId"]: i["reservedQty"] for i in client.get("/projection").json()["items"]} \
        == {"coffee-beans": 1, "tea": 3}
    health = client.get("/health").json()
    assert health["ok"] is True and health["orders"] == 2
    assert (health["database"], health["synchronous"], health["events"]) == \
        ("ok", "FULL", "queue table")


def test_a_lock_held_past_the_budget_is_a_503_that_wrote_nothing(pg_url):
    with TestClient(create_app(pg_url, write_budget=0.3)) as client:
        holder = pgstore.connect(pg_url)
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE orders IN EXCLUSIVE MODE")  # another process writes
        try:
            r = post(client, {"itemId": "x", "qty": 1})
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "nothing was written" in r.json()["error"]
        assert counts(pg_url)["orders"] == 0
        assert post(client, {"itemId": "x", "qty": 1}).status_code == 201


def test_synchronous_levels_on_postgresql(pg_url):
    with TestClient(create_app(pg_url, synchronous="normal")) as client:
        assert client.get("/health").json()["synchronous"] == "NORMAL"
    with pytest.raises(InvalidInput, match="full or normal on PostgreSQL") as bad:
        create_app(pg_url, synchronous="extra")
    assert bad.value.field == "synchronous"


def test_a_schema_init_db_never_made_is_refused():
    from support.pg import new_url

    with pytest.raises(InvalidInput, match="init-db"):
        create_app(new_url())


def test_with_the_broker_outside_the_api_writes_the_outbox_and_the_relay_publishes(
        pg_url, tmp_path):
    with TestClient(create_app(pg_url, outbox=True)) as client:
        r = post(client, {"orderId": "o-001", "itemId": "tea", "qty": 2})
        assert r.status_code == 201
        assert client.get("/health").json()["events"] == "outbox"
        assert counts(pg_url)["outbox"] == 1 and counts(pg_url)["queue_messages"] == 0
        assert client.get("/orders/o-001").json()["order"]["state"] == "pending"
        broker = SQLiteBroker(store.init_db(tmp_path / "broker.db"), clock=SystemClock(),
                              ids=Ids(), trace=False)
        with pgstore.connect(pg_url) as conn:
            Relay(conn, broker, clock=broker.clock).run_until_idle()
            Worker(store=conn, broker=broker, clock=broker.clock).run_until_idle()
            assert check(conn, broker).ok
        broker.conn.close()
        assert client.get("/orders/o-001").json()["order"]["state"] == "correct"


def test_outbox_mode_on_a_store_without_the_outbox_table_asks_for_init_db(pg_url):
    with pgstore.connect(pg_url) as conn:
        conn.execute("DROP TABLE outbox")
    with pytest.raises(InvalidInput, match="init-db") as bad:
        create_app(pg_url, outbox=True)
    assert bad.value.field == "db"


def test_api_flags_for_the_broker_are_checked_before_serving(pg_url, tmp_path):
    same = cli("api", "--db", pg_url, "--broker", pg_url, "--port", str(free_port()))
    assert same.returncode == 2 and "--broker must be a broker outside the store" in same.stderr
    missing = cli("api", "--db", pg_url, "--broker", str(tmp_path / "none.db"))
    assert missing.returncode == 2 and "no database at" in missing.stderr


# -- real processes --------------------------------------------------------------------------
def _serve(tmp: Path, *args: str) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(tmp / "api.log", "api", "--port", str(port), "--no-access-log", *args)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.alive(), f"the API exited:\n{proc.output()}"
        try:
            if request("GET", "/health", port=port, timeout=2)[0] == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the API never answered /health:\n{proc.output()}")


def _wait(done, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.1)
    raise AssertionError(f"not done after {timeout:g}s")


@pytest.mark.slow
def test_the_lab_on_postgresql_api_worker_order_status(pg_url, tmp_path):
    """``deliverylab api`` and ``worker`` on one throwaway schema, orders placed with
    ``deliverylab order``, the verdict read with ``deliverylab status``."""
    api, port = _serve(tmp_path, "--db", pg_url)
    worker = Proc(tmp_path / "worker.log", "worker", "--db", pg_url, "--name", "w-1",
                  "--poll-interval", "0.05", "--ack-fail-rate", "0.5", "--seed", "3",
                  "--visibility-timeout", "0.3")
    try:
        url = f"http://127.0.0.1:{port}"
        for i in range(5):
            done = cli("order", "--url", url, "--item", "coffee-beans", "--qty", "1",
                       "--order-id", f"o-{i}")
            assert done.returncode == 0 and done.stdout.startswith("201 Created"), done.stderr
        again = cli("order", "--url", url, "--item", "coffee-beans", "--order-id", "o-0")
        assert again.stdout.startswith("200 OK") and '"replayed": true' in again.stdout
        bad = cli("order", "--url", url, "--item", "coffee-beans", "--qty", "2",
                  "--order-id", "o-0")
        assert bad.returncode == 1 and bad.stdout.startswith("422")

        def drained() -> bool:
            with pgstore.connect(pg_url) as conn:
                return check(conn).correct == 5

        _wait(drained)
        status = cli("status", "--db", pg_url)
        assert status.returncode == 0
        assert "5 applied exactly once, 0 duplicated, 0 lost" in status.stdout
        assert "OK: all 5 orders applied exactly once" in status.stdout
        assert worker.terminate() == 0 and api.terminate() in (0, -signal.SIGTERM)
        assert "duplicate skipped" in worker.output()  # ACKs were lost, the inbox held
        assert "Traceback" not in api.output() + worker.output()
    finally:
        worker.stop()
        api.stop()


@pytest.mark.slow
def test_five_processes_api_relay_worker_with_the_broker_outside_the_store(pg_url, tmp_path):
    """The store on PostgreSQL, the broker a SQLite file: ``api --broker`` writes the outbox,
    ``relay`` publishes it, ``worker`` consumes it; ``order`` and ``status`` as usual."""
    broker_file = tmp_path / "broker.db"
    assert cli("init-db", "--db", str(broker_file)).returncode == 0
    api, port = _serve(tmp_path, "--db", pg_url, "--broker", str(broker_file))
    relay = Proc(tmp_path / "relay.log", "relay", "--store", pg_url, "--broker",
                 str(broker_file), "--poll-interval", "0.05", "--name", "r-1")
    worker = Proc(tmp_path / "worker.log", "worker", "--store", pg_url, "--broker",
                  str(broker_file), "--poll-interval", "0.05", "--name", "w-1")
    try:
        for i in range(4):
            done = cli("order", "--url", f"http://127.0.0.1:{port}", "--item", "tea",
                       "--order-id", f"o-{i}")
            assert done.returncode == 0 and done.stdout.startswith("201"), done.stderr

        def drained() -> bool:
            with pgstore.connect(pg_url) as conn:
                return check(conn).correct == 4

        _wait(drained)
        assert "OK: all 4 orders applied exactly once" in cli("status", "--db", pg_url).stdout
        assert counts(pg_url)["queue_messages"] == 0  # nothing went to the store's queue
        assert relay.terminate() == 0 and worker.terminate() == 0
        assert api.terminate() in (0, -signal.SIGTERM)
        assert relay.output().count("published as") == 4
        assert "[r-1] stopped: steps=" in relay.output()
    finally:
        for proc in (relay, worker, api):
            proc.stop()
