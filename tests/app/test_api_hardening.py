"""The API under attack: a held write lock, idempotency keys raced and reused, hostile bytes,
a deleted database file, durability of a 201, and foreign ``Host`` names.

The tests marked ``slow`` run the real ``deliverylab api`` process (``support.processes.ProcessRig``)
and a real second SQLite connection; every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.processes import HOST, ProcessRig, child_env, cli, no_failures, request

from deliverylab.app.api import WRITE_BUDGET_S, create_app
from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput, OrderConflict, check_id
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*starlette.testclient")
    from fastapi.testclient import TestClient

JSON = {"content-type": "application/json"}



@pytest.fixture
def lab(tmp_path: Path) -> Iterator[ProcessRig]:
    lab = ProcessRig(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def counts(path: Path) -> dict[str, int]:
    conn = store.connect(path)
    try:
        return store.table_counts(conn)
    finally:
        conn.close()


def post(client: TestClient, body: object, **headers: str) -> Any:
    return client.post("/orders", json=body, headers=headers)


def raw_post(port: int, body: dict[str, Any], headers: dict[str, str] | None = None,
             timeout: float = 10) -> tuple[int, dict[str, str], Any, float]:
    """POST on a fresh connection: (status, headers, JSON body, seconds taken)."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/orders", body=json.dumps(body).encode(),
                     headers={**JSON, **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return (resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw),
                time.monotonic() - t0)
    finally:
        conn.close()


def timed_health(port: int) -> tuple[int, Any, float]:
    t0 = time.monotonic()
    status, body = request("GET", "/health", port=port, timeout=5)
    return status, body, time.monotonic() - t0


# -- 1. a write lock held by another process -----------------------------------------------------

@pytest.mark.slow
def test_a_held_write_lock_gets_each_request_a_prompt_503_and_health_still_answers(
        lab: ProcessRig) -> None:
    api = lab.api("--no-access-log")
    holder = lab.connect()
    holder.execute("BEGIN IMMEDIATE")  # another process takes the write lock and keeps it
    answers: list[Any] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            answers.append(raw_post(lab.port, {"orderId": f"o-{i}", "itemId": "x", "qty": 1},
                                    timeout=WRITE_BUDGET_S + 10))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(45)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)  # the 45 requests are now queued on the server
        probes = [timed_health(lab.port) for _ in range(5)]
        for t in threads:
            t.join(timeout=WRITE_BUDGET_S + 15)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not errors, errors[:3]
    assert len(answers) == 45
    for status, headers, body, took in answers:
        assert status == 503 and headers["retry-after"] == "1", body
        assert "nothing was written" in body["error"]
        # The budget, not 45 busy timeouts in turn; the slack covers a loaded machine.
        assert took < WRITE_BUDGET_S + 2, took
    for status, body, took in probes:
        assert status == 503 and body["writable"] is False and body["database"] == "locked"
        assert took < 1.0, took  # the 100 ms target itself is measured in bench_api.py
    assert counts(lab.db)["orders"] == 0
    # The lock released, the same requests go through.
    assert raw_post(lab.port, {"orderId": "o-0", "itemId": "x", "qty": 1})[0] == 201
    assert request("GET", "/health", port=lab.port)[1]["writable"] is True
    no_failures(api)


def test_orders_that_queued_meanwhile_share_a_commit_and_keep_their_own_answers(
        db_file: Path) -> None:
    """Group commit: what waited behind the lock commits together, each order in a savepoint
    of its own, so a conflict refuses that order alone."""
    with TestClient(create_app(db_file)) as client:
        writer = client.app.state.store
        assert post(client, {"orderId": "taken", "itemId": "tea", "qty": 1}).status_code == 201
        bodies = [{"orderId": f"o-{i}", "itemId": "tea", "qty": 1} for i in range(12)]
        bodies += [{"orderId": "taken", "itemId": "tea", "qty": 9},  # a conflict: 422
                   {"orderId": "o-0", "itemId": "tea", "qty": 1}]  # a replay of o-0: 200
        answers: dict[int, int] = {}
        holder = store.connect(db_file)
        holder.execute("BEGIN IMMEDIATE")
        commits, accepted = writer.commits, writer.accepted
        threads = [threading.Thread(target=lambda i=i, b=b: answers.__setitem__(
            i, post(client, b).status_code)) for i, b in enumerate(bodies)]
        def queued(n: int) -> None:  # until n more orders reached the write thread
            deadline = time.monotonic() + 2
            while writer.accepted - accepted < n and time.monotonic() < deadline:
                time.sleep(0.01)
            assert writer.accepted - accepted == n

        try:
            for t in threads[:12]:
                t.start()
            queued(12)
            for t in threads[12:]:
                t.start()
            queued(14)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
            for t in threads:
                t.join(timeout=10)
        assert [answers[i] for i in range(12)] == [201] * 12
        assert (answers[12], answers[13]) == (422, 200)
        # The first orders to reach the write thread waited for the lock in one transaction;
        # everything that queued behind them shares the next commit.
        assert writer.commits - commits == 2
    assert counts(db_file)["orders"] == 13 and counts(db_file)["queue_messages"] == 13


