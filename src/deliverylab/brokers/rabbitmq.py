"""RabbitMQ quorum queues behind the broker contract (pika, a blocking connection).

What the engine gives, checked against RabbitMQ 3.10.8:

* **The lease is the channel.** A message taken with ``basic.get`` stays unacknowledged on its
  channel until ``basic.ack``; when the channel or the connection closes, the queue takes it
  back (``redelivered=true``) and counts one more delivery. A process killed mid-work therefore
  gives its messages back at once. There is no per-message visibility timeout (the consumer
  timeout, 30 minutes by default and checked on a 60 s tick, is no lease). So each delivery
  gets a channel of its own, and the broker keeps the lease's end on its injected clock: the
  first verb after that time (a receive, ``depth``, …) closes the channel, so a lease too
  short for the work brings the message back here too. A lost ACK or a crash in the worker
  closes the channel at once (:meth:`RabbitMQBroker.abandon`): the message is back within
  milliseconds, with no timer to wait for.
* **The delivery count** is the queue's ``x-delivery-count`` header plus one. On 3.10.8 the
  header is 0 on a first ``basic.get`` (the documentation says a first pushed delivery has
  none: both read as 0), and every return counts: a channel close, ``basic.reject`` and
  ``basic.nack`` with requeue.
* **Dead letters.** The queue is declared with ``x-delivery-limit = max_receives - 1``: the
  server dead-letters a message when its count goes above the limit, that is when the
  ``max_receives``-th delivery comes back unacked (measured: limit 2 hands out 3 deliveries).
  Dead letters go through the exchange ``<queue>.dlx`` to the quorum queue ``<queue>.dlq``
  with ``x-dead-letter-strategy=at-least-once`` and ``x-overflow=reject-publish``, both
  accepted by 3.10.8 (which knows the argument: a bogus strategy is refused with
  ``PRECONDITION_FAILED``): the server keeps a dead letter until the dead-letter queue
  confirmed it.
* **Publisher confirms** on every send: ``send`` returns once a quorum of replicas has the
  message. RabbitMQ has no producer dedup (``dedup_window`` is None).
* **Identity.** A message's event id is its ``x-deliverylab-event-id`` header, else its AMQP
  ``message_id`` (see :func:`identity`): what another producer sets (pika:
  ``BasicProperties(message_id=…, type="OrderPlaced")``). A message with neither is
  dead-lettered at once, reason ``no message id``, never handed to a worker: nothing that
  changes on a redelivery or between processes may stand in for an id.
* **Dead letters keep what came**: the body's bytes, the properties and the headers, with
  the reason and the delivery count added.
* **Deleted underneath**: a verb that finds the queue or its dead-letter queue gone raises
  :class:`~deliverylab.brokers.base.BrokerGone` naming it; nothing is declared again.

Substitutes, where RabbitMQ has no such verb (each verb's docstring says more):
``extend`` moves the broker's own lease timer; ``nack`` with a delay keeps the message on its
channel until the delay has passed, then rejects it with requeue; ``send`` refuses a delay;
``queued_event_ids`` lists only what this broker holds, and refuses to guess while other
messages are ready; ``drop`` forgets only a message this broker holds. Reading the dead
letters takes them and gives them back on one channel (the dead-letter queue has no delivery
limit, so this costs nothing but their order's count).

The price of a lease per delivery: messages are taken with ``basic.get``, one round trip and
one Raft command each (measured on 3.10.8: about 3 ms per get and ack on a quorum queue,
0.5 ms on a classic one), so a batch costs as many round trips as it has messages. A consumer
with a prefetch window is far faster (about 27,000 messages/s with prefetch 100 on the same
machine) but leases a whole window per channel, and pika's ``basic_cancel`` rejects the
messages that arrived but were not dispatched, which a quorum queue counts as deliveries
that no worker ever saw.

A lost connection (the server restarting, a node of a cluster dying, the network) makes the
verb that meets it raise :class:`~deliverylab.engine.errors.BrokerUnavailable`, never pika's
``AMQPConnectionError``: the server gives back every message the connection held (counted),
so the broker forgets its leases, and the next verb connects again (raising
``BrokerUnavailable`` again while no server answers). An ack that met the loss may or may not
have been sent: the message comes back if it was not.

One broker object is used from one thread (pika's ``BlockingConnection`` is not thread-safe).
:meth:`RabbitMQBroker.destroy` deletes the queue, its dead-letter queue and exchange (tests and
benchmarks call it after a run).
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from ..engine.clock import Clock
from ..engine.errors import (
    BrokerUnavailable,
    InvalidInput,
    check_id,
    check_int,
    check_number,
    check_text,
)
from ..engine.ids import Ids
from ..engine.settings import DEFAULT_MAX_RECEIVES
from .base import (
    MAX_VISIBILITY_TIMEOUT_S,
    NO_MESSAGE_ID,
    Broker,
    BrokerGone,
    Capabilities,
    Delivery,
    Received,
    Removal,
    check_delivery,
    check_send,
)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
# Headers this broker writes beside the AMQP properties (message id, correlation id, type).
EVENT_ID = "x-deliverylab-event-id"
ERROR = "x-deliverylab-error"  # a dead letter's reason
DELIVERIES = "x-deliverylab-deliveries"  # a dead letter's delivery count
# How long a verb that gave messages back waits for the queue to count them (see _await),
# and for the dead letters it caused to reach the dead-letter queue (at-least-once
# dead-lettering publishes them from the queue's leader, after the return).
RETURN_WAIT_S = 0.25
DEAD_LETTER_WAIT_S = 5.0
# The bound on a silent link (packets dropped, not refused): the AMQP heartbeat this broker
# asks for, in seconds. pika sends a heartbeat frame every half of it and checks every
# HEARTBEAT_S + 5 s that something came from the server since the last check, so a verb
# waiting on a black-holed link raises BrokerUnavailable within 2 × (HEARTBEAT_S + 5) = 30 s
# at most (measured through a proxy dropping every byte: 23 to 30 s), not after the
# server's default of 60 s (two to three minutes). The price: pika sends heartbeats only
# inside a verb, so the server may close the connection of a worker whose handler keeps it
# away for longer than a few heartbeats (measured on 3.10.8: 25 s of silence was kept); its
# messages come back, counted, and the inbox skips what was applied. A URL's own
# ``heartbeat=`` wins.
HEARTBEAT_S = 10
# A connection the server blocks (a memory or disk alarm) waits this long for a publish to
# go through before it is closed (BrokerUnavailable), and a new connection this long for
# its handshake.
BLOCKED_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
# Headers of a dead letter that are the dead-lettering's own (ours and the server's): a
# redriven message starts without them.
_DEAD_HEADERS = {ERROR, DELIVERIES, "x-death", "x-first-death-exchange", "x-first-death-queue",
                 "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                 "x-last-death-reason", "x-delivery-count"}
_CHANNEL_GONE = (pika.exceptions.ChannelClosed, pika.exceptions.ChannelWrongStateError)


P = ParamSpec("P")
R = TypeVar("R")


def _reconnecting(verb: Callable[Concatenate[RabbitMQBroker, P], R]
                  ) -> Callable[Concatenate[RabbitMQBroker, P], R]:
    """The verb on a live connection: connect again first if the last one was lost, and turn
    a connection lost during the verb into ``BrokerUnavailable`` (forgetting the leases: the
    server gave their messages back)."""
    @functools.wraps(verb)
    def run(self: RabbitMQBroker, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            if not self._conn.is_open:
                self._connect()
            return verb(self, *args, **kwargs)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404 and self._conn.is_open:  # NOT_FOUND: deleted meanwhile
                self._lost()
                raise BrokerGone(self._which(exc.reply_text), exc.reply_text) from None
            if self._conn.is_open:
                raise  # a channel the server closed on a live connection: not a lost link
            self._lost()
            raise BrokerUnavailable(verb.__name__, f"{type(exc).__name__}: {exc}") from None
        except pika.exceptions.UnroutableError:  # published to a queue that is gone
            self._lost()
            raise BrokerGone(f"the queue {self.queue!r} (or its dead-letter queue"
                             f" {self.dlq!r})", "a publish to it was returned unroutable"
                             ) from None
        except (pika.exceptions.AMQPConnectionError, *_CHANNEL_GONE) as exc:
            if isinstance(exc, _CHANNEL_GONE) and self._conn.is_open:
                raise  # a channel the server closed on a live connection: not a lost link
            self._lost()
            raise BrokerUnavailable(verb.__name__, f"{type(exc).__name__}: {exc}") from None
    return run


@dataclass
class _Lease:
    """One delivery this broker holds: its channel, its tag there, and when the lease ends
    (on the broker's clock). ``release_at`` is set when it was nacked with a delay. ``props``
    and ``body`` are the message as it came, which a dead letter keeps."""

    channel: BlockingChannel
    tag: int
    delivery: Delivery
    until: float
    props: pika.BasicProperties
    body: bytes
    release_at: float | None = None


def identity(props: pika.BasicProperties) -> tuple[str, str] | None:
    """(message id, event id) of a message, or None when it has neither a ``message_id``
    property nor an ``x-deliverylab-event-id`` header: a message whose identity cannot be
    known, which no inbox can deduplicate. The event id is the header when set, else the
    message id; the message id is the property when set, else the event id. Both come from
    the producer and travel with the message, so they are the same on every redelivery and in
    every worker process."""
    header = (props.headers or {}).get(EVENT_ID)
    event_id = header.decode(errors="replace") if isinstance(header, bytes) else header
    if not (isinstance(event_id, str) and event_id.strip()):
        event_id = None
    message_id = props.message_id if props.message_id and props.message_id.strip() else None
    if event_id is None:
        return None if message_id is None else (message_id, message_id)
    return message_id or event_id, event_id


def dead_properties(props: pika.BasicProperties, headers: dict[str, Any],
                    **changes: Any) -> pika.BasicProperties:
    """``props`` as they came, persistent, with ``headers`` and ``changes``: what a dead
    letter (or a redriven one) carries. Not copied: ``expiration`` (a TTL would expire a dead
    letter) and ``user_id`` (the server checks it against the publishing connection's
    user)."""
    fields = {k: getattr(props, k) for k in (
        "content_type", "content_encoding", "priority", "correlation_id", "reply_to",
        "message_id", "timestamp", "type", "app_id", "cluster_id")}
    fields.update(changes)
    return pika.BasicProperties(delivery_mode=2, headers=headers, **fields)


def queue_arguments(max_receives: int, dlx: str, queue: str) -> dict[str, Any]:
    """The quorum queue's arguments: dead-lettered at exactly ``max_receives`` deliveries,
    at least once, to ``dlx``."""
    return {"x-queue-type": "quorum",
            "x-delivery-limit": max_receives - 1,
            "x-dead-letter-exchange": dlx,
            "x-dead-letter-routing-key": queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish"}


def bounded(params: pika.connection.Parameters, *, heartbeat: bool = True
            ) -> pika.connection.Parameters:
    """``params`` with this broker's bounds on a link that dies: the heartbeat
    (:data:`HEARTBEAT_S`, unless ``heartbeat`` is False: the URL chose its own), the blocked
    connection timeout and the handshake timeout."""
    if heartbeat:
        params.heartbeat = HEARTBEAT_S
    params.blocked_connection_timeout = BLOCKED_TIMEOUT_S
    params.stack_timeout = CONNECT_TIMEOUT_S
    return params


def check_queue_name(field: str, name: Any) -> str:
    """A queue name RabbitMQ takes and leaves room for ``.dlq``: an id (no control
    characters) of at most 240 bytes, not starting with ``amq.`` (reserved by the server)."""
    checked = check_id(field, name, max_length=240)
    if len(checked.encode()) > 240 or checked.startswith("amq."):
        raise InvalidInput(field, name, "a queue name of at most 240 bytes, not starting"
                                        " with 'amq.'")
    return checked


class RabbitMQBroker(Broker):
    """The broker on a RabbitMQ quorum queue ``queue`` (declared if missing, with its
    dead-letter exchange and queue). ``parameters`` are pika's connection parameters
    (default: ``amqp://guest:guest@127.0.0.1:5672/%2F``); ``name`` labels the connection in
    ``rabbitmqctl list_connections``. A queue that already exists with other arguments (another
    ``max_receives``) is refused, naming both.

    ``max_receives=None`` opens an existing queue as it is, whatever it was declared with
    (what the operator commands and the relay do: they do not choose the delivery limit, the
    workers did): the queue and its dead-letter queue are declared passively, and
    ``max_receives`` is read back from the queue's ``x-delivery-limit``. A queue missing then
    is declared with :data:`DEFAULT_MAX_RECEIVES` if ``create``, else refused with "no such
    queue", having created nothing (``create=False``: ``deliverylab status``, ``redrive``,
    ``drop``)."""

    dedup_window = None  # RabbitMQ has no producer dedup: the consumer's inbox is the defence
    # No delayed send (3.10 without a plugin), ready messages cannot be listed, and the lease
    # is the delivery's channel (closed at the lease's end on the injected clock).
    capabilities = Capabilities(delayed_send=False, lists_queue=False,
                                lease_is_connection=True)

    def __init__(self, queue: str, *, clock: Clock, ids: Ids,
                 max_receives: int | None = DEFAULT_MAX_RECEIVES,
                 parameters: pika.connection.Parameters | None = None,
                 name: str = "deliverylab", create: bool = True) -> None:
        self.queue = check_queue_name("queue", queue)
        self._adopt = max_receives is None
        self._create = create
        self.max_receives = DEFAULT_MAX_RECEIVES if max_receives is None else check_int(
            "max_receives", max_receives, minimum=1)
        self.dlq, self.dlx = f"{queue}.dlq", f"{queue}.dlx"
        self.clock, self.ids = clock, ids
        self.parked: list[tuple[Delivery, str]] = []
        self._parking: list[tuple[Delivery, str]] = []  # for the next receive's ``parked``
        self._leases: dict[str, _Lease] = {}  # receipt -> the lease it settles
        self._held: list[_Lease] = []  # nacked with a delay: given back when it has passed
        self._idle: list[BlockingChannel] = []  # open channels holding no message
        self._errors: dict[str, str] = {}  # message id -> last error given to nack
        self._seq = 0
        self._params = parameters or bounded(pika.URLParameters(DEFAULT_URL))
        self._params.client_properties = {"connection_name": check_id("name", name)}
        self._connect()

    def _connect(self) -> None:
        """Open the connection and its two channels, declaring the queues (idempotent)."""
        self._conn = pika.BlockingConnection(self._params)
        queue = self.queue
        if self._adopt and self._open_as_it_is():
            return
        if not self._create:
            self._conn.close()
            raise InvalidInput("queue", queue, "an existing queue (no such queue: nothing was"
                                               " created)")
        try:
            self._control = self._conn.channel()  # declares, sends, counts: with confirms
            self._control.confirm_delivery()
            self._control.exchange_declare(self.dlx, "direct", durable=True)
            self._control.queue_declare(self.dlq, durable=True,
                                        arguments={"x-queue-type": "quorum"})
            self._control.queue_bind(self.dlq, self.dlx, routing_key=queue)
            self._control.queue_declare(
                queue, durable=True, arguments=queue_arguments(self.max_receives, self.dlx,
                                                               queue))
            self._dead = self._conn.channel()  # reads the dead letters, in order
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._conn.close()
            raise InvalidInput("queue", queue, f"a queue this broker can declare with"
                                               f" max_receives={self.max_receives}"
                                               f" ({exc.reply_text})") from None

    def _open_as_it_is(self) -> bool:
        """Open the existing queue and dead-letter queue without declaring anything (passive
        declares), and read ``max_receives`` back from the queue's delivery limit; False,
        having changed nothing, if the queue does not exist. A queue without this broker's
        dead-letter queue is refused, naming it."""
        probe = self._conn.channel()
        try:
            probe.queue_declare(self.queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            return False
        try:
            probe.queue_declare(self.dlq, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self._conn.close()
            raise InvalidInput("queue", self.queue, f"a queue with its dead-letter queue"
                                                    f" {self.dlq!r} (no such queue)") from None
        limit = self._delivery_limit(probe)
        if limit is not None and limit >= 0:
            self.max_receives = limit + 1
        if probe.is_open:
            probe.close()
        self._control = self._conn.channel()
        self._control.confirm_delivery()
        self._dead = self._conn.channel()
        return True

    def _delivery_limit(self, probe: BlockingChannel) -> int | None:
        """The existing queue's ``x-delivery-limit``. AMQP has no verb that reads a queue's
        arguments, but a declare with other arguments is refused naming the current value
        (3.10.8: ``PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' … received '-1'
        but current is '2'``) and changes nothing. None when the answer names no value (a
        queue declared without a limit, or by someone else with other arguments)."""
        args = queue_arguments(1, self.dlx, self.queue)
        args["x-delivery-limit"] = -1  # no queue of ours has it: the refusal names the value
        try:
            probe.queue_declare(self.queue, durable=True, arguments=args)
        except pika.exceptions.ChannelClosedByBroker as exc:
            found = re.search(r"'x-delivery-limit'.*current is (?:the value )?'(-?\d+)'",
                              exc.reply_text)
            return int(found.group(1)) if found else None
        return -1  # accepted: the queue really has the limit -1 (never from this broker)

    def _which(self, reply_text: str) -> str:
        """What a NOT_FOUND names, in words."""
        if f"'{self.dlq}'" in reply_text:
            return f"the dead-letter queue {self.dlq!r}"
        if f"'{self.dlx}'" in reply_text:
            return f"the dead-letter exchange {self.dlx!r}"
        return f"the queue {self.queue!r}"

    def _lost(self) -> None:
        """The connection is gone: so are its channels and every lease on them."""
        try:
            if self._conn.is_open:
                self._conn.close()
        except pika.exceptions.AMQPError:
            pass  # already broken: nothing left to close
        self._leases.clear()
        self._held.clear()
        self._idle.clear()

    # -- send ------------------------------------------------------------------------------
    @_reconnecting
    def send(self, event_id: str, type: str, payload: dict[str, Any], *,
             correlation_id: str | None = None, delay: float = 0.0,
             dedup_id: str | None = None) -> str:
        """Publish one message (persistent) and return its id once the queue confirmed it.

        Sends at once: RabbitMQ cannot join the caller's database transaction (use an outbox
        and a relay). ``dedup_id`` is checked and otherwise unused: RabbitMQ has no producer
        dedup, so a re-publish is a second message and the consumer's inbox the defence.
        ``delay`` must be 0: RabbitMQ 3.10 has no delayed delivery without a plugin. Raises
        pika's ``NackError`` if the queue refuses the message (``reject-publish`` when full)
        and ``UnroutableError`` if the queue is gone."""
        body, delay = check_send(event_id, type, payload, correlation_id, delay, dedup_id)
        if delay:
            raise InvalidInput("delay", delay, "0 on RabbitMQ: 3.10 has no delayed delivery"
                                               " without a plugin (nack holds a message for"
                                               " a delay instead)")
        message_id = self.ids.message_id()
        self._publish(self.queue, body, message_id=message_id, event_id=event_id, type=type,
                      correlation_id=correlation_id)
        return message_id

    def _publish(self, routing_key: str, body: str, *, message_id: str, event_id: str,
                 type: str, correlation_id: str | None,
                 extra: dict[str, Any] | None = None) -> None:
        props = pika.BasicProperties(
            message_id=message_id, correlation_id=correlation_id, type=type,
            content_type="application/json", delivery_mode=2,
            timestamp=int(self.clock.now()), headers={EVENT_ID: event_id, **(extra or {})})
        self._control.basic_publish("", routing_key, body.encode(), props, mandatory=True)

    # -- receive ---------------------------------------------------------------------------
    @_reconnecting
    def receive(self, visibility_timeout: float, max_messages: int = 1, *,
                worker: str = "worker") -> Received:
        """Take up to ``max_messages`` ready messages, oldest first (a message given back is
        served before the rest, as the quorum queue does), each with ``basic.get`` on a channel
        of its own, leased for ``visibility_timeout`` seconds on the broker's clock.

        First it ends the leases that ran out (closing their channels) and gives back the
        messages nacked with a delay that has passed. A message the server dead-letters on
        that return (its ``max_receives``-th delivery came back) is listed in ``parked``, after
        it reached the dead-letter queue. The receipt is a fresh token, the channel number
        and the delivery tag: unique for every delivery. A message taken by another connection
        is invisible here until that connection gives it back.

        A message with no identity (neither a ``message_id`` property nor an
        ``x-deliverylab-event-id`` header: a foreign producer's, pika's default) is never
        handed out: no inbox could tell its redelivery from a new message. It goes to the
        dead letters at once, as it came plus the reason :data:`NO_MESSAGE_ID`, and is listed
        in ``parked``; it does not count toward ``max_messages``."""
        vt = check_number("visibility_timeout", visibility_timeout, minimum=0,
                          maximum=MAX_VISIBILITY_TIMEOUT_S)
        n = check_int("max_messages", max_messages, minimum=1, maximum=1000)
        self._sweep()
        now, token = self.clock.now(), self.ids.receipt()
        out: list[Delivery] = []
        while len(out) < n:
            channel = self._idle.pop() if self._idle else self._conn.channel()
            method, props, body = channel.basic_get(self.queue)
            if method is None:
                self._idle.append(channel)
                break
            self._seq += 1
            receipt = f"{token}.{channel.channel_number}.{method.delivery_tag}"
            d = self._delivery(self._seq, props, body, receipt, now + vt)
            lease = _Lease(channel, method.delivery_tag, d, now + vt, props, body)
            if identity(props) is None:
                self._refuse(lease)
                continue
            self._leases[d.receipt] = lease
            out.append(d)
        self.parked, self._parking = self._parking, []
        return Received(out, self.parked)

    def _refuse(self, lease: _Lease) -> None:
        """Dead-letter a message with no identity at once (see :meth:`receive`)."""
        self._publish_dead(lease, NO_MESSAGE_ID)
        self._settle(lease)
        self._parking.append((lease.delivery, NO_MESSAGE_ID))

    def _delivery(self, seq: int, props: pika.BasicProperties, body: bytes, receipt: str,
                  lease_until: float) -> Delivery:
        headers = props.headers or {}
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):  # not ours: the worker's handler refuses it
            payload = {"body": body.decode(errors="replace")}
        # No identity: the message is refused before any worker sees it; its delivery names
        # no id (an empty event id matches no order: ids are never empty).
        message_id, event_id = identity(props) or ("", "")
        return Delivery(seq, message_id, event_id,
                        props.type or "", payload, props.correlation_id, receipt,
                        int(headers.get("x-delivery-count", 0)) + 1, lease_until,
                        self._errors.get(message_id))

    def _sweep(self) -> None:
        """End the leases that ran out (close their channels: the queue takes the messages
        back and counts a delivery) and give back what was nacked with a delay now passed."""
        now = self.clock.now()
        expired = [lease for lease in self._leases.values() if lease.until <= now]
        for lease in expired:
            del self._leases[lease.delivery.receipt]
        # Every held lease has its release_at (a nack with a delay put it there).
        due = [lease for lease in self._held if lease.release_at <= now]  # type: ignore[operator]
        if due:
            self._held = [lease for lease in self._held if lease.release_at > now]  # type: ignore[operator]
        self._give_back(expired, reject=False)
        self._give_back(due, reject=True)

    def _give_back(self, leases: list[_Lease], *, reject: bool) -> None:
        """Return messages to the queue: by closing their channels (a lease that ran out, a
        consumer that went away), or, for a nack, by ``basic.reject`` with requeue on a channel
        that stays open (it counts a delivery in every version; 4.3 stops counting
        ``basic.nack``). A message at its last delivery is dead-lettered by the server: wait
        until it is in the dead-letter queue, and park it."""
        if not leases:
            return
        last = [lease.delivery for lease in leases
                if lease.delivery.delivery_count >= self.max_receives]
        back = len(leases) - len(last)
        ready = self._count(self.queue) if back else 0
        dead = self._count(self.dlq) if last else 0
        for lease in leases:
            try:
                if reject:
                    lease.channel.basic_reject(lease.tag, requeue=True)
                    self._idle.append(lease.channel)
                else:
                    lease.channel.close()
            except _CHANNEL_GONE:
                pass  # closed already (by the server): the message went back then
        for d in last:  # the reason in the SQLite broker's words: the same trace
            self._errors.pop(d.message_id, None)
            times = "once" if d.delivery_count == 1 else f"{d.delivery_count} times"
            self._parking.append((d, f"received {times} (max_receives={self.max_receives});"
                                     f" last error: {d.last_error or 'none'}"))
        self._await(self.queue, ready + back, RETURN_WAIT_S)
        self._await(self.dlq, dead + len(last), DEAD_LETTER_WAIT_S)

    def _await(self, queue: str, count: int, timeout: float) -> None:
        """Wait until ``queue`` counts ``count`` ready messages, for at most ``timeout``
        seconds. A return is asynchronous (measured on 3.10.8: about 2 ms, under 10 ms), so
        without this a count or a ``next_visible_at`` right after it would not see the
        message, and a worker would think the queue empty. Another consumer taking the
        message meanwhile ends the wait only at the timeout."""
        deadline = time.monotonic() + timeout
        while self._count(queue) < count and time.monotonic() < deadline:
            self._conn.sleep(0.001)

    # -- settle ----------------------------------------------------------------------------
    def _take(self, delivery: Delivery) -> _Lease | None:
        """The lease ``delivery`` holds, removed from the current ones; None if its receipt is
        stale (settled, nacked, or its lease ended)."""
        lease = self._leases.pop(delivery.receipt, None)
        if lease is not None and not lease.channel.is_open:
            return None
        return lease

    def _settle(self, lease: _Lease) -> bool:
        """``basic.ack`` on the lease's channel; the channel is free again. False if the
        server closed the channel meanwhile (the message went back)."""
        try:
            lease.channel.basic_ack(lease.tag)
        except _CHANNEL_GONE:
            return False
        self._idle.append(lease.channel)
        return True

    def ack(self, delivery: Delivery, *, worker: str = "worker") -> bool:
        """``basic.ack`` if ``delivery`` still holds its channel's lease; False if the receipt
        is stale. AMQP confirms no ACK: True means the ACK left on an open channel. An ACK lost
        with the connection gives the message back, counted, as a closed channel does."""
        return self.ack_many([delivery], worker=worker)[0]

    @_reconnecting
    def ack_many(self, deliveries: list[Delivery], *, worker: str = "worker") -> list[bool]:
        """:meth:`ack` for each, in order (one ``basic.ack`` on each delivery's channel)."""
        if not isinstance(deliveries, list | tuple):
            raise InvalidInput("deliveries", deliveries, "a list of deliveries")
        for d in deliveries:
            check_delivery(d)
        out = []
        for d in deliveries:
            lease = self._take(d)
            out.append(lease is not None and self._settle(lease))
            if out[-1]:
                self._errors.pop(d.message_id, None)
        return out

    @_reconnecting
    def extend(self, delivery: Delivery, seconds: float, *, worker: str = "worker") -> bool:
        """Move the lease's end on the broker's clock to ``seconds`` past now. RabbitMQ itself
        has no per-message visibility timeout: it keeps an unacked message as long as its
        channel lives (up to the server's consumer timeout, 30 minutes by default)."""
        check_delivery(delivery)
        s = check_number("seconds", seconds, minimum=0, maximum=MAX_VISIBILITY_TIMEOUT_S)
        lease = self._leases.get(delivery.receipt)
        if lease is None or not lease.channel.is_open:
            return False
        lease.until = self.clock.now() + s
        return True

    @_reconnecting
    def nack(self, delivery: Delivery, delay: float = 0.0, *, error: str | None = None,
             worker: str = "worker") -> bool:
        """Give the message back: at once with ``basic.reject`` and requeue (the queue counts a
        delivery), or, with a delay, after it: RabbitMQ 3.10 has no delayed requeue without a
        plugin, so the broker keeps the message unacked on its channel, invisible to every
        consumer, and rejects it at its first verb after the delay. If this process dies
        first, the closed channel gives it back early, never late, and never loses it.

        Why not the usual substitute, a retry queue per delay whose TTL dead-letters back:
        the message would come back as a copy, and ``x-delivery-count`` is counted per queue
        (a dead-lettered copy starts again at 0, measured), so ``max_receives`` would no longer
        hold; and one queue per delay value, since a per-message TTL expires only at the head.

        ``error`` cannot travel with a requeued message: this broker keeps it and sets it as
        ``last_error`` on the message's next delivery here."""
        check_delivery(delivery)
        d = check_number("delay", delay, minimum=0, maximum=MAX_VISIBILITY_TIMEOUT_S)
        lease = self._take(delivery)
        if lease is None:
            return False
        if error is not None:
            self._errors[delivery.message_id] = error
        lease.delivery = delivery._replace(last_error=error or delivery.last_error)
        if d == 0:
            self._give_back([lease], reject=True)
        else:
            lease.release_at = self.clock.now() + d
            self._held.append(lease)
        return True

    @_reconnecting
    def abandon(self, deliveries: list[Delivery]) -> None:
        """Close the channel of each delivery still held (a lost ACK, a crash): the queue
        takes the message back at once, with ``redelivered=true`` and its count bumped, as
        when the consumer's connection drops. This is how the worker's lost ACK is injected:
        the effect has committed, then the channel closes before ``basic.ack``."""
        if not isinstance(deliveries, list | tuple):
            raise InvalidInput("deliveries", deliveries, "a list of deliveries")
        for d in deliveries:
            check_delivery(d)
        self._give_back([lease for lease in map(self._take, deliveries) if lease is not None],
                        reject=False)

    @_reconnecting
    def dead_letter(self, delivery: Delivery, error: str, *, worker: str = "worker") -> bool:
        """Publish the message to the dead-letter queue (confirmed), then ack it: at least
        once, like the server's own dead-lettering (a crash between the two leaves it in both
        queues). The dead letter keeps the ids, payload and delivery count."""
        check_delivery(delivery)
        check_text("error", error, max_length=10_000)
        lease = self._take(delivery)
        if lease is None:
            return False
        self._publish_dead(lease, error)
        self._settle(lease)
        self._errors.pop(lease.delivery.message_id, None)
        return True

    def _publish_dead(self, lease: _Lease, error: str) -> None:
        """Publish the leased message to the dead-letter queue (confirmed) as it came: its
        body's bytes and its properties and headers, plus the reason and the delivery
        count."""
        headers = {**(lease.props.headers or {}), ERROR: error,
                   DELIVERIES: lease.delivery.delivery_count}
        self._control.basic_publish("", self.dlq, lease.body,
                                    dead_properties(lease.props, headers), mandatory=True)

    # -- the dead letters --------------------------------------------------------------------
    def _read_dead_letters(self) -> list[tuple[int, pika.BasicProperties, bytes]]:
        """Every dead letter, taken on the dead-letter channel and left unacked there: the
        caller acks what it moves and gives the rest back (:meth:`_return_dead_letters`)."""
        out: list[tuple[int, pika.BasicProperties, bytes]] = []
        while True:
            method, props, body = self._dead.basic_get(self.dlq)
            if method is None:
                return out
            out.append((method.delivery_tag, props, body))

    def _return_dead_letters(self, taken: int) -> None:
        """Give back the ``taken`` dead letters still held on the dead-letter channel, and
        wait (up to :data:`DEAD_LETTER_WAIT_S`) until the queue counts them ready again: the
        return is asynchronous, and a count right after it would miss them."""
        if not taken:
            return
        self._dead.basic_nack(0, multiple=True, requeue=True)
        self._await(self.dlq, taken, DEAD_LETTER_WAIT_S)

    @_reconnecting
    def dead_lettered_event_ids(self) -> set[str]:
        """Read from the dead-letter queue (taken and given back on one channel)."""
        letters = self._read_dead_letters()
        self._return_dead_letters(len(letters))
        return {ident[1] for _, props, _ in letters if (ident := identity(props)) is not None}

    @_reconnecting
    def dead_letters_without_id(self) -> int:
        """The dead letters with no identity (read as :meth:`dead_lettered_event_ids`)."""
        letters = self._read_dead_letters()
        self._return_dead_letters(len(letters))
        return sum(1 for _, props, _ in letters if identity(props) is None)

    @_reconnecting
    def redrive(self, message_ids: list[str] | None = None, *, worker: str = "operator") -> int:
        """Publish dead letters (all, or the given message ids) to the queue as new messages
        (new ids, delivery count from 1 again; the body's bytes, properties and headers as the
        message first came, its event id kept), each confirmed before its dead letter is
        acked; return how many moved. An id that is not a dead letter moves nothing. A dead
        letter with no identity (:data:`NO_MESSAGE_ID`) stays: it would only be refused
        again."""
        if message_ids is not None and (not isinstance(message_ids, list | tuple) or not all(
                isinstance(m, str) for m in message_ids)):
            raise InvalidInput("message_ids", message_ids, "a list of message ids or None")
        letters = self._read_dead_letters()
        by_id = {ident[0]: (tag, props, body) for tag, props, body in reversed(letters)
                 if (ident := identity(props)) is not None}
        if message_ids is None:  # a letter with no identity would only be refused again
            chosen = [letter for letter in letters if identity(letter[1]) is not None]
        else:
            missing = [m for m in message_ids if m not in by_id]
            if missing:
                self._return_dead_letters(len(letters))
                raise InvalidInput("message_ids", missing[0], "the id of a dead letter")
            chosen = [by_id[m] for m in dict.fromkeys(message_ids)]
        for tag, props, body in chosen:
            # Only letters with an identity were chosen (both ways above).
            _, event_id = identity(props)  # type: ignore[misc]
            headers = {k: v for k, v in (props.headers or {}).items() if k not in _DEAD_HEADERS}
            headers[EVENT_ID] = event_id
            self._control.basic_publish(
                "", self.queue, body,
                dead_properties(props, headers, message_id=self.ids.message_id()),
                mandatory=True)
            self._dead.basic_ack(tag)
        self._return_dead_letters(len(letters) - len(chosen))
        return len(chosen)

    # -- fault injection ---------------------------------------------------------------------
    @_reconnecting
    def drop(self, message_id: str, *, reason: str = "dropped", worker: str = "chaos") -> bool:
        """Forget a message this broker holds (leased, or nacked with a delay): ack it, logged
        by the caller as ``lost``. A message waiting in the queue cannot be picked by id:
        RabbitMQ hands out messages in order, and taking the ones before it would count a
        delivery on each, so that is refused with ``NotImplementedError``."""
        check_text("message_id", message_id)
        for lease in [*self._leases.values(), *self._held]:
            if lease.delivery.message_id == message_id:
                return self.lose(lease.delivery, reason=reason, worker=worker)
        raise NotImplementedError(
            f"drop on RabbitMQ: {message_id!r} is not held by this broker, and a queued message"
            f" cannot be picked by id without receiving (and counting) the ones before it")

    @_reconnecting
    def lose(self, delivery: Delivery, *, reason: str, worker: str = "chaos") -> bool:
        """Ack the message this broker holds for ``delivery`` (the receipt not checked: any
        lease or delayed nack of that message here), as an auto-ack consumer that died would
        have lost it. False if this broker holds it no more."""
        check_delivery(delivery)
        for receipt, lease in list(self._leases.items()):
            if lease.delivery.message_id == delivery.message_id:
                del self._leases[receipt]
                return lease.channel.is_open and self._settle(lease)
        for lease in self._held:
            if lease.delivery.message_id == delivery.message_id:
                self._held.remove(lease)
                return lease.channel.is_open and self._settle(lease)
        return False

    # -- look ------------------------------------------------------------------------------
    def _count(self, queue: str) -> int:
        """Messages ready in ``queue`` (a passive declare: not those unacked anywhere)."""
        count: int = self._control.queue_declare(queue, passive=True).method.message_count
        return count

    @_reconnecting
    def depth(self) -> dict[str, int]:
        """``visible``: ready in the queue, as the server counts it; ``in_flight``: what this
        broker holds (leased or nacked with a delay), since AMQP does not count the messages
        other connections hold; ``dead_letters``: ready in the dead-letter queue."""
        self._sweep()
        return {"visible": self._count(self.queue),
                "in_flight": len(self._leases) + len(self._held),
                "dead_letters": self._count(self.dlq)}

    @_reconnecting
    def next_visible_at(self) -> float | None:
        """Now if a message is ready, else the earliest end of a lease or delay this broker
        holds, else None (messages other connections hold are not seen). An idle worker asks
        this between receives, so it also checks that the dead-letter queue is still there:
        without it, the server would drop what it dead-letters (:class:`BrokerGone`)."""
        self._sweep()
        if self._count(self.queue):
            return self.clock.now()
        self._count(self.dlq)
        times = [lease.until for lease in self._leases.values()]
        times += [lease.release_at for lease in self._held if lease.release_at is not None]
        return min(times, default=None)

    @_reconnecting
    def queued_event_ids(self) -> set[str]:
        """The event ids of the messages this broker holds, when no message is ready.

        RabbitMQ cannot list a queue without receiving its messages, and receiving counts a
        delivery on a quorum queue (toward ``max_receives``). So with messages ready this
        raises ``NotImplementedError`` rather than answer wrong; the checker asks when the
        workers are done, with the queue drained. Messages held by another connection are not
        seen: ask when the other consumers have stopped (their messages are then ready)."""
        self._sweep()
        ready = self._count(self.queue)
        if ready:
            raise NotImplementedError(
                f"queued_event_ids on RabbitMQ: {ready} messages are ready in {self.queue!r},"
                f" and listing them would mean receiving them, which counts a delivery; ask"
                f" when the queue is drained")
        return {lease.delivery.event_id for lease in [*self._leases.values(), *self._held]}

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection: every message this broker holds goes back to the queue
        (counted), as when the process dies."""
        if self._conn.is_open:
            self._conn.close()
        self._leases.clear()
        self._held.clear()
        self._idle.clear()

    def destroy(self) -> None:
        """Delete the queue, its dead-letter queue and exchange, whatever they hold, then
        close. For tests and benchmarks that made a queue of their own."""
        if self._conn.is_open:
            for lease in [*self._leases.values(), *self._held]:
                if lease.channel.is_open:
                    lease.channel.close()
            self._control.queue_delete(self.queue)
            self._control.queue_delete(self.dlq)
            self._control.exchange_delete(self.dlx)
        self.close()


def _shown(url: str) -> str:
    """``url`` with its password hidden, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}"))


