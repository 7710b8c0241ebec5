"""Small measurements for the four-part toolkit: inbox, retries, reconciliation, tracing.

Each function runs the engine (queue, worker verbs, checker, trace) under a seed and a
:class:`~deliverylab.engine.clock.FakeClock` and returns plain values or a DataFrame, so a chapter can
show the result and ``tests/book/test_toolkit.py`` can assert it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..brokers.base import Delivery
from ..brokers.sqlite import Queue
from ..engine.clock import Clock
from ..engine.errors import InvalidInput, SimulatedCrash, check_int, check_number
from ..engine.faults import Faults
from ..engine.orders import PlacedOrder, place_order
from ..engine.store import Store, transaction
from ..engine.trace import Outcome, log_delivery
from ..engine.worker import CONSUMER, Handler, apply_order_placed
from .lab import Lab

if TYPE_CHECKING:
    import pandas as pd


# -- something else happens while a worker works ------------------------------------------------

class WhileWorking:
    """A clock for one worker, on which something else happens while that worker works.

    The engine's :class:`~deliverylab.engine.worker.Worker` and the seed's worker sleep their
    ``work_time`` on the clock between receiving a message and committing its effect.
    ``WhileWorking(clock, action)`` advances ``clock`` like any sleep and then runs ``action``
    once (the first time the worker works for at least ``after`` seconds): another worker
    polling while the first one is still busy, or another process taking the write lock. It
    turns a single-threaded run on a :class:`~deliverylab.engine.clock.FakeClock` into a precise,
    repeatable interleaving.
    """

    def __init__(self, clock: Clock, action: Callable[[], object], *,
                 after: float = 0.0) -> None:
        self.clock = clock
        self.action: Callable[[], object] | None = action
        self.after = check_number("after", after, minimum=0)
        self.result: object = None

    def now(self) -> float:
        return self.clock.now()

    def sleep(self, seconds: float) -> None:
        self.clock.sleep(seconds)
        if self.action is not None and seconds >= self.after and seconds > 0:
            action, self.action = self.action, None
            self.result = action()

    def sleep_until(self, t: float) -> None:
        self.clock.sleep_until(t)

    def __repr__(self) -> str:
        return f"WhileWorking({self.clock!r}, pending={self.action is not None})"


# -- ① the outbox under a crash -----------------------------------------------------------------

class _CrashOnSend:
    """A queue whose ``send`` dies: the process crashing after the order row, before the event."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    def send(self, *args: Any, **kwargs: Any) -> str:
        raise SimulatedCrash("between_order_and_event")


def place_order_with_crash(queue: Queue, *, item_id: str, qty: int,
                           order_id: str | None = None,
                           idempotency_key: str | None = None) -> PlacedOrder:
    """Run the engine's :func:`~deliverylab.engine.orders.place_order` and crash at the very point
    where the seed lost its event: after the order ``INSERT``, before the event is written.

    Always raises :class:`~deliverylab.engine.errors.SimulatedCrash`. Because both writes share one
    transaction, the crash rolls the order back too: nothing was written, and the client's retry
    of the same ``orderId`` succeeds. Compare :func:`deliverylab.book.naive.dual_write_place_order`.
    """
    # _CrashOnSend stands in for the queue: place_order calls only its send.
    return place_order(_CrashOnSend(queue), item_id=item_id, qty=qty,  # type: ignore[arg-type]
                       order_id=order_id, idempotency_key=idempotency_key)


# -- ① the inbox row committed apart from the effect --------------------------------------------

INBOX_ORDERINGS = ("one_transaction", "inbox_then_effect", "effect_then_inbox")
CRASH_POINT = "crash_between_inbox_and_effect"


def _inbox_insert(conn: Store, d: Delivery, now: float) -> bool:
    return conn.execute(
        "INSERT INTO inbox_processed (consumer, event_id, processed_at) VALUES (?, ?, ?)"
        " ON CONFLICT (consumer, event_id) DO NOTHING", (CONSUMER, d.event_id, now)).rowcount == 1


