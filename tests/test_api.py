"""The HTTP API in process (FastAPI's TestClient): validation, idempotency, the read endpoints.

``BAD_REQUESTS`` is shared with ``test_lab_processes.py``, which sends the same requests to a
real server.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from deliverylab.app.api import MAX_BODY_BYTES, create_app
from deliverylab.engine import store
from deliverylab.engine.errors import InvalidInput

with warnings.catch_warnings():
    # Starlette's test client announces a future move to another HTTP package; not ours.
    warnings.filterwarnings("ignore", message=".*starlette.testclient")
    from fastapi.testclient import TestClient

JSON = {"content-type": "application/json"}


def _j(obj: object) -> bytes:
    return json.dumps(obj).encode()


# (id, method, path, headers, body, status, a phrase the error must contain)
BAD_REQUESTS: list[tuple[str, str, str, dict[str, str], bytes | None, int, str]] = [
    ("truncated json", "POST", "/orders", JSON, b'{"itemId": "x", "qty": 1', 400,
     "not valid JSON"),
    ("trailing garbage", "POST", "/orders", JSON, b'{"itemId": "x", "qty": 1} x', 400,
     "not valid JSON"),
    ("single quotes", "POST", "/orders", JSON, b"{'itemId': 'x', 'qty': 1}", 400,
     "not valid JSON"),
    ("empty body", "POST", "/orders", JSON, b"", 400, "body is empty"),
    ("not utf-8", "POST", "/orders", JSON, b'{"itemId": "\xff", "qty": 1}', 400, "UTF-8"),
    ("NaN", "POST", "/orders", JSON, b'{"itemId": "x", "qty": NaN}', 400, "NaN"),
    ("duplicate key", "POST", "/orders", JSON, b'{"itemId": "x", "qty": 1, "qty": 2}', 400,
     "duplicate key 'qty'"),
    ("array body", "POST", "/orders", JSON, _j([{"itemId": "x", "qty": 1}]), 422,
     "JSON object"),
    ("string body", "POST", "/orders", JSON, _j("coffee-beans"), 422, "JSON object"),
    ("null body", "POST", "/orders", JSON, b"null", 422, "JSON object"),
    ("empty object", "POST", "/orders", JSON, b"{}", 422, "itemId is required"),
    ("missing itemId", "POST", "/orders", JSON, _j({"qty": 1}), 422, "itemId is required"),
    ("missing qty", "POST", "/orders", JSON, _j({"itemId": "x"}), 422, "qty is required"),
    ("unknown field", "POST", "/orders", JSON, _j({"itemId": "x", "quantity": 1}), 422,
     "unknown field 'quantity'"),
    ("qty zero", "POST", "/orders", JSON, _j({"itemId": "x", "qty": 0}), 422, "qty must be"),
    ("qty negative", "POST", "/orders", JSON, _j({"itemId": "x", "qty": -3}), 422,
     "got -3"),
    ("qty 1.0", "POST", "/orders", JSON, b'{"itemId": "x", "qty": 1.0}', 422, "got 1.0"),
    ("qty 1.5", "POST", "/orders", JSON, _j({"itemId": "x", "qty": 1.5}), 422, "got 1.5"),
    ("qty string", "POST", "/orders", JSON, _j({"itemId": "x", "qty": "1"}), 422,
     'got "1"'),
    ("qty bool", "POST", "/orders", JSON, _j({"itemId": "x", "qty": True}), 422, "got true"),
    ("qty null", "POST", "/orders", JSON, _j({"itemId": "x", "qty": None}), 422, "got null"),
    ("qty too big", "POST", "/orders", JSON, _j({"itemId": "x", "qty": 10_001}), 422,
     "<= 10000"),
    ("qty huge", "POST", "/orders", JSON, _j({"itemId": "x", "qty": 10**40}), 422,
     "qty must be"),
    ("qty overflow float", "POST", "/orders", JSON, b'{"itemId": "x", "qty": 1e400}', 422,
     "qty must be"),
    ("qty list", "POST", "/orders", JSON, _j({"itemId": "x", "qty": [1]}), 422, "qty must be"),
    ("itemId empty", "POST", "/orders", JSON, _j({"itemId": "", "qty": 1}), 422,
     "itemId must be"),
    ("itemId blank", "POST", "/orders", JSON, _j({"itemId": "   ", "qty": 1}), 422,
     "itemId must be"),
    ("itemId too long", "POST", "/orders", JSON, _j({"itemId": "x" * 101, "qty": 1}), 422,
     "101 characters"),
    ("itemId number", "POST", "/orders", JSON, _j({"itemId": 42, "qty": 1}), 422,
     "itemId must be"),
    ("itemId null", "POST", "/orders", JSON, _j({"itemId": None, "qty": 1}), 422,
     "itemId must be"),
    ("orderId empty", "POST", "/orders", JSON, _j({"orderId": "", "itemId": "x", "qty": 1}),
     422, "orderId must be"),
    ("orderId too long", "POST", "/orders", JSON,
     _j({"orderId": "o" * 101, "itemId": "x", "qty": 1}), 422, "orderId must be"),
    ("orderId number", "POST", "/orders", JSON, _j({"orderId": 7, "itemId": "x", "qty": 1}),
     422, "orderId must be"),
    ("body over 64 KiB", "POST", "/orders", JSON,
     _j({"itemId": "x", "qty": 1, "pad": "p" * MAX_BODY_BYTES}), 413, "limit"),
    ("text/plain", "POST", "/orders", {"content-type": "text/plain"},
     _j({"itemId": "x", "qty": 1}), 415, "content-type must be application/json"),
    ("no content-type", "POST", "/orders", {}, _j({"itemId": "x", "qty": 1}), 415,
     "content-type must be application/json"),
    ("form post", "POST", "/orders", {"content-type": "application/x-www-form-urlencoded"},
     b"itemId=x&qty=1", 415, "content-type"),
    ("idempotency key empty", "POST", "/orders", {**JSON, "Idempotency-Key": ""},
     _j({"itemId": "x", "qty": 1}), 400, "Idempotency-Key must be"),
    ("idempotency key too long", "POST", "/orders", {**JSON, "Idempotency-Key": "k" * 201},
     _j({"itemId": "x", "qty": 1}), 400, "Idempotency-Key must be"),
    ("DELETE /orders", "DELETE", "/orders", {}, None, 405, "method DELETE is not allowed"),
    ("PUT /orders/o-1", "PUT", "/orders/o-1", JSON, _j({"qty": 2}), 405, "not allowed"),
    ("POST /health", "POST", "/health", JSON, b"{}", 405, "not allowed"),
    ("unknown route", "GET", "/inventory", {}, None, 404, "no route GET /inventory"),
    ("typo in route", "POST", "/order", JSON, _j({"itemId": "x", "qty": 1}), 404,
     "no route POST /order"),
    ("limit not a number", "GET", "/orders?limit=ten", {}, None, 400, "limit must be"),
    ("limit zero", "GET", "/orders?limit=0", {}, None, 400, "limit must be"),
    ("offset negative", "GET", "/orders?offset=-1", {}, None, 400, "offset must be"),
    ("unknown order", "GET", "/orders/o-404", {}, None, 404, 'no order "o-404"'),
    ("lone surrogate in itemId", "POST", "/orders", JSON, b'{"itemId": "\\ud800", "qty": 1}',
     400, "lone UTF-16 surrogate"),
    ("lone surrogate as a field name", "POST", "/orders", JSON,
     b'{"\\udfff": 1, "itemId": "x", "qty": 1}', 400, "lone UTF-16 surrogate"),
    ("newline in orderId", "POST", "/orders", JSON,
     _j({"orderId": "o-1\n[worker-1] applied projection", "itemId": "x", "qty": 1}), 422,
     "orderId must be an id without control or invisible characters (U+000A"),
    ("terminal escape in itemId", "POST", "/orders", JSON, _j({"itemId": "\x1b[2Jx", "qty": 1}),
     422, "itemId must be an id without control"),
    ("bidi override in orderId", "POST", "/orders", JSON,
     _j({"orderId": "o-\u202e1", "itemId": "x", "qty": 1}), 422, "(U+202E at index 2)"),
    ("idempotency key with a tab", "POST", "/orders", {**JSON, "Idempotency-Key": "k\t1"},
     _j({"itemId": "x", "qty": 1}), 400, "Idempotency-Key must be an id without control"),
    ("a foreign Host", "POST", "/orders", {**JSON, "Host": "evil.example:3000"},
     _j({"itemId": "x", "qty": 1}), 400, 'Host must be one this server answers to'),
]



def counts(path: Path) -> dict[str, int]:
    conn = store.connect(path)
    try:
        return store.table_counts(conn)
    finally:
        conn.close()


def post(client: TestClient, body: object, **headers: str):
    return client.post("/orders", json=body, headers=headers)


def test_there_are_at_least_thirty_bad_requests() -> None:
    assert len(BAD_REQUESTS) >= 30
    assert len({case[0] for case in BAD_REQUESTS}) == len(BAD_REQUESTS)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_with_a_clear_message_and_writes_nothing(
        client: TestClient, db_file: Path, case: tuple) -> None:
    _, method, path, headers, body, status, phrase = case
    before = counts(db_file)
    r = client.request(method, path, headers=headers, content=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert answer["ok"] is False
    assert phrase in answer["error"]
    assert counts(db_file) == before
    assert client.get("/health").json()["ok"] is True


def test_field_errors_name_the_field(client: TestClient) -> None:
    for body, field in [({"itemId": "x", "qty": 0}, "qty"), ({"itemId": "", "qty": 1}, "itemId"),
                        ({"orderId": "", "itemId": "x", "qty": 1}, "orderId"),
                        ({"qty": 1}, "itemId")]:
        answer = post(client, body).json()
        assert answer["field"] == field
        assert answer["error"].startswith(field)


def test_streamed_body_over_the_limit_is_413_without_content_length(
        client: TestClient, db_file: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"itemId": "x", "qty": 1, "pad": "'
        for _ in range(20):
            yield b"p" * 4096
        yield b'"}'

    r = client.post("/orders", content=chunks(), headers=JSON)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413
    assert "limit" in r.json()["error"]
    assert counts(db_file)["orders"] == 0


def test_body_just_under_the_limit_is_read(client: TestClient) -> None:
    body = b'{"itemId": "x", "qty": 1}' + b" " * (MAX_BODY_BYTES - 25)
    assert len(body) == MAX_BODY_BYTES
    assert client.post("/orders", content=body, headers=JSON).status_code == 201


def test_content_type_with_charset_is_accepted(client: TestClient) -> None:
    r = client.post("/orders", content=_j({"itemId": "x", "qty": 1}),
                    headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 201


def test_post_writes_the_order_and_its_event(client: TestClient, db_file: Path) -> None:
    r = post(client, {"orderId": "o-001", "itemId": "coffee-beans", "qty": 1})
    assert r.status_code == 201
    answer = r.json()
    assert answer["ok"] is True and answer["orderId"] == "o-001"
    assert answer["eventId"].startswith("evt-") and answer["replayed"] is False
    conn = store.connect(db_file)
    order = conn.execute("SELECT * FROM orders").fetchone()
    message = conn.execute("SELECT * FROM queue_messages").fetchone()
    conn.close()
    assert (order["order_id"], order["item_id"], order["qty"]) == ("o-001", "coffee-beans", 1)
    assert message["event_id"] == answer["eventId"] == order["event_id"]
    assert message["correlation_id"] == "o-001"
    assert json.loads(message["payload"]) == {"orderId": "o-001", "itemId": "coffee-beans",
                                              "qty": 1}


def test_order_id_is_generated_when_absent_or_null(client: TestClient) -> None:
    a = post(client, {"itemId": "x", "qty": 1}).json()
    b = post(client, {"orderId": None, "itemId": "x", "qty": 1}).json()
    assert a["orderId"].startswith("o-") and b["orderId"].startswith("o-")
    assert a["orderId"] != b["orderId"]


def test_replay_returns_the_first_answer_and_writes_nothing(
        client: TestClient, db_file: Path) -> None:
    body = {"orderId": "o-001", "itemId": "coffee-beans", "qty": 1}
    first = post(client, body)
    again = post(client, body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["eventId"] == first.json()["eventId"]
    assert again.json()["replayed"] is True
    assert counts(db_file)["queue_messages"] == 1


def test_same_order_id_with_a_different_body_is_422(client: TestClient, db_file: Path) -> None:
    post(client, {"orderId": "o-001", "itemId": "coffee-beans", "qty": 1})
    r = post(client, {"orderId": "o-001", "itemId": "coffee-beans", "qty": 2})
    assert r.status_code == 422
    assert r.json() == {"ok": False, "field": "orderId",
                        "error": "orderId 'o-001' was already used with a different request"}
    assert counts(db_file)["orders"] == 1 and counts(db_file)["queue_messages"] == 1


def test_idempotency_key_replays_and_conflicts(client: TestClient, db_file: Path) -> None:
    first = post(client, {"itemId": "tea", "qty": 2}, **{"Idempotency-Key": "k-1"})
    again = post(client, {"itemId": "tea", "qty": 2}, **{"Idempotency-Key": "k-1"})
    other = post(client, {"itemId": "tea", "qty": 3}, **{"Idempotency-Key": "k-1"})
    # The exact retry gets the first status and body; another body with the key is a 422.
    assert (first.status_code, again.status_code, other.status_code) == (201, 201, 422)
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert other.json()["field"] == "Idempotency-Key"
    assert counts(db_file)["orders"] == 1


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


def test_order_ids_with_a_slash_can_be_read_back(client: TestClient) -> None:
    post(client, {"orderId": "shop/42", "itemId": "x", "qty": 1})
    assert client.get("/orders/shop/42").json()["order"]["orderId"] == "shop/42"


def test_order_state_follows_the_worker(client: TestClient, db_file: Path) -> None:
    from deliverylab.brokers.sqlite import SQLiteBroker
    from deliverylab.engine.clock import SystemClock
    from deliverylab.engine.ids import Ids
    from deliverylab.engine.worker import Worker

    post(client, {"orderId": "o-001", "itemId": "coffee-beans", "qty": 1})
    conn = store.connect(db_file)
    Worker(store=conn, clock=SystemClock(),
           broker=SQLiteBroker(conn, clock=SystemClock(), ids=Ids(1))).run_until_idle()
    conn.close()
    assert client.get("/orders/o-001").json()["order"]["state"] == "correct"
    items = client.get("/projection").json()["items"]
    assert items == [{"itemId": "coffee-beans", "reservedQty": 1, "truth": 1, "delta": 0}]


def test_docs_are_not_served(client: TestClient) -> None:
    # Swagger UI would load its scripts from a CDN; the lab works offline.
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404


def test_missing_database_is_an_error_naming_init_db(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="init-db"):
        create_app(tmp_path / "missing.db")


def test_a_file_without_the_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    store.connect(path, must_exist=False).close()
    with pytest.raises(InvalidInput, match="missing tables"):
        create_app(path)


def test_a_database_that_stays_locked_is_a_503_that_wrote_nothing(db_file: Path) -> None:
    with TestClient(create_app(db_file, write_budget=0.2)) as client:
        holder = store.connect(db_file)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            r = post(client, {"itemId": "x", "qty": 1})
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "nothing was written" in r.json()["error"]
        assert counts(db_file)["orders"] == 0
        assert post(client, {"itemId": "x", "qty": 1}).status_code == 201


def test_read_connections_are_reused(client: TestClient) -> None:
    for _ in range(20):
        assert client.get("/health").status_code == 200
        assert client.get("/projection").status_code == 200
    assert len(client.app.state.store._idle) == 1