# -- 2. Idempotency-Key, as the IETF draft specifies ---------------------------------------------

def test_a_key_that_replayed_an_order_id_is_recorded_and_never_reused(
        client: TestClient, db_file: Path) -> None:
    a1 = {"orderId": "A1", "itemId": "coffee-beans", "qty": 1}
    assert post(client, a1).status_code == 201
    second = post(client, a1, **{"Idempotency-Key": "K2"})
    assert second.status_code == 200 and second.json()["replayed"] is True
    # K2 is bound to the A1 request now: another order under it is refused, not created.
    b7 = post(client, {"orderId": "B7", "itemId": "tea", "qty": 5}, **{"Idempotency-Key": "K2"})
    assert b7.status_code == 422 and b7.json()["field"] == "Idempotency-Key"
    retry = post(client, a1, **{"Idempotency-Key": "K2"})
    assert (retry.status_code, retry.json()) == (200, second.json())
    assert counts(db_file)["orders"] == 1 and counts(db_file)["idempotency_keys"] == 1


def test_an_exact_retry_gets_the_first_status_and_body(client: TestClient) -> None:
    body = {"itemId": "tea", "qty": 2}
    first = post(client, body, **{"Idempotency-Key": "k-1"})
    for _ in range(3):
        again = post(client, body, **{"Idempotency-Key": "k-1"})
        assert (again.status_code, again.json()) == (201, first.json())
        assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    # The draft's Structured Field form of the same key is the same key.
    quoted = post(client, body, **{"Idempotency-Key": '"k-1"'})
    assert (quoted.status_code, quoted.json()) == (201, first.json())


@pytest.mark.parametrize("other", [{"itemId": "tea", "qty": 3}, {"itemId": "coffee", "qty": 2},
                                   {"orderId": "o-mine", "itemId": "tea", "qty": 2}])
def test_the_same_key_with_another_request_is_422(client: TestClient, db_file: Path,
                                                  other: dict[str, Any]) -> None:
    assert post(client, {"itemId": "tea", "qty": 2}, **{"Idempotency-Key": "k-1"}).status_code \
        == 201
    before = counts(db_file)
    r = post(client, other, **{"Idempotency-Key": "k-1"})
    assert r.status_code == 422
    assert r.json() == {"ok": False, "field": "Idempotency-Key",
                        "error": "Idempotency-Key 'k-1' was already used with a different"
                                 " request"}
    assert counts(db_file) == before


@pytest.mark.slow
def test_a_retry_while_the_first_request_is_in_flight_is_409(lab: ProcessRig) -> None:
    api = lab.api("--no-access-log")
    body, key = {"itemId": "tea", "qty": 2}, {"Idempotency-Key": "k-race"}
    holder = lab.connect()
    holder.execute("BEGIN IMMEDIATE")  # keeps the first request in flight, waiting to write
    first: list[Any] = []
    thread = threading.Thread(target=lambda: first.append(raw_post(lab.port, body, key)))
    try:
        thread.start()
        time.sleep(0.5)  # the first request is now waiting for the lock, inside its budget
        status, headers, answer, took = raw_post(lab.port, body, key)
        assert thread.is_alive(), "the first request was answered before the retry"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        thread.join(timeout=WRITE_BUDGET_S + 10)
    assert status == 409 and answer["field"] == "Idempotency-Key", answer
    assert "still being processed" in answer["error"] and headers["retry-after"] == "1"
    assert took < 1.0  # answered at once, not after the first request
    assert first[0][0] == 201
    # Once answered, the retry gets the first answer.
    again = raw_post(lab.port, body, key)
    assert (again[0], again[2]) == (201, first[0][2])
    assert counts(lab.db)["orders"] == 1
    no_failures(api)


