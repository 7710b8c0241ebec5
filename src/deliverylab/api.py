"""The HTTP API of the lab: ``POST /orders`` writes an order and its event, atomically.

FastAPI served by uvicorn (``deliverylab api``). Three decisions matter for correctness:

* **The body is validated by hand**, from the raw JSON, with the engine's validators. A model
  class would quietly turn ``"1"`` or ``1.0`` into ``1``; here they are errors that name the
  field. Nothing is written unless the whole request is valid.
* **Writes go through one connection, one at a time**, in a worker thread so the event loop
  never waits on SQLite. Each write is one ``BEGIN IMMEDIATE`` transaction (order row + outbox
  event) that commits before the 201 is sent: an acknowledged order survives a crash of this
  process. Other processes (the workers) wait on SQLite's busy timeout, never fail with
  "database is locked". Reads use one connection per thread and see a WAL snapshot.
* **The producer is idempotent**: the same ``orderId`` (or ``Idempotency-Key``) with the same
  body returns the first answer (200) and writes nothing; with a different body it is a 409.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .clock import SystemClock
from .db import check_schema, connect
from .errors import InvalidInput, OrderConflict, check_int, check_text
from .ids import Ids
from .orders import list_orders, place_order, validate_order
from .queue import Queue
from .status import collect, order_view, snapshot

MAX_BODY_BYTES = 64 * 1024
ORDER_FIELDS = ("orderId", "itemId", "qty")


class ApiError(Exception):
    """An error answer: ``status`` and a message naming what was wrong."""

    def __init__(self, status: int, error: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.field, self.headers = status, error, field, headers


def _show(value: Any, limit: int = 40) -> str:
    """A value as JSON for an error message, shortened when long."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > limit:
        size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters"
        text = f"{text[:limit]}… ({size})"
    return text


def invalid(exc: InvalidInput, status: int = 422) -> ApiError:
    return ApiError(status, f"{exc.field} must be {exc.expected}, got {_show(exc.value)}",
                    exc.field)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_order_body(raw: bytes) -> dict[str, Any]:
    """The JSON body of ``POST /orders`` checked field by field: {itemId, qty, orderId?}."""
    if not raw.strip():
        raise ApiError(400, "body is empty; send a JSON object with itemId and qty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"body is not UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant,
                          object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ApiError(400, "body is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc.msg} at line {exc.lineno}"
                            f" column {exc.colno}") from None
    except ValueError as exc:  # NaN, Infinity, a duplicate key
        raise ApiError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"body must be a JSON object with itemId and qty, got {_show(body)}")
    unknown = [k for k in body if k not in ORDER_FIELDS]
    if unknown:
        raise ApiError(422, f"unknown field {unknown[0]!r} (the fields are orderId, itemId, qty)",
                       unknown[0])
    for name in ("itemId", "qty"):
        if name not in body:
            raise ApiError(422, f"{name} is required", name)
    order_id = body.get("orderId")  # null means "not given": the server makes one
    try:
        validate_order(body["itemId"], body["qty"], order_id)
    except InvalidInput as exc:
        raise invalid(exc) from None
    return {"item_id": body["itemId"], "qty": body["qty"], "order_id": order_id}


