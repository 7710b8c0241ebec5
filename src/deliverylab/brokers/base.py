"""The broker contract: where messages wait, whatever engine keeps them.

A broker holds messages between a producer and the consumers. Every engine in this folder
implements :class:`Broker` with the same verbs and the same meaning, so a worker, the checker
and the tests run unchanged on any of them (the contract suite in
``tests/test_broker_contract.py`` runs against every engine). Each method's docstring states
what an engine must do; where an engine cannot do something, it says so in its own docstring
and raises :class:`~deliverylab.engine.errors.InvalidInput` or documents its substitute, never
a silent no-op.

The vocabulary is Amazon SQS's: a *receive* leases a message for a visibility timeout and
hands out a *delivery* with a fresh *receipt*; only the current receipt may settle it.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

from ..engine.errors import InvalidInput

MAX_VISIBILITY_TIMEOUT_S = 12 * 3600  # the SQS upper bound


class Delivery(NamedTuple):
    """One delivery of one message: what a worker holds until it acks or the lease ends.

    ``seq`` is the message's row in ``queue_messages``: ack, extend and nack find the message by
    it and act only while ``receipt`` still matches. Immutable; a named tuple because a batch
    builds a hundred of them per receive (a frozen dataclass costs five times as much)."""

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


def check_delivery(value: Any) -> Delivery:
    """A :class:`Delivery` as :meth:`Queue.receive` returned it, or :class:`InvalidInput` (a
    message id where a delivery belongs would otherwise fail deep inside with AttributeError)."""
    if not isinstance(value, Delivery):
        raise InvalidInput("delivery", value, "a Delivery returned by Queue.receive")
    return value


class Broker(abc.ABC):
    """What every broker engine must do. ``max_receives`` is the redrive policy's
    ``maxReceiveCount``; ``parked`` lists (delivery, reason) for each message the last
    :meth:`receive` moved to the dead letters instead of handing it out.

    Every verb validates its arguments first and, on bad input, raises ``InvalidInput``
    naming the argument and the value, having changed nothing. Every verb that changes a
    message records it in the trace (``delivery_log``): in the same transaction where the
    broker and the trace share a database, otherwise right after the verb.
    """

    max_receives: int
    parked: list[tuple[Delivery, str]]

    @abc.abstractmethod
    def send(self, event_id: str, type: str, payload: dict[str, Any], *,
             correlation_id: str | None = None, delay: float = 0.0) -> str:
        """Enqueue one message, visible after ``delay`` seconds, and return its new message id.

        ``payload`` must be a JSON object. An engine that shares the caller's database joins
        the caller's open transaction (the transactional outbox); any other engine sends at
        once, and says so."""

    @abc.abstractmethod
    def receive(self, visibility_timeout: float, max_messages: int = 1, *,
                worker: str = "worker") -> list[Delivery]:
        """Lease up to ``max_messages`` (1 to 1000) visible messages for ``visibility_timeout``
        seconds, oldest visible first, and return one :class:`Delivery` each.

        Must: never hand the same message to two concurrent receivers while a lease holds;
        count each receive in ``delivery_count`` (1 on the first); give every delivery a receipt
        that no earlier delivery had; make the message visible again when the lease runs out
        unsettled. A message whose receive would exceed ``max_receives`` is moved to the dead
        letters instead, with the count of the deliveries that really happened, and listed in
        ``parked``. Logs ``received`` for each delivery returned."""

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
