"""The seed chapter's design, kept **wrong on purpose** for teaching. Never use it for real work.

Every function here reproduces one mistake of the original chapter's TypeScript lab, on the same
tables as the engine, so the checker (:mod:`deliverylab.engine.check`) can say what went wrong and a
chapter can put the naive version and the engine's fix side by side. Each docstring names the
bug and the engine function that fixes it.

==========================================  ===============================================
naive (here)                                the fix in the engine
==========================================  ===============================================
:func:`dual_write_place_order`              :func:`deliverylab.engine.orders.place_order` (outbox)
:func:`select_visible` + :func:`lease`      :meth:`deliverylab.brokers.sqlite.Queue.receive`
:func:`ack_by_id`                           :meth:`~deliverylab.brokers.sqlite.Queue.ack` (receipt)
:func:`add_reserved` (read, then write)     :func:`deliverylab.engine.worker.apply_order_placed`
:func:`try_mark_processed` (catch-all)      ``INSERT … ON CONFLICT DO NOTHING`` + row count
:func:`rebuild_projection`                  :func:`deliverylab.engine.reconcile.repair`
:class:`SeedWorker` (no redelivery limit)   :class:`deliverylab.engine.worker.Worker`
==========================================  ===============================================

The visibility-timeout pitfall needs no naive code: it is a setting (a lease shorter than the
work), shown with the engine's own verbs and fixed with :meth:`~deliverylab.brokers.sqlite.Queue.extend`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine.clock import Clock
from ..engine.errors import SimulatedCrash, check_int, check_number, check_text
from ..engine.faults import NO_FAULTS, Faults
from ..engine.ids import Ids
from ..engine.orders import EVENT_TYPE, request_hash
from ..engine.trace import Outcome, log, log_many
from ..engine.worker import CONSUMER, PoisonMessage

CRASH_BETWEEN_WRITES = "between_order_and_event"


@dataclass(frozen=True, slots=True)
class SeedMessage:
    """What the seed's ``receiveOne`` returned: a message, and no receipt."""

    message_id: str
    event_id: str
    type: str
    payload: dict[str, Any]
    correlation_id: str | None
    delivery_count: int  # as the seed saw it when it SELECTed the row

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SeedMessage:
        return cls(row["message_id"], row["event_id"], row["type"], json.loads(row["payload"]),
                   row["correlation_id"], row["delivery_count"])


# -- pitfall 1: the dual write ------------------------------------------------------------------

def dual_write_place_order(conn: sqlite3.Connection, *, clock: Clock, ids: Ids, item_id: str,
                           qty: int, order_id: str | None = None,
                           crash_between: bool = False) -> tuple[str, str]:
    """WRONG ON PURPOSE: the order row, then the event, as two separate writes.

    Each ``INSERT`` commits on its own (autocommit, as in the seed's API). With
    ``crash_between`` the process "dies" after the order committed and before the event was
    written: :class:`~deliverylab.engine.errors.SimulatedCrash` is raised and the event is gone for good
    — the order exists, nothing will ever tell the consumer about it, and a client retrying the
    same ``orderId`` only hits the primary key. Fixed by :func:`deliverylab.engine.orders.place_order`,
    which writes both rows in one transaction (the transactional outbox).
    Returns ``(order_id, event_id)``.
    """
    check_text("itemId", item_id)
    check_int("qty", qty, minimum=1)
    order_id = order_id if order_id is not None else ids.order_id()
    event_id = ids.event_id()
    now = clock.now()
    conn.execute(
        "INSERT INTO orders (order_id, item_id, qty, event_id, idempotency_key, request_hash,"
        " created_at) VALUES (?, ?, ?, ?, NULL, ?, ?)",
        (order_id, item_id, qty, event_id, request_hash(item_id, qty), now))
    if crash_between:
        raise SimulatedCrash(CRASH_BETWEEN_WRITES)
    conn.execute(
        "INSERT INTO queue_messages (message_id, event_id, type, payload, correlation_id,"
        " visible_at, delivery_count, created_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
        (ids.message_id(), event_id, EVENT_TYPE,
         json.dumps({"itemId": item_id, "orderId": order_id, "qty": qty}, sort_keys=True),
         order_id, now, now))
    return order_id, event_id


# -- pitfall 2: SELECT, then UPDATE -------------------------------------------------------------

