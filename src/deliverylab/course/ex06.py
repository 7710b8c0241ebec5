"""Chapter 6's exercises: what an inbox does not cover.

A charge made once through an idempotency key, while the service's answers and the queue's
ACKs get lost; an order-status projection that must end in the right state whatever order
its events arrive in; and the nightly job that keeps the inbox (and the dead letters) from
growing for ever without letting a redriven message be applied twice.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..book import ordering
from ..book.effects import UNIT_PRICE, Charge, PaymentService
from ..brokers.base import Delivery
from ..engine import retention
from ..engine.clock import Clock
from ..engine.errors import InvalidInput, check_int, check_number
from ..engine.faults import Faults
from ..engine.worker import CONSUMER, Mode, Worker, apply_order_placed
from .crew import call, course_lab, course_workers, drain, errors_of
from .grader import CourseLab, Exercise, Trial, describe_faults, judge, order_trace, register

# -- 6.1 one charge per order --------------------------------------------------------------
CHARGE_FAULTS = dict(ack_fail=0.2, ack_answer_lost=0.1, crash_after_commit=0.1)
LOST_ANSWER = 0.2
LOST_REQUEST = 0.2
RACE = 0.3
CHARGE_ORDERS = 20


class LostAnswer(TimeoutError):
    """The call timed out: the service may or may not have charged."""


class FlakyPayments:
    """The payment service behind a network that loses requests and answers: ``charge``
    may never reach the real :class:`~deliverylab.effects.PaymentService` (nothing charged),
    or reach it and lose the answer (charged); the caller gets :class:`LostAnswer`, a
    ``TimeoutError``, either way. ``rate`` is the share of answers lost, ``request_rate`` of
    requests. ``find_charges(order_id)`` is the provider's ledger: the charges it made for
    that order. ``race(order_id)``, if given, runs once for some orders (``race_rate``)
    right after the caller's first call about that order: another worker holding a duplicate
    of the same event, charging at the same moment."""

    def __init__(self, service: PaymentService, *, seed: int, rate: float,
                 request_rate: float = 0.0, race: Callable[[str], Any] | None = None,
                 race_rate: float = 0.0) -> None:
        if not isinstance(service, PaymentService):
            raise InvalidInput("service", service, "a PaymentService")
        self.service, self.rate = service, check_number("rate", rate, minimum=0, maximum=1)
        self.request_rate = check_number("request_rate", request_rate, minimum=0, maximum=1)
        self.race_rate = check_number("race_rate", race_rate, minimum=0, maximum=1)
        self._race = race
        self._raced: set[str] = set()
        self._faults = Faults(seed=seed)
        self._calls: dict[str, int] = {}

    def _maybe_race(self, order_id: str) -> None:
        if self._race is None or order_id in self._raced:
            return
        self._raced.add(order_id)
        if self._faults.uniform("race", order_id) < self.race_rate:
            self._race(order_id)

    def find_charges(self, order_id: str) -> list[dict[str, Any]]:
        rows = [dict(r) for r in self.service.conn.execute(
            "SELECT charge_id, order_id, amount, idempotency_key FROM payment_charges"
            " WHERE order_id = ? ORDER BY rowid", (order_id,))]
        self._maybe_race(order_id)  # what it says may be stale by the time it is read
        return rows

    def charge(self, *, order_id: str, amount: int,
               idempotency_key: str | None = None) -> Charge:
        n = self._calls[order_id] = self._calls.get(order_id, 0) + 1
        self._maybe_race(order_id)
        if self._faults.uniform("lost_request", order_id, n) < self.request_rate:
            raise LostAnswer("the payment service did not answer in time")
        answer = self.service.charge(order_id=order_id, amount=amount,
                                     idempotency_key=idempotency_key)
        if self._faults.uniform("lost_answer", order_id, n) < self.rate:
            raise LostAnswer("the payment service did not answer in time")
        return answer


def charge_starter(service: Any, delivery: Delivery) -> None:
    """Charge the order in ``delivery.payload`` (its ``orderId`` and ``qty``) ``qty x 500``
    cents, exactly once, whatever gets lost: ``service.charge(order_id=…, amount=…,
    idempotency_key=…)`` returns the charge, or raises ``TimeoutError`` when the request or
    its answer was lost (you cannot tell which); ``service.find_charges(order_id)`` lists
    the charges the provider made for an order. Return only once the order is charged;
    raise to have the delivery retried."""


def charge_solution(service: Any, delivery: Delivery) -> None:
    order = delivery.payload
    amount = order["qty"] * 500
    # One key per event: the same on every delivery of it and in every worker, so the
    # provider charges it once and answers any repeat with the first charge.
    key = f"charge-{delivery.event_id}"
    try:
        service.charge(order_id=order["orderId"], amount=amount, idempotency_key=key)
    except TimeoutError:
        # Lost on the way there or on the way back: no way to tell, so do not guess. Fail
        # the delivery: the inbox row rolls back, the message comes back, and the retry,
        # with the same key, either charges or gets the first charge back. Swallowing it
        # would reserve an order that may never have been charged.
        raise


def charge_without_key(service: Any, delivery: Delivery) -> None:
    order = delivery.payload
    service.charge(order_id=order["orderId"], amount=order["qty"] * 500)


def charge_keyed_by_receipt(service: Any, delivery: Delivery) -> None:
    order = delivery.payload
    service.charge(order_id=order["orderId"], amount=order["qty"] * 500,
                   idempotency_key=delivery.receipt)


def charge_keyed_by_attempt(service: Any, delivery: Delivery) -> None:
    order = delivery.payload
    service.charge(order_id=order["orderId"], amount=order["qty"] * 500,
                   idempotency_key=f"{delivery.event_id}-{delivery.delivery_count}")


def charge_swallows_timeout(service: Any, delivery: Delivery) -> None:
    order = delivery.payload
    try:
        service.charge(order_id=order["orderId"], amount=order["qty"] * 500)
    except TimeoutError:
        pass  # it probably went through; a retry would charge twice


def charge_checks_the_ledger(service: Any, delivery: Delivery) -> None:
    order = delivery.payload
    if not service.find_charges(order["orderId"]):  # not charged yet: charge it
        service.charge(order_id=order["orderId"], amount=order["qty"] * 500)


def run_charge(charge: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **CHARGE_FAULTS)
    lab = course_lab(seed=seed, faults=faults, workers=2, max_receives=10)
    service = PaymentService(clock=lab.clock, seed=seed)
    holding: dict[str, Delivery] = {}

    def duplicate(order_id: str) -> None:
        """Another worker with a duplicate of the same event runs the same code now."""
        d = holding.get(order_id)
        if d is None:
            return
        twin = d._replace(receipt=f"{d.receipt}-twin", delivery_count=d.delivery_count + 1)
        try:
            charge(FlakyPayments(service, seed=seed, rate=0.0), twin)
        except Exception:  # noqa: BLE001, S110 - the twin's own failure is its worker's
            pass

    flaky = FlakyPayments(service, seed=seed, rate=LOST_ANSWER, request_rate=LOST_REQUEST,
                          race=duplicate, race_rate=RACE)

    def handle(conn: sqlite3.Connection, delivery: Delivery) -> None:
        # The idempotent consumer: the inbox row, the charge, the reservation, one transaction
        # (the charge itself is the service's own commit: a rollback here does not undo it).
        if conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                        " VALUES (?, ?, ?) ON CONFLICT (consumer, event_id) DO NOTHING",
                        (CONSUMER, delivery.event_id, lab.clock.now())).rowcount:
            holding[delivery.payload.get("orderId", "")] = delivery
            charge(flaky, delivery)
            apply_order_placed(conn, delivery)

    for w in course_workers(lab):
        w.effect_handler = handle
    lab.place_orders(CHARGE_ORDERS)
    drain(lab)
    where = describe_faults(faults, workers=2, orders=CHARGE_ORDERS,
                            extra=f"payment requests lost {LOST_REQUEST:g}, answers lost"
                                  f" {LOST_ANSWER:g}; a duplicate delivery charging at the"
                                  f" same moment for {RACE:.0%} of the orders")
    # A lost call is the network's fault, not the reader's: the worker retries it.
    errors = [e for e in errors_of(lab) if not e.startswith("LostAnswer")]
    base = judge(lab, seed=seed, faults=where, errors=errors)
    per_order = service.charged_orders()
    amounts = {o: q * UNIT_PRICE for o, q in lab.store.execute("SELECT order_id, qty FROM orders")}
    orders = [r[0] for r in lab.store.execute("SELECT order_id FROM orders"
                                             " ORDER BY created_at, order_id")]
    never = tuple(o for o in orders if per_order.get(o, 0) == 0)
    twice = tuple(o for o in orders if per_order.get(o, 0) > 1)
    wrong_amount = [(o, a) for o, a in service.conn.execute(
        "SELECT order_id, amount FROM payment_charges ORDER BY rowid") if amounts.get(o) != a]
    reasons = [base.reason] if base.reason else []
    if twice:
        extra = sum(per_order[o] - 1 for o in twice)
        reasons.append(f"{len(twice)} of {len(orders)} orders charged more than once ({extra}"
                       " extra charges): a retry or a duplicate reached the service as a new"
                       " request")
    if never:
        reasons.append(f"{len(never)} of {len(orders)} orders never charged, yet reserved:"
                       " a lost request was taken for a charge made")
    if wrong_amount:
        o, a = wrong_amount[0]
        reasons.append(f"{len(wrong_amount)} charges of the wrong amount: order {o} was"
                       f" charged {a}, its qty x {UNIT_PRICE} is {amounts.get(o)}")
    if not reasons:
        service.conn.close()
        return Trial(seed=seed, faults=where, passed=True, reason="")
    focus = (twice or never or base.duplicated or base.lost
             or tuple(o for o, _ in wrong_amount[:1]) or tuple(orders[:1]))[0]
    trace = "\n".join([order_trace(lab.store, focus), *_charge_lines(service, focus)])
    service.conn.close()
    return Trial(seed=seed, faults=where, passed=False, reason="; ".join(reasons),
                 lost=never or base.lost, duplicated=twice or base.duplicated, trace=trace)


def _charge_lines(service: PaymentService, order_id: str) -> list[str]:
    rows = service.conn.execute(
        "SELECT charge_id, amount, idempotency_key, charged_at FROM payment_charges"
        " WHERE order_id = ? ORDER BY rowid", (order_id,)).fetchall()
    lines = [f"Charges the payment service made for order {order_id}:"]
    lines += [f"  {at:8.3f}  {charge_id}  amount {amount}  key {key!r}"
              for charge_id, amount, key, at in rows]
    return lines if rows else [*lines, "  (none)"]


register(Exercise(
    id="charge-once", chapter=6, title="One charge per order, whatever gets lost",
    run=run_charge, solution=charge_solution, starter=charge_starter,
    params=("service", "delivery"),
    wrong=(("charged more than once", charge_without_key),
           ("charged more than once", charge_keyed_by_receipt),
           ("charged more than once", charge_keyed_by_attempt))))


# -- 6.2 a status projection where newer wins ----------------------------------------------
STATUS_ORDERS = 12
OVERLAP = 0.5
# The chapter's lives, and the lives in which a fact is reported after the cancellation.
STATUS_LIVES = ordering.LIVES + ordering.LATE_LIVES


def status_starter(conn: sqlite3.Connection, order_id: str, status: str, version: int,
                   now: float) -> None:
    """Keep in ``order_status (order_id, status, version, updated_at)`` the status of the
    order's *newest* change, whatever order the changes arrive in and however often each
    arrives, except that a cancellation stands: once an order is cancelled no other change
    replaces it, whatever its version (another service may still report a payment or a
    dispatch it made before it heard of the cancellation), and a cancellation replaces
    whatever is in place, even a newer version. ``version`` is an integer that grows with
    each change of an order (it runs past 9); ``now`` is the lab's time. Called inside the
    worker's transaction. For the audit, record once in ``status_stale (order_id, version,
    status, seen_at)`` (primary key ``(order_id, version)``) every change that arrived to
    find a change in place that beats it (a newer one, or the cancellation); a redelivery
    of the change in place is not stale."""


def status_solution(conn: sqlite3.Connection, order_id: str, status: str, version: int,
                    now: float) -> None:
    # Read the order's row inside the worker's transaction: nobody writes it in between.
    row = conn.execute("SELECT status, version FROM order_status WHERE order_id = ?",
                       (order_id,)).fetchone()
    if row is None:  # the first change seen for this order, whichever it is
        conn.execute("INSERT INTO order_status (order_id, status, version, updated_at)"
                     " VALUES (?, ?, ?, ?)", (order_id, status, version, now))
        return
    held, held_version = row
    if held_version == version:
        return  # the change in place, delivered again: nothing to do, nothing to record
    # Nothing replaces a cancellation, and a cancellation replaces anything; between other
    # changes the newer version wins (numbers, not text: 10 > 9).
    if held != "cancelled" and (status == "cancelled" or version > held_version):
        conn.execute("UPDATE order_status SET status = ?, version = ?, updated_at = ?"
                     " WHERE order_id = ?", (status, version, now, order_id))
    else:
        # It lost to the change in place, so the audit records that it came late. It may
        # come again (a redelivery): the primary key keeps one row, the first sighting.
        conn.execute("INSERT INTO status_stale (order_id, version, status, seen_at)"
                     " VALUES (?, ?, ?, ?) ON CONFLICT (order_id, version) DO NOTHING",
                     (order_id, version, status, now))


def status_upsert_where_newer(conn: sqlite3.Connection, order_id: str, status: str,
                              version: int, now: float) -> None:
    """Another correct design: one UPSERT whose update only a change that beats the row
    passes, and one INSERT that records the change as stale if, after it, another change is
    in place."""
    conn.execute(
        "INSERT INTO order_status (order_id, status, version, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (order_id) DO UPDATE SET status = excluded.status,"
        " version = excluded.version, updated_at = excluded.updated_at"
        " WHERE order_status.status <> 'cancelled'"
        " AND (excluded.status = 'cancelled' OR excluded.version > order_status.version)",
        (order_id, status, version, now))
    conn.execute("INSERT INTO status_stale (order_id, version, status, seen_at)"
                 " SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM order_status"
                 "  WHERE order_id = ? AND version <> ?) ON CONFLICT DO NOTHING",
                 (order_id, version, status, now, order_id, version))


def status_newer_wins_only(conn: sqlite3.Connection, order_id: str, status: str,
                           version: int, now: float) -> None:
    # Newer wins, and the audit is right for it: but a payment reported after the
    # cancellation is newer, so it wins and the cancelled order looks paid.
    row = conn.execute("SELECT version FROM order_status WHERE order_id = ?",
                       (order_id,)).fetchone()
    if row is None:
        conn.execute("INSERT INTO order_status (order_id, status, version, updated_at)"
                     " VALUES (?, ?, ?, ?)", (order_id, status, version, now))
    elif row[0] < version:
        conn.execute("UPDATE order_status SET status = ?, version = ?, updated_at = ?"
                     " WHERE order_id = ?", (status, version, now, order_id))
    elif row[0] > version:
        conn.execute("INSERT INTO status_stale (order_id, version, status, seen_at)"
                     " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                     (order_id, version, status, now))


def status_cancel_wins_if_newer(conn: sqlite3.Connection, order_id: str, status: str,
                                version: int, now: float) -> None:
    # Nothing replaces a cancellation: right. But the cancellation itself must be newer to
    # win, so one that arrives after the late dispatch leaves the order shipped.
    conn.execute(
        "INSERT INTO order_status (order_id, status, version, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (order_id) DO UPDATE SET status = excluded.status,"
        " version = excluded.version, updated_at = excluded.updated_at"
        " WHERE order_status.status <> 'cancelled' AND excluded.version > order_status.version",
        (order_id, status, version, now))
    conn.execute("INSERT INTO status_stale (order_id, version, status, seen_at)"
                 " SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM order_status"
                 "  WHERE order_id = ? AND version <> ?) ON CONFLICT DO NOTHING",
                 (order_id, version, status, now, order_id, version))


def status_stale_includes_redelivery(conn: sqlite3.Connection, order_id: str, status: str,
                                     version: int, now: float) -> None:
    row = conn.execute("SELECT status, version FROM order_status WHERE order_id = ?",
                       (order_id,)).fetchone()
    if row is None:
        conn.execute("INSERT INTO order_status (order_id, status, version, updated_at)"
                     " VALUES (?, ?, ?, ?)", (order_id, status, version, now))
    elif row[0] != "cancelled" and (status == "cancelled" or row[1] < version):
        conn.execute("UPDATE order_status SET status = ?, version = ?, updated_at = ?"
                     " WHERE order_id = ?", (status, version, now, order_id))
    else:  # "it did not win": but the change in place, delivered again, is no stale change
        conn.execute("INSERT INTO status_stale (order_id, version, status, seen_at)"
                     " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                     (order_id, version, status, now))


def status_last_write_wins(conn: sqlite3.Connection, order_id: str, status: str, version: int,
                           now: float) -> None:
    conn.execute(
        "INSERT INTO order_status (order_id, status, version, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (order_id) DO UPDATE SET status = excluded.status,"
        " version = excluded.version, updated_at = excluded.updated_at",
        (order_id, status, version, now))


def status_newer_by_arrival(conn: sqlite3.Connection, order_id: str, status: str,
                            version: int, now: float) -> None:
    conn.execute(
        "INSERT INTO order_status (order_id, status, version, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (order_id) DO UPDATE SET status = excluded.status,"
        " version = excluded.version, updated_at = excluded.updated_at"
        " WHERE excluded.updated_at >= order_status.updated_at",
        (order_id, status, version, now))


def status_compared_as_text(conn: sqlite3.Connection, order_id: str, status: str,
                            version: int, now: float) -> None:
    conn.execute(
        "INSERT INTO order_status (order_id, status, version, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (order_id) DO UPDATE SET status = excluded.status,"
        " version = excluded.version, updated_at = excluded.updated_at"
        " WHERE order_status.status <> 'cancelled' AND (excluded.status = 'cancelled'"
        "  OR CAST(excluded.version AS TEXT) > CAST(order_status.version AS TEXT))",
        (order_id, status, version, now))
    conn.execute("INSERT INTO status_stale (order_id, version, status, seen_at)"
                 " SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM order_status"
                 "  WHERE order_id = ? AND version <> ?) ON CONFLICT DO NOTHING",
                 (order_id, version, status, now, order_id, version))


def status_final_is_sticky(conn: sqlite3.Connection, order_id: str, status: str,
                           version: int, now: float) -> None:
    # "Shipped and cancelled are both final": but a cancellation that arrives after the
    # dispatch reported late must still replace it.
    conn.execute(
        "INSERT INTO order_status (order_id, status, version, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (order_id) DO UPDATE SET status = excluded.status,"
        " version = excluded.version, updated_at = excluded.updated_at"
        " WHERE order_status.status NOT IN ('shipped', 'cancelled')"
        " AND (excluded.status = 'cancelled' OR excluded.version > order_status.version)",
        (order_id, status, version, now))
    conn.execute("INSERT INTO status_stale (order_id, version, status, seen_at)"
                 " SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM order_status"
                 "  WHERE order_id = ? AND version <> ?) ON CONFLICT DO NOTHING",
                 (order_id, version, status, now, order_id, version))


VERSION_BASE = 8  # versions seen by the reader: 9 (placed), 10, 11…: text and numbers differ
STALE_SCHEMA = """
CREATE TABLE status_stale (order_id TEXT NOT NULL, version INTEGER NOT NULL,
                           status TEXT NOT NULL, seen_at REAL NOT NULL,
                           PRIMARY KEY (order_id, version));
