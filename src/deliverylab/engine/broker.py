"""The broker contract: where messages wait, whatever engine keeps them.

A broker holds messages between a producer and the consumers. The contract lives here, in the
engine, because the engine is what uses it: the worker, the relay and the checker are written
against :class:`Broker`, and every engine in :mod:`deliverylab.brokers` implements it with the
same verbs and the same meaning (the contract suite in ``tests/brokers/test_broker_contract.py`` runs
against every engine). Nothing in the engine imports a concrete broker; the caller passes one.

Each method's docstring states what an engine must do. What an engine cannot do is data, not a
class name: its :class:`Capabilities` (delayed send, listing the queue, refusing a stale
receipt, whose clock times the lease, …), which the worker, the chapter and the tests read.
Where an engine lacks a verb, it says so in its own docstring and raises
:class:`~deliverylab.engine.errors.InvalidInput` or ``NotImplementedError`` or documents its
substitute, never a silent no-op.

The vocabulary is Amazon SQS's: a *receive* leases a message for a visibility timeout and
hands out a *delivery* with a fresh *receipt*; only the current receipt may settle it.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from .errors import InvalidInput, check_id, check_number

if TYPE_CHECKING:
    from .clock import Clock
    from .ids import Ids

MAX_VISIBILITY_TIMEOUT_S = 12 * 3600  # the SQS upper bound


# The reason a broker gives when it dead-letters a message whose identity it cannot know (a
# foreign producer sent it without a message id): such a message cannot be made idempotent, so
# it is refused at once, on its first delivery, never handed to a worker.
NO_MESSAGE_ID = "no message id"


class BrokerGone(Exception):
    """What the broker keeps messages in (a queue, a stream, a consumer) no longer exists on
    the server: someone deleted it while this broker used it. Not passing, unlike
    :class:`~deliverylab.engine.errors.BrokerUnavailable`: a worker stops, saying what
    disappeared (the command exits with status 2), rather than recreate it behind the back of
    whoever deleted it. ``what`` names the thing, in words."""

    def __init__(self, what: str, detail: str = "") -> None:
        self.what = what
        super().__init__(f"{what} no longer exists on the server (deleted while in use)"
                         + (f": {detail}" if detail else ""))


class Delivery(NamedTuple):
    """One delivery of one message: what a worker holds until it acks or the lease ends.

    ``seq`` is the engine's handle on the message (in SQLite, its row in ``queue_messages``):
    ack, extend and nack find the message by it and act only while ``receipt`` still matches.
    Immutable; a named tuple because a batch builds a hundred of them per receive (a frozen
    dataclass costs five times as much)."""

    seq: int
    message_id: str
    event_id: str
    type: str
    payload: dict[str, Any]
    correlation_id: str | None
    receipt: str
    delivery_count: int
    lease_until: float
    last_error: str | None = None


class Received(list[Delivery]):
    """What :meth:`Broker.receive` returns: the deliveries handed out (it is that list), and
    ``parked``, the (delivery, reason) of each message this receive moved to the dead letters
    instead of handing it out (its ``max_receives`` was spent). A caller that reports dead
    letters reads them here, from the call that moved them."""

    __slots__ = ("parked",)

    def __init__(self, deliveries: Any = (),
                 parked: list[tuple[Delivery, str]] | None = None) -> None:
        super().__init__(deliveries)
        self.parked: list[tuple[Delivery, str]] = list(parked or [])


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an engine can and cannot do, as data: read it instead of asking for a class.

    ``delayed_send``: ``send(delay>0)`` keeps the message invisible for ``delay`` seconds;
    without it such a send is refused (InvalidInput or NotImplementedError naming ``delay``).
    ``lists_queue``: the ready messages can be listed without receiving them
    (``queued_event_ids``, ``drop`` by id); without it those answer only for what the broker
    holds. ``refuses_stale_receipts``: ack, extend, nack and dead-letter refuse a delivery whose
    lease ran out and was handed out again; without it they act on the message whoever holds
    it now. ``lease_clock``: ``"injected"`` when leases end by the broker's own ``clock`` (a
    FakeClock drives them), ``"server"`` when the server times them (waiting means sleeping).
    ``fixed_lease``: the lease every receive gets, whatever ``visibility_timeout`` asks, and
    what ``extend`` restarts (seconds; None when ``visibility_timeout`` sets it).
    ``lease_is_connection``: a lease ends when the consumer's connection (or channel) goes,
    so :meth:`Broker.abandon` gives a message back at once instead of when a timer runs out.
    ``dedup_window``: seconds within which a second send with the same ``dedup_id`` is
    dropped; None without producer dedup. ``joins_store``: the broker can run on the store's
    own connection (:meth:`Broker.joins`), so an ack can commit in the effect's transaction.
    """

    delayed_send: bool = True
    lists_queue: bool = True
    refuses_stale_receipts: bool = True
    lease_clock: Literal["injected", "server"] = "injected"
    fixed_lease: float | None = None
    lease_is_connection: bool = False
    dedup_window: float | None = None
    joins_store: bool = False

    def lease_for(self, visibility_timeout: float) -> float:
        """How long a ``receive(visibility_timeout)`` leases on this engine."""
        return visibility_timeout if self.fixed_lease is None else self.fixed_lease


