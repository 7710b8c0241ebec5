"""The worker: receive, apply the effect, acknowledge — in one of four orders.

=================  ===========================================  ==============================
mode               order of work                                what a fault does
=================  ===========================================  ==============================
at-most-once       ack, then apply                              a crash after the ack loses it
at-least-once      apply, then ack; no inbox                    a lost ack applies it twice
idempotent         inbox row + effect in one transaction, ack   a duplicate is skipped, acked
transactional      effect + ack in one transaction              exactly once, inside one DB
=================  ===========================================  ==============================

Every mode runs the same code path otherwise, with the same fault schedule (see ``faults``).
The projection update is one UPSERT, never read-then-write. An inbox conflict means "already
processed"; any other database error propagates.

A worker runs over a broker (where messages wait, :mod:`deliverylab.brokers`) and a store
(the consumer's own database: orders, inbox, projection, fence, trace). On the lab's single
SQLite file they are one connection; the broker may also be another database, in which case
``transactional`` is refused (its ACK would be a write in another system, which cannot commit
in the effect's transaction) and the worker writes the trace rows of the broker's verbs into
the store itself, right after each verb.

A broker that cannot be reached for a while (a server restarting, a cluster electing a leader)
raises ``BrokerUnavailable``; the worker backs off and tries again, as it does for a SQLite
write lock, and never exits for it. A step cut short leaves its leases to run out. An ack that
raised may still have reached the broker, or not: the effect has committed, so the message
may come back, and is then skipped by the inbox (idempotent) or applied again (at-least-once:
that mode's duplicate).

Every mode also honours the reconcile fence: inside the effect's own transaction, an event a
repair has already counted (a row in ``reconciled_events``) is not applied again; the delivery
is logged as ``fenced`` and acknowledged as usual (see :mod:`deliverylab.engine.reconcile`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TypeVar

from .broker import NO_MESSAGE_ID, Broker, Delivery
from .clock import Clock
from .errors import (
    STORE_ERRORS,
    BrokerUnavailable,
    InvalidInput,
    SimulatedCrash,
    StoreUnavailable,
    check_id,
    check_int,
    check_number,
)
from .faults import NO_FAULTS, Faults
from .ids import Ids
from .store import Store, is_busy, is_store, transaction
from .trace import Outcome, lease_detail, log_delivery, log_many

CONSUMER = "inventory"


class Mode(StrEnum):
    AT_MOST_ONCE = "at-most-once"
    AT_LEAST_ONCE = "at-least-once"
    IDEMPOTENT = "idempotent"
    TRANSACTIONAL = "transactional"

    @classmethod
    def parse(cls, value: object) -> Mode:
        if isinstance(value, cls):
            return value
        for mode in cls:
            if value == mode.value:
                return mode
        raise InvalidInput("mode", value, "one of " + ", ".join(m.value for m in cls))


class PoisonMessage(ValueError):
    """The message can never be processed as it is (unknown type, bad payload)."""


_RESERVE = ("INSERT INTO inventory_projection (item_id, reserved_qty) VALUES (?, ?)"
            " ON CONFLICT (item_id) DO UPDATE"
            " SET reserved_qty = inventory_projection.reserved_qty + excluded.reserved_qty")


def _reservation(delivery: Delivery) -> tuple[str, int]:
    if delivery.type != "OrderPlaced":
        raise PoisonMessage(f"unknown event type {delivery.type!r}")
    item, qty = delivery.payload.get("itemId"), delivery.payload.get("qty")
    if not isinstance(item, str) or not item:
        raise PoisonMessage(f"payload itemId must be a non-empty string, got {item!r}")
    if not isinstance(qty, int) or isinstance(qty, bool) or qty < 1:
        raise PoisonMessage(f"payload qty must be an integer >= 1, got {qty!r}")
    return item, qty


def apply_order_placed(conn: Store, delivery: Delivery) -> None:
    """The effect: reserve the order's quantity in ``inventory_projection`` with one UPSERT."""
    conn.execute(_RESERVE, _reservation(delivery))


def apply_order_placed_many(conn: Store, deliveries: list[Delivery]) -> None:
    """The same effect for a batch: check every delivery first, then one UPSERT per item."""
    totals: dict[str, int] = {}
    for d in deliveries:
        item, qty = _reservation(d)
        totals[item] = totals.get(item, 0) + qty
    conn.executemany(_RESERVE, totals.items())


