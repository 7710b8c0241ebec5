"""Chapter 3's exercises: an idempotent handler, a heartbeat, a producer that retries.

The handler is the effect itself, ``handler(conn, delivery)``, run inside the worker's
transaction by an apply-then-ack worker whose ACKs get lost. The heartbeat is a
``process(delivery, ops)`` for work longer than the lease. The producer is
``submit(send, request)``, placing one order through a connection that drops answers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from ..book.lab import ITEMS, Lab
from ..brokers.base import Delivery
from ..engine.faults import Faults
from ..engine.orders import place_order
from ..engine.worker import apply_order_placed
from .grader import (
    Exercise,
    Ops,
    Stopped,
    Trial,
    describe_faults,
    judge,
    register,
    run_workers,
)

# -- 3.1 the idempotent handler ------------------------------------------------------------
INBOX = dict(ack_fail=0.3, crash_after_commit=0.1)


def idempotent_handler_solution(conn: sqlite3.Connection, delivery: Delivery) -> None:
    # The inbox row and the effect share the worker's transaction: both commit, or neither.
    fresh = conn.execute(
        "INSERT INTO inbox_processed (consumer, event_id, processed_at)"
        " VALUES ('inventory', ?, clock_now()) ON CONFLICT DO NOTHING",
        (delivery.event_id,)).rowcount
    if fresh:
        apply_order_placed(conn, delivery)


def plain_handler(conn: sqlite3.Connection, delivery: Delivery) -> None:
    apply_order_placed(conn, delivery)


def keyed_by_receipt(conn: sqlite3.Connection, delivery: Delivery) -> None:
    fresh = conn.execute(
        "INSERT INTO inbox_processed (consumer, event_id, processed_at)"
        " VALUES ('inventory', ?, clock_now()) ON CONFLICT DO NOTHING",
        (delivery.receipt,)).rowcount
    if fresh:
        apply_order_placed(conn, delivery)


def skip_reserved_items(conn: sqlite3.Connection, delivery: Delivery) -> None:
    seen = conn.execute("SELECT 1 FROM inventory_projection WHERE item_id = ?",
                        (delivery.payload["itemId"],)).fetchone()
    if seen is None:
        apply_order_placed(conn, delivery)


def run_idempotent_handler(handler: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **INBOX)
    run, _ = run_workers(handler=handler, seed=seed, faults=faults, orders=30, workers=2)
    return judge(run.lab, seed=seed, faults=describe_faults(faults, workers=2, orders=30),
                 errors=run.errors)


register(Exercise(
    id="idempotent-handler", chapter=3, title="An idempotent handler",
    run=run_idempotent_handler, solution=idempotent_handler_solution, starter=plain_handler,
    params=("conn", "delivery"),
    wrong=(("duplicated", plain_handler), ("duplicated", keyed_by_receipt),
           ("lost", skip_reserved_items))))


# -- 3.2 the heartbeat ---------------------------------------------------------------------
WORK = 4.5     # seconds of work per delivery, against a 2-second lease
BEAT = dict(crash_after_receive=0.1)


def heartbeat_solution(delivery: Delivery, ops: Ops) -> None:
    while ops.work_left > 0:
        ops.extend(delivery, ops.visibility_timeout)  # the lease outlives the next chunk
        ops.work(min(1.0, ops.work_left))
    ops.apply(delivery)
    ops.ack(delivery)


def no_heartbeat(delivery: Delivery, ops: Ops) -> None:
    ops.work(ops.work_left)
    ops.apply(delivery)
    ops.ack(delivery)


def extend_once(delivery: Delivery, ops: Ops) -> None:
    ops.extend(delivery, ops.visibility_timeout)
    ops.work(ops.work_left)
    ops.apply(delivery)
    ops.ack(delivery)


def run_heartbeat(process: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **BEAT)
    run, _ = run_workers(process=process, seed=seed, faults=faults, orders=20, workers=2,
                         work=WORK, visibility_timeout=2.0)
    where = describe_faults(faults, workers=2, orders=20,
                            extra=f"{WORK:g}s of work per delivery, 2s lease")
    return judge(run.lab, seed=seed, faults=where, errors=run.errors)


register(Exercise(
    id="heartbeat", chapter=3, title="A heartbeat for slow work",
    run=run_heartbeat, solution=heartbeat_solution, starter=no_heartbeat,
    wrong=(("duplicated", no_heartbeat), ("duplicated", extend_once))))


# -- 3.3 the producer that retries ---------------------------------------------------------
REQUESTS = 20
LOST_REQUEST = 0.2    # the request never reaches the server
LOST_RESPONSE = 0.3   # the order commits, the answer never reaches the client
MAX_ATTEMPTS = 20


def producer_solution(send: Callable[..., str], request: dict[str, Any]) -> str:
    while True:
        try:  # the same key on every attempt: a retry of a request that did commit is a replay
            return send(request["item_id"], request["qty"],
                        idempotency_key=request["request_id"])
        except TimeoutError:
            continue


def retry_without_key(send: Callable[..., str], request: dict[str, Any]) -> str:
    while True:
        try:
            return send(request["item_id"], request["qty"])
        except TimeoutError:
            continue


def retry_fresh_key(send: Callable[..., str], request: dict[str, Any]) -> str | None:
    for attempt in range(MAX_ATTEMPTS):
        try:
            return send(request["item_id"], request["qty"],
                        idempotency_key=f"{request['request_id']}-{attempt}")
        except TimeoutError:
            continue
    return None


def no_retry(send: Callable[..., str], request: dict[str, Any]) -> str | None:
    try:
        return send(request["item_id"], request["qty"], idempotency_key=request["request_id"])
    except TimeoutError:
        return None


class _Network:
    """``send`` for one request: place_order behind a connection that loses requests and
    answers on a seeded schedule, with a log of every attempt for the verdict's trace."""

    def __init__(self, lab: Lab, faults: Faults, request_id: str) -> None:
        self.lab, self.faults, self.request_id = lab, faults, request_id
        self.attempts = 0
        self.created: list[str] = []
        self.log: list[str] = []

    def send(self, item_id: str, qty: int, *, idempotency_key: str | None = None) -> str:
        self.attempts += 1
        n = self.attempts
        if n > MAX_ATTEMPTS:
            raise Stopped(f"more than {MAX_ATTEMPTS} attempts for one request")
        if self.faults.uniform("request", self.request_id, n) < LOST_REQUEST:
            self.log.append(f"  attempt {n}: request lost on the way → TimeoutError")
            raise TimeoutError("no answer from the server")
        placed = place_order(self.lab.queue, item_id=item_id, qty=qty,
                             idempotency_key=idempotency_key)
        if placed.created:
            self.created.append(placed.order_id)
        what = (f"order {placed.order_id} created" if placed.created
                else f"replayed order {placed.order_id}, nothing written")
        key = f"key {idempotency_key!r}" if idempotency_key else "no key"
        if self.faults.uniform("response", self.request_id, n) < LOST_RESPONSE:
            self.log.append(f"  attempt {n} ({key}): {what}; answer lost → TimeoutError")
            raise TimeoutError("no answer from the server")
        self.log.append(f"  attempt {n} ({key}): {what}; answer received")
        return placed.order_id