def _seen(conn: Store, d: Delivery) -> bool:
    return conn.execute("SELECT 1 FROM inbox_processed WHERE consumer = ? AND event_id = ?",
                        (CONSUMER, d.event_id)).fetchone() is not None


def _effect(conn: Store, d: Delivery, now: float, worker: str,
            detail: str) -> None:
    apply_order_placed(conn, d)
    log_delivery(conn, d, at=now, worker=worker, outcome=Outcome.APPLIED, detail=detail)


def _skip(conn: Store, d: Delivery, now: float, worker: str) -> None:
    log_delivery(conn, d, at=now, worker=worker, outcome=Outcome.DUPLICATE_SKIPPED)


@dataclass(frozen=True, slots=True)
class InboxRun:
    ordering: str
    crash_rate: float
    orders: int
    deliveries: int
    crashes: int
    correct: int
    lost: int
    duplicated: int
    extra_applications: int
    projection_equals_truth: bool


def separate_inbox_commit(ordering: str, *, orders: int = 200, crash_rate: float = 0.2,
                          seed: int = 0, visibility_timeout: float = 2.0) -> InboxRun:
    """Consume ``orders`` orders while the worker dies between the inbox row and the effect.

    ``ordering`` says how the two writes commit:

    * ``one_transaction`` — the engine's idempotent consumer: inbox row and effect commit
      together, so a crash between them rolls both back and the redelivery does the work once;
    * ``inbox_then_effect`` — the inbox row commits first: after a crash the redelivery finds
      the row, skips the event as a duplicate and ACKs it, and the effect never happens (lost);
    * ``effect_then_inbox`` — the effect commits first: after a crash there is no inbox row,
      so the redelivery applies the effect again (double).

    The crash schedule is a keyed hash of (seed, event, delivery), the same for all three
    orderings. A crash leaves the message leased; the lease runs out and the queue redelivers.
    """
    if ordering not in INBOX_ORDERINGS:
        raise InvalidInput("ordering", ordering, "one of " + ", ".join(INBOX_ORDERINGS))
    crash_rate = check_number("crash_rate", crash_rate, minimum=0, maximum=1)
    lab = Lab(seed=seed)
    lab.place_orders(check_int("orders", orders, minimum=0, maximum=100_000))
    conn, clock, queue, faults = lab.store, lab.clock, lab.broker, Faults(seed=seed)
    worker = f"worker ({ordering})"
    deliveries = crashes = 0
    while (nxt := queue.next_visible_at()) is not None:
        clock.sleep_until(nxt)
        for d in queue.receive(visibility_timeout, worker=worker):
            deliveries += 1
            now = clock.now()
            crash = faults.uniform(CRASH_POINT, d.event_id, d.delivery_count) < crash_rate
            try:
                if ordering == "one_transaction":
                    with transaction(conn):
                        if not _inbox_insert(conn, d, now):
                            _skip(conn, d, now, worker)
                        else:
                            if crash:
                                raise SimulatedCrash(CRASH_POINT)
                            _effect(conn, d, now, worker, "inbox row and effect, one commit")
                elif ordering == "inbox_then_effect":
                    with transaction(conn):
                        first = _inbox_insert(conn, d, now)
                        if not first:
                            _skip(conn, d, now, worker)
                    if first:
                        if crash:
                            raise SimulatedCrash(CRASH_POINT)
                        with transaction(conn):
                            _effect(conn, d, now, worker, "effect committed after the inbox")
                else:  # effect_then_inbox
                    if _seen(conn, d):
                        with transaction(conn):
                            _skip(conn, d, now, worker)
                    else:
                        with transaction(conn):
                            _effect(conn, d, now, worker, "effect committed before the inbox")
                        if crash:
                            raise SimulatedCrash(CRASH_POINT)
                        with transaction(conn):
                            _inbox_insert(conn, d, now)
            except SimulatedCrash:
                crashes += 1
                with transaction(conn):
                    log_delivery(conn, d, at=now, worker=worker,
                                 outcome=Outcome.CRASHED, detail=CRASH_POINT)
                continue  # no ACK: the lease runs out and the message comes back
            queue.ack(d, worker=worker)
        clock.advance(0.01)
    result = lab.check()
    return InboxRun(ordering=ordering, crash_rate=crash_rate, orders=result.orders,
                    deliveries=deliveries, crashes=crashes, correct=result.correct,
                    lost=result.lost, duplicated=result.duplicated,
                    extra_applications=result.extra_applications,
                    projection_equals_truth=result.projection_equals_truth)


