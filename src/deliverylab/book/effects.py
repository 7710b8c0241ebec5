"""A side effect outside the database: a payment service that deduplicates by idempotency key.

The consumer's transaction covers the consumer's own tables and nothing else (chapter 2 sent
two emails for one order while the database stayed exactly right). A call to another system
cannot join that transaction, so a consumer that calls out can only repeat the call when a
message comes back. What makes the repeat harmless is on the *other* side: a service that
remembers the key of every request it executed and answers a repeat with the first result.

:class:`PaymentService` is such a service, the way Stripe's API behaves
(https://docs.stripe.com/api/idempotent_requests): it keeps, per key, the hash of the request
and the charge it made; the same key with the same request returns that charge and charges
nothing; the same key with a different request is refused. It runs on its own SQLite
database and its own connection, so its commits are its own: rolling back the consumer's
transaction does not take back a charge, exactly as with a real provider.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..brokers.base import Delivery
from ..engine.clock import Clock
from ..engine.errors import InvalidInput, OrderConflict, check_int, check_number, check_text
from ..engine.faults import NO_FAULTS, Faults
from ..engine.ids import Ids
from ..engine.store import Store, connect, transaction
from ..engine.worker import Handler, Mode, PoisonMessage, Worker, apply_order_placed
from .lab import Lab
from .tables import install_schema

if TYPE_CHECKING:
    import pandas as pd

UNIT_PRICE = 500  # cents per unit ordered: the amount a payment is for
MAX_KEY_LENGTH = 255  # Stripe's limit on an idempotency key

SCHEMA = """
CREATE TABLE IF NOT EXISTS payment_charges (
    charge_id       TEXT PRIMARY KEY,
    order_id        TEXT NOT NULL,
    amount          INTEGER NOT NULL CHECK (amount >= 1),
    idempotency_key TEXT,
    charged_at      REAL NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS payment_idempotency (
    idempotency_key TEXT PRIMARY KEY,
    request_hash    TEXT NOT NULL,
    charge_id       TEXT NOT NULL,
    created_at      REAL NOT NULL
) STRICT, WITHOUT ROWID;
"""


def install(conn: Store) -> None:
    """Create the service's two tables if they are not there yet (idempotent)."""
    install_schema(conn, SCHEMA)


@dataclass(frozen=True, slots=True)
class Charge:
    """The service's answer: the charge, and whether it is the replay of an earlier one."""

    charge_id: str
    order_id: str
    amount: int
    replayed: bool

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


def _request_hash(order_id: str, amount: int) -> str:
    body = json.dumps({"amount": amount, "order_id": order_id}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


class PaymentService:
    """A fake payment provider on its own SQLite database (in memory unless ``path`` says).

    Charge ids are random unless ``seed`` is given. ``calls`` counts the requests it received; the ``payment_charges`` table holds the charges
    it actually made. A request without a key is always executed.
    """

    def __init__(self, path: str | Path = ":memory:", *, clock: Clock,
                 seed: int | None = None) -> None:
        if seed is not None:
            check_int("seed", seed)
        self.conn = connect(path, must_exist=False)
        install(self.conn)
        self.clock = clock
        # Charge ids: random, or under a seed (for one reproducible run from an empty
        # database) a stream of its own, so a charge id never repeats the id of the event that
        # caused it when the lab has the same seed.
        self.ids = Ids(None if seed is None else int.from_bytes(
            hashlib.blake2b(f"payments:{seed}".encode(), digest_size=6).digest(), "big"))
        self.calls = 0

    def charge(self, *, order_id: str, amount: int,
               idempotency_key: str | None = None) -> Charge:
        """Charge ``amount`` cents for ``order_id``, once per ``idempotency_key``.

        The same key with the same order and amount returns the first charge (``replayed``)
        and charges nothing; with a different order or amount it raises
        :class:`~deliverylab.engine.errors.OrderConflict` and writes nothing.
        """
        check_text("order_id", order_id)
        check_int("amount", amount, minimum=1, maximum=10**9)
        if idempotency_key is not None:
            check_text("idempotency_key", idempotency_key, max_length=MAX_KEY_LENGTH)
        self.calls += 1
        digest = _request_hash(order_id, amount)
        now = self.clock.now()
        with transaction(self.conn):
            if idempotency_key is not None:
                first = self.conn.execute(
                    "SELECT k.request_hash, c.charge_id, c.order_id, c.amount"
                    " FROM payment_idempotency AS k JOIN payment_charges AS c USING (charge_id)"
                    " WHERE k.idempotency_key = ?", (idempotency_key,)).fetchone()
                if first is not None:
                    if first["request_hash"] != digest:
                        raise OrderConflict("idempotency_key", idempotency_key)
                    return Charge(first["charge_id"], first["order_id"], first["amount"],
                                  replayed=True)
            charge_id = self.ids.new("ch")
            self.conn.execute(
                "INSERT INTO payment_charges (charge_id, order_id, amount, idempotency_key,"
                " charged_at) VALUES (?, ?, ?, ?, ?)",
                (charge_id, order_id, amount, idempotency_key, now))
            if idempotency_key is not None:
                self.conn.execute(
                    "INSERT INTO payment_idempotency (idempotency_key, request_hash, charge_id,"
                    " created_at) VALUES (?, ?, ?, ?)", (idempotency_key, digest, charge_id, now))
        return Charge(charge_id, order_id, amount, replayed=False)

    def charge_count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM payment_charges").fetchone()[0]

    def charged_orders(self) -> dict[str, int]:
        """Order id → how many times it was charged."""
        return dict(self.conn.execute(
            "SELECT order_id, count(*) FROM payment_charges GROUP BY order_id"))

    def charges(self) -> pd.DataFrame:
        import pandas as pd

        rows = self.conn.execute(
            "SELECT charge_id, order_id, amount, idempotency_key, charged_at"
            " FROM payment_charges ORDER BY charged_at, rowid").fetchall()
        return pd.DataFrame([tuple(r) for r in rows],
                            columns=["charge_id", "order_id", "amount", "idempotency_key",
                                     "charged_at"])


# -- a consumer that calls the service from its handler -----------------------------------------

# The two halves of a lost call, as of a lost ACK: the request never reaches the service (it
# charges nothing), or the service charged and its answer never comes back. The caller sees
# the same timeout after either and cannot tell them apart.
LOST_REQUEST = "lost_request"  # the fault point: the request never reached the service
LOST_ANSWER = "lost_answer"  # the fault point: the service charged, its answer never arrived
TIMEOUT = "the payment service did not answer in time"


def charge_handler(service: PaymentService, *, keyed: bool, lost_answer: float = 0.0,
                   lost_request: float = 0.0, seed: int = 0,
                   attempts: list[str] | None = None) -> Handler:
    """A handler that charges the order, then reserves it (the engine's UPSERT).

    With ``keyed`` the event id goes to the service as the idempotency key. ``lost_request``
    is the rate at which the request is lost on its way (the service never hears it and
    charges nothing), ``lost_answer`` the rate at which the service's answer is lost after it
    charged. Either way the handler raises the same ``TimeoutError``, and the worker rolls its
    transaction back and retries the message. Whether a half is lost is a keyed hash of
    (seed, event, delivery), like every fault in the engine. ``attempts``, when given,
    collects the order id of every call the handler tried, lost requests included.
    """
    if not isinstance(service, PaymentService):
        raise InvalidInput("service", service, "a PaymentService")
    answer_rate = check_number("lost_answer", lost_answer, minimum=0, maximum=1)
    request_rate = check_number("lost_request", lost_request, minimum=0, maximum=1)
    if attempts is not None and not isinstance(attempts, list):
        raise InvalidInput("attempts", attempts, "a list, or None")
    faults = Faults(seed=seed)

    def lost(point: str, rate: float, delivery: Delivery) -> bool:
        return bool(rate) and faults.uniform(point, delivery.event_id,
                                             delivery.delivery_count) < rate

    def handle(conn: Store, delivery: Delivery) -> None:
        order_id, qty = delivery.payload.get("orderId"), delivery.payload.get("qty")
        if not isinstance(order_id, str) or not isinstance(qty, int) or isinstance(qty, bool):
            raise PoisonMessage(f"payload needs orderId and an integer qty, got {delivery.payload!r}")
        if attempts is not None:
            attempts.append(order_id)
        if lost(LOST_REQUEST, request_rate, delivery):
            raise TimeoutError(TIMEOUT)  # the service never heard it: nothing was charged
        service.charge(order_id=order_id, amount=qty * UNIT_PRICE,
                       idempotency_key=delivery.event_id if keyed else None)
        if lost(LOST_ANSWER, answer_rate, delivery):
            raise TimeoutError(TIMEOUT)  # the same words: the caller cannot tell the halves apart
        apply_order_placed(conn, delivery)

    return handle


def worker_for(lab: Lab, handler: Handler, *, faults: Faults = NO_FAULTS) -> Worker:
    """A worker like the lab's own (its mode, clock, queue and pace) with ``handler``."""
    if not isinstance(lab, Lab):
        raise InvalidInput("lab", lab, "a deliverylab.book.lab.Lab")
    first = lab.workers[0]
    return Worker(store=lab.store, clock=lab.clock, broker=lab.broker, mode=lab.mode,
                  faults=faults, visibility_timeout=first.visibility_timeout,
                  work_time=first.work_time, name=first.name, handler=handler)


@dataclass(frozen=True, slots=True)
class ChargeRun:
    mode: str
    keyed: bool
    orders: int
    attempts: int  # calls the handler tried, lost requests included
    calls: int  # requests the service received
    charges: int
    double_charged: int  # orders charged more than once
    verdict: str

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


def charge_run(mode: Mode | str, *, keyed: bool, orders: int = 20, seed: int = 0,
               ack_fail: float = 0.0, lost_answer: float = 0.0, lost_request: float = 0.0,
               max_receives: int = 10) -> ChargeRun:
    """``orders`` orders through one worker whose handler charges each, under the seeded
    faults: lost ACKs (the queue's), and lost requests and lost answers (the two halves of a
    call to the service that times out)."""
    if not isinstance(keyed, bool):
        raise InvalidInput("keyed", keyed, "True or False")
    check_int("orders", orders, minimum=0, maximum=100_000)
    lab = Lab(seed=seed, mode=mode, max_receives=max_receives)
    service = PaymentService(clock=lab.clock, seed=seed)
    tried: list[str] = []
    lab.workers = [worker_for(lab, charge_handler(service, keyed=keyed, lost_answer=lost_answer,
                                                  lost_request=lost_request, seed=seed,
                                                  attempts=tried),
                              faults=Faults(seed=seed, ack_fail=ack_fail))]
    lab.place_orders(orders)
    result = lab.run_until_idle()
    per_order = service.charged_orders()
    run = ChargeRun(mode=str(lab.mode), keyed=keyed, orders=orders, attempts=len(tried),
                    calls=service.calls,
                    charges=service.charge_count(),
                    double_charged=sum(1 for n in per_order.values() if n > 1),
                    verdict=result.verdict)
    service.conn.close()
    lab.close()
    return run


def charge_table(*, seeds: range | list[int], orders: int = 20, ack_fail: float = 0.3,
                 lost_answer: float = 0.3, lost_request: float = 0.3) -> pd.DataFrame:
    """Summed over ``seeds``: orders, calls tried, calls the service received and charges
    made, for each consumer (at-least-once, idempotent) and fault (lost ACKs, lost requests,
    lost answers), with and without a key."""
    import pandas as pd

    seeds = list(seeds)
    if not seeds:
        raise InvalidInput("seeds", seeds, "at least one seed")
    rows = []
    by_fault: list[tuple[str, dict[str, Any]]] = [("lost ACKs", {"ack_fail": ack_fail}),
                                                ("lost requests", {"lost_request": lost_request}),
                                                ("lost answers", {"lost_answer": lost_answer})]
    for fault, rates in by_fault:
        for mode in (Mode.AT_LEAST_ONCE, Mode.IDEMPOTENT):
            for keyed in (False, True):
                runs = [charge_run(mode, keyed=keyed, orders=orders, seed=s, **rates)
                        for s in seeds]
                rows.append({"fault": fault, "consumer": str(mode),
                             "key": "event id" if keyed else "none",
                             "orders": sum(r.orders for r in runs),
                             "attempts": sum(r.attempts for r in runs),
                             "calls": sum(r.calls for r in runs),
                             "charges": sum(r.charges for r in runs),
                             "double_charged": sum(r.double_charged for r in runs),
                             "runs_with_db_ok": sum(r.verdict.startswith("OK") for r in runs)})
    return pd.DataFrame(rows)