def test_place_order_records_every_key_it_is_given(file_lab) -> None:
    lab = file_lab
    lab.order("tea", 1, order_id="A1")
    replay = lab.order("tea", 1, order_id="A1", idempotency_key="K2")
    assert not replay.created and replay.key_first_created is None
    again = lab.order("tea", 1, order_id="A1", idempotency_key="K2")
    assert again.key_first_created is False  # the first answer with K2 was a replay
    before = store.dump(lab.store)
    with pytest.raises(OrderConflict, match="Idempotency-Key 'K2'"):
        lab.order("tea", 1, order_id="B7", idempotency_key="K2")
    assert store.dump(lab.store) == before


# -- 3. bytes that must never reach a 500, a log or a terminal -----------------------------------

SURROGATES = [
    ("in itemId", b'{"itemId": "\\ud800", "qty": 1}', "itemId"),
    ("in orderId", b'{"orderId": "o-\\udfff", "itemId": "x", "qty": 1}', "orderId"),
    ("in qty", b'{"itemId": "x", "qty": "\\ud800"}', "qty"),
    ("in a field name", b'{"\\ud800": 1, "itemId": "x", "qty": 1}', None),
    ("as the whole body", b'"\\ud800"', None),
    ("inside a list", b'{"itemId": ["\\udc00"], "qty": 1}', "itemId"),
    ("deep inside", b'{"itemId": "x", "qty": 1, "meta": {"a": [{"b": "\\ud83d"}]}}', None),
]


@pytest.mark.parametrize(("where", "body", "field"), SURROGATES, ids=[s[0] for s in SURROGATES])
def test_a_lone_surrogate_is_a_400_and_writes_nothing(client: TestClient, db_file: Path,
                                                      where: str, body: bytes,
                                                      field: str | None) -> None:
    r = client.post("/orders", content=body, headers=JSON)  # a 500 would raise here
    assert r.status_code == 400, r.text
    answer = json.loads(r.content.decode("utf-8", errors="strict"))
    assert "lone UTF-16 surrogate" in answer["error"] and answer.get("field") == field
    assert sum(counts(db_file).values()) == 0


HOSTILE_IDS = [
    ("orderId", "o-1\n[worker-1] t=1.000 applied projection item=x qty=999"),
    ("orderId", "o-1\r"),
    ("itemId", "\x1b[31mred\x1b[0m"),
    ("itemId", "tea\x00"),
    ("itemId", "tea\x7f"),
    ("itemId", "tea\x9b31m"),  # C1 CSI
    ("orderId", "o-\u202e1"),  # right-to-left override
    ("orderId", "o-\u2066x\u2069"),  # bidi isolate
    ("itemId", "te\u200ba"),  # zero-width space
    ("itemId", "tea\u2028"),  # line separator
    ("orderId", "\ufeffo-1"),  # byte order mark
]


@pytest.mark.parametrize(("field", "value"), HOSTILE_IDS, ids=[repr(v)[:30] for _, v in HOSTILE_IDS])
def test_control_and_invisible_characters_in_ids_are_refused_by_the_api(
        client: TestClient, db_file: Path, field: str, value: str) -> None:
    body = {"itemId": "tea", "qty": 1, field: value}
    r = post(client, body)
    assert r.status_code == 422 and r.json()["field"] == field
    assert "without control or invisible characters" in r.json()["error"]
    text = r.content.decode("utf-8")
    # The message quotes the value escaped: nothing in it can drive a terminal or a log.
    assert value not in text and not any(c in text for c in "\n\r\x1b\x9b\u202e\u2028")
    assert sum(counts(db_file).values()) == 0


@pytest.mark.parametrize(("field", "value"), HOSTILE_IDS, ids=[repr(v)[:30] for _, v in HOSTILE_IDS])
def test_control_and_invisible_characters_in_ids_are_refused_by_place_order(
        file_lab, field: str, value: str) -> None:
    lab = file_lab
    before = store.dump(lab.store)
    kwargs = {"item_id": "tea", "qty": 1, {"orderId": "order_id", "itemId": "item_id"}[field]:
              value}
    with pytest.raises(InvalidInput) as info:
        place_order(lab.broker, **kwargs)
    assert info.value.field == field and info.value.value == value
    with pytest.raises(InvalidInput) as info:
        place_order(lab.broker, item_id="tea", qty=1, idempotency_key=value)
    assert info.value.field == "Idempotency-Key"
    assert store.dump(lab.store) == before


