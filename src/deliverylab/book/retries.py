"""Chapter 8, "Retries multiply": three layers that each retry, and the two cures.

The chain is the engine's worker and two services below it, each layer retrying what failed:

1. **the queue**: a handler that raises is nacked and redelivered, ``max_receives`` times in
   all (the engine's :class:`~deliverylab.engine.worker.Worker`, unchanged);
2. **the worker's call to the payment API**: up to ``tries`` calls per delivery;
3. **the payment API's call to its bank**: up to ``tries`` calls per API request.

With three tries at each layer, one order meets a bank that is down 3 x 3 x 3 = 27 times. The
Google SRE book calls this retry amplification ("Handling Overload"): the load on the weakest
system multiplies exactly while it is weakest. Two cures, each a parameter of the run:

* a **retry budget** (:class:`RetryBudget`), a token bucket per client: every first attempt
  puts ``ratio`` of a token in, every retry takes one out, and no retry is made without a
  whole token, so retries stay below ``ratio`` of the calls (the SRE book's 10 % per client;
  the AWS SDKs' retry quota, described in the Builders' Library article "Timeouts, retries,
  and backoff with jitter", works the same way);
* **deadline propagation**: the delivery's lease end travels down with every call as an
  absolute deadline, and no layer starts an attempt that cannot finish before it. A worker
  past its lease is a zombie (the previous section), so the lease is the natural deadline.

Everything runs on a FakeClock: a call to the bank takes ``call_s`` when it is up and times
out after ``timeout_s`` when it is down; the counts and times replay exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..brokers.base import Delivery
from ..engine.clock import FakeClock
from ..engine.errors import InvalidInput, check_int, check_number
from ..engine.store import Store
from ..engine.worker import Worker, apply_order_placed
from .lab import Lab

if TYPE_CHECKING:
    import pandas as pd


class Unavailable(Exception):
    """A call failed: the service below was down (or there was no time left to ask it)."""


@dataclass
class RetryBudget:
    """A token bucket that caps retries at ``ratio`` of first attempts: each first attempt
    deposits ``ratio`` tokens (up to ``capacity``), each retry withdraws one; a retry is made
    only when a whole token is there. It starts full: a rare failure is always retried."""

    ratio: float = 0.1
    capacity: float = 10.0
    tokens: float = field(default=-1.0)
    refused: int = 0

    def __post_init__(self) -> None:
        check_number("ratio", self.ratio, minimum=0, maximum=1)
        check_number("capacity", self.capacity, minimum=1)
        if self.tokens < 0:
            self.tokens = self.capacity

    def first_attempt(self) -> None:
        self.tokens = min(self.capacity, self.tokens + self.ratio)

    def allow_retry(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.refused += 1
        return False


@dataclass
class Bank:
    """The bottom layer: up outside ``outage`` (start, end), where each call takes ``call_s``;
    inside it, each call times out after ``timeout_s``. Counts every call, and when."""

    clock: FakeClock
    outage: tuple[float, float] = (0.0, 0.0)
    call_s: float = 0.05
    timeout_s: float = 0.5
    calls: list[float] = field(default_factory=list)

    def down(self) -> bool:
        return self.outage[0] <= self.clock.now() < self.outage[1]

    def charge(self, order_id: str) -> None:
        self.calls.append(self.clock.now())
        if self.down():
            self.clock.advance(self.timeout_s)
            raise Unavailable("the bank did not answer")
        self.clock.advance(self.call_s)


def _call_with_retries(call, *, tries: int, budget: RetryBudget | None,
                       deadline: float | None, clock: FakeClock, needs: float) -> None:
    """``call()`` up to ``tries`` times: a retry needs the budget's token (if any), and no
    attempt starts with less than ``needs`` seconds left before ``deadline`` (if any)."""
    if budget is not None:
        budget.first_attempt()
    for attempt in range(tries):
        if deadline is not None and deadline - clock.now() < needs:
            raise Unavailable("no time left before the deadline")
        if attempt and budget is not None and not budget.allow_retry():
            raise Unavailable("retry budget spent")
        try:
            return call()
        except Unavailable:
            if attempt == tries - 1:
                raise
    raise Unavailable("no attempt made")  # tries == 0 cannot happen: checked by the callers


@dataclass
class PaymentApi:
    """The middle layer: each request calls the bank up to ``tries`` times."""

    bank: Bank
    tries: int = 3
    budget: RetryBudget | None = None
    requests: int = 0
    overran: int = 0  # deliveries whose handler was still calling when their lease ended

    def charge(self, order_id: str, *, deadline: float | None = None) -> None:
        self.requests += 1
        _call_with_retries(lambda: self.bank.charge(order_id), tries=self.tries,
                           budget=self.budget, deadline=deadline, clock=self.bank.clock,
                           needs=self.bank.timeout_s)


@dataclass(frozen=True)
class Policy:
    """How every layer retries: ``tries`` per client layer, the queue's ``max_receives``,
    an optional retry budget ``ratio`` per client, and whether the lease's deadline travels
    down with each call."""

    name: str
    tries: int = 3
    max_receives: int = 3
    budget_ratio: float | None = None
    deadline: bool = False

    def __post_init__(self) -> None:
        check_int("tries", self.tries, minimum=1, maximum=10)
        check_int("max_receives", self.max_receives, minimum=1, maximum=10)
        if self.budget_ratio is not None:
            check_number("budget_ratio", self.budget_ratio, minimum=0, maximum=1)


POLICIES = (
    Policy("retries at every layer"),
    Policy("with a retry budget (10 %)", budget_ratio=0.1),
    Policy("with the deadline propagated", deadline=True),
    Policy("both cures", budget_ratio=0.1, deadline=True),
)


def payment_handler(api: PaymentApi, policy: Policy):
    """The worker's handler: charge through the API (up to ``policy.tries`` calls, within the
    delivery's lease when the deadline is propagated), then reserve the order."""
    budget = RetryBudget(policy.budget_ratio) if policy.budget_ratio is not None else None

    def handle(conn: Store, delivery: Delivery) -> None:
        deadline = delivery.lease_until if policy.deadline else None
        try:
            _call_with_retries(
                lambda: api.charge(delivery.payload["orderId"], deadline=deadline),
                tries=policy.tries, budget=budget, deadline=deadline, clock=api.bank.clock,
                needs=api.bank.timeout_s)
        finally:  # still at work after the lease ran out: a zombie, whatever happens next
            if api.bank.clock.now() > delivery.lease_until:
                api.overran += 1
        apply_order_placed(conn, delivery)

    return handle