def run_producer(submit: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed)
    lab = Lab(seed=seed)
    nets = []
    errors: list[str] = []
    for i in range(REQUESTS):
        request = {"request_id": f"req-{seed}-{i:03d}",
                   "item_id": lab.rng.choice(ITEMS), "qty": lab.rng.randint(1, 3)}
        net = _Network(lab, faults, request["request_id"])
        try:
            submit(net.send, dict(request))
        except Stopped as exc:
            if not errors:
                errors.append(f"no end of retries: {exc} (request {request['request_id']})")
        except Exception as exc:  # the reader's code: report it, go on with the next request
            if not errors:
                errors.append(f"{type(exc).__name__}: {exc} (request {request['request_id']})")
        nets.append(net)
    lab.run_until_idle()
    lost = tuple(n.request_id for n in nets if not n.created)
    dup = tuple(n.request_id for n in nets if len(n.created) > 1)
    reasons = [f"your code raised {e}" for e in errors]
    if lost:
        reasons.append(f"{len(lost)} of {REQUESTS} requests never placed: the client gave up"
                       " on an order that was never written")
    if dup:
        extra = sum(len(n.created) - 1 for n in nets)
        reasons.append(f"{len(dup)} of {REQUESTS} requests placed more than once ({extra}"
                       " extra orders): a retry wrote a new order instead of replaying")
    base = judge(lab, seed=seed, faults="", errors=())  # the consumer side must be clean too
    if not base.passed:
        reasons.append(f"the consumer side: {base.reason}")
    where = (f"requests lost {LOST_REQUEST:g}, answers lost {LOST_RESPONSE:g};"
             f" {REQUESTS} requests")
    bad = next((n for n in nets if len(n.created) != 1), None)
    trace = ""
    if reasons and bad is not None:
        trace = "\n".join([f"Attempts of request {bad.request_id}:", *bad.log])
    return Trial(seed=seed, faults=where, passed=not reasons, reason="; ".join(reasons),
                 lost=lost, duplicated=dup, trace=trace)


register(Exercise(
    id="producer-retries", chapter=3, title="A producer that survives its own retries",
    run=run_producer, solution=producer_solution, starter=retry_without_key,
    params=("send", "request"),
    wrong=(("placed more than once", retry_without_key),
           ("placed more than once", retry_fresh_key), ("never placed", no_retry))))
