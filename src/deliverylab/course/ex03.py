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
from .crew import nemesis_handler, pausing_process
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
INBOX = dict(ack_fail=0.3, ack_answer_lost=0.1, crash_after_commit=0.1)
INBOX_INTERLEAVE = 0.3     # a peer runs the handler on the same event between statements
INBOX_STORE_FAILURE = 0.1  # a write fails: locked, disk full, a constraint (not a repeat)
INBOX_RECEIVES = 10


def idempotent_handler_solution(conn: sqlite3.Connection, delivery: Delivery) -> None:
    # The inbox row and the effect share the worker's transaction: both commit, or neither.
    # The unique key decides, not an earlier SELECT: a peer may commit the same event between
    # two of these statements. Any other failure propagates: the transaction rolls back and
    # the delivery comes again; only a repeat is a reason to skip.
    fresh = conn.execute(
        "INSERT INTO inbox_processed (consumer, event_id, processed_at)"
        " VALUES ('inventory', ?, clock_now())"
        " ON CONFLICT (consumer, event_id) DO NOTHING",
        (delivery.event_id,)).rowcount
    if fresh:
        apply_order_placed(conn, delivery)


def idempotent_handler_starter(conn: sqlite3.Connection, delivery: Delivery) -> None:
    """Make the order's effect (``apply_order_placed(conn, delivery)``) at most once per
    event, however often the event is delivered, and never skip it for any reason but a
    repeat. Runs inside the worker's transaction; the inbox table is
    ``inbox_processed(consumer, event_id, processed_at)``."""


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


def inbox_swallows_errors(conn: sqlite3.Connection, delivery: Delivery) -> None:
    try:  # "it failed, so we must have seen it already"
        conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                     " VALUES ('inventory', ?, clock_now())", (delivery.event_id,))
    except Exception:
        return
    apply_order_placed(conn, delivery)


def run_idempotent_handler(handler: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **INBOX)
    # The peer is another worker of the same consumer running *your* handler on a duplicate
    # of the event: the verdict judges the outcome of your design, whatever table it keeps.
    hostile = nemesis_handler(handler, faults, interleave=INBOX_INTERLEAVE,
                              store_failure=INBOX_STORE_FAILURE, rival=handler)
    run, _ = run_workers(handler=hostile, seed=seed, faults=faults, orders=30, workers=2,
                         max_receives=INBOX_RECEIVES)
    where = describe_faults(faults, workers=2, orders=30,
                            extra=f"a peer between statements {INBOX_INTERLEAVE:g}, store"
                                  f" failures {INBOX_STORE_FAILURE:g} per write")
    return judge(run.lab, seed=seed, faults=where, errors=run.errors)


register(Exercise(
    id="idempotent-handler", chapter=3, title="An idempotent handler",
    run=run_idempotent_handler, solution=idempotent_handler_solution,
    starter=idempotent_handler_starter, params=("conn", "delivery"),
    wrong=(("duplicated", plain_handler), ("duplicated", keyed_by_receipt),
           ("lost", skip_reserved_items), ("lost", inbox_swallows_errors))))


# -- 3.2 the heartbeat ---------------------------------------------------------------------
BEAT = dict(crash_after_receive=0.1, ack_fail=0.2, ack_answer_lost=0.1)
BEAT_LEASE = 2.0
BEAT_WORK = (1.5, 7.5)  # seconds of work per delivery, seeded in this range
BEAT_PAUSE = 0.3        # a stall between two verbs, about one lease long
BEAT_LATENCY = (0.02, 0.1)  # seconds a renewal takes to reach the queue
BEAT_RECEIVES = 10


def heartbeat_solution(delivery: Delivery, ops: Ops) -> None:
    lease = ops.visibility_timeout
    beat = lease / 2  # renew well inside the lease, never at its very edge
    while ops.work_left > 0:
        if not ops.extend(delivery, lease):
            # The lease ran out and another delivery holds the message: it does the work.
            return
        ops.work(min(beat, ops.work_left))
    # A stall after the last beat can still outlast the lease: the effect and the ACK
    # commit together, and only if this delivery still holds the message.
    with ops.transaction():
        ops.apply(delivery)
        if not ops.ack(delivery):
            raise ops.Rollback


def heartbeat_starter(delivery: Delivery, ops: Ops) -> None:
    """Do the delivery's work (``ops.work``, ``ops.work_left`` seconds of it, often longer
    than the lease ``ops.visibility_timeout``), then its effect, exactly once per order:
    nothing lost, nothing applied twice, whatever the timing."""


def beat_then_separate_commits(delivery: Delivery, ops: Ops) -> None:
    while ops.work_left > 0:
        ops.extend(delivery, ops.visibility_timeout)
        ops.work(min(1.0, ops.work_left))
    ops.apply(delivery)
    ops.ack(delivery)


def beat_at_the_lease_edge(delivery: Delivery, ops: Ops) -> None:
    while ops.work_left > 0:  # renew by exactly the lease, work exactly the lease
        ops.extend(delivery, ops.visibility_timeout)
        ops.work(min(ops.visibility_timeout, ops.work_left))
    with ops.transaction():
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


