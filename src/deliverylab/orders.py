"""Placing an order: the source-of-truth row and its ``OrderPlaced`` event, in one transaction.

This is the transactional outbox. The seed chapter wrote the order, then enqueued the event as
a second write; a crash between the two lost the event for good. Here both rows commit
together or neither does, and the queue table *is* the outbox.

The producer is idempotent too: placing the same order id (or the same ``Idempotency-Key``)
with the same request again returns the first result and writes nothing; with a different
request it is an :class:`~deliverylab.errors.OrderConflict`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from .db import transaction
from .errors import OrderConflict, check_int, check_text
from .queue import Queue

EVENT_TYPE = "OrderPlaced"
MAX_QTY = 10_000
MAX_ID_LENGTH = 100


@dataclass(frozen=True, slots=True)
class PlacedOrder:
    order_id: str
    event_id: str
    created: bool  # False when this was a replay of an earlier identical request


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    item_id: str
    qty: int
    event_id: str
    created_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Order:
        return cls(row["order_id"], row["item_id"], row["qty"], row["event_id"],
                   row["created_at"])


def validate_order(item_id: Any, qty: Any, order_id: Any = None,
                   idempotency_key: Any = None) -> None:
    """Raise :class:`~deliverylab.errors.InvalidInput` naming the first bad field."""
    if order_id is not None:
        check_text("orderId", order_id, max_length=MAX_ID_LENGTH)
    check_text("itemId", item_id, max_length=MAX_ID_LENGTH)
    check_int("qty", qty, minimum=1, maximum=MAX_QTY)
    if idempotency_key is not None:
        check_text("Idempotency-Key", idempotency_key, max_length=200)


def request_hash(item_id: str, qty: int) -> str:
    body = json.dumps({"itemId": item_id, "qty": qty}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def place_order(queue: Queue, *, item_id: str, qty: int, order_id: str | None = None,
                idempotency_key: str | None = None) -> PlacedOrder:
    """Write the order and enqueue its ``OrderPlaced`` event atomically."""
    validate_order(item_id, qty, order_id, idempotency_key)
    conn = queue.conn
    digest = request_hash(item_id, qty)
    with transaction(conn):
        existing = None
        if idempotency_key is not None:
            existing = conn.execute("SELECT * FROM orders WHERE idempotency_key = ?",
                                    (idempotency_key,)).fetchone()
            if existing is not None and (
                    existing["request_hash"] != digest
                    or (order_id is not None and existing["order_id"] != order_id)):
                raise OrderConflict("Idempotency-Key", idempotency_key)
        if existing is None and order_id is not None:
            existing = conn.execute("SELECT * FROM orders WHERE order_id = ?",
                                    (order_id,)).fetchone()
            if existing is not None and existing["request_hash"] != digest:
                raise OrderConflict("orderId", order_id)
        if existing is not None:
            return PlacedOrder(existing["order_id"], existing["event_id"], created=False)

        order_id = order_id if order_id is not None else queue.ids.order_id()
        event_id = queue.ids.event_id()
        now = queue.clock.now()
        conn.execute(
            "INSERT INTO orders (order_id, item_id, qty, event_id, idempotency_key,"
            " request_hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (order_id, item_id, qty, event_id, idempotency_key, digest, now))
        # Joins this transaction: the outbox write.
        queue.send(event_id, EVENT_TYPE, {"orderId": order_id, "itemId": item_id, "qty": qty},
                   correlation_id=order_id)
    return PlacedOrder(order_id, event_id, created=True)


def get_order(conn: sqlite3.Connection, order_id: str) -> Order | None:
    row = conn.execute("SELECT * FROM orders WHERE order_id = ?", (order_id,)).fetchone()
    return Order.from_row(row) if row is not None else None


def list_orders(conn: sqlite3.Connection, *, limit: int = 100, offset: int = 0) -> list[Order]:
    check_int("limit", limit, minimum=1, maximum=10_000)
    check_int("offset", offset, minimum=0)
    rows = conn.execute("SELECT * FROM orders ORDER BY created_at, order_id LIMIT ? OFFSET ?",
                        (limit, offset)).fetchall()
    return [Order.from_row(r) for r in rows]