def check_delivery(value: Any) -> Delivery:
    """A :class:`Delivery` as :meth:`Queue.receive` returned it, or :class:`InvalidInput` (a
    message id where a delivery belongs would otherwise fail deep inside with AttributeError)."""
    if not isinstance(value, Delivery):
        raise InvalidInput("delivery", value, "a Delivery returned by Queue.receive")
    return value


def encode_payload(payload: Any) -> str:
    """A message body: ``payload`` (a JSON object) as compact JSON with sorted keys."""
    if not isinstance(payload, dict):
        raise InvalidInput("payload", payload, "a JSON object (dict)")
    try:
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidInput("payload", payload, f"JSON-serialisable ({exc})") from None


def check_send(event_id: Any, type: Any, payload: Any, correlation_id: Any, delay: Any,
               dedup_id: Any) -> tuple[str, float]:
    """What every engine's :meth:`Broker.send` checks first, in this order: the body to store
    and the delay, or :class:`InvalidInput` naming the first bad argument."""
    check_id("event_id", event_id)
    if dedup_id is not None:
        check_id("dedup_id", dedup_id)
    check_id("type", type)
    if correlation_id is not None:
        check_id("correlation_id", correlation_id)
    body = encode_payload(payload)
    return body, check_number("delay", delay, minimum=0, maximum=MAX_VISIBILITY_TIMEOUT_S)