@pytest.mark.parametrize("value", ["e-1\n", "e\x1b[2J", "e\u202e", "e\ud800"])
def test_queue_send_refuses_hostile_event_and_correlation_ids(file_lab, value: str) -> None:
    lab = file_lab
    before = store.dump(lab.store)
    with pytest.raises(InvalidInput) as info:
        lab.broker.send(value, "OrderPlaced", {})
    assert info.value.field == "event_id"
    with pytest.raises(InvalidInput) as info:
        lab.broker.send("evt-1", "OrderPlaced", {}, correlation_id=value)
    assert info.value.field == "correlation_id"
    assert store.dump(lab.store) == before


def test_check_id_keeps_ordinary_text_and_says_what_it_found() -> None:
    for ok in ("o-001", "shop/42", "café", "咖啡豆", "☕ beans", "a b", "x" * 100):
        assert check_id("itemId", ok) == ok
    with pytest.raises(InvalidInput, match=r"^orderId must be an id without control or"
                                           r" invisible characters \(U\+000A at index 3\),"
                                           r" got 'o-1\\n'$"):
        check_id("orderId", "o-1\n")
    for bad in ("", "   ", "x" * 101, 7, None):
        with pytest.raises(InvalidInput):
            check_id("itemId", bad)


def test_an_internal_error_answers_a_generic_500(db_file: Path, tmp_path: Path) -> None:
    with TestClient(create_app(db_file), raise_server_exceptions=False) as c:
        conn = store.connect(db_file)
        conn.execute("DROP TABLE inventory_projection")  # the engine's reads now fail
        conn.close()
        r = c.get("/projection")
    assert r.status_code == 500
    assert r.json() == {"ok": False, "error": "internal error; the server's log has the details"}
    assert "no such table" not in r.text and str(tmp_path) not in r.text


@pytest.mark.slow
def test_an_internal_error_is_logged_by_the_server_and_not_told_to_the_client(lab: ProcessRig) -> None:
    api = lab.api()
    conn = lab.connect()
    conn.execute("DROP TABLE inventory_projection")
    conn.close()
    status, body = request("GET", "/projection", port=lab.port)
    assert status == 500 and "no such table" not in json.dumps(body)
    assert str(lab.tmp) not in json.dumps(body)
    deadline = time.monotonic() + 10
    while "no such table" not in api.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Traceback" in api.output() and "no such table" in api.output()
    assert api.alive() and request("GET", "/orders", port=lab.port)[0] == 200


@pytest.mark.slow
def test_hostile_bytes_leave_no_traceback_in_the_server_log(lab: ProcessRig) -> None:
    api = lab.api()
    for _, body, _ in SURROGATES:
        status, answer = request("POST", "/orders", body, port=lab.port, headers=JSON)
        assert status == 400, answer
    for field, value in HOSTILE_IDS:
        status, answer = request("POST", "/orders", {"itemId": "x", "qty": 1, field: value},
                                 port=lab.port)
        assert status == 422, answer
    # A C1 control in the key: header bytes outside ASCII reach the server as latin-1.
    status, answer = request("POST", "/orders", {"itemId": "x", "qty": 1}, port=lab.port,
                             headers={"Idempotency-Key": "k\x9b31m"})
    assert status == 400 and answer["field"] == "Idempotency-Key"
    assert sum(counts(lab.db).values()) == 0
    no_failures(api)


# -- 4. the database file deleted or replaced under the running API ------------------------------

@pytest.mark.slow
def test_writes_are_refused_once_the_database_file_is_deleted(lab: ProcessRig) -> None:
    api = lab.api("--no-access-log")
    assert raw_post(lab.port, {"orderId": "o-1", "itemId": "x", "qty": 1})[0] == 201
    os.unlink(lab.db)  # the -wal and -shm files stay, as after a careless rm
    status, headers, body, _ = raw_post(lab.port, {"orderId": "o-2", "itemId": "x", "qty": 1})
    assert status == 503 and headers["retry-after"] == "1"
    assert "deleted" in body["error"] and "nothing was written" in body["error"]
    status, health = request("GET", "/health", port=lab.port)
    assert status == 503 and health["database"] == "deleted" and health["writable"] is False
    assert api.alive()
    no_failures(api)


