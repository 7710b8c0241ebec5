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

from ..book.lab import ITEMS
from ..brokers.base import Delivery
from ..engine.errors import check_number
from ..engine.faults import Faults
from ..engine.orders import place_order
from ..engine.worker import apply_order_placed
from .crew import nemesis_handler, pausing_process
from .grader import (
    CourseLab,
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
RESTART = 0.3         # the client dies after a lost answer and submits the request again
OUTAGE = 0.3          # the server is down when the request starts: connections are refused
OUTAGE_S = (1.0, 3.0)  # for this long, seeded
DOWN = 0.1            # the server is down past the deadline: no attempt ever reaches it
BLACK_HOLE = 0.1      # the first attempt commits, then no answer comes back until the deadline
REFUSED = 0.15        # the request asks for more than the server allows: refused every time
DEADLINE_S = 10.0     # each request's deadline, from its start
WAIT_S = 0.5          # how long an attempt waits for an answer that never comes
EARLY_S = DEADLINE_S / 4  # "unknown" with more of the deadline left is giving up early
MAX_ATTEMPTS = 15     # more attempts for one request is a retry storm
QTY_LIMIT = 5


def producer_solution(send: Callable[..., str], request: dict[str, Any],
                      clock: Any) -> tuple[str, str | None]:
    # The key names the request, not the attempt and not this call: a retry, or the same
    # request submitted again after the client restarted, replays the order it placed.
    key = request["request_id"]
    pause = 0.2
    reached = False  # did any attempt get past the connection?
    while True:
        try:
            return "placed", send(request["item_id"], request["qty"], idempotency_key=key)
        except ValueError as refusal:
            # The server answered no: the same request gets the same answer, so stop now.
            return "refused", str(refusal)
        except TimeoutError:
            # Lost on the way or on the way back: the order may exist or not. Only a retry
            # with the same key is safe either way.
            reached = True
        except ConnectionError:
            pass  # refused a connection: this attempt never reached the server
        if clock.now() + pause >= request["deadline"]:
            # No answer came. If an attempt may have reached the server the order may
            # exist: "unknown", and the caller must check before it tells anyone it failed.
            return ("unknown" if reached else "failed"), None
        # Wait longer each time, so that a struggling server is not buried under retries.
        clock.sleep(pause)
        pause = min(pause * 2, 2.0)


def producer_starter(send: Callable[..., str], request: dict[str, Any],
                     clock: Any) -> tuple[str, str | None]:
    """Place the order ``request`` asks for through ``send(item_id, qty,
    idempotency_key=None)`` and report what happened: ``("placed", order_id)``,
    ``("refused", reason)``, ``("failed", None)`` when no attempt reached the server, or
    ``("unknown", None)``. Exactly one order per request, however many requests and answers
    the connection loses (``TimeoutError``) or however long the server is down
    (``ConnectionError``), and even if this function is called again for the same request
    after the client restarts. A refusal (``ValueError``) is final. Retry no later than
    ``request["deadline"]`` on ``clock.now()``, pausing with ``clock.sleep(s)`` between
    attempts, and never more than 15 attempts per request."""


def retry_without_key(send: Callable[..., str], request: dict[str, Any],
                      clock: Any) -> tuple[str, str | None]:
    while True:
        try:
            return "placed", send(request["item_id"], request["qty"])
        except (TimeoutError, ConnectionError):
            clock.sleep(1.0)
        except ValueError as refusal:
            return "refused", str(refusal)


def retry_fresh_key(send: Callable[..., str], request: dict[str, Any],
                    clock: Any) -> tuple[str, str | None]:
    attempt = 0
    while clock.now() < request["deadline"] - 1.0:
        attempt += 1
        try:
            return "placed", send(request["item_id"], request["qty"],
                                  idempotency_key=f"{request['request_id']}-{attempt}")
        except (TimeoutError, ConnectionError):
            clock.sleep(1.0)
        except ValueError as refusal:
            return "refused", str(refusal)
    return "unknown", None


def no_retry(send: Callable[..., str], request: dict[str, Any],
             clock: Any) -> tuple[str, str | None]:
    try:
        return "placed", send(request["item_id"], request["qty"],
                              idempotency_key=request["request_id"])
    except (TimeoutError, ConnectionError):
        return "unknown", None
    except ValueError as refusal:
        return "refused", str(refusal)


def retry_refusals(send: Callable[..., str], request: dict[str, Any],
                   clock: Any) -> tuple[str, str | None]:
    reached = False
    while clock.now() < request["deadline"] - 1.0:
        try:
            return "placed", send(request["item_id"], request["qty"],
                                  idempotency_key=request["request_id"])
        except ConnectionError:
            pass
        except (TimeoutError, ValueError):  # the mistake: a refusal retried like a timeout
            reached = True
        clock.sleep(1.0)
    return ("unknown" if reached else "failed"), None


class _Restarted(BaseException):  # noqa: N818 - a fault, not an error
    """The client process died after a lost answer; the request is submitted again."""


class ClientClock:
    """The client's clock: ``now()`` in seconds, ``sleep(seconds)`` to pause."""

    def __init__(self, lab: CourseLab) -> None:
        self._clock = lab.clock

    def now(self) -> float:
        return self._clock.now()

    def sleep(self, seconds: float) -> None:
        self._clock.advance(check_number("seconds", seconds, minimum=0, maximum=60))


class _Network:
    """``send`` for one request: place_order behind a connection that loses requests and
    answers, a server that is down for a while or refuses, all on a seeded schedule, with a
    log of every attempt for the verdict's trace."""

    def __init__(self, lab: CourseLab, faults: Faults, request: dict[str, Any]) -> None:
        self.lab, self.faults = lab, faults
        self.request_id: str = request["request_id"]
        self.deadline: float = request["deadline"]
        self.refuses = request["qty"] > QTY_LIMIT
        start = lab.clock.now()
        lo, hi = OUTAGE_S
        down = faults.uniform("outage", self.request_id)
        self.down_until = start + (lo + (hi - lo) * faults.uniform("outage-s", self.request_id)
                                   if down < OUTAGE else DEADLINE_S + 5.0
                                   if down > 1.0 - DOWN else 0.0)
        self.reached = False   # an attempt got past the connection: the order may exist
        self.black_hole = not self.refuses and faults.uniform("hole", self.request_id) < BLACK_HOLE
        self.attempts = 0
        self.restarts = 0
        self.late = 0          # attempts sent after the deadline
        self.after_refusal = 0  # attempts sent after the server refused
        self.refused = False
        self.why = ""          # how the answer misreports the request ("raised": no answer)
        self.created: list[str] = []
        self.log: list[str] = []

    def _lost(self, note: str) -> TimeoutError:
        self.lab.clock.advance(WAIT_S)
        self.log.append(note)
        return TimeoutError("no answer from the server")

    def send(self, item_id: str, qty: int, *, idempotency_key: str | None = None) -> str:
        clock = self.lab.clock
        self.attempts += 1
        n = self.attempts
        at = f"  attempt {n} at t={clock.now() - self.deadline + DEADLINE_S:.2f}s"
        if n > MAX_ATTEMPTS:
            raise Stopped(f"more than {MAX_ATTEMPTS} attempts for one request (a retry storm)")
        if clock.now() > self.deadline + 1e-9:
            self.late += 1
        if self.refused:
            self.after_refusal += 1
        if clock.now() < self.down_until:
            clock.advance(0.01)
            self.log.append(f"{at}: the server is down → ConnectionError")
            raise ConnectionError("connection refused: the server is down")
        self.reached = True
        lost_request = self.faults.uniform("request", self.request_id, n) < LOST_REQUEST
        if (self.black_hole and n > 1) or (lost_request and not self.black_hole):
            raise self._lost(f"{at}: request lost on the way → TimeoutError")
        if self.refuses:
            self.refused = True
            clock.advance(0.02)
            self.log.append(f"{at}: refused, qty {qty} is over the limit → ValueError")
            raise ValueError(f"qty {qty} is over the limit of {QTY_LIMIT} per order")
        placed = place_order(self.lab.broker, item_id=item_id, qty=qty,
                             idempotency_key=idempotency_key)
        if placed.created:
            self.created.append(placed.order_id)
        what = (f"order {placed.order_id} created" if placed.created
                else f"replayed order {placed.order_id}, nothing written")
        key = f"key {idempotency_key!r}" if idempotency_key else "no key"
        if self.black_hole or self.faults.uniform("response", self.request_id, n) < LOST_RESPONSE:
            if not self.restarts and self.faults.uniform("restart", self.request_id) < RESTART:
                self.restarts += 1
                clock.advance(WAIT_S)
                self.log.append(f"{at} ({key}): {what}; answer lost, and the client died: it"
                                " submits the request again")
                raise _Restarted
            raise self._lost(f"{at} ({key}): {what}; answer lost → TimeoutError")
        clock.advance(0.02)
        self.log.append(f"{at} ({key}): {what}; answer received")
        return placed.order_id


def _judge_answer(net: _Network, answer: Any, now: float) -> str:
    """Why ``answer`` misreports the request ``net`` saw ("" when it is true)."""
    if not (isinstance(answer, tuple) and len(answer) == 2
            and answer[0] in ("placed", "refused", "unknown", "failed")):
        return (f"answered {answer!r}: the answers are ('placed', order id), ('refused',"
                " reason), ('unknown', None) and ('failed', None)")
    status, detail = answer
    if net.refused:
        return "" if status == "refused" else f"answered {status!r} to a refusal"
    if status == "refused":
        return "answered 'refused' to a request the server never refused"
    if status == "placed":
        if detail not in net.created:
            return f"answered ('placed', {detail!r}), not the order it placed"
        return ""
    if status == "failed" and net.reached:
        return ("answered 'failed' after an attempt got through to the server: the order may"
                " exist, and only 'unknown' is true")
    if status == "unknown" and not net.reached and net.attempts:
        return ("answered 'unknown' when every attempt was refused a connection: nothing"
                " reached the server, so the order surely does not exist ('failed')")
    left = net.deadline - now
    if -left > WAIT_S + 1e-9:
        return (f"answered {status!r} {-left:.1f}s after its deadline: the caller stopped"
                " waiting long before")
    if left > EARLY_S:
        return (f"answered {status!r} with {left:.1f}s of its {DEADLINE_S:g}s deadline left:"
                " it gave up early")
    return ""


def run_producer(submit: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed)
    lab = CourseLab(seed=seed)
    clock = ClientClock(lab)
    nets = []
    errors: list[str] = []
    request: dict[str, Any]
    for i in range(REQUESTS):
        request_id = f"req-{seed}-{i:03d}"
        over = faults.uniform("refused", request_id) < REFUSED
        request = {"request_id": request_id, "item_id": lab.rng.choice(ITEMS),
                   "qty": lab.rng.randint(QTY_LIMIT + 1, 9) if over else lab.rng.randint(1, 3),
                   "deadline": round(lab.clock.now() + DEADLINE_S, 6)}
        net = _Network(lab, faults, request)
        try:
            try:
                answer = submit(net.send, dict(request), clock)
            except _Restarted:
                answer = submit(net.send, dict(request), clock)  # the restarted client
        except Stopped as exc:
            net.why = "raised"
            if not errors:
                errors.append(f"no end of retries: {exc} (request {request_id})")
        except Exception as exc:  # the reader's code: report it, go on with the next request
            net.why = "raised"
            if not errors:
                errors.append(f"{type(exc).__name__}: {exc} (request {request_id})")
        else:
            net.why = _judge_answer(net, answer, lab.clock.now())
            net.log.append(f"  its answer: {net.why}" if net.why else f"  answered {answer!r}")
        nets.append(net)
        lab.clock.sleep_until(request["deadline"] + 1.0)  # the next request starts later
    lab.run_until_idle()
    reasons = [f"your code raised {e}" for e in errors]
    retried = [n for n in nets if n.after_refusal]
    if retried:
        reasons.append(f"{len(retried)} of {REQUESTS} requests retried a refusal"
                       f" ({sum(n.after_refusal for n in retried)} attempts after the server"
                       " said no): a retry cannot fix it")
    late = [n for n in nets if n.late]
    if late:
        reasons.append(f"{len(late)} of {REQUESTS} requests sent after their deadline"
                       f" ({sum(n.late for n in late)} attempts)")
    lost = tuple(n.request_id for n in nets if not n.created and not n.refuses and n.why)
    dup = tuple(n.request_id for n in nets if len(n.created) > 1)
    if lost:
        reasons.append(f"{len(lost)} of {REQUESTS} requests never placed: the client gave up"
                       " before its deadline on an order that was never written")
    if dup:
        extra = sum(len(n.created) - 1 for n in nets if n.created)
        reasons.append(f"{len(dup)} of {REQUESTS} requests placed more than once ({extra}"
                       " extra orders): a retry wrote a new order instead of replaying")
    misreported = [n for n in nets if n.why and n.why != "raised"]
    if misreported:
        first = misreported[0]
        reasons.append(f"{len(misreported)} of {REQUESTS} requests misreported (request"
                       f" {first.request_id} {first.why})")
    base = judge(lab, seed=seed, faults="", errors=())  # the consumer side must be clean too
    if not base.passed:
        reasons.append(f"the consumer side: {base.reason}")
    where = (f"requests lost {LOST_REQUEST:g}, answers lost {LOST_RESPONSE:g}, the client"
             f" restarts after {RESTART:.0%} of lost answers, the server down"
             f" {OUTAGE_S[0]:g}-{OUTAGE_S[1]:g}s for {OUTAGE:.0%} of requests and past the"
             f" deadline for {DOWN:.0%}, silent for {BLACK_HOLE:.0%}, {REFUSED:.0%} refused;"
             f" {DEADLINE_S:g}s deadlines;"
             f" {REQUESTS} requests")
    bad = next((n for n in nets if len(n.created) > 1 or n.after_refusal or n.late or n.why),
               None)
    trace = ""
    if reasons and bad is not None:
        trace = "\n".join([f"Attempts of request {bad.request_id}:", *bad.log])
    return Trial(seed=seed, faults=where, passed=not reasons, reason="; ".join(reasons),
                 lost=lost, duplicated=dup, trace=trace)


register(Exercise(
    id="producer-retries", chapter=3, title="A producer that survives its own retries",
    run=run_producer, solution=producer_solution, starter=producer_starter,
    params=("send", "request", "clock"),
    wrong=(("placed more than once", retry_without_key),
           ("placed more than once", retry_fresh_key), ("never placed", no_retry),
           ("retried a refusal", retry_refusals))))
