"""An outbound outbox: the payment request commits with the consumer's effect; a relay sends it.

Calling the payment service from the handler ties the call to the consumer's transaction in
the worst way: the call happens whether or not the transaction then commits. Here the handler
only *writes down* the request, a row in ``payment_outbox``, in the same transaction as the
inbox row and the reservation: the request exists if and only if the order took effect. A
separate step, :func:`relay`, reads the pending rows, calls the service, and marks each row
sent. It is the producer-side outbox of chapter 3 turned outward (Chris Richardson's
"transactional outbox" with a "polling publisher").

The relay is at-least-once in its turn: it can die after the service charged and before the
row is marked, and the next pass sends the row again. With the row's key (the event id) sent
as the idempotency key, the service answers the repeat with the first charge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..brokers.base import Delivery
from ..engine.clock import Clock
from ..engine.errors import InvalidInput, check_int, check_number
from ..engine.faults import Faults
from ..engine.store import Store, transaction
from ..engine.worker import Handler, Mode, PoisonMessage, apply_order_placed
from .effects import UNIT_PRICE, PaymentService, worker_for
from .lab import Lab
from .tables import install_schema, require_tables

if TYPE_CHECKING:
    import pandas as pd

SCHEMA = """
CREATE TABLE IF NOT EXISTS payment_outbox (
    request_key TEXT PRIMARY KEY,
    order_id    TEXT NOT NULL,
    amount      INTEGER NOT NULL CHECK (amount >= 1),
    created_at  REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    sent_at     REAL,
    charge_id   TEXT
) STRICT, WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS payment_outbox_pending ON payment_outbox (created_at)
    WHERE sent_at IS NULL;
"""

RELAY_CRASH = "relay_crash"  # the fault point: the relay dies after the call, before the mark


def install(conn: Store) -> None:
    """Create ``payment_outbox`` in the consumer's database if it is not there (idempotent)."""
    install_schema(conn, SCHEMA)


def outbox_handler(*, clock: Clock) -> Handler:
    """A handler that reserves the order and writes its payment request to ``payment_outbox``,
    both inside the worker's transaction. The request's key is the event id, so a second
    delivery of the same event (without an inbox) cannot add a second request."""

    def handle(conn: Store, delivery: Delivery) -> None:
        order_id, qty = delivery.payload.get("orderId"), delivery.payload.get("qty")
        if not isinstance(order_id, str) or not isinstance(qty, int) or isinstance(qty, bool):
            raise PoisonMessage(f"payload needs orderId and an integer qty, got {delivery.payload!r}")
        apply_order_placed(conn, delivery)
        conn.execute(
            "INSERT INTO payment_outbox (request_key, order_id, amount, created_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (request_key) DO NOTHING",
            (delivery.event_id, order_id, qty * UNIT_PRICE, clock.now()))

    return handle


@dataclass(frozen=True, slots=True)
class RelayPass:
    sent: int  # rows sent and marked
    crashed: bool  # the pass died between a call and its mark


def relay(conn: Store, service: PaymentService, *, clock: Clock,
          keyed: bool = True, crash_rate: float = 0.0, seed: int = 0,
          limit: int = 100) -> RelayPass:
    """One pass of the relay over up to ``limit`` pending rows, oldest first.

    For each row: count the attempt (its own commit, so the crash schedule and an operator
    both see it), call the service, then mark the row sent. With ``crash_rate`` the relay dies
    between the call and the mark, at a keyed hash of (seed, row, attempt): the pass stops
    there and the row is still pending. With ``keyed`` the row's key is the idempotency key.
    """
    if not isinstance(service, PaymentService):
        raise InvalidInput("service", service, "a PaymentService")
    if not isinstance(keyed, bool):
        raise InvalidInput("keyed", keyed, "True or False")
    rate = check_number("crash_rate", crash_rate, minimum=0, maximum=1)
    check_int("limit", limit, minimum=1, maximum=10_000)
    require_tables(conn, ["payment_outbox"], "deliverylab.book.payment_outbox.install")
    faults = Faults(seed=seed)
    rows = conn.execute(
        "SELECT request_key, order_id, amount FROM payment_outbox WHERE sent_at IS NULL"
        " ORDER BY created_at, request_key LIMIT ?", (limit,)).fetchall()
    sent = 0
    for key, order_id, amount in rows:
        with transaction(conn):
            attempt = conn.execute(
                "UPDATE payment_outbox SET attempts = attempts + 1 WHERE request_key = ?"
                " RETURNING attempts", (key,)).fetchone()[0]
        charge = service.charge(order_id=order_id, amount=amount,
                                idempotency_key=key if keyed else None)
        if rate and faults.uniform(RELAY_CRASH, key, attempt) < rate:
            return RelayPass(sent, crashed=True)
        with transaction(conn):
            conn.execute("UPDATE payment_outbox SET sent_at = ?, charge_id = ?"
                         " WHERE request_key = ? AND sent_at IS NULL",
                         (clock.now(), charge.charge_id, key))
        sent += 1
    return RelayPass(sent, crashed=False)


