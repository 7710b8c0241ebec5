"""Placing an order: the source-of-truth row and its ``OrderPlaced`` event, in one transaction.

This is the transactional outbox. The seed chapter wrote the order, then enqueued the event as
a second write; a crash between the two lost the event for good. Here both rows commit
together or neither does. When the broker is the queue table in the order's own database, the
queue table *is* the outbox. When the broker is elsewhere (another database, RabbitMQ,
JetStream), nothing can commit in both places: the event goes to the store's ``outbox`` table
in the order's transaction, and a relay (:mod:`deliverylab.engine.relay`) publishes it.

The producer is idempotent too. Placing the same order id with the same request again returns
the first result and writes nothing; with a different request it is an
:class:`~deliverylab.engine.errors.OrderConflict`. An ``Idempotency-Key`` (the IETF draft
draft-ietf-httpapi-idempotency-key-header) is recorded in ``idempotency_keys`` whenever a
request carries one, with a fingerprint of the whole request and the answer it got, even when
that answer was a replay of an existing order. So a key is never silently reused: the same key
with the same request gets the first answer again; with any other request (another body or
another ``orderId``) it is an ``OrderConflict`` naming the key.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from .broker import Broker, encode_payload
from .clock import Clock
from .errors import InvalidInput, OrderConflict, check_id, check_int
from .ids import Ids
from .store import Store, is_store, require_outbox, transaction

EVENT_TYPE = "OrderPlaced"
MAX_QTY = 10_000
MAX_ID_LENGTH = 100
MAX_KEY_LENGTH = 200


@dataclass(frozen=True, slots=True)
class PlacedOrder:
    order_id: str
    event_id: str
    created: bool  # False when this was a replay of an earlier identical request
    # When this call replayed a recorded Idempotency-Key: whether the key's first request
    # created the order (its answer is what a retry must get again). None otherwise. Not part
    # of equality: it describes the answer, not the order.
    key_first_created: bool | None = field(default=None, compare=False)


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
    """Raise :class:`~deliverylab.engine.errors.InvalidInput` naming the first bad field."""
    if order_id is not None:
        check_id("orderId", order_id, max_length=MAX_ID_LENGTH)
    check_id("itemId", item_id, max_length=MAX_ID_LENGTH)
    check_int("qty", qty, minimum=1, maximum=MAX_QTY)
    if idempotency_key is not None:
        check_id("Idempotency-Key", idempotency_key, max_length=MAX_KEY_LENGTH)


def request_hash(item_id: str, qty: int) -> str:
    body = json.dumps({"itemId": item_id, "qty": qty}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def key_fingerprint(item_id: str, qty: int, order_id: str | None) -> str:
    """What an Idempotency-Key is bound to: the whole request, the order id included (absent
    and null are the same request: the server makes the id)."""
    body = json.dumps({"orderId": order_id, "itemId": item_id, "qty": qty}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def place_order(queue: Broker | None, *, item_id: str, qty: int, order_id: str | None = None,
                idempotency_key: str | None = None,
                store: Store | None = None, clock: Clock | None = None,
                ids: Ids | None = None) -> PlacedOrder:
    """Write the order and its ``OrderPlaced`` event in one transaction.

    Where the event goes depends on where the broker is:

    * the broker joins the store (the default: the order goes to ``queue.conn``, the queue
      table's own database): ``send`` joins the order's transaction, and the queue table is
      the outbox;
    * the broker is elsewhere (``store=`` on a broker that does not join it, or no broker at
      all, ``queue=None`` with ``store``, ``clock`` and ``ids``): the event is written to the
      store's ``outbox`` table in the order's transaction, and nothing is sent here. A send
      from inside the transaction would commit on its own, in another system: should the
      order's commit then fail, the event would announce an order that does not exist. The
      relay publishes the row afterwards, at least once.

    ``clock`` and ``ids`` default to the broker's."""
    validate_order(item_id, qty, order_id, idempotency_key)
    conn = store if store is not None else getattr(queue, "conn", None)
    if not is_store(conn):
        raise InvalidInput("store", store, "the store connection the order is written to")
    clock = clock if clock is not None else getattr(queue, "clock", None)
    ids = ids if ids is not None else getattr(queue, "ids", None)
    if clock is None or ids is None:
        raise InvalidInput("clock" if clock is None else "ids", None,
                           "given when there is no broker to take it from")
    outbox = queue is None or not queue.joins(conn)
    if outbox:
        require_outbox(conn)
    digest = request_hash(item_id, qty)
    with transaction(conn):
        if idempotency_key is not None:
            fingerprint = key_fingerprint(item_id, qty, order_id)
            replay = _replay_key(conn, idempotency_key, fingerprint, digest, order_id)
            if replay is not None:
                return replay
        placed = _place(conn, None if outbox else queue, clock, ids, digest, item_id, qty,
                        order_id, idempotency_key)
        if idempotency_key is not None:
            conn.execute(
                "INSERT INTO idempotency_keys (key, request_hash, order_id, created, created_at)"
                " VALUES (?, ?, ?, ?, ?)", (idempotency_key, fingerprint, placed.order_id,
                                            int(placed.created), clock.now()))
    return placed


def _replay_key(conn: Store, key: str, fingerprint: str, digest: str,
                order_id: str | None) -> PlacedOrder | None:
    """The first answer for ``key`` when the request is the same, None for a new key."""
    row = conn.execute("SELECT * FROM idempotency_keys WHERE key = ?", (key,)).fetchone()
    if row is not None:
        if row["request_hash"] != fingerprint:
            raise OrderConflict("Idempotency-Key", key)
        event_id = conn.execute("SELECT event_id FROM orders WHERE order_id = ?",
                                (row["order_id"],)).fetchone()[0]
        return PlacedOrder(row["order_id"], event_id, created=False,
                           key_first_created=bool(row["created"]))
    # A key that created an order before the key table existed lives only on the order row.
    old = conn.execute("SELECT * FROM orders WHERE idempotency_key = ?", (key,)).fetchone()
    if old is None:
        return None
    if old["request_hash"] != digest or order_id not in (None, old["order_id"]):
        raise OrderConflict("Idempotency-Key", key)
    return PlacedOrder(old["order_id"], old["event_id"], created=False, key_first_created=True)


def _place(conn: Store, queue: Broker | None, clock: Clock, ids: Ids,
           digest: str, item_id: str, qty: int, order_id: str | None,
           idempotency_key: str | None) -> PlacedOrder:
    """Inside the caller's transaction: replay the order ``order_id`` or write a new one, its
    event sent on ``queue`` (which joins this transaction) or, without one, written to the
    outbox table."""
    if order_id is not None:
        existing = conn.execute("SELECT * FROM orders WHERE order_id = ?",
                                (order_id,)).fetchone()
        if existing is not None:
            if existing["request_hash"] != digest:
                raise OrderConflict("orderId", order_id)
            return PlacedOrder(existing["order_id"], existing["event_id"], created=False)
    order_id = order_id if order_id is not None else ids.order_id()
    event_id = ids.event_id()
    now = clock.now()
    conn.execute(
        "INSERT INTO orders (order_id, item_id, qty, event_id, idempotency_key,"
        " request_hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (order_id, item_id, qty, event_id, idempotency_key, digest, now))
    payload = {"orderId": order_id, "itemId": item_id, "qty": qty}
    if queue is not None:  # joins this transaction: the queue table is the outbox
        queue.send(event_id, EVENT_TYPE, payload, correlation_id=order_id)
    else:
        conn.execute(
            "INSERT INTO outbox (event_id, type, payload, correlation_id, created_at)"
            " VALUES (?, ?, ?, ?, ?)", (event_id, EVENT_TYPE, encode_payload(payload),
                                        order_id, now))
    return PlacedOrder(order_id, event_id, created=True)


def get_order(conn: Store, order_id: str) -> Order | None:
    row = conn.execute("SELECT * FROM orders WHERE order_id = ?", (order_id,)).fetchone()
    return Order.from_row(row) if row is not None else None


def list_orders(conn: Store, *, limit: int = 100, offset: int = 0) -> list[Order]:
    check_int("limit", limit, minimum=1, maximum=10_000)
    check_int("offset", offset, minimum=0)
    rows = conn.execute("SELECT * FROM orders ORDER BY created_at, order_id LIMIT ? OFFSET ?",
                        (limit, offset)).fetchall()
    return [Order.from_row(r) for r in rows]