# The fence, read inside the effect's transaction (so after any repair that committed first).
_FENCED = "SELECT 1 FROM reconciled_events WHERE consumer = ? AND event_id = ?"
_FENCED_MANY = ("SELECT event_id FROM reconciled_events WHERE consumer = ?"
                " AND event_id IN (SELECT value FROM json_each(?))")
# The idempotent consumer's inbox row, written only for an event no repair has fenced: the
# fence costs no extra statement on its hot path. No row written: a duplicate, or fenced.
_INBOX_ONE = ("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
              " SELECT ?1, ?2, ?3 WHERE NOT EXISTS (SELECT 1 FROM reconciled_events"
              " WHERE consumer = ?1 AND event_id = ?2)"
              " ON CONFLICT (consumer, event_id) DO NOTHING")
FENCED_DETAIL = "counted by reconcile"

Handler = Callable[[Store, Delivery], None]
BatchHandler = Callable[[Store, list[Delivery]], None]
# Handlers with a batch form: the worker's fast path applies a whole batch in a few statements.
BATCH_FORMS: dict[Handler, BatchHandler] = {apply_order_placed: apply_order_placed_many}


@dataclass
class WorkerStats:
    steps: int = 0
    received: int = 0
    applied: int = 0
    duplicates_skipped: int = 0
    acked: int = 0
    ack_failed: int = 0
    ack_rejected: int = 0
    crashed: int = 0
    lost: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    fenced: int = 0
    lock_waits: int = 0  # times the write lock stayed taken past the busy timeout
    broker_waits: int = 0  # times the broker could not be reached (BrokerUnavailable)
    store_waits: int = 0  # times the store's database could not be reached (StoreUnavailable)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Worker:
    """One consumer: it receives from ``broker`` and applies to ``store``. ``echo`` receives one
    human-readable line per step.

    ``Worker(store=…, broker=…, clock=…)`` names both (``conn=`` and ``queue=`` are the older
    names). The engine opens no broker itself: the lab's is the SQLite queue table on the
    store's own connection (``SQLiteBroker(conn, clock=…, ids=…)``), which the caller builds.
    ``ids`` is accepted for older callers and unused (the broker has its own); so is
    ``max_receives``, which must then be the broker's.
    """

    def __init__(self, conn: Store | None = None, *, clock: Clock,
                 ids: Ids | None = None,
                 mode: Mode | str = Mode.IDEMPOTENT, faults: Faults = NO_FAULTS,
                 visibility_timeout: float = 2.0, max_messages: int = 1,
                 max_receives: int | None = None, backoff_base: float = 0.1, backoff_cap: float = 10.0,
                 name: str = "worker-1", consumer: str = CONSUMER,
                 handler: Handler = apply_order_placed,
                 echo: Callable[[str], None] | None = None, crash_exits: bool = False,
                 work_time: float = 0.0, queue: Broker | None = None,
                 broker: Broker | None = None,
                 store: Store | None = None) -> None:
        store = _one_of("store", store, "conn", conn)
        broker = _one_of("broker", broker, "queue", queue)
        if not is_store(store):
            raise InvalidInput("store", store, "a store connection (deliverylab.engine.store,"
                                               " or engine.store_postgres)")
        if not isinstance(broker, Broker):
            raise InvalidInput("broker", broker, "a deliverylab.engine.broker.Broker (the"
                               " engine opens none: the lab's is SQLiteBroker(conn, clock=…,"
                               " ids=…) on the store's connection)")
        if max_receives is not None and max_receives != broker.max_receives:
            raise InvalidInput("max_receives", max_receives,
                               f"the broker's own ({broker.max_receives}), or left out: the"
                               f" broker counts the receives")
        self.mode = Mode.parse(mode)
        joined = broker.joins(store)
        if not joined:
            refuse_apart(self.mode)
        if not isinstance(faults, Faults):
            raise InvalidInput("faults", faults, "a deliverylab.engine.faults.Faults")
        self.visibility_timeout = check_number("visibility_timeout", visibility_timeout,
                                               minimum=0, maximum=12 * 3600)
        self.max_messages = check_int("max_messages", max_messages, minimum=1, maximum=1000)
        self.backoff_base = check_number("backoff_base", backoff_base, minimum=0)
        self.backoff_cap = check_number("backoff_cap", backoff_cap, minimum=self.backoff_base)
        self.name = check_id("name", name)
        self.consumer = check_id("consumer", consumer)
        self.conn, self.clock, self.faults = store, clock, faults
        self.queue = broker
        # Who writes the trace rows of the broker's verbs: the broker, inside each verb's
        # transaction on the store; or this worker, into the store right after the verb.
        self._trace_verbs = not (joined and broker.writes_trace)
        self.handler, self.echo, self.crash_exits = handler, echo, crash_exits
        self._handle_many = BATCH_FORMS.get(handler)
        # How long processing takes, on the clock: a lease shorter than this runs out while
        # the worker is still busy (the brief's "visibility timeout shorter than processing").
        self.work_time = check_number("work_time", work_time, minimum=0)
        self.stats = WorkerStats()
        self._stopping = False
        self._lock_streak = 0  # lock waits in a row: the exponent of the next backoff
        self._broker_streak = 0  # broker waits in a row: the same, for the broker
        self._store_streak = 0  # store waits in a row: the same, for the store's database

    @property
    def broker(self) -> Broker:
        return self.queue

    @property
    def store(self) -> Store:
        return self.conn

    # -- output ----------------------------------------------------------------------------
    def _say(self, d: Delivery, words: str) -> None:
        if self.echo is not None:
            self.echo(f"[{self.name}] t={self.clock.now():.3f} message={d.message_id}"
                      f" event={d.event_id} order={d.correlation_id}"
                      f" delivery={d.delivery_count} {words}")

    def _log(self, d: Delivery, outcome: Outcome, detail: str = "") -> None:
        """A log row for something with no transaction of its own (a crash, a lost ACK)."""
        with transaction(self.conn):
            log_delivery(self.conn, d, at=self.clock.now(), worker=self.name,
                         outcome=outcome, detail=detail)

    def _trace(self, rows: list[tuple[Outcome, Delivery, str]]) -> None:
        """The trace rows of a broker verb that wrote none itself (a broker that is not the
        store): written into the store after the verb, so not atomic with it."""
        if self._trace_verbs and rows:
            now = self.clock.now()
            with transaction(self.conn):
                log_many(self.conn, [(now, self.name, d.correlation_id, d.event_id,
                                      d.message_id, d.delivery_count, outcome, detail)
                                     for outcome, d, detail in rows])

    def _acked(self, deliveries: list[Delivery], results: list[bool]) -> None:
        if not self._trace_verbs:  # the hot path: the broker logged them in the ACK's commit
            return
        self._trace([(Outcome.ACKED, d, "") if ok
                     else (Outcome.ACK_REJECTED, d, "receipt is no longer current")
                     for d, ok in zip(deliveries, results, strict=True)])

    def _crash(self, deliveries: list[Delivery], point: str) -> None:
        self.stats.crashed += 1
        for d in deliveries:
            self._log(d, Outcome.CRASHED, point)
            self._say(d, f"crashed ({point}) → effect lost" if self.mode is Mode.AT_MOST_ONCE
                      else f"crashed ({point}) → lease will expire, expect redelivery")
        if self.crash_exits:
            os._exit(70)
        self.queue.abandon(deliveries)  # what the broker sees of a crash (a process exit too)

    def _fires(self, point: str, d: Delivery) -> bool:
        """Whether fault ``point`` strikes this delivery; never asked when no rate is set."""
        return self.faults.active and self.faults.fires(point, d.event_id, d.delivery_count)

    # -- the effect ------------------------------------------------------------------------
    def _fenced(self, event_id: str) -> bool:
        return self.conn.execute(_FENCED, (self.consumer, event_id)).fetchone() is not None

    def _not_fresh(self, event_id: str) -> Outcome:
        """Why the inbox took no row for ``event_id``: a repair fenced it, or a duplicate."""
        return Outcome.FENCED if self._fenced(event_id) else Outcome.DUPLICATE_SKIPPED

    def _apply(self, d: Delivery) -> Outcome:
        """Run the effect for ``d`` inside the open transaction: APPLIED, or DUPLICATE_SKIPPED
        (the inbox has it) or FENCED (a repair counted it) with no effect."""
        if self.mode is Mode.IDEMPOTENT:  # the inbox row, unless a repair fenced the event
            fresh = self.conn.execute(_INBOX_ONE, (self.consumer, d.event_id,
                                                   self.clock.now())).rowcount
            skip = None if fresh else self._not_fresh(d.event_id)
        else:
            skip = Outcome.FENCED if self._fenced(d.event_id) else None
        if skip is not None:
            log_delivery(self.conn, d, at=self.clock.now(), worker=self.name, outcome=skip,
                         detail=FENCED_DETAIL if skip is Outcome.FENCED else "")
            return skip
        self.handler(self.conn, d)
        log_delivery(self.conn, d, at=self.clock.now(), worker=self.name,
                     outcome=Outcome.APPLIED, detail=str(self.mode))
        return Outcome.APPLIED

    def _apply_guarded(self, d: Delivery) -> tuple[Outcome | None, str | None]:
        """Apply under a savepoint: (outcome, None) or (None, error) for a handler error,
        whose partial writes are undone. Database errors are not caught: they surface."""
        self.conn.execute("SAVEPOINT message")
        try:
            if self._fires("process_error", d):
                raise RuntimeError("injected processing error")
            applied = self._apply(d)
        except STORE_ERRORS:
            raise
        except Exception as exc:  # the handler's own failure: retry it, later dead-letter it
            self.conn.execute("ROLLBACK TO message")
            self.conn.execute("RELEASE message")
            return None, f"{type(exc).__name__}: {exc}"
        self.conn.execute("RELEASE message")
        return applied, None

    _INBOX_MANY = ("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                   " SELECT ?1, value, ?2 FROM json_each(?3) WHERE NOT EXISTS"
                   " (SELECT 1 FROM reconciled_events AS f"
                   "   WHERE f.consumer = ?1 AND f.event_id = value)"
                   " ON CONFLICT (consumer, event_id) DO NOTHING RETURNING event_id")

    def _apply_batch(self, deliveries: list[Delivery]) -> list[Outcome] | None:
        """The fast path: apply a whole batch in one transaction with a handful of statements
        (inbox rows or the fence in one statement, the effect in one UPSERT per item, the log
        in one insert). Same rows, same order as applying one by one. None — and nothing
        written — when a handler fails: the caller then applies one by one, each under its
        own savepoint."""
        conn, now = self.conn, self.clock.now()
        ids = [d.event_id for d in deliveries]
        try:
            with transaction(conn):
                fenced: set[str] = set()
                if self.mode is Mode.IDEMPOTENT:
                    if len(deliveries) == 1:  # the common case: skip json_each (~10% faster)
                        inserted = conn.execute(_INBOX_ONE, (self.consumer, ids[0],
                                                             now)).rowcount
                        fresh = {ids[0]} if inserted else set()
                    else:
                        fresh = {r[0] for r in conn.execute(self._INBOX_MANY, (
                            self.consumer, now, json.dumps(ids)))}
                    if len(fresh) < len(deliveries):  # only then: fenced, or duplicates?
                        fenced = self._fenced_among(ids)
                else:
                    fresh = set(ids)
                    fenced = self._fenced_among(ids)
                outcomes = []
                for d in deliveries:  # a second message for one event is a duplicate
                    if d.event_id in fenced:
                        outcomes.append(Outcome.FENCED)
                    elif d.event_id in fresh:
                        outcomes.append(Outcome.APPLIED)
                        if self.mode is Mode.IDEMPOTENT:
                            fresh.discard(d.event_id)
                    else:
                        outcomes.append(Outcome.DUPLICATE_SKIPPED)
                todo = [d for d, o in zip(deliveries, outcomes, strict=True)
                        if o is Outcome.APPLIED]
                if todo:
                    assert self._handle_many is not None  # the fast path needs the batch form
                    self._handle_many(conn, todo)
                details = {Outcome.APPLIED: str(self.mode), Outcome.FENCED: FENCED_DETAIL,
                           Outcome.DUPLICATE_SKIPPED: ""}
                log_many(conn, [(now, self.name, d.correlation_id, d.event_id, d.message_id,
                                 d.delivery_count, o, details[o])
                                for d, o in zip(deliveries, outcomes, strict=True)])
        except STORE_ERRORS:
            raise
        except Exception:  # a handler refused one of them: redo one by one, isolating it
            return None
        return outcomes

    def _fenced_among(self, ids: list[str]) -> set[str]:
        """The event ids in ``ids`` a repair has fenced, read in the open transaction."""
        if len(ids) == 1:
            return set(ids) if self._fenced(ids[0]) else set()
        return {r[0] for r in self.conn.execute(_FENCED_MANY, (self.consumer,
                                                               json.dumps(ids)))}

    def _count(self, d: Delivery, outcome: Outcome) -> None:
        if outcome is Outcome.APPLIED:
            self.stats.applied += 1
            self._say(d, "applied projection (first time)" if self.mode is Mode.IDEMPOTENT
                      else "applied projection")
        elif outcome is Outcome.FENCED:
            self.stats.fenced += 1
            self._say(d, "fenced: a repair already counted it → not applied")
        else:
            self.stats.duplicates_skipped += 1
            self._say(d, "duplicate skipped")

    # -- one step --------------------------------------------------------------------------
    def step(self) -> int:
        """Receive up to ``max_messages`` and handle them. Returns how many were received."""
        try:
            deliveries = self.queue.receive(self.visibility_timeout, self.max_messages,
                                            worker=self.name)
            parked = deliveries.parked
        except STORE_ERRORS as exc:
            if not is_busy(exc):
                raise
            self._wait_for_lock("receive: nothing leased")
            return 0
        except BrokerUnavailable as exc:
            self._wait_for_broker(exc, "nothing leased")
            return 0
        self._lock_streak = self._broker_streak = self._store_streak = 0
        self.stats.steps += 1
        if self._trace_verbs:
            self._trace([(Outcome.DEAD_LETTERED, d, reason) for d, reason in parked]
                        + [(Outcome.RECEIVED, d, lease_detail(d.lease_until))
                           for d in deliveries])
        for d, reason in parked:
            self.stats.dead_lettered += 1
            self._say(d, f"dead-lettered: {reason}" + (
                " (a foreign producer's message: nothing can deduplicate it)"
                if reason == NO_MESSAGE_ID else " → 'deliverylab redrive' moves it back"))
        if not deliveries:
            return 0
        self.stats.received += len(deliveries)
        kept = []
        for d in deliveries:
            self._say(d, "received")
            if self._fires("lose_message", d):
                if self.queue.lose(d, reason="lost in transit (auto-ack)", worker=self.name):
                    self._trace([(Outcome.LOST, d, "lost in transit (auto-ack)")])
                self.stats.lost += 1
                self._say(d, "lost before processing → no effect, no redelivery")
            else:
                kept.append(d)
        try:
            if self.mode is Mode.AT_MOST_ONCE:
                self._ack_then_apply(kept)
            else:
                self._apply_then_ack(kept)
        except SimulatedCrash:
            pass  # already logged; the leases run out and the queue redelivers
        return len(deliveries)

    def _ack_then_apply(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            try:
                (answer,) = self._send_acks([d])
            except BrokerUnavailable:
                self._ack_in_doubt([d], "not processed: the ACK was not confirmed")
                raise
            if answer is None:  # no answer: the worker cannot know whether the queue has it
                self.stats.ack_failed += 1
                self._log(d, Outcome.ACK_FAILED, "not processed: the ACK was not confirmed"
                          + self._lost_half(d))
                self.queue.abandon([d])
                self._say(d, "ack failed → not processing, expect redelivery")
                continue
            ok = answer
            if not ok:
                self.stats.ack_rejected += 1
                self._say(d, "ack rejected (stale receipt) → not processing")
                continue
            self.stats.acked += 1
            self._say(d, "acked")
            if self._fires("crash_after_receive", d):
                self.stats.lost += 1
                self._crash([d], "after_ack")
                continue
            self.clock.sleep(self.work_time)
            with transaction(self.conn):
                applied, error = self._apply_guarded(d)
            if error is not None:
                self.stats.lost += 1
                self._log(d, Outcome.LOST, f"failed after the ACK: {error}")
                self._say(d, f"processing failed after the ACK → effect lost ({error})")
                continue
            assert applied is not None  # no error: an outcome
            self._count(d, applied)

    def _apply_then_ack(self, deliveries: list[Delivery]) -> None:
        done: list[tuple[Delivery, Outcome]] = []
        failed: list[tuple[Delivery, str]] = []
        rejected: list[Delivery] = []
        if deliveries:
            self.clock.sleep(self.work_time)
        fast = None
        if (self._handle_many is not None and self.mode is not Mode.TRANSACTIONAL
                and not (self.faults.active
                         and any(self._fires(p, d) for d in deliveries
                                 for p in ("crash_after_receive", "process_error")))):
            fast = self._apply_batch(deliveries)
        if fast is not None:
            done = list(zip(deliveries, fast, strict=True))
        else:
            try:
                with transaction(self.conn):
                    for d in deliveries:
                        if self._fires("crash_after_receive", d):
                            raise SimulatedCrash("after_receive")
                        if self.mode is Mode.TRANSACTIONAL:  # its ACK may undo the effect
                            self.conn.execute("SAVEPOINT delivery")
                        applied, error = self._apply_guarded(d)
                        if error is not None:
                            failed.append((d, error))
                        elif self.mode is Mode.TRANSACTIONAL and not self.queue.ack(
                                d, worker=self.name):
                            # The ACK is a row delete in the effect's own transaction, valid
                            # only while this delivery holds the lease: if not, undo the effect.
                            self.conn.execute("ROLLBACK TO delivery")
                            rejected.append(d)
                        else:
                            assert applied is not None  # no error: an outcome
                            done.append((d, applied))
                        if self.mode is Mode.TRANSACTIONAL:
                            self.conn.execute("RELEASE delivery")
            except SimulatedCrash as crash:
                self._crash(deliveries, crash.point)
                raise
        for d in rejected:
            self.stats.ack_rejected += 1
            self._log(d, Outcome.ACK_REJECTED, "lease lost before commit: effect rolled back")
            self._say(d, "lease lost before commit → effect rolled back")
        for d, applied in done:
            self._count(d, applied)
        if self.mode is Mode.TRANSACTIONAL:
            self.stats.acked += len(done)
            for d, _ in done:
                self._say(d, "acked (in the effect's transaction)")
            done = []
        to_ack: list[Delivery] = []
        for i, (d, _) in enumerate(done):
            if self._fires("crash_after_commit", d):
                # Every delivery of the batch not settled yet dies with the worker: the ones
                # waiting for the batched ACK, the rest, and the failed ones never nacked.
                self._crash([*to_ack, *(x for x, _ in done[i:]), *(x for x, _ in failed)],
                            "after_commit_before_ack")
                raise SimulatedCrash("after_commit_before_ack")
            to_ack.append(d)
        if to_ack:
            try:
                answers = self._send_acks(to_ack)
            except BrokerUnavailable:  # the effects have committed; the ACKs are in doubt
                self._ack_in_doubt(to_ack, "the effect committed; the ACK may or may not"
                                           " have reached the broker")
                raise
            for d, ok in zip(to_ack, answers, strict=True):
                if ok is None:  # the effect has committed; whether the ACK did is unknown
                    self.stats.ack_failed += 1
                    self._log(d, Outcome.ACK_FAILED, self._lost_half(d).lstrip("; "))
                    self.queue.abandon([d])
                    self._say(d, "ack failed → expect redelivery")
                elif ok:
                    self.stats.acked += 1
                    self._say(d, "acked")
                else:
                    self.stats.ack_rejected += 1
                    self._say(d, "ack rejected (stale receipt) → another delivery holds it")
        for d, error in failed:
            self._retry_or_dead_letter(d, error)

    # -- the ACK and its two halves -----------------------------------------------------------
    def _send_acks(self, deliveries: list[Delivery]) -> list[bool | None]:
        """Acknowledge ``deliveries`` through the fault points; one answer each: True (the
        queue deleted the message), False (it refused: the receipt is stale) or None (no
        answer came back). None is both halves of a lost ACK: the request that never arrived
        (``ack_fail``: nothing is sent) and the answer that never came back
        (``ack_answer_lost``: the queue deleted the message all the same). The caller gets
        the same None for either, so it cannot tell them apart, as a real consumer cannot."""
        lost_request = [self._fires("ack_fail", d) for d in deliveries]
        sent = [d for d, lost in zip(deliveries, lost_request, strict=True) if not lost]
        results = iter(self.queue.ack_many(sent, worker=self.name) if sent else [])
        answers: list[bool | None] = []
        heard_sent: list[tuple[Delivery, bool]] = []
        for d, lost in zip(deliveries, lost_request, strict=True):
            if lost:
                answers.append(None)
                continue
            ok = next(results)
            heard_sent.append((d, ok))
            answers.append(None if self._fires("ack_answer_lost", d) else ok)
        # The broker's own record of what it did, whether its answer arrived or not.
        if heard_sent:
            self._acked([d for d, _ in heard_sent], [ok for _, ok in heard_sent])
        return answers

    def _lost_half(self, d: Delivery) -> str:
        """For the trace, which is the fault injector's record and not the worker's view:
        which half of the ACK was lost."""
        if self._fires("ack_fail", d):
            return "; the ACK never reached the queue"
        return "; the queue deleted the message, but its answer never came back"

    def _retry_or_dead_letter(self, d: Delivery, error: str) -> None:
        if d.delivery_count >= self.queue.max_receives:
            if self.queue.dead_letter(d, error, worker=self.name):
                self._trace([(Outcome.DEAD_LETTERED, d, error)])
                self.stats.dead_lettered += 1
                self._say(d, f"dead-lettered after {d.delivery_count} receives ({error})")
            else:
                self._refused(d, "dead-letter")
            return
        delay = self.faults.backoff(d.delivery_count - 1, base=self.backoff_base,
                                    cap=self.backoff_cap, event_id=d.event_id)
        if self.queue.nack(d, delay, error=error, worker=self.name):
            self._trace([(Outcome.NACKED, d, f"retry in {delay:g}s; error: {error}")])
            self.stats.nacked += 1
            self._say(d, f"nacked ({error}) → retry in {delay:.3f}s (backoff with full jitter)")
        else:
            self._refused(d, "nack")

    def _refused(self, d: Delivery, verb: str) -> None:
        """The lease ran out and another delivery holds the message: say so in the trace."""
        self.stats.ack_rejected += 1
        self._log(d, Outcome.ACK_REJECTED, f"{verb} refused: receipt is no longer current")
        self._say(d, f"{verb} rejected (stale receipt) → another delivery holds it")

    # -- waits: the write lock, the broker ---------------------------------------------------
    def _wait_for_lock(self, during: str) -> None:
        """Another connection held the write lock past the busy timeout. Say so in one line,
        back off (see :meth:`_back_off`), and let the caller try again. A step cut short by the
        lock leaves its leases to run out: the queue redelivers those messages, as after a
        crash."""
        if self.conn.in_transaction:  # a COMMIT refused for the lock: undo, never join it later
            self.conn.execute("ROLLBACK")
        self.stats.lock_waits += 1
        self._lock_streak += 1
        self._back_off(self._lock_streak, f"lock|{self.name}|{self.stats.lock_waits}",
                       f"database is locked ({during}): another connection held the write"
                       f" lock past the busy timeout")

    def _wait_for_broker(self, exc: BrokerUnavailable, during: str) -> None:
        """The broker could not be reached (``exc``). Say so in one line, back off (see
        :meth:`_back_off`), and let the caller try again: an election or a restart passes, and
        a worker that exited would only have to be started again. Whatever the step held is
        left to its leases, which run out and come back."""
        if self.conn.in_transaction:  # nothing of the store is left half done either
            self.conn.execute("ROLLBACK")
        self.stats.broker_waits += 1
        self._broker_streak += 1
        self._back_off(self._broker_streak, f"broker|{self.name}|{self.stats.broker_waits}",
                       f"{exc} ({during})")

    def _wait_for_store(self, exc: StoreUnavailable, during: str) -> None:
        """A database's connection was lost, or cannot be opened again yet (``exc``: a
        PostgreSQL server restarting, failing over, or a backend terminated). As for a broker:
        one line, back off, try again; the connection reopens itself on the next statement.
        What the transaction in flight wrote is gone with it (the server rolled it back), and
        the step's leases run out and come back; a COMMIT whose answer was lost may have
        committed, and a redelivery of its message is then a duplicate the inbox skips."""
        for conn in {id(c): c for c in (self.conn, getattr(self.queue, "conn", None))
                     if c is not None}.values():
            if conn.in_transaction:  # only forgets a transaction its connection took along
                conn.execute("ROLLBACK")
        self.stats.store_waits += 1
        self._store_streak += 1
        self._back_off(self._store_streak, f"store|{self.name}|{self.stats.store_waits}",
                       f"database unavailable: {exc} ({during})")

    def _back_off(self, streak: int, draw: str, why: str) -> None:
        """Say ``why`` and sleep: exponential in ``streak`` (waits in a row), full jitter,
        capped at ``backoff_cap``; drawn from the fault seed and ``draw`` (which names this
        worker), so a run replays and two workers spread apart. In slices, so a stop ends the
        wait early."""
        delay = self.faults.backoff(min(streak - 1, 62), base=self.backoff_base,
                                    cap=self.backoff_cap, event_id=draw)
        if self.echo is not None:
            self.echo(f"[{self.name}] t={self.clock.now():.3f} {why}"
                      f" → retry in {delay:.3f}s (wait {streak} in a row)")
        left = delay
        while left > 0 and not self._stopping:
            self.clock.sleep(min(0.1, left))
            left -= 0.1

    def _ack_in_doubt(self, deliveries: list[Delivery], detail: str) -> None:
        """An ACK that raised ``BrokerUnavailable``: it may have reached the broker or not.
        Counted and logged as ``ack_failed``; if the message comes back, it is a duplicate."""
        self.stats.ack_failed += len(deliveries)
        for d in deliveries:
            self._log(d, Outcome.ACK_FAILED, f"broker unavailable: {detail}")
            self._say(d, "ack unconfirmed (broker unavailable) → it may come back")

    def _step_through_waits(self) -> int | None:
        """One step; None when the write lock stayed taken past the busy timeout or the broker
        could not be reached (already waited out)."""
        try:
            return self.step()
        except BrokerUnavailable as exc:
            self._wait_for_broker(exc, "mid-step: its leases will run out and come back")
        except StoreUnavailable as exc:
            self._wait_for_store(exc, "mid-step: its leases will run out and come back")
        except STORE_ERRORS as exc:
            if not is_busy(exc):
                raise
            self._wait_for_lock("mid-step: its leases will run out and come back")
        return None

    def _next_visible_at(self) -> float | None:
        """The broker's :meth:`~Broker.next_visible_at`; when the broker cannot be reached,
        now (after waiting it out), so the loop steps again at once."""
        try:
            return self.queue.next_visible_at()
        except BrokerUnavailable as exc:
            self._wait_for_broker(exc, "looking for the next message")
            return self.clock.now()
        except StoreUnavailable as exc:
            self._wait_for_store(exc, "looking for the next message")
            return self.clock.now()
        except STORE_ERRORS as exc:  # PostgreSQL: even a read waits for an exclusive lock
            if not is_busy(exc):
                raise
            self._wait_for_lock("looking for the next message")
            return self.clock.now()

    # -- loops -----------------------------------------------------------------------------
    def run_until_idle(self, max_steps: int = 1_000_000) -> WorkerStats:
        """Step until the queue is empty, sleeping on the clock until the next message is
        visible (a fake clock jumps there at once). A lock held past the busy timeout, or a
        broker that cannot be reached, is waited out, with backoff, not raised."""
        check_int("max_steps", max_steps, minimum=1)
        for _ in range(max_steps):
            if self._step_through_waits() == 0:
                nxt = self._next_visible_at()
                if nxt is None:
                    break
                self.clock.sleep_until(nxt)
        return self.stats

    def run_forever(self, *, poll_interval: float = 0.2) -> WorkerStats:
        """Step until :meth:`stop` (the CLI calls it on SIGTERM and Ctrl-C). A step is never cut
        in half: stopping waits for the current one to finish. A lock held past the busy
        timeout, or a broker that cannot be reached, is waited out, with backoff, not
        raised."""
        check_number("poll_interval", poll_interval, minimum=0.001)
        while not self._stopping:
            if self._step_through_waits() == 0:
                nxt = self._next_visible_at()
                wait = poll_interval if nxt is None else min(poll_interval,
                                                            max(0.0, nxt - self.clock.now()))
                self.clock.sleep(max(wait, 0.001))
        return self.stats

    def stop(self) -> None:
        self._stopping = True


def refuse_apart(mode: Mode | str) -> None:
    """:class:`InvalidInput` for ``transactional`` over a broker that is not the store's own
    database (the CLI asks before it connects to such a broker, so a refusal declares nothing
    there)."""
    if Mode.parse(mode) is Mode.TRANSACTIONAL:
        raise InvalidInput(
            "mode", Mode.TRANSACTIONAL.value,
            "a mode other than transactional when the broker is not the store's own"
            " database: the ACK is a write in another system, so it cannot commit in the"
            " effect's transaction (use idempotent: inbox and effect in one transaction)")


_T = TypeVar("_T")


def _one_of(name: str, value: _T | None, old_name: str, old_value: _T | None) -> _T | None:
    """``value`` or ``old_value`` (two names for one argument), never two different ones."""
    if value is not None and old_value is not None and value is not old_value:
        raise InvalidInput(old_name, old_value, f"left out when {name} is given")
    return value if value is not None else old_value
