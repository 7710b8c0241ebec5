"""What the API tests share with the process and PostgreSQL tests: the bad requests every
entry point must refuse, an order posted through the test client, and the API served as a
process."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from deliverylab.app.api import MAX_BODY_BYTES
from support.processes import Proc, free_port, request

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


def post(client: Any, body: object, **headers: str) -> Any:
    return client.post("/orders", json=body, headers=headers)


def serve(tmp: Path, *args: str) -> tuple[Any, int]:
    """``deliverylab api`` with ``args`` on a free port, once ``/health`` answers 200."""
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