def select_visible(conn: sqlite3.Connection, now: float) -> SeedMessage | None:
    """WRONG ON PURPOSE, step 1 of 2 of the seed's ``receiveOne``: find a visible message.

    Nothing is claimed yet: another worker running the same ``SELECT`` before our ``UPDATE``
    finds the same row. Fixed by :meth:`deliverylab.brokers.sqlite.Queue.receive`, one ``UPDATE … WHERE
    seq IN (SELECT … LIMIT n) RETURNING …`` statement.
    """
    row = conn.execute(
        "SELECT message_id, event_id, type, payload, correlation_id, delivery_count"
        "  FROM queue_messages"
        " WHERE visible_at <= ? AND (lease_until IS NULL OR lease_until <= ?)"
        " ORDER BY visible_at, seq LIMIT 1", (now, now)).fetchone()
    return None if row is None else SeedMessage.from_row(row)


def lease(conn: sqlite3.Connection, message: SeedMessage, *, now: float,
          visibility_timeout: float, worker: str = "seed-worker") -> SeedMessage:
    """WRONG ON PURPOSE, step 2 of 2: set the lease on the row found by :func:`select_visible`.

    The ``UPDATE`` matches the message id alone, so it succeeds even when another worker leased
    the row in between: both now hold it. Returns the message with its new delivery count.
    """
    check_number("visibility_timeout", visibility_timeout, minimum=0)
    conn.execute("UPDATE queue_messages SET lease_until = ?, delivery_count = delivery_count + 1"
                 " WHERE message_id = ?", (now + visibility_timeout, message.message_id))
    got = SeedMessage(message.message_id, message.event_id, message.type, message.payload,
                      message.correlation_id, message.delivery_count + 1)
    log(conn, at=now, worker=worker, event_id=got.event_id, correlation_id=got.correlation_id,
        message_id=got.message_id, delivery_count=got.delivery_count, outcome=Outcome.RECEIVED,
        detail=f"lease until {now + visibility_timeout:g} (naive: SELECT, then UPDATE)")
    return got


def receive_one(conn: sqlite3.Connection, *, now: float, visibility_timeout: float,
                worker: str = "seed-worker") -> SeedMessage | None:
    """WRONG ON PURPOSE: the seed's ``receiveOne``, :func:`select_visible` then :func:`lease`."""
    found = select_visible(conn, now)
    if found is None:
        return None
    return lease(conn, found, now=now, visibility_timeout=visibility_timeout, worker=worker)


# -- pitfall 3: ACK by message id ---------------------------------------------------------------

def ack_by_id(conn: sqlite3.Connection, message_id: str) -> bool:
    """WRONG ON PURPOSE: delete the message by its id, whoever holds it now.

    A worker whose lease ran out still "succeeds" and deletes the message another worker is
    processing. Fixed by :meth:`deliverylab.brokers.sqlite.Queue.ack`, which deletes only while the
    delivery's receipt is the current one, and says so when it is not: stricter than SQS, whose
    ``DeleteMessage`` with an old receipt handle succeeds and may not delete the message.
    """
    return conn.execute("DELETE FROM queue_messages WHERE message_id = ?",
                        (message_id,)).rowcount == 1


# -- pitfall 4: read, then write ----------------------------------------------------------------

def read_reserved(conn: sqlite3.Connection, item_id: str) -> int | None:
    """WRONG ON PURPOSE, step 1 of the seed's ``addReserved``: read the current value."""
    row = conn.execute("SELECT reserved_qty FROM inventory_projection WHERE item_id = ?",
                       (item_id,)).fetchone()
    return None if row is None else row[0]


def write_reserved(conn: sqlite3.Connection, item_id: str, seen: int | None, qty: int) -> None:
    """WRONG ON PURPOSE, step 2: write ``seen + qty`` — whatever changed since ``seen`` is lost.

    Fixed by :func:`deliverylab.engine.worker.apply_order_placed`: one UPSERT,
    ``reserved_qty = reserved_qty + excluded.reserved_qty``, computed inside the database.
    """
    if seen is None:
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty) VALUES (?, ?)",
                     (item_id, qty))
    else:
        conn.execute("UPDATE inventory_projection SET reserved_qty = ? WHERE item_id = ?",
                     (seen + qty, item_id))


def add_reserved(conn: sqlite3.Connection, item_id: str, qty: int) -> None:
    """WRONG ON PURPOSE: the seed's ``addReserved``, :func:`read_reserved` then
    :func:`write_reserved`."""
    write_reserved(conn, item_id, read_reserved(conn, item_id), qty)