def beat_work(faults: Faults) -> Callable[[Delivery], float]:
    lo, hi = BEAT_WORK
    return lambda d: round(lo + (hi - lo) * faults.uniform("work", d.event_id), 3)


def run_heartbeat(process: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **BEAT)
    hostile = pausing_process(process, faults, pause=BEAT_PAUSE, lease=BEAT_LEASE,
                              latency=BEAT_LATENCY)
    run, _ = run_workers(process=hostile, seed=seed, faults=faults, orders=20, workers=2,
                         work=beat_work(faults), visibility_timeout=BEAT_LEASE,
                         max_receives=BEAT_RECEIVES)
    where = describe_faults(faults, workers=2, orders=20,
                            extra=f"{BEAT_WORK[0]:g}-{BEAT_WORK[1]:g}s of work per delivery,"
                                  f" {BEAT_LEASE:g}s lease, stalls {BEAT_PAUSE:g},"
                                  f" renewals reach the queue {BEAT_LATENCY[0]:g}-"
                                  f"{BEAT_LATENCY[1]:g}s after they are sent")
    return judge(run.lab, seed=seed, faults=where, errors=run.errors)


register(Exercise(
    id="heartbeat", chapter=3, title="A heartbeat for slow work",
    run=run_heartbeat, solution=heartbeat_solution, starter=heartbeat_starter,
    wrong=(("duplicated", beat_then_separate_commits), ("duplicated", beat_at_the_lease_edge),
           ("duplicated", extend_once))))


# -- 3.3 the producer that retries ---------------------------------------------------------
REQUESTS = 20
LOST_REQUEST = 0.2    # the request never reaches the server
LOST_RESPONSE = 0.3   # the order commits, the answer never reaches the client
MAX_ATTEMPTS = 20
RESTART = 0.3         # the client dies after a lost answer and submits the request again


def producer_solution(send: Callable[..., str], request: dict[str, Any]) -> str:
    # The key names the request, not the attempt and not this call: a retry, or the same
    # request submitted again after the client restarted, replays the order it placed.
    key = request["request_id"]
    attempts = 0
    while True:
        attempts += 1
        try:
            return send(request["item_id"], request["qty"], idempotency_key=key)
        except TimeoutError:
            # Lost on the way or lost on the way back: the order may exist or not, and the
            # client cannot tell which. Only a retry with the same key is safe either way.
            if attempts == 20:
                raise  # give up loudly: the caller must know the order may not exist


def producer_starter(send: Callable[..., str], request: dict[str, Any]) -> str:
    """Place the order ``request`` asks for through ``send(item_id, qty,
    idempotency_key=None)`` and return its order id: exactly one order per request, however
    many requests and answers the connection loses (each raises ``TimeoutError``), and even
    if this function is called again for the same request after the client restarts."""


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


class _Restarted(BaseException):  # noqa: N818 - a fault, not an error
    """The client process died after a lost answer; the request is submitted again."""


class _Network:
    """``send`` for one request: place_order behind a connection that loses requests and
    answers on a seeded schedule, with a log of every attempt for the verdict's trace."""

    def __init__(self, lab: Lab, faults: Faults, request_id: str) -> None:
        self.lab, self.faults, self.request_id = lab, faults, request_id
        self.attempts = 0
        self.restarts = 0
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
            if not self.restarts and self.faults.uniform("restart", self.request_id) < RESTART:
                self.restarts += 1
                self.log.append(f"  attempt {n} ({key}): {what}; answer lost, and the client"
                                " died: it submits the request again")
                raise _Restarted
            self.log.append(f"  attempt {n} ({key}): {what}; answer lost → TimeoutError")
            raise TimeoutError("no answer from the server")
        self.log.append(f"  attempt {n} ({key}): {what}; answer received")
        return placed.order_id


def run_producer(submit: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed)
    lab = Lab(seed=seed)
    nets = []
    errors: list[str] = []
    request: dict[str, Any]
    for i in range(REQUESTS):
        request = {"request_id": f"req-{seed}-{i:03d}",
                   "item_id": lab.rng.choice(ITEMS), "qty": lab.rng.randint(1, 3)}
        net = _Network(lab, faults, request["request_id"])
        try:
            try:
                submit(net.send, dict(request))
            except _Restarted:
                submit(net.send, dict(request))  # the restarted client, the same request
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
    where = (f"requests lost {LOST_REQUEST:g}, answers lost {LOST_RESPONSE:g}, the client"
             f" restarts after {RESTART:.0%} of lost answers; {REQUESTS} requests")
    bad = next((n for n in nets if len(n.created) != 1), None)
    trace = ""
    if reasons and bad is not None:
        trace = "\n".join([f"Attempts of request {bad.request_id}:", *bad.log])
    return Trial(seed=seed, faults=where, passed=not reasons, reason="; ".join(reasons),
                 lost=lost, duplicated=dup, trace=trace)


register(Exercise(
    id="producer-retries", chapter=3, title="A producer that survives its own retries",
    run=run_producer, solution=producer_solution, starter=producer_starter,
    params=("send", "request"),
    wrong=(("placed more than once", retry_without_key),
           ("placed more than once", retry_fresh_key), ("never placed", no_retry))))