def pending(conn: Store) -> int:
    return conn.execute(
        "SELECT count(*) FROM payment_outbox WHERE sent_at IS NULL").fetchone()[0]


def outbox_frame(conn: Store) -> pd.DataFrame:
    import pandas as pd

    rows = conn.execute("SELECT request_key, order_id, amount, attempts, sent_at, charge_id"
                        " FROM payment_outbox ORDER BY created_at, request_key").fetchall()
    return pd.DataFrame([tuple(r) for r in rows],
                        columns=["request_key", "order_id", "amount", "attempts", "sent_at",
                                 "charge_id"])


@dataclass(frozen=True, slots=True)
class OutboxRun:
    keyed: bool
    orders: int
    relay_passes: int
    relay_crashes: int
    calls: int
    charges: int
    double_charged: int
    verdict: str

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


def outbox_run(*, keyed: bool, orders: int = 20, seed: int = 0, ack_fail: float = 0.3,
               relay_crash: float = 0.3, max_passes: int = 10_000) -> OutboxRun:
    """``orders`` orders through an idempotent consumer that writes payment requests to the
    outbox (its ACKs lost at ``ack_fail``), then relay passes until nothing is pending, each
    pass dying between a call and its mark at ``relay_crash``."""
    check_int("orders", orders, minimum=0, maximum=100_000)
    check_int("max_passes", max_passes, minimum=1)
    lab = Lab(seed=seed, mode=Mode.IDEMPOTENT)
    install(lab.store)
    service = PaymentService(clock=lab.clock, seed=seed)
    lab.workers = [worker_for(lab, outbox_handler(clock=lab.clock),
                              faults=Faults(seed=seed, ack_fail=ack_fail))]
    lab.place_orders(orders)
    verdict = lab.run_until_idle().verdict
    passes = crashes = 0
    while pending(lab.store) and passes < max_passes:
        passes += 1
        crashes += relay(lab.store, service, clock=lab.clock, keyed=keyed,
                         crash_rate=relay_crash, seed=seed).crashed
        lab.clock.advance(1.0)  # the relay runs again a second later
    per_order = service.charged_orders()
    run = OutboxRun(keyed=keyed, orders=orders, relay_passes=passes, relay_crashes=crashes,
                    calls=service.calls, charges=service.charge_count(),
                    double_charged=sum(1 for n in per_order.values() if n > 1),
                    verdict=verdict)
    service.conn.close()
    lab.close()
    return run


def outbox_table(*, seeds: range | list[int], orders: int = 20, ack_fail: float = 0.3,
                 relay_crash: float = 0.3) -> pd.DataFrame:
    """:func:`outbox_run` without and with the key, summed over ``seeds``."""
    import pandas as pd

    seeds = list(seeds)
    if not seeds:
        raise InvalidInput("seeds", seeds, "at least one seed")
    rows = []
    for keyed in (False, True):
        runs = [outbox_run(keyed=keyed, orders=orders, seed=s, ack_fail=ack_fail,
                           relay_crash=relay_crash) for s in seeds]
        rows.append({"key": "event id" if keyed else "none",
                     "orders": sum(r.orders for r in runs),
                     "relay_crashes": sum(r.relay_crashes for r in runs),
                     "calls": sum(r.calls for r in runs),
                     "charges": sum(r.charges for r in runs),
                     "double_charged": sum(r.double_charged for r in runs),
                     "runs_with_db_ok": sum(r.verdict.startswith("OK") for r in runs)})
    return pd.DataFrame(rows)
