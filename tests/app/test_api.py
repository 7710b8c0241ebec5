"""The HTTP API in process (FastAPI's TestClient), on each database through one fixture: a
SQLite file and a PostgreSQL schema (created for the test, dropped after) get the same
validation, idempotency and read endpoints, the same answers and error codes; and the lab as
real processes (``deliverylab api``, ``worker``, ``order``, ``status``) on each.

``BAD_REQUESTS`` is shared with ``test_lab_processes.py``, which sends the same requests to a
real server.
"""

from __future__ import annotations

import json
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.api import BAD_REQUESTS, JSON, _j, post, serve
from support.engine import DATABASES

from deliverylab.app.api import MAX_BODY_BYTES, create_app
from deliverylab.brokers.registry import table_broker
from deliverylab.brokers.sqlite import SQLiteBroker
from deliverylab.engine import store
from deliverylab.engine.check import check
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.ids import Ids
from deliverylab.engine.relay import Relay
from deliverylab.engine.store import Store
from deliverylab.engine.store_postgres import for_store
from deliverylab.engine.worker import Worker

with warnings.catch_warnings():
    # Starlette's test client announces a future move to another HTTP package; not ours.
    warnings.filterwarnings("ignore", message=".*starlette.testclient")
    from fastapi.testclient import TestClient







# -- one fixture, both databases -------------------------------------------------------------
@pytest.fixture
def client(db: str) -> Iterator[TestClient]:
    with TestClient(create_app(db)) as c:
        yield c


def open_store(db: str) -> Store:
    return for_store(db).connect(db)


def counts(db: str) -> dict[str, int]:
    conn = open_store(db)
    try:
        return {**store.table_counts(conn),
                "outbox": conn.execute("SELECT count(*) FROM outbox").fetchone()[0]}
    finally:
        conn.close()





# What another process does to hold up every write, on each database: SQLite's write lock;
# on PostgreSQL a table lock that conflicts with an INSERT's.
HOLD_WRITES = {"sqlite": ("BEGIN IMMEDIATE",),
               "postgresql": ("BEGIN", "LOCK TABLE orders IN EXCLUSIVE MODE")}


def test_there_are_at_least_thirty_bad_requests() -> None:
    assert len(BAD_REQUESTS) >= 30
    assert len({case[0] for case in BAD_REQUESTS}) == len(BAD_REQUESTS)


