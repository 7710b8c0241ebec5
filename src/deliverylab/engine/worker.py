"""The worker: receive, apply the effect, acknowledge — in one of four orders.

=================  ===========================================  ==============================
mode               order of work                                what a fault does
=================  ===========================================  ==============================
at-most-once       ack, then apply                              a crash after the ack loses it
at-least-once      apply, then ack; no inbox                    a lost ACK applies it twice
idempotent         inbox row + effect in one transaction, ack   a duplicate is skipped, acked
transactional      effect + ack in one transaction              exactly once, inside one DB
=================  ===========================================  ==============================

Each mode is one short function below (:data:`MODES`), which reads as the table does; the
verbs it calls (:meth:`Worker.apply`, :meth:`Worker.ack`, …) are the same for every mode, with
the same fault schedule (see ``faults``: the modes ask :meth:`Worker.fires` at its named
points). Counting, narrating and the trace rows nobody else writes are hooks around the modes
(:mod:`deliverylab.engine.hooks`); the settings are one validated object
(:class:`~deliverylab.engine.settings.WorkerSettings`).

The projection update is one UPSERT, never read-then-write. An inbox conflict means "already
processed"; any other database error propagates.

A worker runs over a broker (where messages wait, :mod:`deliverylab.brokers`) and a store
(the consumer's own database: orders, inbox, projection, fence, trace). On the lab's single
SQLite file they are one connection; the broker may also be another database, in which case
``transactional`` is refused (its ACK would be a write in another system, which cannot commit
in the effect's transaction) and the worker writes the trace rows of the broker's verbs into
the store itself: first in its next transaction there (a receive's rows in the effect's), and
by the end of the step at the latest.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .broker import Broker, Delivery
from .clock import Clock
from .errors import (
    STORE_ERRORS,
    BrokerUnavailable,
    InvalidInput,
    SimulatedCrash,
    StoreUnavailable,
    check_int,
    check_number,
)
from .faults import Faults
from .hooks import Dispatch, Hook, Narration, Trace, VerbTrace, WorkerStats
from .settings import (
    CONSUMER,
    DEFAULT_MAX_RECEIVES,
    FIELDS,
    Mode,
    WorkerSettings,
    check_names,
)
from .store import Store, is_busy, is_store, transaction
from .trace import Outcome, log_delivery, log_many

__all__ = ["CONSUMER", "DEFAULT_MAX_RECEIVES", "FENCED_DETAIL", "MODES", "Hook", "Mode",
           "PoisonMessage", "Worker", "WorkerSettings", "WorkerStats", "apply_order_placed",
           "apply_order_placed_many", "refuse_apart"]


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
    if len(deliveries) == 1:  # the common case: one statement, no totals to add up
        conn.execute(_RESERVE, _reservation(deliveries[0]))
        return
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


# -- the modes: each is the order of work in the table above ---------------------------------
def ack_then_apply(w: Worker, batch: list[Delivery]) -> None:
    """at-most-once: ack, then apply. A crash or a failure after the ACK loses the effect."""
    for d in batch:
        if w.ack_first(d):
            w.apply_acked(d)


def apply_then_ack(w: Worker, batch: list[Delivery]) -> None:
    """at-least-once and idempotent: apply, then ack. The idempotent effect writes its inbox
    row in its own transaction (:meth:`Worker.apply`), so a redelivery is skipped; without
    the inbox a lost ACK applies the effect again. A failure goes back, or to the dead
    letters."""
    done, failed = w.apply(batch)
    w.ack(done, unsettled=failed)
    w.give_back(failed)


def effect_and_ack(w: Worker, batch: list[Delivery]) -> None:
    """transactional: the effect and the ACK in one transaction (the ACK is a row delete in
    the store), so exactly once, inside one database."""
    _, failed = w.apply(batch, ack=True)
    w.give_back(failed)


MODES: dict[Mode, Callable[[Worker, list[Delivery]], None]] = {
    Mode.AT_MOST_ONCE: ack_then_apply,
    Mode.AT_LEAST_ONCE: apply_then_ack,
    Mode.IDEMPOTENT: apply_then_ack,
    Mode.TRANSACTIONAL: effect_and_ack,
}

_NO_HOOKS: tuple[Hook, ...] = ()


class Worker:
    """One consumer: it receives from ``broker`` and applies to ``store``, as its
    ``settings`` say (:class:`WorkerSettings`; or the same names as keywords, which build
    them: ``Worker(store=conn, broker=b, clock=c, mode="at-least-once")``; keywords given with
    ``settings`` replace those fields). ``handler`` is the effect. ``echo`` receives one
    human-readable line per step (the :class:`~deliverylab.engine.hooks.Narration` hook);
    ``hooks`` are more :class:`~deliverylab.engine.hooks.Hook` objects, called after the
    worker's own (stats, trace, narration).

    The engine opens no broker itself: the lab's is the SQLite queue table on the store's own
    connection (``SQLiteBroker(conn, clock=…, ids=…)``), which the caller builds. The broker
    counts the receives (its ``max_receives``).

    Each setting is also an attribute (``worker.mode``, ``worker.faults``…); setting one checks
    it and replaces that field of ``worker.settings``.
    """

    settings: WorkerSettings
    mode: Mode
    faults: Faults
    visibility_timeout: float
    max_messages: int
    backoff_base: float
    backoff_cap: float
    name: str
    consumer: str
    work_time: float
    crash_exits: bool
    hooks: tuple[Hook, ...]
    # Set with the settings and the handler (:meth:`_adopt`, :meth:`__setattr__`).
    _on: Dispatch
    _process: Callable[[Worker, list[Delivery]], None]
    _handle_many: BatchHandler | None

    def __init__(self, *, store: Store | None = None,
                 broker: Broker | None = None, clock: Clock,
                 settings: WorkerSettings | None = None, handler: Handler = apply_order_placed,
                 echo: Callable[[str], None] | None = None, hooks: Iterable[Hook] = _NO_HOOKS,
                 **changes: Any) -> None:
        check_names(changes, "a keyword Worker takes: store, broker, clock, settings,"
                             " handler, echo, hooks, or a setting")
        if settings is None:
            settings = WorkerSettings(**changes)
        elif not isinstance(settings, WorkerSettings):
            raise InvalidInput("settings", settings, "a deliverylab.engine.settings"
                                                     ".WorkerSettings")
        elif changes:
            settings = settings.replace(**changes)
        if not is_store(store):
            raise InvalidInput("store", store, "a store connection (deliverylab.engine.store,"
                                               " or engine.store_postgres)")
        if not isinstance(broker, Broker):
            raise InvalidInput("broker", broker, "a deliverylab.engine.broker.Broker (the"
                               " engine opens none: the lab's is SQLiteBroker(conn, clock=…,"
                               " ids=…) on the store's connection)")
        joined = broker.joins(store)
        if not joined:
            refuse_apart(settings.mode)
        if not callable(handler):
            raise InvalidInput("handler", handler, "a function (conn, delivery)")
        extra = list(hooks)
        for hook in extra:
            if not isinstance(hook, Hook):
                raise InvalidInput("hooks", hook, "deliverylab.engine.hooks.Hook objects")
        self._adopt(settings)
        self.conn = self.store = store  # ``conn``: the store's connection, the effect's
        self.broker, self.clock, self.handler = broker, clock, handler
        self._joined = joined
        # Who writes the trace rows of the broker's verbs: the broker, inside each verb's
        # transaction on the store; or this worker, in its own next transaction there.
        self._verbs = not (joined and broker.writes_trace)
        self._extra = tuple(extra)
        self.stats = WorkerStats()
        self.echo = echo  # builds the hooks (see __setattr__)
        self._stopping = False
        self._lock_streak = 0  # lock waits in a row: the exponent of the next backoff
        self._broker_streak = 0  # broker waits in a row: the same, for the broker
        self._store_streak = 0  # store waits in a row: the same, for the store's database
        # Trace rows of the broker's verbs (VerbTrace) not in the store yet: written first in
        # the worker's next transaction on the store, and at the end of the step at the latest.
        self._verb_rows: list[tuple[Any, ...]] = []

    def _adopt(self, settings: WorkerSettings) -> None:
        """Take ``settings``: each field also a plain attribute, which the hot path reads."""
        if settings.mode is Mode.TRANSACTIONAL and not self.__dict__.get("_joined", True):
            refuse_apart(settings.mode)
        d = self.__dict__
        d["settings"] = settings
        for name in FIELDS:
            d[name] = getattr(settings, name)
        d["_process"] = MODES[settings.mode]

    def __setattr__(self, name: str, value: Any) -> None:
        """A setting set on the worker (``worker.faults = …``) is checked, and replaces the
        settings' field; a new ``echo``, ``stats`` or ``handler`` takes effect at once."""
        if name in FIELDS:
            self._adopt(self.settings.replace(**{name: value}))
            return
        object.__setattr__(self, name, value)
        if name == "handler":
            object.__setattr__(self, "_handle_many", BATCH_FORMS.get(value))
        elif name in ("echo", "stats") and "echo" in self.__dict__:
            hooks: tuple[Hook, ...] = (
                self.stats, Trace(), *([VerbTrace()] if self._verbs else []),
                *([Narration(self.echo)] if self.echo is not None else []), *self._extra)
            object.__setattr__(self, "hooks", hooks)
            object.__setattr__(self, "_on", Dispatch(list(hooks)))

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called: the loop ends after the current step."""
        return self._stopping

    # -- what the modes and the hooks use ----------------------------------------------------
    def fires(self, point: str, d: Delivery) -> bool:
        """Whether fault ``point`` strikes this delivery (the schedule of ``faults``: the same
        for every mode and every worker)."""
        return self.faults.active and self.faults.fires(point, d.event_id, d.delivery_count)

    def log(self, d: Delivery, outcome: Outcome, detail: str = "") -> None:
        """A trace row for something with no transaction of its own (a crash, a lost ACK), in
        a transaction of its own."""
        with self._transaction():
            log_delivery(self.conn, d, at=self.clock.now(), worker=self.name,
                         outcome=outcome, detail=detail)

    def defer_log(self, rows: list[tuple[Any, ...]]) -> None:
        """Trace rows (``trace.log_many``'s) of a broker verb that wrote none itself: written
        first in the worker's next transaction on the store (the effect's, for a receive), so
        the trace keeps the order of events, and at the end of the step at the latest
        (:meth:`flush_log`). A step cut short keeps them for the next."""
        self._verb_rows.extend(rows)

    def flush_log(self) -> None:
        """Write the deferred trace rows (:meth:`defer_log`) now, in a transaction of their
        own."""
        if self._verb_rows:
            with self._transaction():
                pass

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """A transaction of this worker on the store that first writes the deferred trace
        rows: they commit with it, or stay deferred if it rolls back."""
        pending = len(self._verb_rows)
        with transaction(self.conn):
            if pending:
                log_many(self.conn, self._verb_rows[:pending])
            yield
        if pending:
            del self._verb_rows[:pending]

    def crash(self, deliveries: list[Delivery], point: str) -> None:
        """The worker dies at ``point`` holding ``deliveries``: the ``on_crash`` hooks record
        it; then the process exits (``crash_exits``) or the broker sees the consumer go (the
        leases run out, or end at once where the lease is a connection). The caller raises
        :class:`~deliverylab.engine.errors.SimulatedCrash`, or returns."""
        for on_crash_hook in self._on.on_crash:
            on_crash_hook(self, deliveries, point)
        if self.crash_exits:
            os._exit(70)
        self.broker.abandon(deliveries)  # what the broker sees of a crash (a process exit too)

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
            if self.fires("process_error", d):
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
        handle_many = self._handle_many
        assert handle_many is not None  # a batch is applied only with its handler's batch form
        try:
            with self._transaction():
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
                name, applied = self.name, str(self.mode)
                if not fenced and len(fresh) == len(deliveries):  # the common case: all new
                    outcomes = [Outcome.APPLIED] * len(deliveries)
                    handle_many(conn, deliveries)
                    log_many(conn, [(now, name, d.correlation_id, d.event_id, d.message_id,
                                     d.delivery_count, Outcome.APPLIED, applied)
                                    for d in deliveries])
                    return outcomes
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
                    handle_many(conn, todo)
                details = {Outcome.APPLIED: applied, Outcome.FENCED: FENCED_DETAIL,
                           Outcome.DUPLICATE_SKIPPED: ""}
                log_many(conn, [(now, name, d.correlation_id, d.event_id, d.message_id,
                                 d.delivery_count, o, details[o])
                                for d, o in zip(deliveries, outcomes, strict=True)])
        except STORE_ERRORS:
            raise
        except Exception:  # a handler refused one of them: redo one by one, isolating it
            return None
        return outcomes

    def _apply_alone(self, d: Delivery) -> list[Outcome] | None:
        """The fast path for a batch of one: :meth:`_apply` in a transaction of its own, the
        same statements and rows as :meth:`_apply_batch` (no savepoint: nothing else shares
        the transaction). None, and nothing written, when the handler fails."""
        try:
            with self._transaction():
                return [self._apply(d)]
        except STORE_ERRORS:
            raise
        except Exception:  # the handler refused it: redo it under a savepoint, as a batch
            return None

    def _fenced_among(self, ids: list[str]) -> set[str]:
        """The event ids in ``ids`` a repair has fenced, read in the open transaction."""
        if len(ids) == 1:
            return set(ids) if self._fenced(ids[0]) else set()
        return {r[0] for r in self.conn.execute(_FENCED_MANY, (self.consumer,
                                                               json.dumps(ids)))}

    def _apply_each(self, deliveries: list[Delivery], ack: bool
                    ) -> tuple[list[tuple[Delivery, Outcome]], list[tuple[Delivery, str]],
                               list[Delivery]]:
        """Apply one by one in one transaction, each under its own savepoint: (done, failed,
        rejected). With ``ack``, each effect's ACK is a row delete in the same transaction,
        valid only while the delivery holds the lease; if not, its effect is undone
        (rejected)."""
        done: list[tuple[Delivery, Outcome]] = []
        failed: list[tuple[Delivery, str]] = []
        rejected: list[Delivery] = []
        try:
            with self._transaction():
                for d in deliveries:
                    if self.fires("crash_after_receive", d):
                        raise SimulatedCrash("after_receive")
                    if ack:  # its ACK may undo the effect
                        self.conn.execute("SAVEPOINT delivery")
                    applied, error = self._apply_guarded(d)
                    if error is not None:
                        failed.append((d, error))
                    elif ack and not self.broker.ack(d, worker=self.name):
                        self.conn.execute("ROLLBACK TO delivery")
                        rejected.append(d)
                    else:
                        done.append((d, applied))  # type: ignore[arg-type]
                    if ack:
                        self.conn.execute("RELEASE delivery")
        except SimulatedCrash as crash:
            self.crash(deliveries, crash.point)
            raise
        return done, failed, rejected

    # -- the verbs of the modes ------------------------------------------------------------
    def apply(self, deliveries: list[Delivery], *, ack: bool = False
              ) -> tuple[list[tuple[Delivery, Outcome]], list[tuple[Delivery, str]]]:
        """Work ``work_time``, then apply ``deliveries`` in one transaction: (done, failed),
        done with each delivery's outcome (``applied``, or ``duplicate_skipped`` and
        ``fenced`` with no effect), failed with the handler's error (nothing of it written).
        With ``ack`` (transactional), each ACK is a row delete in the effect's transaction.
        A batch with no fault to strike goes through the handler's batch form, in a few
        statements; otherwise one by one, each under a savepoint."""
        if deliveries and self.work_time:
            self.clock.sleep(self.work_time)
        outcomes = None
        if (self._handle_many is not None and not ack
                and not (self.faults.active
                         and any(self.fires(p, d) for d in deliveries
                                 for p in ("crash_after_receive", "process_error")))):
            outcomes = (self._apply_batch(deliveries) if len(deliveries) > 1
                        else self._apply_alone(deliveries[0]))
        failed: list[tuple[Delivery, str]]
        rejected: list[Delivery]
        if outcomes is not None:
            done, failed, rejected = list(zip(deliveries, outcomes, strict=True)), [], []
        else:
            done, failed, rejected = self._apply_each(deliveries, ack)
        for d in rejected:
            for on_rejected_hook in self._on.on_rejected:
                on_rejected_hook(self, d, "commit")
        if done:
            for after_apply_hook in self._on.after_apply:
                after_apply_hook(self, done)
            if ack:
                for d, _ in done:
                    for after_ack_hook in self._on.after_ack:
                        after_ack_hook(self, d)
        return done, failed

    def ack(self, done: list[tuple[Delivery, Outcome]], *,
            unsettled: Sequence[tuple[Delivery, str]] = ()) -> None:
        """Acknowledge the deliveries whose effect committed, in one batch. A crash after the
        commit (``crash_after_commit``) takes every delivery not settled yet with it: those
        waiting for the ACK, the rest, and ``unsettled`` (failed ones not given back yet)."""
        if not done:
            return
        if self.faults.active:
            for d, _ in done:
                if self.fires("crash_after_commit", d):
                    self.crash([*(x for x, _ in done), *(x for x, _ in unsettled)],
                               "after_commit_before_ack")
                    raise SimulatedCrash("after_commit_before_ack")
        to_ack = [d for d, _ in done]
        try:
            answers = self._send_acks(to_ack)
        except BrokerUnavailable:  # the effects have committed; the ACKs are in doubt
            self._ack_in_doubt(to_ack, "the effect committed; the ACK may or may not"
                                       " have reached the broker")
            raise
        on = self._on
        for d, ok in zip(to_ack, answers, strict=True):
            if ok:
                for after_ack_hook in on.after_ack:
                    after_ack_hook(self, d)
            elif ok is None:  # the effect has committed; whether the ACK did is unknown
                for on_ack_failed_hook in on.on_ack_failed:
                    on_ack_failed_hook(self, d, self._lost_half(d).lstrip("; "), False)
                self.broker.abandon([d])
            else:
                for on_rejected_hook in on.on_rejected:
                    on_rejected_hook(self, d, "ack")

    def ack_first(self, d: Delivery) -> bool:
        """At-most-once: acknowledge ``d`` before its effect. True if the broker deleted the
        message; False if the ACK went unanswered or was refused (then ``d`` is not
        processed)."""
        try:
            (answer,) = self._send_acks([d])
        except BrokerUnavailable:
            self._ack_in_doubt([d], "not processed: the ACK was not confirmed")
            raise
        if answer is None:  # no answer: the worker cannot know whether the queue has it
            for on_ack_failed_hook in self._on.on_ack_failed:
                on_ack_failed_hook(self, d, "not processed: the ACK was not confirmed" + self._lost_half(d),
                  False)
            self.broker.abandon([d])
            return False
        if not answer:
            for on_rejected_hook in self._on.on_rejected:
                on_rejected_hook(self, d, "ack")
            return False
        for after_ack_hook in self._on.after_ack:
            after_ack_hook(self, d)
        return True

    def apply_acked(self, d: Delivery) -> None:
        """At-most-once: apply ``d``, already acknowledged. A crash before the effect
        (``crash_after_receive``) or a failure of the effect loses it."""
        if self.fires("crash_after_receive", d):
            self.crash([d], "after_ack")
            return
        if self.work_time:
            self.clock.sleep(self.work_time)
        with self._transaction():
            applied, error = self._apply_guarded(d)
        if error is not None:
            for on_failure_hook in self._on.on_failure:
                on_failure_hook(self, d, error)
            return
        assert applied is not None  # no error: an outcome
        for after_apply_hook in self._on.after_apply:
            after_apply_hook(self, [(d, applied)])

    def give_back(self, failed: list[tuple[Delivery, str]]) -> None:
        """Each failed delivery goes back with a backoff (nack), or to the dead letters on its
        last receive."""
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
        if not self.faults.active:  # the hot path: every ACK is sent, every answer heard
            results = self.broker.ack_many(deliveries, worker=self.name)
            if self._on.after_ack_sent:
                heard = list(zip(deliveries, results, strict=True))
                for after_ack_sent_hook in self._on.after_ack_sent:
                    after_ack_sent_hook(self, heard)
            return list(results)
        lost_request = [self.fires("ack_fail", d) for d in deliveries]
        sent = [d for d, lost in zip(deliveries, lost_request, strict=True) if not lost]
        replies = iter(self.broker.ack_many(sent, worker=self.name) if sent else [])
        answers: list[bool | None] = []
        heard_sent: list[tuple[Delivery, bool]] = []
        for d, lost in zip(deliveries, lost_request, strict=True):
            if lost:
                answers.append(None)
                continue
            ok = next(replies)
            heard_sent.append((d, ok))
            answers.append(None if self.fires("ack_answer_lost", d) else ok)
        # The broker's own record of what it did, whether its answer arrived or not.
        if heard_sent:
            for after_ack_sent_hook in self._on.after_ack_sent:
                after_ack_sent_hook(self, heard_sent)
        return answers

    def _lost_half(self, d: Delivery) -> str:
        """For the trace, which is the fault injector's record and not the worker's view:
        which half of the ACK was lost."""
        if self.fires("ack_fail", d):
            return "; the ACK never reached the queue"
        return "; the queue deleted the message, but its answer never came back"

    def _retry_or_dead_letter(self, d: Delivery, error: str) -> None:
        if d.delivery_count >= self.broker.max_receives:
            if self.broker.dead_letter(d, error, worker=self.name):
                for after_dead_letter_hook in self._on.after_dead_letter:
                    after_dead_letter_hook(self, d, error)
            else:
                for on_rejected_hook in self._on.on_rejected:
                    on_rejected_hook(self, d, "dead-letter")
            return
        delay = self.faults.backoff(d.delivery_count - 1, base=self.backoff_base,
                                    cap=self.backoff_cap, event_id=d.event_id)
        if self.broker.nack(d, delay, error=error, worker=self.name):
            for after_nack_hook in self._on.after_nack:
                after_nack_hook(self, d, delay, error)
        else:
            for on_rejected_hook in self._on.on_rejected:
                on_rejected_hook(self, d, "nack")

    def _ack_in_doubt(self, deliveries: list[Delivery], detail: str) -> None:
        """An ACK that raised ``BrokerUnavailable``: it may have reached the broker or not.
        Counted and logged as ``ack_failed``; if the message comes back, it is a duplicate."""
        for d in deliveries:
            for on_ack_failed_hook in self._on.on_ack_failed:
                on_ack_failed_hook(self, d, f"broker unavailable: {detail}", True)

    # -- one step --------------------------------------------------------------------------
    def step(self) -> int:
        """Receive up to ``max_messages`` and handle them in the worker's mode. Returns how
        many were received."""
        try:
            deliveries = self.broker.receive(self.visibility_timeout, self.max_messages,
                                             worker=self.name)
        except STORE_ERRORS as exc:
            if not is_busy(exc):
                raise
            self._wait_for_lock("receive: nothing leased")
            return 0
        except BrokerUnavailable as exc:
            self._wait_for_broker(exc, "nothing leased")
            return 0
        if self._lock_streak or self._broker_streak or self._store_streak:
            self._lock_streak = self._broker_streak = self._store_streak = 0
        on = self._on
        for after_receive_hook in on.after_receive:
            after_receive_hook(self, deliveries)
        if deliveries:
            self._work(deliveries)
        if self._verb_rows:  # the verbs' trace rows no transaction of the step took along
            self.flush_log()
        return len(deliveries)

    def _work(self, deliveries: list[Delivery]) -> None:
        """The step's deliveries, through ``before_process`` and the transit fault, then
        handled in the worker's mode."""
        on = self._on
        kept: list[Delivery] = deliveries
        if on.before_process or self.faults.active:
            kept = []
            for d in deliveries:
                for before_process_hook in on.before_process:
                    before_process_hook(self, d)
                if self.fires("lose_message", d):
                    recorded = self.broker.lose(d, reason="lost in transit (auto-ack)",
                                                worker=self.name)
                    for after_lose_hook in on.after_lose:
                        after_lose_hook(self, d, recorded)
                else:
                    kept.append(d)
        if kept:
            self.handle(kept)

    def handle(self, deliveries: list[Delivery]) -> None:
        """Handle ``deliveries``, received by this worker, in its mode (:data:`MODES`). An
        injected crash is recorded and ends the batch: its leases run out and the broker hands
        the messages out again."""
        try:
            self._process(self, deliveries)
        except SimulatedCrash:
            pass  # already recorded; the leases run out and the queue redelivers

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
        for conn in {id(c): c for c in (self.conn, getattr(self.broker, "conn", None))
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
        for on_wait_hook in self._on.on_wait:
            on_wait_hook(self, why, delay, streak)
        left = delay
        while left > 0 and not self._stopping:
            self.clock.sleep(min(0.1, left))
            left -= 0.1

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
            return self.broker.next_visible_at()
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