def inbox_commit_table(*, orderings: Sequence[str] = INBOX_ORDERINGS,
                       crash_rates: Iterable[float] = (0.1, 0.2), orders: int = 200,
                       seed: int = 0) -> pd.DataFrame:
    """:func:`separate_inbox_commit` for each ordering and crash rate: one row per run."""
    import pandas as pd

    rows = [separate_inbox_commit(o, orders=orders, crash_rate=r, seed=seed)
            for r in crash_rates for o in orderings]
    return pd.DataFrame([{name: getattr(r, name) for name in InboxRun.__slots__} for r in rows])


# -- ② retry budgets ----------------------------------------------------------------------------

RETRY_POLICIES = ("per-request limit", "limit + retry budget")


@dataclass(frozen=True, slots=True)
class RetryLoad:
    policy: str
    failure_rate: float
    requests: int
    calls: int
    succeeded: int

    @property
    def calls_per_request(self) -> float:
        return self.calls / self.requests


def retry_load(policy: str, failure_rate: float, *, requests: int = 1000,
               max_attempts: int = 5, budget_ratio: float = 0.1, seed: int = 0) -> RetryLoad:
    """How many calls one client sends when each call fails with ``failure_rate``.

    Every request gets up to ``max_attempts`` calls. With ``limit + retry budget`` a retry is
    sent only while the client's retries stay below ``budget_ratio`` of its requests so far
    (the per-client retry budget of Google's SRE book, "Handling Overload"; gRPC's retry
    throttling is the same idea with a token bucket). When the server is down, the per-request
    limit multiplies the load by ``max_attempts``; the budget caps it near ``1 + budget_ratio``.
    The price: in a partial outage fewer requests get through. Seeded: same arguments, same
    result.
    """
    if policy not in RETRY_POLICIES:
        raise InvalidInput("policy", policy, "one of " + ", ".join(RETRY_POLICIES))
    failure_rate = check_number("failure_rate", failure_rate, minimum=0, maximum=1)
    requests = check_int("requests", requests, minimum=1, maximum=10_000_000)
    max_attempts = check_int("max_attempts", max_attempts, minimum=1, maximum=100)
    budget_ratio = check_number("budget_ratio", budget_ratio, minimum=0)
    rng = random.Random(seed)
    calls = retries = succeeded = 0
    for done in range(requests):
        for attempt in range(max_attempts):
            if attempt > 0:
                if policy == RETRY_POLICIES[1] and retries >= budget_ratio * (done + 1):
                    break
                retries += 1
            calls += 1
            if rng.random() >= failure_rate:
                succeeded += 1
                break
    return RetryLoad(policy, failure_rate, requests, calls, succeeded)


def retry_budget_table(failure_rates: Iterable[float] = (0.0, 0.1, 0.5, 1.0), *,
                       requests: int = 1000, max_attempts: int = 5, budget_ratio: float = 0.1,
                       seed: int = 0) -> pd.DataFrame:
    """:func:`retry_load` for both policies at each failure rate: calls per request (the load
    the server sees) and the share of requests that succeeded."""
    import pandas as pd

    rows = []
    for rate in failure_rates:
        for policy in RETRY_POLICIES:
            r = retry_load(policy, rate, requests=requests, max_attempts=max_attempts,
                           budget_ratio=budget_ratio, seed=seed)
            rows.append({"failure_rate": r.failure_rate, "policy": r.policy,
                         "calls_per_request": round(r.calls_per_request, 3),
                         "succeeded": round(r.succeeded / r.requests, 3)})
    return pd.DataFrame(rows)


# -- ② a handler bug, dead letters, the fix, a redrive ------------------------------------------

class UnknownItem(LookupError):
    """The handler does not know the order's item: a bug in the consumer, not in the message."""