@dataclass(frozen=True)
class RetryRun:
    policy: str
    orders: int
    deliveries: int
    api_requests: int
    bank_calls: int
    orders_in_outage: int
    bank_calls_in_outage: int
    amplification: float
    past_the_lease: int
    charged: int
    dead_lettered: int
    drained_at: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def run(policy: Policy, *, orders: int = 1, every: float = 0.0,
        outage: tuple[float, float] = (0.0, 1e9), timeout_s: float = 0.5, lease: float = 2.0,
        seed: int = 0) -> RetryRun:
    """``orders`` orders, one every ``every`` seconds, consumed by one worker under
    ``policy`` while the bank is down during ``outage``, each call to it failing after
    ``timeout_s``; what each layer did. ``amplification`` is the bank's calls during the
    outage per order that arrived in it (1.0 would be no retries at all)."""
    if not isinstance(policy, Policy):
        raise InvalidInput("policy", policy, "a retries.Policy")
    check_int("orders", orders, minimum=1, maximum=10_000)
    check_number("every", every, minimum=0)
    check_number("lease", lease, minimum=0.1)
    lab = Lab(seed=seed, max_receives=policy.max_receives)
    check_number("timeout_s", timeout_s, minimum=0.001, maximum=60)
    bank = Bank(lab.clock, outage=outage, timeout_s=timeout_s)
    budget = RetryBudget(policy.budget_ratio) if policy.budget_ratio is not None else None
    api = PaymentApi(bank, tries=policy.tries, budget=budget)
    worker = Worker(store=lab.store, clock=lab.clock, broker=lab.broker, mode="idempotent",
                    visibility_timeout=lease, handler=payment_handler(api, policy),
                    name="worker-1")
    due = [i * every for i in range(orders)]
    placed = 0
    while True:
        while placed < orders and due[placed] <= lab.clock.now():
            lab.place_order("coffee-beans", 1, order_id=f"o-{placed + 1:03d}")
            placed += 1
        if worker.step():
            continue
        nxt = [t for t in (lab.broker.next_visible_at(),
                           due[placed] if placed < orders else None) if t is not None]
        if not nxt:
            break
        lab.clock.sleep_until(min(nxt))
    result = lab.check()
    in_outage = sum(1 for t in bank.calls if outage[0] <= t < outage[1])
    arrived = sum(1 for t in due if outage[0] <= t < outage[1])
    return RetryRun(policy.name, orders, worker.stats.received, api.requests, len(bank.calls),
                    arrived, in_outage, round(in_outage / arrived, 2) if arrived else 0.0,
                    api.overran, result.correct, result.dead_lettered, lab.clock.now())


def layer_counts(policies: tuple[Policy, ...] = POLICIES, *,
                 timeout_s: float = 0.5) -> pd.DataFrame:
    """One order against a bank that never answers (each call times out after
    ``timeout_s``): the attempts at each layer, under each policy (one column each)."""
    import pandas as pd

    rows = {}
    for p in policies:
        r = run(p, orders=1, timeout_s=timeout_s)
        rows[p.name] = {"queue deliveries (the worker)": r.deliveries,
                        "calls to the payment API": r.api_requests,
                        "calls to the bank": r.bank_calls,
                        "deliveries still at work after their lease": r.past_the_lease,
                        "seconds until dead-lettered": round(r.drained_at, 2)}
    return pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in rows.items()})


def outage_table(*, timeout_s: float = 0.01, orders: int = 120, every: float = 0.5,
                 outage: tuple[float, float] = (10.0, 30.0),
                 policies: tuple[Policy, ...] = POLICIES) -> pd.DataFrame:
    """The same orders (one every half second for a minute) through a 20-second outage of
    the bank, whose calls fail after ``timeout_s`` (a refused connection fails at once, a
    timeout takes long), under each policy."""
    import pandas as pd

    return pd.DataFrame([run(p, orders=orders, every=every, outage=outage,
                             timeout_s=timeout_s).as_dict()
                         for p in policies]).set_index("policy")