@pytest.mark.slow
def test_writes_are_refused_once_the_database_file_is_replaced(lab: ProcessRig) -> None:
    api = lab.api("--no-access-log")
    other = lab.tmp / "other.db"
    store.init_db(other).close()
    os.replace(other, lab.db)  # a restore from backup while the API runs
    status, _, body, _ = raw_post(lab.port, {"orderId": "o-1", "itemId": "x", "qty": 1})
    assert status == 503 and "replaced" in body["error"]
    status, health = request("GET", "/health", port=lab.port)
    assert status == 503 and health["database"] == "replaced"
    assert counts(lab.db)["orders"] == 0
    no_failures(api)


# -- 5. a 201 is on disk: synchronous=FULL for the API's writes ----------------------------------

def test_the_api_writes_with_synchronous_full_by_default(client: TestClient) -> None:
    assert client.get("/health").json()["synchronous"] == "FULL"


def test_synchronous_can_be_set_by_argument_or_environment(
        db_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(create_app(db_file, synchronous="normal")) as c:
        assert c.get("/health").json()["synchronous"] == "NORMAL"
    monkeypatch.setenv("DELIVERYLAB_SYNCHRONOUS", "normal")
    with TestClient(create_app(db_file)) as c:
        assert c.get("/health").json()["synchronous"] == "NORMAL"
    with TestClient(create_app(db_file, synchronous="full")) as c:  # the argument wins
        assert c.get("/health").json()["synchronous"] == "FULL"


def test_a_bad_synchronous_value_is_refused_naming_where_it_came_from(
        db_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInput) as info:
        create_app(db_file, synchronous="fast")
    assert info.value.field == "synchronous" and info.value.value == "fast"
    monkeypatch.setenv("DELIVERYLAB_SYNCHRONOUS", "off")
    with pytest.raises(InvalidInput) as info:
        create_app(db_file)
    assert info.value.field == "DELIVERYLAB_SYNCHRONOUS" and info.value.value == "off"


def test_connect_sets_synchronous_and_validates_it(db_file: Path) -> None:
    for name, level in (("normal", 1), ("FULL", 2), ("Extra", 3)):
        conn = store.connect(db_file, synchronous=name)
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == level
        conn.close()
    conn = store.connect(db_file)  # workers keep NORMAL
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    conn.close()
    for bad in ("OFF", "0", "", None, 2):
        with pytest.raises(InvalidInput) as info:
            store.connect(db_file, synchronous=bad)  # type: ignore[arg-type]
        assert info.value.field == "synchronous"


@pytest.mark.slow
def test_the_api_process_runs_full_unless_told_otherwise(lab: ProcessRig) -> None:
    lab.api("--no-access-log")
    assert request("GET", "/health", port=lab.port)[1]["synchronous"] == "FULL"
    lab.close()
    lab.api("--no-access-log", "--synchronous", "normal")
    assert request("GET", "/health", port=lab.port)[1]["synchronous"] == "NORMAL"
    done = cli("api", "--db", str(lab.db), "--synchronous", "fast")
    assert done.returncode == 2 and "--synchronous" in done.stderr and "'fast'" in done.stderr
    done = cli("api", "--db", str(lab.db), env=child_env(DELIVERYLAB_SYNCHRONOUS="fast"))
    assert done.returncode == 2 and "DELIVERYLAB_SYNCHRONOUS must be one of" in done.stderr


# -- 6. the Host header: only the names this server answers to -----------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:3000", "localhost", "LocalHost:80",
                                  "[::1]", "[::1]:3000"])
def test_local_host_names_are_served(client: TestClient, host: str) -> None:
    r = post(client, {"itemId": "x", "qty": 1}, host=host)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:3000", "localhost.evil.example",
                                  "127.0.0.1.nip.io", "127.0.0.2", "[::1", "localhost:x",
                                  "user@localhost"])