def catalogue_handler(items: Iterable[str]) -> Handler:
    """A handler that refuses items missing from ``items``, then applies the order as usual.

    With an outdated catalogue it fails on every delivery of a new item's orders: after
    ``max_receives`` they land in ``dead_letters``. Deploying the handler with the catalogue
    fixed (a new :class:`~deliverylab.engine.worker.Worker`) and redriving applies them.
    """
    known = frozenset(items)

    def handle(conn: Store, delivery: Delivery) -> None:
        item = delivery.payload.get("itemId")
        if item not in known:
            raise UnknownItem(f"item {item!r} is not in the catalogue")
        apply_order_placed(conn, delivery)

    return handle


# -- ④ delivery counts against the geometric distribution ----------------------------------------

def geometric_expected(n: int, p: float, max_receives: int) -> pd.DataFrame:
    """Expected number of events needing k deliveries when each ACK is lost with probability
    ``p``: ``n · (1 − p) · p^(k − 1)`` — the geometric distribution, mean ``1 / (1 − p)`` —
    with the tail cut at ``max_receives``: after that many receives a message is dead-lettered
    whether it was applied or not, so the last bar holds ``n · p^(max_receives − 1)``."""
    import pandas as pd

    check_int("n", n, minimum=0)
    p = check_number("p", p, minimum=0, maximum=0.999)
    m = check_int("max_receives", max_receives, minimum=1)
    ks = range(1, m + 1)
    expected = [n * (1 - p) * p ** (k - 1) if k < m else n * p ** (m - 1) for k in ks]
    return pd.DataFrame({"deliveries": list(ks), "expected": expected})


def delivery_histogram(conn: Store, p: float, max_receives: int) -> pd.DataFrame:
    """Observed events per delivery count (from the trace) beside :func:`geometric_expected`."""
    from .traceviews import delivery_counts

    counts = delivery_counts(conn)
    frame = geometric_expected(len(counts), p, max_receives)
    observed = counts["deliveries"].value_counts()
    frame.insert(1, "observed", [int(observed.get(k, 0)) for k in frame["deliveries"]])
    return frame


def plot_delivery_histogram(histogram: pd.DataFrame, p: float, ax: Any = None) -> Any:
    """Bars of observed events per delivery count, the geometric expectation as a line.

    ``histogram`` is :func:`delivery_histogram`'s frame. Its last row is not "k deliveries"
    like the others but "max_receives or more, cut there": after ``max_receives`` receives a
    message is dead-lettered, so the last bar and the last expected point hold the whole tail.
    The axis says so, and the last bar is hatched.
    """
    import matplotlib.pyplot as plt

    if histogram.empty:
        raise InvalidInput("histogram", "an empty frame", "delivery_histogram's rows")
    p = check_number("p", p, minimum=0, maximum=0.999)
    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(8, 3.8))
    ks = [int(k) for k in histogram["deliveries"]]
    last = ks[-1]
    bars = ax.bar(ks, histogram["observed"], color="tab:blue", alpha=0.7, label="observed")
    bars[-1].set_hatch("//")
    ax.plot(ks, histogram["expected"], "o-", color="black", label=f"geometric, p = {p:g}")
    ax.set_xticks(ks, [str(k) for k in ks[:-1]] + [f"≥ {last}\n(max_receives)"])
    ax.set(xlabel="deliveries of one event", ylabel="events", yscale="log",
           title="delivery counts under ACK loss")
    ax.legend()
    if own:
        ax.figure.tight_layout()
    return ax


def ack_loss_run(p: float, *, orders: int = 400, seed: int = 0, max_receives: int = 10,
                 poison: bool = True) -> Lab:
    """An idempotent lab whose ACKs are lost with probability ``p``, run until idle.

    With ``poison`` one more message is sent straight to the queue by a buggy producer (``qty``
    as the string ``"2"``): the handler rejects it on every delivery, so it is nacked with
    backoff until ``max_receives`` and then dead-lettered. Its correlation id is ``o-poison``.
    """
    lab = Lab(seed=seed, mode="idempotent", faults=Faults(seed=seed, ack_fail=p),
              max_receives=check_int("max_receives", max_receives, minimum=1))
    lab.place_orders(check_int("orders", orders, minimum=0))
    if poison:
        lab.broker.send(lab.ids.event_id(), "OrderPlaced",
                       {"orderId": "o-poison", "itemId": "coffee-beans", "qty": "2"},
                       correlation_id="o-poison")
    lab.run_until_idle()
    return lab


