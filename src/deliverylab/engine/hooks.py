"""What a worker does around its modes: counting, narrating and tracing, as hooks.

A mode (:mod:`deliverylab.engine.worker`) is the order of receive, effect and ACK, and
nothing else. Around it, at each named point, the worker calls its hooks, in the middleware
style: a :class:`Hook` overrides the methods of the points it cares about, and the worker
calls only those, so a point no hook uses costs nothing. A worker's own hooks come first, in
this order:

* :class:`WorkerStats` counts (``worker.stats``);
* :class:`Trace` writes the trace rows nobody else writes: a crash, a lost or refused ACK, a
  refused NACK, an effect lost after its ACK;
* :class:`VerbTrace`, only when the broker writes no trace of its own (it is not the store's
  own database): the rows of the broker's verbs (received, acked, nacked, lost,
  dead-lettered), in the worker's next transaction on the store, within the step;
* :class:`Narration`, only when the worker has an ``echo``: one line per step.

``Worker(..., hooks=[...])`` adds more after them. The rows an effect writes in its own
transaction (``applied``, ``duplicate_skipped``, ``fenced``) are the effect's, not a hook's:
the trace never claims an effect that did not commit. The fault schedule is not a hook
either: the modes ask ``worker.fires(point, delivery)`` at its named points.

=====================  ========================================================
point                  called
=====================  ========================================================
``after_receive``      after each receive, with the deliveries (and ``parked``)
``before_process``     for each delivery received, before anything else
``after_lose``         a delivery lost in transit (``lose_message``)
``after_apply``        effects committed: (delivery, outcome) in order
``after_ack_sent``     the broker's answers to the ACKs that reached it
``after_ack``          a delivery acknowledged
``on_rejected``        a stale receipt: ``ack``, ``commit``, ``nack`` or ``dead-letter``
``on_ack_failed``      no answer to an ACK (``in_doubt``: the broker was unreachable)
``after_nack``         a delivery given back, visible again after ``delay``
``after_dead_letter``  a delivery moved to the dead letters
``on_failure``         the effect failed after the ACK (at-most-once): lost
``on_crash``           the worker crashed at ``point`` holding ``deliveries``
``on_wait``            a backoff: the broker, the store or the write lock
=====================  ========================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from .broker import NO_MESSAGE_ID, Delivery, Received
from .clock import Clock
from .settings import Mode
from .store import Store
from .trace import Outcome, lease_detail


class Worker(Protocol):
    """What a hook may use of the worker that calls it (a
    :class:`deliverylab.engine.worker.Worker`): its settings, clock and store, and
    :meth:`log` for a trace row in a transaction of its own."""

    name: str
    mode: Mode
    clock: Clock
    conn: Store

    def log(self, d: Delivery, outcome: Outcome, detail: str = "") -> None: ...

    def defer_log(self, rows: list[tuple[Any, ...]]) -> None: ...

POINTS = ("after_receive", "before_process", "after_lose", "after_apply", "after_ack_sent",
          "after_ack", "on_rejected", "on_ack_failed", "after_nack", "after_dead_letter",
          "on_failure", "on_crash", "on_wait")


class Hook:
    """A worker hook: override the methods of the points you need (see the module's table).
    Every method here does nothing, and the worker never calls one a hook left as it is."""

    def after_receive(self, w: Worker, received: Received) -> None:
        """``received``: the deliveries handed out, ``received.parked`` the (delivery, reason)
        of the messages the receive moved to the dead letters."""

    def before_process(self, w: Worker, d: Delivery) -> None:
        """One delivery of the batch, before its fault points and its effect."""

    def after_lose(self, w: Worker, d: Delivery, recorded: bool) -> None:
        """``lose_message`` fired: the broker forgot ``d`` (``recorded``: it had it)."""

    def after_apply(self, w: Worker, done: list[tuple[Delivery, Outcome]]) -> None:
        """Committed: ``applied``, ``duplicate_skipped`` or ``fenced`` for each delivery."""

    def after_ack_sent(self, w: Worker, heard: list[tuple[Delivery, bool]]) -> None:
        """What the broker did with each ACK that reached it (True: deleted), whether its
        answer came back or not."""

    def after_ack(self, w: Worker, d: Delivery) -> None:
        """``d`` is acknowledged (in transactional mode, in the effect's transaction)."""

    def on_rejected(self, w: Worker, d: Delivery, verb: str) -> None:
        """The receipt of ``d`` was no longer current: another delivery holds the message.
        ``verb``: ``ack`` (the broker refused the ACK), ``commit`` (transactional: the effect
        was rolled back with it), ``nack`` or ``dead-letter``."""

    def on_ack_failed(self, w: Worker, d: Delivery, detail: str, in_doubt: bool) -> None:
        """No answer to the ACK of ``d``: the message may come back. ``in_doubt``: the broker
        could not be reached (the ACK raised) rather than a fault lost it."""

    def after_nack(self, w: Worker, d: Delivery, delay: float, error: str) -> None:
        """``d`` failed with ``error`` and goes back, visible after ``delay`` seconds."""

    def after_dead_letter(self, w: Worker, d: Delivery, error: str) -> None:
        """``d`` failed on its last receive and is now a dead letter."""

    def on_failure(self, w: Worker, d: Delivery, error: str) -> None:
        """At-most-once: the effect of ``d`` failed after its ACK, so it is lost."""

    def on_crash(self, w: Worker, deliveries: list[Delivery], point: str) -> None:
        """The worker crashed at ``point`` holding ``deliveries`` (unsettled: their leases
        run out and the broker hands them out again)."""

    def on_wait(self, w: Worker, why: str, delay: float, streak: int) -> None:
        """The worker backs off ``delay`` seconds (``streak`` waits in a row) because of
        ``why``: the broker, the store's database, or the write lock."""


class Dispatch:
    """For each point, the tuple of hook methods that override it: the worker loops over a
    tuple, an empty one where no hook cares."""

    __slots__ = POINTS

    after_receive: tuple[Callable[[Worker, Received], None], ...]
    before_process: tuple[Callable[[Worker, Delivery], None], ...]
    after_lose: tuple[Callable[[Worker, Delivery, bool], None], ...]
    after_apply: tuple[Callable[[Worker, list[tuple[Delivery, Outcome]]], None], ...]
    after_ack_sent: tuple[Callable[[Worker, list[tuple[Delivery, bool]]], None], ...]
    after_ack: tuple[Callable[[Worker, Delivery], None], ...]
    on_rejected: tuple[Callable[[Worker, Delivery, str], None], ...]
    on_ack_failed: tuple[Callable[[Worker, Delivery, str, bool], None], ...]
    after_nack: tuple[Callable[[Worker, Delivery, float, str], None], ...]
    after_dead_letter: tuple[Callable[[Worker, Delivery, str], None], ...]
    on_failure: tuple[Callable[[Worker, Delivery, str], None], ...]
    on_crash: tuple[Callable[[Worker, list[Delivery], str], None], ...]
    on_wait: tuple[Callable[[Worker, str, float, int], None], ...]

    def __init__(self, hooks: list[Hook]) -> None:
        for point in POINTS:
            base = getattr(Hook, point)
            setattr(self, point, tuple(getattr(h, point) for h in hooks
                                       if getattr(type(h), point) is not base))


@dataclass
class WorkerStats(Hook):
    """The worker's counters, counted as a hook."""

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

    def after_receive(self, w: Worker, received: Received) -> None:
        self.steps += 1
        self.dead_lettered += len(received.parked)
        self.received += len(received)

    def after_lose(self, w: Worker, d: Delivery, recorded: bool) -> None:
        self.lost += 1

    def after_apply(self, w: Worker, done: list[tuple[Delivery, Outcome]]) -> None:
        for _, outcome in done:
            if outcome is Outcome.APPLIED:
                self.applied += 1
            elif outcome is Outcome.FENCED:
                self.fenced += 1
            else:
                self.duplicates_skipped += 1

    def after_ack(self, w: Worker, d: Delivery) -> None:
        self.acked += 1

    def on_rejected(self, w: Worker, d: Delivery, verb: str) -> None:
        self.ack_rejected += 1

    def on_ack_failed(self, w: Worker, d: Delivery, detail: str, in_doubt: bool) -> None:
        self.ack_failed += 1

    def after_nack(self, w: Worker, d: Delivery, delay: float, error: str) -> None:
        self.nacked += 1

    def after_dead_letter(self, w: Worker, d: Delivery, error: str) -> None:
        self.dead_lettered += 1

    def on_failure(self, w: Worker, d: Delivery, error: str) -> None:
        self.lost += 1

    def on_crash(self, w: Worker, deliveries: list[Delivery], point: str) -> None:
        self.crashed += 1
        if point == "after_ack":  # at-most-once: acknowledged, never applied
            self.lost += len(deliveries)


class Trace(Hook):
    """The trace rows of what has no transaction of its own (a crash, a lost or refused ACK,
    an effect lost after its ACK), each written in a transaction of its own
    (:meth:`Worker.log <deliverylab.engine.worker.Worker.log>`)."""

    def on_rejected(self, w: Worker, d: Delivery, verb: str) -> None:
        if verb == "commit":
            w.log(d, Outcome.ACK_REJECTED, "lease lost before commit: effect rolled back")
        elif verb != "ack":  # a refused ACK is the broker's own row (after_ack_sent)
            w.log(d, Outcome.ACK_REJECTED, f"{verb} refused: receipt is no longer current")

    def on_ack_failed(self, w: Worker, d: Delivery, detail: str, in_doubt: bool) -> None:
        w.log(d, Outcome.ACK_FAILED, detail)

    def on_failure(self, w: Worker, d: Delivery, error: str) -> None:
        w.log(d, Outcome.LOST, f"failed after the ACK: {error}")

    def on_crash(self, w: Worker, deliveries: list[Delivery], point: str) -> None:
        for d in deliveries:
            w.log(d, Outcome.CRASHED, point)


class VerbTrace(Hook):
    """The trace rows of the broker's verbs (received, acked, nacked, lost, dead-lettered)
    for a broker that writes none itself (one that is not the store's own database), so not
    atomic with the verb: handed to :meth:`Worker.defer_log
    <deliverylab.engine.worker.Worker.defer_log>`, which writes them first in the worker's
    next transaction on the store (a receive's rows in the effect's), and at the end of the
    step at the latest. A worker whose broker writes them in each verb's own transaction has
    no such hook."""

    def rows(self, w: Worker, rows: list[tuple[Outcome, Delivery, str]]) -> None:
        """Trace rows for ``rows`` of (outcome, delivery, detail), timed now."""
        if rows:
            now = w.clock.now()
            w.defer_log([(now, w.name, d.correlation_id, d.event_id, d.message_id,
                          d.delivery_count, outcome, detail) for outcome, d, detail in rows])

    def after_receive(self, w: Worker, received: Received) -> None:
        self.rows(w, [(Outcome.DEAD_LETTERED, d, reason) for d, reason in received.parked]
                  + [(Outcome.RECEIVED, d, lease_detail(d.lease_until)) for d in received])

    def after_lose(self, w: Worker, d: Delivery, recorded: bool) -> None:
        if recorded:
            self.rows(w, [(Outcome.LOST, d, "lost in transit (auto-ack)")])

    def after_ack_sent(self, w: Worker, heard: list[tuple[Delivery, bool]]) -> None:
        self.rows(w, [(Outcome.ACKED, d, "") if ok
                      else (Outcome.ACK_REJECTED, d, "receipt is no longer current")
                      for d, ok in heard])

    def after_nack(self, w: Worker, d: Delivery, delay: float, error: str) -> None:
        self.rows(w, [(Outcome.NACKED, d, f"retry in {delay:g}s; error: {error}")])

    def after_dead_letter(self, w: Worker, d: Delivery, error: str) -> None:
        self.rows(w, [(Outcome.DEAD_LETTERED, d, error)])


class Narration(Hook):
    """One human-readable line per step to ``echo``: what happened to which delivery."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo

    def say(self, w: Worker, d: Delivery, words: str) -> None:
        self.echo(f"[{w.name}] t={w.clock.now():.3f} message={d.message_id}"
                  f" event={d.event_id} order={d.correlation_id}"
                  f" delivery={d.delivery_count} {words}")

    def after_receive(self, w: Worker, received: Received) -> None:
        for d, reason in received.parked:
            self.say(w, d, f"dead-lettered: {reason}" + (
                " (a foreign producer's message: nothing can deduplicate it)"
                if reason == NO_MESSAGE_ID else " → 'deliverylab redrive' moves it back"))

    def before_process(self, w: Worker, d: Delivery) -> None:
        self.say(w, d, "received")

    def after_lose(self, w: Worker, d: Delivery, recorded: bool) -> None:
        self.say(w, d, "lost before processing → no effect, no redelivery")

    def after_apply(self, w: Worker, done: list[tuple[Delivery, Outcome]]) -> None:
        for d, outcome in done:
            if outcome is Outcome.APPLIED:
                self.say(w, d, "applied projection (first time)" if w.mode is Mode.IDEMPOTENT
                         else "applied projection")
            elif outcome is Outcome.FENCED:
                self.say(w, d, "fenced: a repair already counted it → not applied")
            else:
                self.say(w, d, "duplicate skipped")

    def after_ack(self, w: Worker, d: Delivery) -> None:
        self.say(w, d, "acked (in the effect's transaction)" if w.mode is Mode.TRANSACTIONAL
                 else "acked")

    def on_rejected(self, w: Worker, d: Delivery, verb: str) -> None:
        if verb == "commit":
            self.say(w, d, "lease lost before commit → effect rolled back")
        elif verb == "ack" and w.mode is Mode.AT_MOST_ONCE:
            self.say(w, d, "ack rejected (stale receipt) → not processing")
        else:
            self.say(w, d, f"{verb} rejected (stale receipt) → another delivery holds it")

    def on_ack_failed(self, w: Worker, d: Delivery, detail: str, in_doubt: bool) -> None:
        self.say(w, d, "ack unconfirmed (broker unavailable) → it may come back" if in_doubt
                 else "ack failed → not processing, expect redelivery"
                 if w.mode is Mode.AT_MOST_ONCE else "ack failed → expect redelivery")

    def after_nack(self, w: Worker, d: Delivery, delay: float, error: str) -> None:
        self.say(w, d, f"nacked ({error}) → retry in {delay:.3f}s (backoff with full jitter)")

    def after_dead_letter(self, w: Worker, d: Delivery, error: str) -> None:
        self.say(w, d, f"dead-lettered after {d.delivery_count} receives ({error})")

    def on_failure(self, w: Worker, d: Delivery, error: str) -> None:
        self.say(w, d, f"processing failed after the ACK → effect lost ({error})")

    def on_crash(self, w: Worker, deliveries: list[Delivery], point: str) -> None:
        for d in deliveries:
            self.say(w, d, f"crashed ({point}) → effect lost" if w.mode is Mode.AT_MOST_ONCE
                     else f"crashed ({point}) → lease will expire, expect redelivery")

    def on_wait(self, w: Worker, why: str, delay: float, streak: int) -> None:
        self.echo(f"[{w.name}] t={w.clock.now():.3f} {why}"
                  f" → retry in {delay:.3f}s (wait {streak} in a row)")