class Broker(abc.ABC):
    """What every broker engine must do.

    Attributes every engine has: ``clock`` and ``ids`` (the injected clock and id source:
    leases are measured on ``clock`` unless ``capabilities.lease_clock`` is ``"server"``,
    message ids and receipts come from ``ids``); ``max_receives``, the redrive policy's
    ``maxReceiveCount``; ``capabilities``, what the engine can do (:class:`Capabilities`);
    ``writes_trace``, whether the verbs write their own trace rows (below); ``parked``, the
    same list as the last :meth:`receive`'s ``Received.parked``, for older callers.

    Every verb validates its arguments first and, on bad input, raises ``InvalidInput``
    naming the argument and the value, having changed nothing. An engine that cannot do a
    verb as stated says so in that verb's docstring and either documents its substitute or
    raises ``NotImplementedError`` naming the verb and the engine: never a silent no-op.

    Unavailable. A verb that cannot reach the broker for a reason expected to pass (a server
    restarting, a cluster electing a leader, a lost connection the engine reconnects) raises
    :class:`~deliverylab.engine.errors.BrokerUnavailable`, never the client library's own
    timeout or connection error, having changed nothing it knows of. A settlement verb (ack,
    nack, extend, dead-letter) is the exception: it may have reached the server before the
    answer was lost, so the caller cannot tell whether it took effect. A worker backs off and
    tries again; a message whose ack is in doubt may come back and is then a duplicate.

    The trace. The rows that record what a verb did (``received``, ``acked``,
    ``ack_rejected``, ``nacked``, ``extended``, ``dead_lettered``, ``redriven``, ``lost``)
    belong in the consumer's store, beside the effects. A broker that :meth:`joins` the store
    and ``writes_trace`` writes them into ``delivery_log`` inside the verb's own transaction.
    Any other broker cannot (the verb commits in another system): the worker writes them into
    the store itself, in its next transaction there (a receive's rows in the effect's) and by
    the end of the step, which is not atomic with the verb, as with any external broker.
    """

    clock: Clock
    ids: Ids
    max_receives: int
    parked: list[tuple[Delivery, str]]
    capabilities: Capabilities = Capabilities()
    writes_trace: bool = False
    # Producer dedup: how long (seconds) the engine remembers a ``dedup_id`` given to
    # :meth:`send` and drops a second send carrying it; None when the engine has none. The
    # same value as ``capabilities.dedup_window``.
    dedup_window: float | None = None

    def close(self) -> None:
        """Release what the broker holds of its own (connections, channels, threads). A broker
        on the caller's connection (SQLite, PostgreSQL) leaves that connection open: its owner
        closes it."""
        return None

    @abc.abstractmethod
    def destroy(self) -> None:
        """Remove what this broker made to keep its messages (its queue, stream or rows, with
        their dead letters), then :meth:`close`. For a throwaway broker (a test, a chapter's
        run); idempotent."""

    def joins(self, store: Any) -> bool:
        """True only when this broker's verbs run on ``store`` itself (the same connection),
        so a verb and the consumer's writes can commit in one transaction: what the
        ``transactional`` worker mode needs. A broker in another database answers False
        (the default): its ACK is a write in another system."""
        return False

    @abc.abstractmethod
    def send(self, event_id: str, type: str, payload: dict[str, Any], *,
             correlation_id: str | None = None, delay: float = 0.0,
             dedup_id: str | None = None) -> str:
        """Enqueue one message, visible after ``delay`` seconds, and return its new message id.

        ``payload`` must be a JSON object. An engine that shares the caller's database joins
        the caller's open transaction (the transactional outbox); any other engine sends at
        once, and says so.

        ``dedup_id`` is the producer's name for this send (an outbox relay passes the event
        id, so a re-publish after a crash carries the same one). An engine with producer dedup
        (``dedup_window`` not None) stores a second send with the same ``dedup_id`` within its
        window once, and returns the first send's message id; an engine without it checks the
        value and sends again: the consumer's inbox is then the only defence."""

    @abc.abstractmethod
    def receive(self, visibility_timeout: float, max_messages: int = 1, *,
                worker: str = "worker") -> Received:
        """Lease up to ``max_messages`` (1 to 1000) visible messages for ``visibility_timeout``
        seconds (``capabilities.lease_for``), oldest visible first, and return one
        :class:`Delivery` each, as a :class:`Received`.

        Must: never hand the same message to two concurrent receivers while a lease holds;
        count each receive in ``delivery_count`` (1 on the first); give each delivery a receipt
        no earlier delivery of that message had; make it visible again when the lease runs out
        unsettled. A message whose receive would exceed ``max_receives`` is moved to the dead
        letters instead, with the count of the deliveries that really happened, and listed in
        the result's ``parked``. Logs ``received`` for each delivery returned."""

    @abc.abstractmethod
    def ack(self, delivery: Delivery, *, worker: str = "worker") -> bool:
        """Delete the message if ``delivery``'s receipt is still current; True if it did.

        False, with nothing deleted and ``ack_rejected`` logged, when the receipt is stale
        (the lease ran out and the message was received again, or it was already settled)."""

    @abc.abstractmethod
    def ack_many(self, deliveries: list[Delivery], *, worker: str = "worker") -> list[bool]:
        """:meth:`ack` for several deliveries at once; one bool per delivery, in order.

        Judged by row and receipt as one by one: a stale and a current delivery of the same
        message answer ``[False, True]``; the same delivery twice acks only the first."""

    @abc.abstractmethod
    def extend(self, delivery: Delivery, seconds: float, *, worker: str = "worker") -> bool:
        """Move the lease to ``seconds`` past now (SQS ChangeMessageVisibility); False, with
        nothing changed, if the receipt is stale. Logs ``extended`` with the new lease end."""

    @abc.abstractmethod
    def nack(self, delivery: Delivery, delay: float = 0.0, *, error: str | None = None,
             worker: str = "worker") -> bool:
        """Give the message back, visible again after ``delay`` seconds, keeping ``error`` as
        its last error; False, with nothing changed, if the receipt is stale. The delivery
        count is kept: the next receive counts on from it."""

    def abandon(self, deliveries: list[Delivery]) -> None:
        """The consumer holding ``deliveries`` lost its link to the broker before settling them
        (its ACK was lost, or it crashed): do what the engine does when a consumer goes away.
        The worker calls it at those fault points, so an injected fault is the engine's own.
        An engine whose lease is a timer does nothing (this default): the lease runs out and
        the message comes back then. An engine whose lease is a connection (RabbitMQ: the
        channel) closes it, and the message comes back at once, counted."""
        return None

    @abc.abstractmethod
    def dead_letter(self, delivery: Delivery, error: str, *, worker: str = "worker") -> bool:
        """Move the message to the dead letters now, with ``error``; False if the receipt is
        stale. A dead letter keeps its event id, payload, correlation id and delivery count."""

    @abc.abstractmethod
    def redrive(self, message_ids: list[str] | None = None, *, worker: str = "operator") -> int:
        """Move dead letters (all, or the given ids) back to the queue as new messages (new
        message ids, delivery count 0), visible now; return how many moved. An id that is not
        a dead letter raises ``InvalidInput`` and moves nothing; an id named twice moves once."""

    @abc.abstractmethod
    def drop(self, message_id: str, *, reason: str = "dropped", worker: str = "chaos") -> bool:
        """Fault injection: forget the message whatever its lease, logged as ``lost``. False
        if no such message is queued."""

    @abc.abstractmethod
    def lose(self, delivery: Delivery, *, reason: str, worker: str = "chaos") -> bool:
        """Fault injection: :meth:`drop` for a message just received, found by its delivery;
        the receipt is not checked (the broker forgets the message, whoever holds it)."""

    @abc.abstractmethod
    def depth(self) -> dict[str, int]:
        """``{"visible": …, "in_flight": …, "dead_letters": …}``: messages visible now,
        leased or delayed, and dead-lettered."""

    @abc.abstractmethod
    def next_visible_at(self) -> float | None:
        """When the earliest queued message becomes visible (None if nothing is queued); a
        worker with nothing to do sleeps until then."""

    # -- what the checker needs ------------------------------------------------------------
    @abc.abstractmethod
    def queued_event_ids(self) -> set[str]:
        """The event ids of every message still queued (visible, leased or delayed): the
        checker calls an unapplied order with one of these *pending*, not lost."""

    def dead_letters_without_id(self) -> int:
        """How many dead letters have no message id (refused at once, reason
        :data:`NO_MESSAGE_ID`): a foreign producer's messages, which no order can match. An
        engine whose queue only this project writes (a table with NOT NULL ids) has none."""
        return 0

    @abc.abstractmethod
    def dead_lettered_event_ids(self) -> set[str]:
        """The event ids of every dead letter: the checker calls an unapplied order with one
        of these *dead-lettered*, not lost."""