def delivery_summary(conn: Store) -> pd.DataFrame:
    """One row per event, most deliveries first: how often it was received, whether it took
    effect, how many ACKs were lost, how many deliveries failed with an error, how it ended.

    A redelivery caused by a lost ACK shows ``ack_failed`` and ``applied``; a poison message
    shows an error on every delivery and was never applied."""
    import pandas as pd

    rows = conn.execute("""
        SELECT event_id, max(correlation_id) AS order_id,
               sum(outcome = 'received') AS deliveries,
               sum(outcome = 'applied') AS applied,
               sum(outcome = 'ack_failed') AS ack_failed,
               sum(outcome = 'nacked' OR (outcome = 'dead_lettered'
                                          AND detail NOT LIKE 'received % times%')) AS errors,
               (SELECT l2.outcome FROM delivery_log AS l2 WHERE l2.event_id = l.event_id
                 ORDER BY l2.seq DESC LIMIT 1) AS ended
          FROM delivery_log AS l
         GROUP BY event_id
         ORDER BY deliveries DESC, errors DESC, event_id""").fetchall()
    return pd.DataFrame([tuple(r) for r in rows],
                        columns=["event_id", "order_id", "deliveries", "applied", "ack_failed",
                                 "errors", "ended"])


# -- ④ one correlation id through every table ---------------------------------------------------

def follow(conn: Store, correlation_id: str) -> pd.DataFrame:
    """Everything the database holds about one order, in time order: the order row, each
    delivery-log row of its event, the inbox row, a dead letter if any.

    The correlation id is the order id: the API writes it on the order and on the event, the
    queue carries it on every delivery, the worker writes it in every log row."""
    import pandas as pd

    rows: list[tuple[Any, ...]] = []
    order = conn.execute("SELECT * FROM orders WHERE order_id = ?", (correlation_id,)).fetchone()
    event_ids: set[str] = set()
    if order is not None:
        event_ids.add(order["event_id"])
        rows.append((order["created_at"], 0, "orders", "order written",
                     f"{order['item_id']} x {order['qty']}, event {order['event_id']}"))
    first_effect: dict[str, int] = {}  # event id -> seq of its first 'applied'/'reconciled'
    for r in conn.execute("SELECT * FROM delivery_log WHERE correlation_id = ? ORDER BY seq",
                          (correlation_id,)):
        event_ids.add(r["event_id"])
        if r["outcome"] in ("applied", "reconciled"):
            first_effect.setdefault(r["event_id"], r["seq"])
        where = f"delivery #{r['delivery_count']}" if r["delivery_count"] else "operator"
        rows.append((r["at"], r["seq"], "delivery_log", f"{r['outcome']} ({where})",
                     f"{r['worker']}, {r['message_id']}" + (f": {r['detail']}"
                                                           if r["detail"] else "")))
    for event_id in sorted(event_ids):
        # The inbox row commits with the first effect (or the repair): list it right after.
        first = first_effect.get(event_id)
        for r in conn.execute("SELECT * FROM inbox_processed WHERE event_id = ?", (event_id,)):
            rows.append((r["processed_at"], 10**12 if first is None else first + 0.5,
                         "inbox_processed", "inbox row",
                         f"consumer {r['consumer']}, event {event_id}"))
        for r in conn.execute("SELECT * FROM dead_letters WHERE event_id = ?", (event_id,)):
            rows.append((r["dead_at"], 10**12 + 1, "dead_letters", "dead letter",
                         f"{r['message_id']}: {r['last_error']}"))
    rows.sort(key=lambda r: (r[0], r[1]))
    return pd.DataFrame([(at, table, what, detail) for at, _, table, what, detail in rows],
                        columns=["at", "table", "what", "detail"])
