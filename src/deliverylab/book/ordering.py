"""Order matters: an order's status, a projection that is not a sum.

The inventory projection adds quantities, and addition does not care about order: events
applied in any order give the same total. An order's *status* is different. ``placed → paid →
shipped`` applied as ``placed → shipped → paid`` ends at ``paid``: the last write wins, and the
last write is whichever event arrived last, not whichever happened last. A queue reorders
events whenever one is retried (its first attempt failed, or its ACK was lost and it comes back
after a newer one) and whenever two workers hold events of the same order at once.

The producer numbers each order's changes (``version``, 1 for ``placed``) in the same
transaction as the event, and the fixed projection applies an event only if it is newer than
what it holds: ``UPDATE … WHERE version < ?``, here an UPSERT whose ``DO UPDATE`` has that
``WHERE``. The result no longer depends on the order of arrival.

One status outranks the versions: a cancellation. Other services may still report a fact
about an order after it was cancelled (the payment captured, the parcel dispatched, before the
cancellation reached them): :func:`report_after_cancel` records it with the next version, and
the cancellation stands. The truth of an order's status is its cancellation if it has one,
else its newest change.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..brokers.base import Delivery
from ..brokers.sqlite import Queue
from ..engine.clock import Clock
from ..engine.errors import InvalidInput, check_int, check_number, check_text
from ..engine.faults import NO_FAULTS, Faults
from ..engine.store import Store, transaction
from ..engine.worker import Handler, Mode, PoisonMessage, Worker, apply_order_placed
from .lab import Lab
from .tables import install_schema, require_tables

if TYPE_CHECKING:
    import pandas as pd

STATUS_EVENT = "OrderStatusChanged"
# Which status may follow which: the producer refuses anything else.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "placed": ("paid", "cancelled"),
    "paid": ("shipped", "cancelled"),
    "shipped": (),
    "cancelled": (),
}
CANCELLED = "cancelled"  # the status that stands, whatever version comes after it

SCHEMA = """
CREATE TABLE IF NOT EXISTS order_status_changes (
    order_id   TEXT NOT NULL,
    version    INTEGER NOT NULL CHECK (version >= 2),
    status     TEXT NOT NULL,
    event_id   TEXT NOT NULL UNIQUE,
    changed_at REAL NOT NULL,
    PRIMARY KEY (order_id, version)
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS order_status (
    order_id   TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    version    INTEGER NOT NULL,
    updated_at REAL NOT NULL
) STRICT, WITHOUT ROWID;
"""


def install(conn: Store) -> None:
    """Create the status truth (``order_status_changes``, beside ``orders``) and the status
    projection (``order_status``) if they are not there yet (idempotent)."""
    install_schema(conn, SCHEMA)


# -- the producer ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StatusChange:
    order_id: str
    status: str
    version: int
    event_id: str


# The change that gives an order its status: its cancellation if it has one, else its newest.
_STANDS = f"ORDER BY status = '{CANCELLED}' DESC, version DESC LIMIT 1"


def _current(conn: Store, order_id: str, *, besides_cancel: bool = False
             ) -> tuple[str, int] | None:
    """(status, version) of an order in the truth; None if there is no such order.
    ``besides_cancel``: the newest change that is not the cancellation instead (the life
    the other services still see)."""
    row = conn.execute(
        "SELECT status, version FROM order_status_changes WHERE order_id = ?"
        + (f" AND status <> '{CANCELLED}' ORDER BY version DESC LIMIT 1" if besides_cancel
           else " " + _STANDS), (order_id,)).fetchone()
    if row is not None:
        return row[0], row[1]
    placed = conn.execute("SELECT 1 FROM orders WHERE order_id = ?", (order_id,)).fetchone()
    return ("placed", 1) if placed else None


def _record(queue: Queue, order_id: str, status: str, *, late: bool) -> StatusChange:
    check_text("order_id", order_id)
    if status not in TRANSITIONS or status == "placed":
        raise InvalidInput("status", status, "one of paid, shipped, cancelled")
    conn = queue.conn
    require_tables(conn, ["order_status_changes"], "deliverylab.book.ordering.install")
    with transaction(conn):
        current = _current(conn, order_id)
        if current is None:
            raise InvalidInput("order_id", order_id, "the id of a placed order")
        was = current[0]
        if late:
            if was != CANCELLED:
                raise InvalidInput("order_id", order_id, "the id of a cancelled order")
            if status == CANCELLED:
                raise InvalidInput("status", status, "a status other than cancelled")
            before = _current(conn, order_id, besides_cancel=True)
            was = before[0] if before is not None else "placed"
        if status not in TRANSITIONS[was]:
            allowed = " or ".join(TRANSITIONS[was]) or "nothing (it is final)"
            raise InvalidInput("status", status, f"a status that may follow {was!r}: {allowed}")
        version = conn.execute("SELECT coalesce(max(version), 1) FROM order_status_changes"
                               " WHERE order_id = ?", (order_id,)).fetchone()[0] + 1
        event_id = queue.ids.event_id()
        conn.execute(
            "INSERT INTO order_status_changes (order_id, version, status, event_id, changed_at)"
            " VALUES (?, ?, ?, ?, ?)", (order_id, version, status, event_id, queue.clock.now()))
        queue.send(event_id, STATUS_EVENT,
                   {"orderId": order_id, "status": status, "version": version},
                   correlation_id=order_id)
    return StatusChange(order_id, status, version, event_id)


def change_status(queue: Queue, order_id: str, status: str) -> StatusChange:
    """Move an order to ``status``: the change row (the truth, with the next version) and its
    ``OrderStatusChanged`` event commit in one transaction, the outbox again."""
    return _record(queue, order_id, status, late=False)


def report_after_cancel(queue: Queue, order_id: str, status: str) -> StatusChange:
    """Record a fact another service reports about a *cancelled* order, one that happened
    before the cancellation reached it: the payment captured, the parcel dispatched. It must
    follow the order's life before the cancellation (a parcel is dispatched only once paid);
    it gets the next version and its event like any change, and the order stays cancelled."""
    return _record(queue, order_id, status, late=True)


def live(queue: Queue, order_id: str, life: tuple[str, ...]) -> list[StatusChange]:
    """Send an order's ``life`` (the statuses after ``placed``), one change after the other:
    each status after a cancellation is a fact reported after it
    (:func:`report_after_cancel`)."""
    if not isinstance(life, tuple):
        raise InvalidInput("life", life, "a tuple of statuses, such as ('paid', 'shipped')")
    return [_record(queue, order_id, status, late=CANCELLED in life[:i])
            for i, status in enumerate(life)]


# -- the projection -------------------------------------------------------------------------------

LAST_WRITE_WINS = (
    "INSERT INTO order_status (order_id, status, version, updated_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (order_id) DO UPDATE SET status = excluded.status,"
    " version = excluded.version, updated_at = excluded.updated_at")
# The fix: the same UPSERT, applied only when the event is newer than the row.
NEWER_WINS = LAST_WRITE_WINS + " WHERE excluded.version > order_status.version"


def _status_of(delivery: Delivery) -> tuple[str, str, int]:
    p = delivery.payload
    status: Any
    version: Any
    if delivery.type == "OrderPlaced":
        order_id, status, version = p.get("orderId"), "placed", 1
    elif delivery.type == STATUS_EVENT:
        order_id, status, version = p.get("orderId"), p.get("status"), p.get("version")
    else:
        raise PoisonMessage(f"unknown event type {delivery.type!r}")
    if not isinstance(order_id, str) or status not in TRANSITIONS or not isinstance(
            version, int) or isinstance(version, bool) or version < 1:
        raise PoisonMessage(f"payload needs orderId, a status and a version >= 1, got {p!r}")
    return order_id, status, version


def status_handler(*, versioned: bool, clock: Clock) -> Handler:
    """A handler for both event types: ``OrderPlaced`` reserves (the engine's UPSERT) and
    sets ``placed``; ``OrderStatusChanged`` sets its status. ``versioned=False`` writes
    whatever arrives (last write wins); ``versioned=True`` only what is newer."""
    if not isinstance(versioned, bool):
        raise InvalidInput("versioned", versioned, "True or False")
    sql = NEWER_WINS if versioned else LAST_WRITE_WINS

    def handle(conn: Store, delivery: Delivery) -> None:
        order_id, status, version = _status_of(delivery)
        if delivery.type == "OrderPlaced":
            apply_order_placed(conn, delivery)
        conn.execute(sql, (order_id, status, version, clock.now()))

    return handle


# -- the check ------------------------------------------------------------------------------------

_STATUS_SQL = f"""
    WITH latest AS (
        SELECT c.order_id, c.status, c.version FROM order_status_changes AS c
         WHERE c.version = (SELECT version FROM order_status_changes
                             WHERE order_id = c.order_id {_STANDS}))
    SELECT o.order_id, coalesce(l.status, 'placed'), coalesce(l.version, 1), p.status, p.version
      FROM orders AS o
      LEFT JOIN latest AS l USING (order_id)
      LEFT JOIN order_status AS p USING (order_id)
     ORDER BY o.created_at, o.order_id
"""
STATUS_COLUMNS = ["order_id", "truth", "truth_version", "projection", "projection_version"]


@dataclass(frozen=True, slots=True)
class StatusCheck:
    orders: int
    correct: int
    wrong: int  # the projection holds another status than the truth
    missing: int  # no status yet (its events still queued, or lost)

    @property
    def ok(self) -> bool:
        return self.correct == self.orders

    @property
    def verdict(self) -> str:
        if self.ok:
            return f"OK: all {self.orders} order statuses match the truth"
        parts = [f"{self.wrong} wrong"] if self.wrong else []
        if self.missing:
            parts.append(f"{self.missing} missing")
        return f"BROKEN: {', '.join(parts)} of {self.orders} order statuses"


def status_rows(conn: Store) -> list[tuple[str, str, int, str | None, int | None]]:
    """(order_id, truth, truth_version, projection, projection_version) per order. The
    truth is the order's cancellation if it has one, else its newest change."""
    return [tuple(r) for r in conn.execute(_STATUS_SQL)]


def status_check(conn: Store) -> StatusCheck:
    require_tables(conn, ["order_status_changes", "order_status"], "deliverylab.book.ordering.install")
    rows = status_rows(conn)
    missing = sum(1 for r in rows if r[3] is None)
    correct = sum(1 for r in rows if r[3] == r[1])
    return StatusCheck(orders=len(rows), correct=correct, wrong=len(rows) - correct - missing,
                       missing=missing)


def status_frame(conn: Store) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(status_rows(conn), columns=STATUS_COLUMNS)


# -- two workers at once, on one fake clock -------------------------------------------------------

class Overlap:
    """A worker's clock on which, while that worker works, another takes a step.

    The engine's worker sleeps its ``work_time`` between receiving a message and committing
    its effect. On this clock each such sleep runs ``step`` (another worker's whole step:
    receive, apply, ack) with probability ``rate``, drawn from a seeded RNG: two consumers
    holding messages at the same time, the second one finishing first, repeatably.
    """

    def __init__(self, clock: Clock, step: Callable[[], object], *, rate: float,
                 seed: int = 0) -> None:
        self.clock, self.step = clock, step
        self.rate = check_number("rate", rate, minimum=0, maximum=1)
        self.rng = random.Random(check_int("seed", seed))
        self.overlaps = 0

    def now(self) -> float:
        return self.clock.now()

    def sleep(self, seconds: float) -> None:
        self.clock.sleep(seconds)
        if seconds > 0 and self.rng.random() < self.rate:
            self.overlaps += 1
            self.step()

    def sleep_until(self, t: float) -> None:
        self.clock.sleep_until(t)


# Each order's life, drawn from the seed: (weight, the statuses after ``placed``).
LIVES = ((5, ("paid", "shipped")), (2, ("cancelled",)), (2, ("paid", "cancelled")),
         (1, ("paid",)))
# Lives in which another service reports a fact after the cancellation (see :func:`live`):
# the payment captured as the customer cancelled, the parcel dispatched before the warehouse
# heard of it.
LATE_LIVES = ((2, ("cancelled", "paid")), (3, ("paid", "cancelled", "shipped")))


@dataclass(frozen=True, slots=True)
class StatusRun:
    versioned: bool
    orders: int
    events: int
    overlaps: int
    correct: int
    wrong: int
    missing: int
    verdict: str  # the engine's checker, on the reservations

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


def status_lab(*, versioned: bool, seed: int = 0, mode: Mode | str = Mode.IDEMPOTENT,
               faults: Faults = NO_FAULTS, overlap: float = 0.0) -> tuple[Lab, Overlap]:
    """A lab whose consumer keeps the status projection: worker 1 on an :class:`Overlap`
    clock, worker 2 stepping while worker 1 works at rate ``overlap``."""
    lab = Lab(seed=seed, mode=mode)
    install(lab.store)
    handler = status_handler(versioned=versioned, clock=lab.clock)
    first = lab.workers[0]
    kw: dict[str, Any]  # the keyword arguments both workers share
    kw = {"broker": lab.broker, "mode": lab.mode, "faults": faults,
          "visibility_timeout": first.visibility_timeout, "work_time": first.work_time,
          "handler": handler}
    second = Worker(store=lab.store, clock=lab.clock, name="worker-2", **kw)
    clock = Overlap(lab.clock, second.step, rate=overlap, seed=seed)
    lab.workers = [Worker(store=lab.store, clock=clock, name="worker-1", **kw)]
    return lab, clock


def status_run(*, versioned: bool, orders: int = 30, seed: int = 0,
               mode: Mode | str = Mode.IDEMPOTENT, ack_fail: float = 0.0,
               process_error: float = 0.0, overlap: float = 0.0) -> StatusRun:
    """``orders`` orders, each living one of :data:`LIVES` (its events sent one after the
    other), consumed under the seeded faults and overlaps; the status check at the end."""
    check_int("orders", orders, minimum=0, maximum=100_000)
    faults = Faults(seed=seed, ack_fail=ack_fail, process_error=process_error)
    lab, clock = status_lab(versioned=versioned, seed=seed, mode=mode, faults=faults,
                            overlap=overlap)
    rng = random.Random(seed)
    weights = [w for w, _ in LIVES]
    events = 0
    for placed in lab.place_orders(orders):
        events += 1
        for status in rng.choices([life for _, life in LIVES], weights)[0]:
            change_status(lab.broker, placed.order_id, status)
            events += 1
    verdict = lab.run_until_idle().verdict
    result = status_check(lab.store)
    lab.close()
    return StatusRun(versioned=versioned, orders=orders, events=events,
                     overlaps=clock.overlaps, correct=result.correct, wrong=result.wrong,
                     missing=result.missing, verdict=verdict)


# The scenarios of the chapter's table: (name, mode, fault rates, overlap).
SCENARIOS: tuple[tuple[str, Mode, dict[str, float], float], ...] = (
    ("lost ACKs, no inbox", Mode.AT_LEAST_ONCE, {"ack_fail": 0.3}, 0.0),
    ("lost ACKs, inbox", Mode.IDEMPOTENT, {"ack_fail": 0.3}, 0.0),
    ("failed first attempts, inbox", Mode.IDEMPOTENT, {"process_error": 0.2}, 0.0),
    ("two workers at once, inbox", Mode.IDEMPOTENT, {}, 0.5),
)


def status_table(*, seeds: range | list[int], orders: int = 30) -> pd.DataFrame:
    """For each scenario, last write wins beside newer wins, summed over ``seeds``: orders
    whose final status is wrong, and runs in which the engine's checker (reservations) said
    OK."""
    import pandas as pd

    seeds = list(seeds)
    if not seeds:
        raise InvalidInput("seeds", seeds, "at least one seed")
    rows = []
    for name, mode, rates, overlap in SCENARIOS:
        for versioned in (False, True):
            runs = [status_run(versioned=versioned, orders=orders, seed=s, mode=mode,
                               overlap=overlap, **rates) for s in seeds]
            rows.append({"scenario": name,
                         "projection": "newer wins" if versioned else "last write wins",
                         "orders": sum(r.orders for r in runs),
                         "wrong_status": sum(r.wrong for r in runs),
                         "runs_checker_ok": sum(r.verdict.startswith("OK") for r in runs)})
    return pd.DataFrame(rows)


def status_log(conn: Store, order_id: str) -> pd.DataFrame:
    """The delivery log of one order, each row named by the status its event carries."""
    from .traceviews import log_frame

    check_text("order_id", order_id)
    names = dict(conn.execute("SELECT event_id, status || ' (v' || version || ')'"
                              " FROM order_status_changes WHERE order_id = ?", (order_id,)))
    for (event_id,) in conn.execute("SELECT event_id FROM orders WHERE order_id = ?",
                                    (order_id,)):
        names[event_id] = "placed (v1)"
    log = log_frame(conn, correlation_id=order_id)
    log.insert(3, "event", log.event_id.map(names))
    return log[["at", "worker", "event", "delivery_count", "outcome"]]