def _query_int(request: Request, name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value: Any = int(raw) if re.fullmatch(r"[+-]?[0-9]{1,15}", raw) else raw
    try:
        return check_int(name, value, minimum=minimum, maximum=maximum)
    except InvalidInput as exc:
        raise invalid(exc, 400) from None


class Store:
    """The database side of the API: one writer connection behind a lock, and a pool of
    reader connections (one per concurrent read, reused, closed at shutdown)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.clock = SystemClock()
        self._write_lock = threading.Lock()
        self._writer = connect(self.path)
        check_schema(self._writer)
        self.queue = Queue(self._writer, clock=self.clock, ids=Ids())
        self._idle: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        with self._pool_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = connect(self.path)
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            with self._pool_lock:
                self._idle.append(conn)

    def place(self, **order: Any) -> Any:
        with self._write_lock:
            return place_order(self.queue, **order)

    def close(self) -> None:
        with self._pool_lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()
        with self._write_lock:
            self._writer.close()


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refusing more than ``limit`` bytes whatever Content-Length claims."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body is {int(declared)} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _require_json(request: Request) -> None:
    ctype = request.headers.get("content-type")
    media = (ctype or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, "content-type must be application/json, got "
                            + (_show(ctype) if ctype else "none"), "content-type")


def create_app(db_path: str | Path) -> FastAPI:
    """The API over the database at ``db_path``, which must exist (``deliverylab init-db``)."""
    store = Store(db_path)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(title="deliverylab", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        body: dict[str, Any] = {"ok": False, "error": exc.error}
        if exc.field is not None:
            body["field"] = exc.field
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error = f"method {request.method} is not allowed on {request.url.path}" + (
                f" (allowed: {allowed})" if allowed else "")
        else:
            error = str(exc.detail)
        return JSONResponse({"ok": False, "error": error}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"ok": False, "error": f"internal error: {type(exc).__name__}:"
                                                   f" {exc}"}, status_code=500)

    @app.post("/orders")
    async def post_order(request: Request) -> JSONResponse:
        _require_json(request)
        raw = await read_body(request)
        order = parse_order_body(raw)
        key = request.headers.get("idempotency-key")
        if key is not None:
            try:
                check_text("Idempotency-Key", key, max_length=200)
            except InvalidInput as exc:
                raise invalid(exc, 400) from None
        try:
            placed = await run_in_threadpool(store.place, idempotency_key=key, **order)
        except OrderConflict as exc:
            raise ApiError(409, str(exc), exc.key_name) from None
        except sqlite3.OperationalError as exc:
            # Only after the 30 s busy timeout: the transaction rolled back, so say so.
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            raise ApiError(503, f"the database stayed busy ({exc}); nothing was written,"
                                " retry the same request", headers={"Retry-After": "1"}) from None
        except InvalidInput as exc:
            raise invalid(exc) from None
        return JSONResponse({"ok": True, "orderId": placed.order_id, "eventId": placed.event_id,
                             "replayed": not placed.created},
                            status_code=201 if placed.created else 200)

    def _list(limit: int, offset: int) -> dict[str, Any]:
        with store.reading() as conn, snapshot(conn):
            total = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
            orders = [{"orderId": o.order_id, "itemId": o.item_id, "qty": o.qty,
                       "eventId": o.event_id, "createdAt": o.created_at}
                      for o in list_orders(conn, limit=limit, offset=offset)]
        return {"ok": True, "total": total, "limit": limit, "offset": offset, "orders": orders}

    @app.get("/orders")
    async def get_orders(request: Request) -> dict[str, Any]:
        limit = _query_int(request, "limit", 100, 1, 1000)
        offset = _query_int(request, "offset", 0, 0, 10**12)
        return await run_in_threadpool(_list, limit, offset)

    def _one(order_id: str) -> dict[str, Any] | None:
        with store.reading() as conn, snapshot(conn):
            row = conn.execute("SELECT * FROM orders WHERE order_id = ?",
                               (order_id,)).fetchone()
            return None if row is None else order_view(conn, row)

    @app.get("/orders/{order_id:path}")
    async def get_order(order_id: str) -> dict[str, Any]:
        order = await run_in_threadpool(_one, order_id)
        if order is None:
            raise ApiError(404, f"no order {_show(order_id)}", "orderId")
        return {"ok": True, "order": order}

    def _projection() -> dict[str, Any]:
        with store.reading() as conn:
            report = collect(conn)
        return {"ok": True, "items": [
            {"itemId": i["itemId"], "reservedQty": i["projection"], "truth": i["truth"],
             "delta": i["delta"]} for i in report["items"]],
            "projectionEqualsTruth": report["check"]["projection_equals_truth"]}

    @app.get("/projection")
    async def get_projection() -> dict[str, Any]:
        return await run_in_threadpool(_projection)

    def _collect() -> dict[str, Any]:
        with store.reading() as conn:
            return collect(conn)

    @app.get("/status")
    async def get_status() -> dict[str, Any]:
        report = await run_in_threadpool(_collect)
        return {**report, "ok": True, "guaranteeHeld": report["ok"]}

    def _health() -> dict[str, Any]:
        with store.reading() as conn:
            check_schema(conn)
            orders = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
        return {"ok": True, "version": __version__, "orders": orders}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return await run_in_threadpool(_health)

    return app