# -- pitfall 5: every exception means "duplicate" -----------------------------------------------

def try_mark_processed(conn: sqlite3.Connection, event_id: str, *, now: float,
                       consumer: str = CONSUMER) -> bool:
    """WRONG ON PURPOSE: the seed's ``tryMarkProcessed``. True: first time; False: "duplicate".

    *Any* exception is read as "already processed": a locked database, a full disk or a broken
    trigger silently turns a new event into a skipped one, and the worker then ACKs it — lost.
    Even ``except sqlite3.IntegrityError`` would be too wide (a CHECK or NOT NULL failure is one
    too). The engine inserts with ``ON CONFLICT (consumer, event_id) DO NOTHING``, reads the row
    count (0 means duplicate) and lets every other error surface (see
    :class:`deliverylab.engine.worker.Worker`).
    """
    try:
        conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                     " VALUES (?, ?, ?)", (consumer, event_id, now))
        return True
    except Exception:  # the bug this module exists to show
        return False


# -- pitfall 6: rebuild while events are in flight ----------------------------------------------

def rebuild_projection(conn: sqlite3.Connection) -> int:
    """WRONG ON PURPOSE: the seed's ``reconcile.ts``. Empty the projection, SUM the orders.

    Events still in the queue are not marked processed, so when they arrive the consumer applies
    them on top of a projection that already counts them: a double count made by the repair.
    Fixed by :func:`deliverylab.reconcile.repair`, which also fences their events in the same
    transaction. Returns the number of projection rows written.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM inventory_projection")
        n = conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                         " SELECT item_id, sum(qty) FROM orders GROUP BY item_id").rowcount
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return n


# -- pitfall 7: the seed's worker loop, with no redelivery limit --------------------------------

def seed_apply(conn: sqlite3.Connection, message: SeedMessage) -> None:
    """The seed's effect: validate like the engine's handler, then :func:`add_reserved`."""
    if message.type != EVENT_TYPE:
        raise PoisonMessage(f"unknown event type {message.type!r}")
    item, qty = message.payload.get("itemId"), message.payload.get("qty")
    if not isinstance(item, str) or not item:
        raise PoisonMessage(f"payload itemId must be a non-empty string, got {item!r}")
    if not isinstance(qty, int) or isinstance(qty, bool) or qty < 1:
        raise PoisonMessage(f"payload qty must be an integer >= 1, got {qty!r}")
    add_reserved(conn, item, qty)


SeedHandler = Callable[[sqlite3.Connection, SeedMessage], None]


@dataclass
class SeedStats:
    steps: int = 0
    received: int = 0
    applied: int = 0
    duplicates_skipped: int = 0
    failed: int = 0
    acked: int = 0
    ack_failed: int = 0


class SeedWorker:
    """WRONG ON PURPOSE: the seed's worker loop, faithfully.

    ``receiveOne`` (SELECT, then UPDATE) → ``BEGIN`` → ``tryMarkProcessed`` (catch-all) →
    ``addReserved`` (read, then write) → ``COMMIT`` → ACK by message id, failing at the rate of
    ``faults.ack_fail``. A message whose processing fails is rolled back and simply waits for
    its lease to run out: **there is no redelivery limit**, so a poison message comes back
    forever. Fixed by :class:`deliverylab.engine.worker.Worker` (``max_receives``, then
    ``dead_letters``; nack with backoff). Rows go to ``delivery_log`` like the engine's, so the
    checker and the trace work on a seed run too.
    """

    def __init__(self, conn: sqlite3.Connection, *, clock: Clock, faults: Faults = NO_FAULTS,
                 visibility_timeout: float = 2.0, name: str = "seed-worker",
                 consumer: str = CONSUMER, handler: SeedHandler = seed_apply,
                 work_time: float = 0.0, echo: Callable[[str], None] | None = None) -> None:
        self.conn, self.clock, self.faults = conn, clock, faults
        self.visibility_timeout = check_number("visibility_timeout", visibility_timeout,
                                               minimum=0)
        self.name = check_text("name", name)
        self.consumer = check_text("consumer", consumer)
        self.handler, self.echo = handler, echo
        self.work_time = check_number("work_time", work_time, minimum=0)
        self.stats = SeedStats()
        self._pending: list[tuple[Any, ...]] = []

    def _log(self, m: SeedMessage, outcome: Outcome, detail: str = "") -> None:
        """A trace row. Only ``applied`` is written at once, inside the effect's transaction;
        the others wait for the worker's next write (the seed only printed them, and a log
        write must not change what the seed does when the database is locked)."""
        row = (self.clock.now(), self.name, m.correlation_id, m.event_id, m.message_id,
               m.delivery_count, outcome, detail)
        if outcome is Outcome.APPLIED:
            log_many(self.conn, [row])
        else:
            self._pending.append(row)

    def flush(self) -> None:
        """Write the trace rows held back by :meth:`_log`."""
        if self._pending:
            log_many(self.conn, self._pending)
            self._pending = []

    def _say(self, m: SeedMessage, words: str) -> None:
        if self.echo is not None:
            self.echo(f"[{self.name}] t={self.clock.now():.3f} event={m.event_id}"
                      f" delivery={m.delivery_count} {words}")

    def receive(self) -> SeedMessage | None:
        """The seed's ``receiveOne``: SELECT, then UPDATE (:func:`receive_one`)."""
        self.flush()
        m = receive_one(self.conn, now=self.clock.now(),
                        visibility_timeout=self.visibility_timeout, worker=self.name)
        if m is not None:
            self.stats.received += 1
            self._say(m, "received")
        return m

    def process(self, m: SeedMessage) -> bool | None:
        """``BEGIN`` → ``tryMarkProcessed`` → ``addReserved`` → ``COMMIT``. True: applied;
        False: skipped as a "duplicate"; None: failed and rolled back, to be redelivered when
        the lease runs out — however many times that takes."""
        self.conn.execute("BEGIN")  # deferred, as in the seed
        try:
            if try_mark_processed(self.conn, m.event_id, now=self.clock.now(),
                                  consumer=self.consumer):
                self.handler(self.conn, m)
                self._log(m, Outcome.APPLIED, "seed")
                first = True
            else:
                self._log(m, Outcome.DUPLICATE_SKIPPED, "seed: any inbox error counts as seen")
                first = False
            self.conn.execute("COMMIT")
        except Exception as exc:  # the seed's "will be redelivered", forever
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            self.stats.failed += 1
            self._say(m, f"processing failed, will be redelivered ({exc})")
            return None
        if first:
            self.stats.applied += 1
            self._say(m, "applied projection (first time)")
        else:
            self.stats.duplicates_skipped += 1
            self._say(m, "duplicate skipped")
        return first

    def ack(self, m: SeedMessage) -> bool:
        """The seed's ``ack``: lost at the rate of ``faults.ack_fail``, otherwise
        :func:`ack_by_id`. Any error is "ack failed → expect redelivery"."""
        try:
            if self.faults.fires("ack_fail", m.event_id, m.delivery_count):
                raise ConnectionError("ACK failed (simulated)")
            self.flush()
            ack_by_id(self.conn, m.message_id)
        except Exception as exc:  # as in the seed: every ACK error means "redelivery"
            self.stats.ack_failed += 1
            self._log(m, Outcome.ACK_FAILED, f"{type(exc).__name__}: {exc}")
            self._say(m, "ack failed → expect redelivery")
            return False
        self.stats.acked += 1
        self._log(m, Outcome.ACKED, "by message id, no receipt")
        self.flush()
        self._say(m, "acked")
        return True

    def step(self) -> int:
        """One turn of the seed's ``while (true)`` loop. Returns 1 if a message was received."""
        self.stats.steps += 1
        m = self.receive()
        if m is None:
            return 0
        self.clock.sleep(self.work_time)
        if self.process(m) is not None:
            self.ack(m)
        return 1

    def next_lease_end(self) -> float | None:
        """When the earliest leased message becomes visible again (None: nothing leased)."""
        return self.conn.execute("SELECT min(lease_until) FROM queue_messages"
                                 " WHERE lease_until > ?", (self.clock.now(),)).fetchone()[0]

    def run(self, max_steps: int) -> SeedStats:
        """Step ``max_steps`` times, jumping the clock to the next lease expiry when nothing is
        visible. Unlike the engine there is no "until idle": a poison message never leaves."""
        check_int("max_steps", max_steps, minimum=1)
        for _ in range(max_steps):
            if self.step() == 0:
                nxt = self.next_lease_end()
                if nxt is None:
                    break
                self.clock.sleep_until(nxt)
        self.flush()
        return self.stats