def test_the_fixture_gives_each_database_its_own_store(db: str) -> None:
    conn = open_store(db)
    try:
        assert store.dialect_of(conn) is for_store(db)
        assert store.missing_tables(conn) == []
    finally:
        conn.close()
    assert for_store(db).name in DATABASES


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_with_a_clear_message_and_writes_nothing(
        client: TestClient, db: str, case: tuple) -> None:
    _, method, path, headers, body, status, phrase = case
    before = counts(db)
    r = client.request(method, path, headers=headers, content=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert answer["ok"] is False
    assert phrase in answer["error"]
    assert counts(db) == before
    assert client.get("/health").json()["ok"] is True


def test_field_errors_name_the_field(client: TestClient) -> None:
    for body, field in [({"itemId": "x", "qty": 0}, "qty"), ({"itemId": "", "qty": 1}, "itemId"),
                        ({"orderId": "", "itemId": "x", "qty": 1}, "orderId"),
                        ({"qty": 1}, "itemId")]:
        answer = post(client, body).json()
        assert answer["field"] == field
        assert answer["error"].startswith(field)


def test_streamed_body_over_the_limit_is_413_without_content_length(
        client: TestClient, db: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"itemId": "x", "qty": 1, "pad": "'
        for _ in range(20):
            yield b"p" * 4096
        yield b'"}'

    r = client.post("/orders", content=chunks(), headers=JSON)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413
    assert "limit" in r.json()["error"]
    assert counts(db)["orders"] == 0


def test_body_just_under_the_limit_is_read(client: TestClient) -> None:
    body = b'{"itemId": "x", "qty": 1}' + b" " * (MAX_BODY_BYTES - 25)
    assert len(body) == MAX_BODY_BYTES
    assert client.post("/orders", content=body, headers=JSON).status_code == 201


def test_content_type_with_charset_is_accepted(client: TestClient) -> None:
    r = client.post("/orders", content=_j({"itemId": "x", "qty": 1}),
                    headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 201


def test_post_writes_the_order_and_its_event_in_one_transaction(
        client: TestClient, db: str) -> None:
    r = post(client, {"orderId": "o-001", "itemId": "coffee-beans", "qty": 1})
    assert r.status_code == 201
    answer = r.json()
    assert answer["ok"] is True and answer["orderId"] == "o-001"
    assert answer["eventId"].startswith("evt-") and answer["replayed"] is False
    conn = open_store(db)
    order = conn.execute("SELECT * FROM orders").fetchone()
    message = conn.execute("SELECT * FROM queue_messages").fetchone()
    conn.close()
    assert (order["order_id"], order["item_id"], order["qty"]) == ("o-001", "coffee-beans", 1)
    assert message["event_id"] == answer["eventId"] == order["event_id"]
    assert message["correlation_id"] == "o-001"
    assert json.loads(message["payload"]) == {"orderId": "o-001", "itemId": "coffee-beans",
                                              "qty": 1}
    assert counts(db)["outbox"] == 0  # the queue table is the outbox here


def test_order_id_is_generated_when_absent_or_null(client: TestClient) -> None:
    a = post(client, {"itemId": "x", "qty": 1}).json()
    b = post(client, {"orderId": None, "itemId": "x", "qty": 1}).json()
    assert a["orderId"].startswith("o-") and b["orderId"].startswith("o-")
    assert a["orderId"] != b["orderId"]


def test_replay_returns_the_first_answer_and_writes_nothing(client: TestClient, db: str) -> None:
    body = {"orderId": "o-001", "itemId": "coffee-beans", "qty": 1}
    first = post(client, body)
    again = post(client, body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["eventId"] == first.json()["eventId"]
    assert again.json()["replayed"] is True
    assert counts(db)["queue_messages"] == 1


def test_same_order_id_with_a_different_body_is_422(client: TestClient, db: str) -> None:
    post(client, {"orderId": "o-001", "itemId": "coffee-beans", "qty": 1})
    r = post(client, {"orderId": "o-001", "itemId": "coffee-beans", "qty": 2})
    assert r.status_code == 422
    assert r.json() == {"ok": False, "field": "orderId",
                        "error": "orderId 'o-001' was already used with a different request"}
    assert counts(db)["orders"] == 1 and counts(db)["queue_messages"] == 1


def test_idempotency_key_replays_and_conflicts(client: TestClient, db: str) -> None:
    first = post(client, {"itemId": "tea", "qty": 2}, **{"Idempotency-Key": "k-1"})
    again = post(client, {"itemId": "tea", "qty": 2}, **{"Idempotency-Key": "k-1"})
    other = post(client, {"itemId": "tea", "qty": 3}, **{"Idempotency-Key": "k-1"})
    # The exact retry gets the first status and body; another body with the key is a 422.
    assert (first.status_code, again.status_code, other.status_code) == (201, 201, 422)
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert other.json()["field"] == "Idempotency-Key"
    assert counts(db)["orders"] == 1 and counts(db)["queue_messages"] == 1


def test_read_endpoints(client: TestClient) -> None:
    post(client, {"orderId": "o-001", "itemId": "coffee-beans", "qty": 1})
    post(client, {"orderId": "o-002", "itemId": "tea", "qty": 3})
    listing = client.get("/orders?limit=1&offset=1").json()
    assert listing["total"] == 2 and [o["orderId"] for o in listing["orders"]] == ["o-002"]
    one = client.get("/orders/o-001").json()["order"]
    assert one["itemId"] == "coffee-beans" and one["state"] == "pending"
    assert one["applications"] == 0
    projection = client.get("/projection").json()
    assert projection["projectionEqualsTruth"] is False
    assert {i["itemId"]: (i["reservedQty"], i["truth"]) for i in projection["items"]} == {
        "coffee-beans": (0, 1), "tea": (0, 3)}
    status = client.get("/status").json()
    assert status["check"]["pending"] == 2 and status["guaranteeHeld"] is False
    health = client.get("/health").json()
    assert health["ok"] is True and health["orders"] == 2
    assert (health["database"], health["synchronous"], health["events"]) == \
        ("ok", "FULL", "queue table")


def test_order_ids_with_a_slash_can_be_read_back(client: TestClient) -> None:
    post(client, {"orderId": "shop/42", "itemId": "x", "qty": 1})
    assert client.get("/orders/shop/42").json()["order"]["orderId"] == "shop/42"


def test_order_state_follows_the_worker(client: TestClient, db: str) -> None:
    post(client, {"orderId": "o-001", "itemId": "coffee-beans", "qty": 1})
    post(client, {"orderId": "o-002", "itemId": "tea", "qty": 3})
    conn = open_store(db)
    try:
        broker = table_broker(conn, clock=SystemClock(), ids=Ids(1))
        Worker(store=conn, broker=broker, clock=broker.clock).run_until_idle()
    finally:
        conn.close()
    assert client.get("/orders/o-001").json()["order"]["state"] == "correct"
    status = client.get("/status").json()
    assert status["guaranteeHeld"] is True and status["check"]["correct"] == 2
    items = client.get("/projection").json()["items"]
    assert items == [{"itemId": "coffee-beans", "reservedQty": 1, "truth": 1, "delta": 0},
                     {"itemId": "tea", "reservedQty": 3, "truth": 3, "delta": 0}]


def test_docs_are_not_served(client: TestClient) -> None:
    # Swagger UI would load its scripts from a CDN; the lab works offline.
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404


@pytest.mark.parametrize("database", DATABASES)
def test_a_store_init_db_never_made_is_refused_naming_init_db(database: str,
                                                              tmp_path: Path) -> None:
    from support.pg import new_url

    never_made = {"sqlite": str(tmp_path / "missing.db"), "postgresql": new_url()}[database]
    with pytest.raises(InvalidInput, match="init-db") as bad:
        create_app(never_made)
    assert bad.value.field == "db"


def test_a_file_without_the_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    store.connect(path, must_exist=False).close()
    with pytest.raises(InvalidInput, match="missing tables"):
        create_app(path)


def test_a_write_held_up_past_the_budget_is_a_503_that_wrote_nothing(db: str) -> None:
    with TestClient(create_app(db, write_budget=0.3)) as client:
        holder = open_store(db)
        for statement in HOLD_WRITES[for_store(db).name]:  # another process writes
            holder.execute(statement)
        try:
            r = post(client, {"itemId": "x", "qty": 1})
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "nothing was written" in r.json()["error"]
        assert counts(db)["orders"] == 0
        assert post(client, {"itemId": "x", "qty": 1}).status_code == 201


def test_read_connections_are_reused(client: TestClient) -> None:
    for _ in range(20):
        assert client.get("/health").status_code == 200
        assert client.get("/projection").status_code == 200
    assert len(client.app.state.store._idle) == 1


@pytest.mark.parametrize("level", ["normal", "full", "extra"])
def test_each_synchronous_level_the_database_has_is_read_back_the_others_refused(
        db: str, level: str) -> None:
    dialect = for_store(db)
    if level.upper() not in dialect.durabilities:  # EXTRA: SQLite's alone
        with pytest.raises(InvalidInput, match="full or normal on PostgreSQL") as bad:
            create_app(db, synchronous=level)
        assert bad.value.field == "synchronous"
        return
    with TestClient(create_app(db, synchronous=level)) as client:
        assert client.get("/health").json()["synchronous"] == level.upper()


def test_with_the_broker_outside_the_api_writes_the_outbox_and_the_relay_publishes(
        db: str, tmp_path: Path) -> None:
    with TestClient(create_app(db, outbox=True)) as client:
        r = post(client, {"orderId": "o-001", "itemId": "tea", "qty": 2})
        assert r.status_code == 201
        assert client.get("/health").json()["events"] == "outbox"
        assert counts(db)["outbox"] == 1 and counts(db)["queue_messages"] == 0
        assert client.get("/orders/o-001").json()["order"]["state"] == "pending"
        broker = SQLiteBroker(store.init_db(tmp_path / "broker.db"), clock=SystemClock(),
                              ids=Ids(), trace=False)
        conn = open_store(db)
        try:
            Relay(conn, broker, clock=broker.clock).run_until_idle()
            Worker(store=conn, broker=broker, clock=broker.clock).run_until_idle()
            assert check(conn, broker).ok
        finally:
            conn.close()
            broker.conn.close()
        assert client.get("/orders/o-001").json()["order"]["state"] == "correct"


def test_outbox_mode_on_a_store_without_the_outbox_table_asks_for_init_db(db: str) -> None:
    conn = open_store(db)
    conn.execute("DROP TABLE outbox")
    conn.close()
    with pytest.raises(InvalidInput, match="init-db") as bad:
        create_app(db, outbox=True)
    assert bad.value.field == "db"


def test_api_flags_for_the_broker_are_checked_before_serving(db: str, tmp_path: Path) -> None:
    from support.processes import cli, free_port

    same = cli("api", "--db", db, "--broker", db, "--port", str(free_port()))
    assert same.returncode == 2 and "--broker must be a broker outside the store" in same.stderr
    missing = cli("api", "--db", db, "--broker", str(tmp_path / "none.db"))
    assert missing.returncode == 2 and "no database at" in missing.stderr


# -- real processes --------------------------------------------------------------------------



def _wait(done: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.1)
    raise AssertionError(f"not done after {timeout:g}s")


@pytest.mark.slow
def test_the_lab_as_processes_api_worker_order_status(db: str, tmp_path: Path) -> None:
    """``deliverylab api`` and ``worker`` on one store, orders placed with ``deliverylab
    order``, the verdict read with ``deliverylab status``."""
    from support.processes import Proc, cli

    api, port = serve(tmp_path, "--db", db)
    worker = Proc(tmp_path / "worker.log", "worker", "--db", db, "--name", "w-1",
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

        def drained() -> bool:  # every order applied, and every message settled: a lost
            conn = open_store(db)  # ACK's redelivery has come back and been skipped
            try:
                left = conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
                return check(conn).correct == 5 and left == 0
            finally:
                conn.close()

        _wait(drained)
        status = cli("status", "--db", db)
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
def test_five_processes_api_relay_worker_with_the_broker_outside_the_store(
        db: str, tmp_path: Path) -> None:
    """The store on either database, the broker a SQLite file of its own: ``api --broker``
    writes the outbox, ``relay`` publishes it, ``worker`` consumes it; ``order`` and
    ``status`` as usual."""
    from support.processes import Proc, cli

    broker_file = tmp_path / "broker.db"
    assert cli("init-db", "--db", str(broker_file)).returncode == 0
    api, port = serve(tmp_path, "--db", db, "--broker", str(broker_file))
    relay = Proc(tmp_path / "relay.log", "relay", "--store", db, "--broker",
                 str(broker_file), "--poll-interval", "0.05", "--name", "r-1")
    worker = Proc(tmp_path / "worker.log", "worker", "--store", db, "--broker",
                  str(broker_file), "--poll-interval", "0.05", "--name", "w-1")
    try:
        for i in range(4):
            done = cli("order", "--url", f"http://127.0.0.1:{port}", "--item", "tea",
                       "--order-id", f"o-{i}")
            assert done.returncode == 0 and done.stdout.startswith("201"), done.stderr

        def drained() -> bool:
            conn = open_store(db)
            try:
                return check(conn).correct == 4
            finally:
                conn.close()

        _wait(drained)
        assert "OK: all 4 orders applied exactly once" in cli("status", "--db", db).stdout
        assert counts(db)["queue_messages"] == 0  # nothing went to the store's queue
        assert relay.terminate() == 0 and worker.terminate() == 0
        assert api.terminate() in (0, -signal.SIGTERM)
        assert relay.output().count("published as") == 4
        assert "[r-1] stopped: steps=" in relay.output()
    finally:
        for proc in (relay, worker, api):
            proc.stop()