CREATE TEMP TABLE stale_expected (order_id TEXT, version INTEGER, status TEXT,
                                  PRIMARY KEY (order_id, version));
CREATE TEMP TABLE status_held (order_id TEXT PRIMARY KEY, status TEXT, version INTEGER);
"""


def _rank(status: str, version: int) -> tuple[bool, int]:
    """The order in which changes beat each other: a cancellation beats every other change,
    and between the others the higher version wins. One change per version, so two changes
    of an order never tie."""
    return status == ordering.CANCELLED, version


def _note(conn: sqlite3.Connection, order_id: str, status: str, version: int) -> None:
    """The grader's own model of the projection, in the worker's transaction (it rolls back
    with it), written after the submission's call so that it cannot read the answer: the
    change in place per order, and every change that arrived and lost to it."""
    held = conn.execute("SELECT status, version FROM temp.status_held WHERE order_id = ?",
                        (order_id,)).fetchone()
    if held is None or _rank(status, version) > _rank(*held):
        conn.execute("INSERT OR REPLACE INTO temp.status_held VALUES (?, ?, ?)",
                     (order_id, status, version))
    elif _rank(status, version) < _rank(*held):
        conn.execute("INSERT OR IGNORE INTO temp.stale_expected VALUES (?, ?, ?)",
                     (order_id, version, status))


def _status_change(delivery: Delivery) -> tuple[str, str, int]:
    p = delivery.payload
    if delivery.type == "OrderPlaced":
        return p["orderId"], "placed", 1 + VERSION_BASE
    return p["orderId"], p["status"], p["version"] + VERSION_BASE


def _status_trace(conn: sqlite3.Connection, order_id: str) -> str:
    log = ordering.status_log(conn, order_id)
    lines = [f"Trace of order {order_id} (each delivery, named by the change it carries):",
             f"  {'t':>8}  {'worker':<9} {'event':<16} {'delivery':>8}  outcome"]
    for at, worker, event, count, outcome in log.itertuples(index=False):
        lines.append(f"  {at:8.3f}  {worker:<9} {event:<16} {count:>8}  {outcome}")
    return "\n".join(lines)


def run_status(apply_status: Callable[..., Any], seed: int) -> Trial:
    mode = Mode.IDEMPOTENT if seed % 2 == 0 else Mode.AT_LEAST_ONCE
    faults = Faults(seed=seed, ack_fail=0.3, process_error=0.2)
    lab = CourseLab(seed=seed, mode=mode)
    ordering.install(lab.store)
    lab.store.executescript(STALE_SCHEMA)
    errors: list[str] = []

    def handle(conn: sqlite3.Connection, delivery: Delivery) -> None:
        order_id, status, version = _status_change(delivery)
        if delivery.type == "OrderPlaced":
            apply_order_placed(conn, delivery)  # the reservation is the grader's part
        try:
            apply_status(conn, order_id, status, version, lab.clock.now())
        except Exception as exc:  # the reader's code: note it; the worker retries later
            text = f"{type(exc).__name__}: {exc} (order {order_id}, {status} v{version})"
            if not errors:
                errors.append(text)
            raise
        _note(conn, order_id, status, version)

    first = lab.workers[0]
    kw: dict[str, Any]  # the keyword arguments both workers share
    kw = {"broker": lab.broker, "mode": lab.mode, "faults": faults,
          "visibility_timeout": first.visibility_timeout, "work_time": first.work_time,
          "handler": handle}
    # Worker 2 takes a whole step while worker 1 works, on a seeded share of its steps.
    second = Worker(store=lab.store, clock=lab.clock, name="worker-2", **kw)
    lab.workers = [Worker(store=lab.store, name="worker-1", **kw,
                          clock=ordering.Overlap(lab.clock, second.step, rate=OVERLAP,
                                                 seed=seed))]
    rng = random.Random(seed)
    weights = [w for w, _ in STATUS_LIVES]
    for placed in lab.place_orders(STATUS_ORDERS):
        ordering.live(lab.broker, placed.order_id,
                      rng.choices([life for _, life in STATUS_LIVES], weights)[0])
    lab.run_until_idle()
    rows = ordering.status_rows(lab.store)
    wrong = [r for r in rows if r[3] is not None and r[3] != r[1]]
    missing = tuple(r[0] for r in rows if r[3] is None)
    where = describe_faults(faults, workers=2, orders=STATUS_ORDERS,
                            extra=f"an inbox on even seeds, none on odd ones (here {mode});"
                                  f" the second worker steps while the first works"
                                  f" {OVERLAP:.0%} of the time; versions from"
                                  f" {1 + VERSION_BASE}")
    reasons = [f"your code raised {e}" for e in errors]
    if wrong:
        o, truth, tv, proj, pv = wrong[0]
        why = (" (its cancellation stands, whatever comes after it)"
               if truth == ordering.CANCELLED and pv is not None and pv > tv + VERSION_BASE
               else "")
        reasons.append(f"{len(wrong)} of {len(rows)} orders end in the wrong status: order {o}"
                       f" is {truth} (v{tv + VERSION_BASE}) in the truth, {proj} (v{pv}) in"
                       f" your projection{why}")
    if missing:
        reasons.append(f"{len(missing)} of {len(rows)} orders have no status at all")
    expected = set(map(tuple, lab.store.execute(
        "SELECT order_id, version, status FROM stale_expected")))
    recorded = set(map(tuple, lab.store.execute(
        "SELECT order_id, version, status FROM status_stale")))
    unrecorded, extra = sorted(expected - recorded), sorted(recorded - expected)
    if unrecorded:
        o, v, st = unrecorded[0]
        reasons.append(f"{len(unrecorded)} stale changes not in status_stale: order {o}'s"
                       f" {st} (v{v}) arrived to find a change in place that beats it")
    if extra:
        o, v, st = extra[0]
        reasons.append(f"{len(extra)} changes recorded as stale that were not: order {o}'s"
                       f" {st} (v{v}) never arrived to find a change in place that beats it")
    focus_stale = (unrecorded or extra or [("",)])[0][0]
    if not reasons:
        return Trial(seed=seed, faults=where, passed=True, reason="")
    focus = wrong[0][0] if wrong else (missing or (focus_stale or rows[0][0],))[0]
    return Trial(seed=seed, faults=where, passed=False, reason="; ".join(reasons),
                 lost=missing, trace=_status_trace(lab.store, focus))


register(Exercise(
    id="newer-wins", chapter=6, title="An order status where the newer change wins",
    run=run_status, solution=status_solution, starter=status_starter,
    params=("conn", "order_id", "status", "version", "now"),
    wrong=(("wrong status", status_last_write_wins), ("wrong status", status_newer_by_arrival),
           ("wrong status", status_final_is_sticky),
           ("wrong status", status_compared_as_text),
           ("recorded as stale that were not", status_stale_includes_redelivery),
           ("its cancellation stands", status_newer_wins_only),
           ("wrong status", status_cancel_wins_if_newer))))


# -- 6.3 the nightly cleanup ---------------------------------------------------------------
DAY = retention.DAY
HOUR = 3600.0
DAYS = 6
ORDERS_PER_DAY = 8


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """What the queue and its operators promise: a lease of ``visibility_timeout`` seconds,
    at most ``max_receives`` deliveries with backoffs of at most ``backoff_cap`` seconds
    between them, and dead letters that may be redriven for ``redrive_window`` seconds."""

    visibility_timeout: float
    max_receives: int
    backoff_cap: float
    redrive_window: float

    def __post_init__(self) -> None:
        check_number("visibility_timeout", self.visibility_timeout, minimum=0)
        check_int("max_receives", self.max_receives, minimum=1)
        check_number("backoff_cap", self.backoff_cap, minimum=0)
        check_number("redrive_window", self.redrive_window, minimum=0)


def cleanup_solution(conn: sqlite3.Connection, clock: Clock, policy: QueuePolicy) -> None:
    horizon = retention.dedup_horizon(
        visibility_timeout=policy.visibility_timeout, max_receives=policy.max_receives,
        backoff_cap=policy.backoff_cap, redrive_window=policy.redrive_window)
    # Dead letters past the window go first: then no inbox row has to outlive the window.
    retention.expire_dead_letters(conn, older_than=policy.redrive_window, clock=clock)
    retention.prune_inbox(conn, older_than=horizon.total, horizon=horizon, clock=clock)


def cleanup_redelivery_only(conn: sqlite3.Connection, clock: Clock,
                            policy: QueuePolicy) -> None:
    horizon = retention.dedup_horizon(
        visibility_timeout=policy.visibility_timeout, max_receives=policy.max_receives,
        backoff_cap=policy.backoff_cap)
    retention.prune_inbox(conn, older_than=horizon.total, horizon=horizon, clock=clock)


def cleanup_keeps_dead_letters(conn: sqlite3.Connection, clock: Clock,
                               policy: QueuePolicy) -> None:
    horizon = retention.dedup_horizon(
        visibility_timeout=policy.visibility_timeout, max_receives=policy.max_receives,
        backoff_cap=policy.backoff_cap, redrive_window=policy.redrive_window)
    retention.prune_inbox(conn, older_than=horizon.total, horizon=horizon, clock=clock)


def cleanup_nothing(conn: sqlite3.Connection, clock: Clock, policy: QueuePolicy) -> None:
    pass  # keep everything: nothing can come back unrecognised


def _dead(conn: sqlite3.Connection) -> dict[str, tuple[str, float]]:
    return {m: (o, t) for m, o, t in conn.execute(
        "SELECT message_id, correlation_id, dead_at FROM dead_letters")}


def run_cleanup(nightly: Callable[..., Any], seed: int) -> Trial:
    rng = random.Random(seed)
    window = rng.choice((1, 2, 3)) * DAY
    receives = rng.choice((3, 4, 5))
    lease = rng.choice((2.0, 5.0, 30.0))
    faults = Faults(seed=seed, ack_fail=0.8)
    lab = CourseLab(seed=seed, faults=faults, max_receives=receives, visibility_timeout=lease)
    first = lab.workers[0]
    policy = QueuePolicy(visibility_timeout=first.visibility_timeout, max_receives=receives,
                         backoff_cap=first.backoff_cap, redrive_window=window)
    horizon = retention.horizon_of(first, redrive_window=window)
    healthy = Worker(store=lab.store, clock=lab.clock, broker=lab.broker,
                     name="worker-healthy", visibility_timeout=lease)
    redrive_days = (1, DAYS - 1)  # one redrive inside the window, one long after
    errors: list[str] = []
    failures: list[str] = []
    focus: list[str] = []
    for day in range(DAYS):
        lab.clock.sleep_until(day * DAY + HOUR)
        lab.place_orders(ORDERS_PER_DAY)
        lab.run_until_idle()
        if day in redrive_days:
            lab.clock.sleep_until(day * DAY + 12 * HOUR)
            lab.broker.redrive()  # the operator redrives whatever the dead letters hold
            healthy.run_until_idle()
        lab.clock.sleep_until(day * DAY + 22 * HOUR)
        now = lab.clock.now()
        before = _dead(lab.store)
        call(errors, nightly, lab.store, lab.clock, policy)
        after = _dead(lab.store)
        early = sorted((o, t) for m, (o, t) in before.items()
                       if m not in after and now - t <= window)
        if early and not failures:
            o, t = early[0]
            failures.append(f"{len(early)} dead letters deleted inside the {window / DAY:g}-day"
                            f" redrive window: order {o}'s was parked {(now - t) / HOUR:.0f} h"
                            " before, and an operator may still redrive it")
            focus.append(o)
        stale = lab.store.execute("SELECT count(*) FROM inbox_processed WHERE processed_at < ?",
                                 (now - horizon.total - DAY,)).fetchone()[0]
        if stale and not failures:
            focus.extend(r[0] for r in lab.store.execute(
                "SELECT o.order_id FROM inbox_processed AS i JOIN orders AS o USING (event_id)"
                " ORDER BY i.processed_at LIMIT 1"))
            failures.append(f"on night {day + 1} the inbox still holds {stale} rows more than a"
                            f" day past the dedup horizon of {horizon.total:g} s"
                            f" [{horizon.explain()}]: it grows for ever")
    where = (f"{describe_faults(faults, orders=DAYS * ORDERS_PER_DAY)}; {DAYS} days; the"
             f" operator redrives on days {redrive_days[0] + 1} and {redrive_days[1] + 1};"
             " lease, receives and redrive window drawn per seed (here"
             f" {lease:g} s, {receives}, {window / DAY:g} days)")
    return judge(lab, seed=seed, faults=where, errors=errors, extra_failures=failures,
                 focus=focus)


register(Exercise(
    id="inbox-cleanup", chapter=6, title="The nightly inbox cleanup",
    run=run_cleanup, solution=cleanup_solution, starter=cleanup_redelivery_only,
    params=("conn", "clock", "policy"),
    wrong=(("duplicated", cleanup_redelivery_only), ("duplicated", cleanup_keeps_dead_letters),
           ("grows for ever", cleanup_nothing))))