def test_other_host_names_are_refused_naming_the_field(client: TestClient, db_file: Path,
                                                       host: str) -> None:
    for method, path in (("POST", "/orders"), ("GET", "/orders"), ("GET", "/health")):
        r = client.request(method, path, headers={**JSON, "host": host},
                           content=b'{"itemId": "x", "qty": 1}')
        assert r.status_code == 400, r.text
        assert r.json()["field"] == "Host" and "Host must be one" in r.json()["error"]
    assert sum(counts(db_file).values()) == 0


def test_allowed_hosts_adds_names(db_file: Path) -> None:
    with TestClient(create_app(db_file, allowed_hosts=["shop.test", "::1", "10.0.0.5"])) as c:
        for host in ("shop.test:8080", "SHOP.TEST", "10.0.0.5", "localhost"):
            assert c.get("/orders", headers={"host": host}).status_code == 200, host
        assert c.get("/orders", headers={"host": "evil.example"}).status_code == 400
    with TestClient(create_app(db_file, allowed_hosts=["*"])) as c:
        assert c.get("/orders", headers={"host": "anything.example"}).status_code == 200
    for bad in ("shop.test:8080", "a b", "", "x/y", "ev\nil", "[::1", "fe80::1:80]"):
        with pytest.raises(InvalidInput) as info:
            create_app(db_file, allowed_hosts=[bad])
        assert info.value.field == "allowed_hosts"


def test_allowed_hosts_from_the_environment_add_to_the_argument(
        db_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELIVERYLAB_ALLOWED_HOSTS", "shop.test, api.shop.test")
    with TestClient(create_app(db_file, allowed_hosts=["other.test"])) as c:
        for host in ("shop.test", "api.shop.test:80", "other.test", "127.0.0.1"):
            assert c.get("/orders", headers={"host": host}).status_code == 200, host
    monkeypatch.setenv("DELIVERYLAB_ALLOWED_HOSTS", "shop.test,bad host")
    with pytest.raises(InvalidInput) as info:
        create_app(db_file)
    assert info.value.field == "DELIVERYLAB_ALLOWED_HOSTS" and info.value.value == "bad host"


@pytest.mark.slow
def test_the_api_process_refuses_a_foreign_host(lab: ProcessRig) -> None:
    api = lab.api("--no-access-log", "--allowed-host", "shop.test")
    for host, status in (("evil.example", 400), (f"evil.example:{lab.port}", 400),
                         ("testserver", 400), (f"localhost:{lab.port}", 201),
                         (f"[::1]:{lab.port}", 201), (f"shop.test:{lab.port}", 201)):
        got, _, body, _ = raw_post(lab.port, {"itemId": "x", "qty": 1}, {"Host": host})
        assert got == status, (host, body)
        if status == 400:
            assert body["field"] == "Host"
    assert counts(lab.db)["orders"] == 3
    no_failures(api)
    done = cli("api", "--db", str(lab.db), "--allowed-host", "shop.test:80")
    assert done.returncode == 2 and "--allowed-host must be a host name" in done.stderr
    done = cli("api", "--db", str(lab.db),
               env=child_env(DELIVERYLAB_ALLOWED_HOSTS="shop.test,bad host"))
    assert done.returncode == 2 and "DELIVERYLAB_ALLOWED_HOSTS must be" in done.stderr


def test_an_unwritable_key_table_is_a_store_error_not_a_silent_reuse(db_file: Path) -> None:
    """The key table is part of the schema: a database without it is refused at start."""
    conn = sqlite3.connect(db_file)
    conn.execute("DROP TABLE idempotency_keys")
    conn.close()
    with pytest.raises(InvalidInput, match="idempotency_keys"):
        create_app(db_file)


def test_a_key_recorded_before_the_key_table_still_replays(tmp_path: Path) -> None:
    """An order row that carries a key from before the key table existed keeps it bound."""
    conn = store.init_db(tmp_path / "old.db")
    queue = Queue(conn, clock=FakeClock(), ids=Ids(1))
    first = place_order(queue, item_id="tea", qty=1, idempotency_key="k-old")
    conn.execute("DELETE FROM idempotency_keys")  # as the file was before the table
    again = place_order(queue, item_id="tea", qty=1, idempotency_key="k-old")
    assert (again.order_id, again.created, again.key_first_created) == (first.order_id, False,
                                                                        True)
    with pytest.raises(OrderConflict):
        place_order(queue, item_id="tea", qty=2, idempotency_key="k-old")
    conn.close()