def open_url(url: str, *, field: str = "broker", clock: Clock, ids: Ids,
             max_receives: int | None = None, worker: str = "deliverylab",
             create: bool = True) -> RabbitMQBroker:
    """Connect to ``amqp://user:password@host:port/vhost?queue=NAME`` (pika's other URL
    options, such as ``heartbeat``, pass through; without one the heartbeat is
    :data:`HEARTBEAT_S`). A bad URL, an unknown option, a queue name that is not clean UTF-8
    once percent-decoded (``queue=x%FF``), a server that does not answer or refuses the login
    is :class:`InvalidInput` naming ``field`` and the URL (password hidden), with the reason.

    ``max_receives``: the queue's delivery limit, declared (a worker); None opens an existing
    queue as it is (see :class:`RabbitMQBroker`). ``create=False`` creates nothing: a missing
    queue is refused with "no such queue"."""
    if not isinstance(url, str):
        raise InvalidInput(field, url, "an amqp:// URL")
    shown = _shown(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        raise InvalidInput(field, shown, f"an amqp:// URL ({exc})") from None
    if parts.scheme.lower() != "amqp" or not parts.hostname:
        raise InvalidInput(field, shown, "an amqp:// URL with a host"
                                         " (amqp://user:password@host:5672/%2F?queue=NAME)")
    try:  # percent-decoded once, strictly: %FF is no UTF-8, and is refused, not replaced
        query = parse_qsl(parts.query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidInput(field, shown, f"an amqp:// URL whose options are UTF-8 once"
                                         f" percent-decoded ({exc.reason} at"
                                         f" {exc.object[exc.start:exc.end]!r})") from None
    queues = [v for k, v in query if k == "queue"]
    if len(queues) != 1:
        raise InvalidInput(field, shown, "an amqp:// URL naming one queue (?queue=NAME)")
    try:
        check_queue_name("queue", queues[0])
    except InvalidInput as exc:
        raise InvalidInput(field, shown, f"an amqp:// URL with a valid queue name"
                                         f" ({exc})") from None
    rest = urlencode([(k, v) for k, v in query if k != "queue"], quote_via=quote)
    try:
        params = pika.URLParameters(urlunsplit(parts._replace(query=rest, fragment="")))
    except (ValueError, TypeError) as exc:
        raise InvalidInput(field, shown, f"an amqp:// URL pika accepts ({exc})") from None
    params.connection_attempts, params.socket_timeout = 1, 5
    bounded(params, heartbeat=not any(k == "heartbeat" for k, _ in query))
    try:
        return RabbitMQBroker(queues[0], clock=clock, ids=ids, max_receives=max_receives,
                              parameters=params, name=worker, create=create)
    except InvalidInput as exc:
        if exc.field != "queue":
            raise
        raise InvalidInput(field, shown, f"an amqp:// URL whose queue can be opened"
                                         f" ({exc.expected})") from None
    except pika.exceptions.ProbableAuthenticationError:
        raise InvalidInput(field, shown, "an amqp:// URL whose user and password the server"
                                         " accepts (login refused)") from None
    except pika.exceptions.ProbableAccessDeniedError:
        raise InvalidInput(field, shown, "an amqp:// URL with a virtual host the user may"
                                         " use (access refused)") from None
    except pika.exceptions.AMQPConnectionError as exc:
        # pika wraps the cause: AMQPConnectorSocketConnectError: ConnectionRefusedError(…)
        reason = "; ".join(str(a) or repr(a) for a in exc.args) or type(exc).__name__
        raise InvalidInput(field, shown, f"the URL of a reachable RabbitMQ server"
                                         f" ({reason})") from None


# -- for the registry ---------------------------------------------------------------------------
BROKER = RabbitMQBroker


def scratch_url(server: str, name: str, *, lease: float = 1.0,
                dedup_window: float | None = None) -> str:
    """The URL of queue ``name`` on ``server`` (a throwaway one: ``destroy()`` deletes it).
    ``lease`` is unused: a receive sets its own. RabbitMQ has no producer dedup."""
    if dedup_window is not None:
        raise InvalidInput("dedup_window", dedup_window, "None: RabbitMQ has no producer dedup")
    return f"{server}?queue={name}"


def removal_of(url: str, *, field: str = "broker") -> Removal:
    """What ``deliverylab cleanup`` removes for the ``amqp://`` URL ``url``: the queue, its
    dead letters ``QUEUE.dlq`` and its exchange ``QUEUE.dlx``. Reads only (passive declares:
    nothing is created). A bad URL, a login refused or a server that does not answer is
    InvalidInput naming ``field``; a queue already gone is said, not refused."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    queues = [v for k, v in query if k == "queue"]
    if len(queues) != 1 or not parts.hostname:
        raise InvalidInput(field, url, "an amqp:// URL with a host, naming one queue"
                                       " (amqp://user:password@host:5672/%2F?queue=NAME)")
    queue = unquote(queues[0])
    try:
        check_queue_name("queue", queue)
    except InvalidInput as exc:
        raise InvalidInput(field, url, f"an amqp:// URL with a valid queue name ({exc})"
                           ) from None
    rest = urlencode([(k, v) for k, v in query if k != "queue"], quote_via=quote)
    try:
        params = pika.URLParameters(urlunsplit(parts._replace(query=rest, fragment="")))
    except (ValueError, TypeError) as exc:
        raise InvalidInput(field, url, f"an amqp:// URL pika accepts ({exc})") from None
    params.connection_attempts, params.socket_timeout = 1, 5
    dlq, dlx = f"{queue}.dlq", f"{queue}.dlx"

    def connect() -> Any:
        try:
            return pika.BlockingConnection(params)
        except pika.exceptions.ProbableAuthenticationError:
            raise InvalidInput(field, url, "an amqp:// URL whose user and password the server"
                                           " accepts (login refused)") from None
        except pika.exceptions.AMQPConnectionError as exc:
            reason = "; ".join(str(a) or repr(a) for a in exc.args) or type(exc).__name__
            raise InvalidInput(field, url, f"the URL of a reachable RabbitMQ server ({reason})"
                               ) from None

    conn = connect()
    try:
        found: dict[str, int] = {}
        for name in (queue, dlq):
            channel = conn.channel()
            try:
                found[name] = channel.queue_declare(name, passive=True).method.message_count
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:  # 404: no such queue
                pass
        channel = conn.channel()
        try:
            channel.exchange_declare(dlx, passive=True)
            channel.close()
            exchange = True
        except pika.exceptions.ChannelClosedByBroker:
            exchange = False
    finally:
        conn.close()
    if not found and not exchange:
        return Removal(f"RabbitMQ queue {queue} (not there: nothing to remove)")
    listed = [f"queue {n} ({found[n]} messages)" for n in (queue, dlq) if n in found]
    if exchange:
        listed.append(f"exchange {dlx}")

    def remove() -> None:
        c = connect()
        try:
            ch = c.channel()
            for name in found:
                ch.queue_delete(name)
            if exchange:
                ch.exchange_delete(dlx)
        finally:
            c.close()

    return Removal(f"RabbitMQ queue {queue}", remove, listed)
