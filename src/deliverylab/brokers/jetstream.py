"""NATS JetStream behind the broker contract (nats-py on a NATS 2.9 server).

The queue is a JetStream stream with work-queue retention and one durable pull consumer with
explicit acks: a message stays in the stream until it is acked (or terminated, or deleted),
so the stream *is* the queue and :meth:`JetStreamBroker.queued_event_ids` reads it message by
message. (Limits retention would keep acked messages too, and "what is still queued" would
then have to be worked out from the consumer's ack floor and its gaps.)

How the contract's words map onto JetStream, and where the server decides instead of us:

* **lease** = the consumer's ``AckWait``, one value for every delivery, on the *server's*
  clock. ``receive``'s ``visibility_timeout`` is checked but cannot change it; ``lease_until``
  is ``clock.now() + ack_wait``. ``extend`` sends ``in_progress()`` (``+WPI``), which restarts
  AckWait from now: it cannot move the lease to an arbitrary time.
* **delivery count** = ``metadata.num_delivered``, counted by the server from 1.
* **receipt** = the delivery's reply subject ``$JS.ACK.<stream>.<consumer>.<delivered>.
  <stream seq>.<consumer seq>.<ts>.<pending>``, unique per delivery. But the server finds the
  message by its stream sequence alone: measured on 2.9.10, an ack, nak, in-progress or term
  sent on an *older* delivery's reply subject after the message was redelivered is accepted
  and acts on the message the current holder has (the stale ack deletes it, the stale nak
  hands it out again at once, the stale in-progress restarts the holder's AckWait). So here a
  stale receipt is **not** refused: the one check made before a verb is that the message is
  still in the stream (the verb answers False for a message already acked, dead-lettered or
  dropped). The contract suite states this difference case by case. An ack skips that
  check, and its round trip, while this broker holds the delivery's lease with time to spare
  (a quarter of AckWait, at most a second): the server hands the message to no one else
  then, so only another process acting on it by hand (a stale holder's ack, an operator's
  dead-letter) could have removed it, and the ack then answers True for a message already
  gone.
* **ack** = ``ack_sync()`` by default: the ack is a request and the broker waits for the
  server's reply (2.9.10 replies with an empty body to every ack, stale or not, so the reply
  says only that the server received it). ``confirm_acks=False`` sends ``ack()``, fire and
  forget: the verb returns once the ack is in the client's buffer; a process that dies before
  the buffer is flushed never acked, and those messages come back after AckWait.
* **nack(delay)** = ``nak(delay)``. The contract's ``last_error`` has no place in JetStream:
  this broker keeps the error of a nack in its own memory and shows it on the next delivery
  it hands out; another process does not see it.
* **dead letters.** At ``MaxDeliver`` (= ``max_receives``) the server stops delivering and
  publishes the advisory ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>``;
  the message stays in the stream. On 2.9.10 the advisory comes only when the server next
  tries to deliver, i.e. during a later fetch. A stream ``<stream>_ADVISORIES`` captures the
  advisories (so none is lost while no worker runs) and a durable consumer on it hands each to
  one broker: its ``receive`` copies the message into the dead-letter stream
  ``<stream>_DEAD`` (with its event id, delivery count and reason), deletes it from the queue,
  acks the advisory and lists it in ``parked``. ``dead_letter`` does the same by hand and
  terminates the delivery (``term()``).
* **message id** = ``<stream>-<stream sequence>``. A publish answers with its sequence; a
  duplicate publish (same ``Nats-Msg-Id`` within the duplicate window) answers with the
  *first* send's sequence and ``duplicate=True``, never its headers, and the first message
  may already be acked and gone: the sequence is the one name the server can give back.
  Redrive publishes anew, so a redriven message has a new sequence and a new id.
* **event id** = the ``Deliverylab-Event-Id`` header, else the producer's ``Nats-Msg-Id``
  (see :func:`event_id_of`); a message with neither is dead-lettered at once, reason ``no
  message id``. A body that is not a JSON object is handed out as ``{"body": text}`` and
  dead-lettered at ``max_receives``; a dead letter is the stream's message as it was (bytes
  and headers) plus the reason. A stream or consumer deleted underneath raises
  :class:`~deliverylab.brokers.base.BrokerGone` naming it.
* **producer dedup** = ``Nats-Msg-Id`` = ``dedup_id``, remembered for the stream's
  ``duplicate_window`` (:attr:`dedup_window`); after the window the same id is stored again.
  A send without ``dedup_id`` gets a random ``Nats-Msg-Id`` of its own, so the broker's own
  retry of a publish (a timeout, a cluster's leader change) is still stored once.
* **delay**: JetStream 2.9 has no delayed publish; ``send(delay>0)`` raises
  ``NotImplementedError`` (``nack`` with a delay works: ``nak(delay)``).

nats-py is asyncio and the contract is synchronous: the broker runs a private event loop in a
daemon thread and every verb waits for its coroutine there, with a timeout. The client
reconnects on its own (to any server of the list, for a cluster) and the broker retries a
request that timed out or found no leader (each attempt waits at most 2 s, so a request lost
with a dead leader is sent again to the next one) until ``timeout`` runs out. Then the verb
raises :class:`~deliverylab.engine.errors.BrokerUnavailable`, never nats-py's own errors: a
worker waits and tries again, as through a leader election that outlasts ``timeout``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import re
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import nats
from nats.errors import (
    ConnectionClosedError,
    ConnectionReconnectingError,
    NoRespondersError,
    OutboundBufferLimitError,
    StaleConnectionError,
)
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import (
    APIError,
    BadRequestError,
    NoStreamResponseError,
    NotFoundError,
    ServerError,
    ServiceUnavailableError,
)

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
    UrlLease,
    check_delivery,
    check_send,
)

T = TypeVar("T")

# Our headers on every message (the payload is the body, as JSON).
EVENT_ID = "Deliverylab-Event-Id"
TYPE = "Deliverylab-Type"
CORRELATION_ID = "Deliverylab-Correlation-Id"
# ... and on a dead letter, besides those.
MESSAGE_ID = "Deliverylab-Message-Id"
DELIVERY_COUNT = "Deliverylab-Delivery-Count"
ERROR = "Deliverylab-Error"

CONSUMER = "workers"  # the durable pull consumer every worker of a stream shares
PARKER = "parker"  # the durable consumer on the advisories stream
ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"
# The server's error codes for "no such message": get (10037) and delete (10057) differ.
NO_MESSAGE = {10037, 10057}
STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,48}\Z")
DEFAULT_PORT = 4222
# Advisories fetched per receive at most, and how long a fetch of them may wait.
_ADVISORY_BATCH = 100
_ADVISORY_WAIT = 0.05
# The bound on a silent link (packets dropped, not refused): the client pings the server
# every PING_S seconds and, with more than MAX_PINGS pings unanswered, drops the connection
# as stale and reconnects: within (MAX_PINGS + 1) × PING_S = 15 s, not nats-py's default of
# 120 s × 3 (six minutes, every verb BrokerUnavailable meanwhile). The pings run in the
# broker's own loop thread, so a long handler in the worker does not starve them.
PING_S = 5
MAX_PINGS = 2
# get_msg requests in flight at once when a stream is read message by message.
_READ_AHEAD = 256
# The longest one attempt of a request waits: a request sent to a leader that just died gets
# no answer, and is sent again (to the next leader) after this.
_ATTEMPT_S = 2.0
# What passes: no answer in time, no leader or no responder yet (a cluster electing one, a
# server restarting), JetStream answering 503 or 500 during the election, the client between
# two connections. Retried within a verb; past ``timeout``, ``BrokerUnavailable``.
_TRANSIENT = (TimeoutError, NatsTimeout, NoRespondersError, NoStreamResponseError,
              ServiceUnavailableError, ServerError, ConnectionReconnectingError,
              StaleConnectionError, OutboundBufferLimitError)


# The server's error codes for a stream and a consumer that do not exist.
NO_STREAM, NO_CONSUMER = 10059, 10014


def event_id_of(headers: dict[str, str] | None) -> str | None:
    """A message's event id: the ``Deliverylab-Event-Id`` header, else the producer's own
    ``Nats-Msg-Id`` (the name its producer gave it for JetStream's dedup, the same on every
    redelivery and every re-publish); None when it has neither, and no inbox could tell its
    redelivery from another message."""
    for key in (EVENT_ID, "Nats-Msg-Id"):
        value = (headers or {}).get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def payload_of(data: bytes | None) -> dict[str, Any]:
    """The body as a JSON object; anything else (not JSON, not UTF-8, not an object: a
    foreign producer's) as ``{"body": <the text, undecodable bytes replaced>}``, which the
    worker's handler refuses, so the message is retried and dead-lettered at
    ``max_receives``, its original bytes kept in the dead letter."""
    try:
        payload = json.loads(data or b"")
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        payload = {"body": (data or b"").decode(errors="replace")}
    return payload


DEFAULT_ACK_WAIT_S = 30.0
"""The consumer's ``AckWait`` when none is given: NATS's own default, and the lease of every
delivery (see :class:`JetStreamBroker`)."""


class _Loop:
    """A private asyncio event loop in a daemon thread: the synchronous verbs call into it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait at most ``timeout`` seconds for it."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"JetStream did not answer within {timeout:g}s") from None

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class JetStreamBroker(Broker):
    """A queue on a JetStream stream; see the module docstring for every engine difference.

    ``servers``: one ``nats://host:port`` or a list of them (a cluster: the client reconnects
    to the survivors when one dies). ``stream``: the stream's name; the broker creates (or
    reuses, if the configuration matches) the stream ``stream``, its dead letters
    ``<stream>_DEAD``, its advisories ``<stream>_ADVISORIES`` and their consumers, each with
    ``replicas`` replicas. ``ack_wait`` is the lease (seconds), ``max_receives`` the consumer's
    ``MaxDeliver``, ``dedup_window`` the stream's duplicate window (seconds).
    ``confirm_acks=False`` acks with ``ack()`` (fire and forget) instead of ``ack_sync()``.
    ``fetch_wait`` bounds how long an empty ``receive`` waits for a message; ``timeout`` bounds
    every request, retries included. :meth:`destroy` deletes the streams; :meth:`close`
    disconnects and stops the loop thread.

    ``max_receives=None`` opens the stream as it is: an existing consumer's ``MaxDeliver`` and
    ``AckWait`` and the stream's duplicate window are taken as they are (what the operator
    commands and the relay do: the workers chose them). ``create=False`` creates nothing: a
    missing stream or consumer is refused with "no such stream" / "no such consumer".
    """

    # No delayed publish in 2.9; a stale receipt acts on the message (found by its stream
    # sequence); the server times the lease, one AckWait (this default's, until __init__ sets
    # the stream's) for every receive.
    capabilities = Capabilities(delayed_send=False, refuses_stale_receipts=False,
                                lease_clock="server", fixed_lease=DEFAULT_ACK_WAIT_S,
                                dedup_window=120.0)
    dedup_window: float  # JetStream always dedups: the stream's duplicate window

    def __init__(self, servers: str | list[str] = f"nats://127.0.0.1:{DEFAULT_PORT}", *,
                 stream: str, clock: Clock, ids: Ids,
                 max_receives: int | None = DEFAULT_MAX_RECEIVES,
                 ack_wait: float = DEFAULT_ACK_WAIT_S, replicas: int = 1, dedup_window: float = 120.0,
                 confirm_acks: bool = True, fetch_wait: float = 0.1, timeout: float = 10.0,
                 name: str = "worker", field: str = "broker", create: bool = True) -> None:
        if isinstance(servers, str):
            servers = [servers]
        if not isinstance(servers, list) or not servers or not all(
                isinstance(s, str) and s.startswith("nats://") for s in servers):
            raise InvalidInput("servers", servers, "a nats://host:port or a list of them")
        if not isinstance(stream, str) or not STREAM_NAME.match(stream):
            raise InvalidInput("stream", stream,
                               "a stream name of 1 to 48 letters, digits, '-' or '_'")
        if not isinstance(confirm_acks, bool):
            raise InvalidInput("confirm_acks", confirm_acks, "True or False")
        self.clock, self.ids = clock, ids
        self._adopt, self._create = max_receives is None, create
        self.max_receives = DEFAULT_MAX_RECEIVES if max_receives is None else check_int(
            "max_receives", max_receives, minimum=1)
        self.ack_wait = check_number("ack_wait", ack_wait, minimum=0.1,
                                     maximum=MAX_VISIBILITY_TIMEOUT_S)
        self.replicas = check_int("replicas", replicas, minimum=1, maximum=5)
        self.dedup_window = check_number("dedup_window", dedup_window, minimum=0.1,
                                         maximum=MAX_VISIBILITY_TIMEOUT_S)
        self.capabilities = replace(type(self).capabilities, fixed_lease=self.ack_wait,
                                    dedup_window=self.dedup_window)
        self.fetch_wait = check_number("fetch_wait", fetch_wait, minimum=0.001, maximum=60)
        self.timeout = check_number("timeout", timeout, minimum=0.1, maximum=600)
        self.confirm_acks = confirm_acks
        self.servers, self.stream = servers, stream
        self.dead_stream = f"{stream}_DEAD"
        self.advisory_stream = f"{stream}_ADVISORIES"
        self.subject = f"deliverylab.{stream}.queue"
        self.dead_subject = f"deliverylab.{stream}.dead"
        self.advisory_subject = ADVISORY.format(stream=stream, consumer=CONSUMER)
        self.parked: list[tuple[Delivery, str]] = []
        # What this broker alone knows: the error of each message it nacked (JetStream keeps
        # none), and when each message it leased or nacked is due back (for next_visible_at).
        self._errors: dict[int, str] = {}
        self._due: dict[int, float] = {}
        self._advised = True  # look for advisories on the first receive (left from before)
        self._loop = _Loop(f"jetstream-{stream}")
        try:
            self._run(self._open(check_id("name", name)), "connect")
        except (OSError, NatsError, BrokerUnavailable) as exc:
            self.close()
            where = ",".join(servers)
            raise InvalidInput(field, f"{where}?stream={stream}",
                               f"a reachable NATS server with JetStream ({exc or type(exc).__name__})"
                               ) from None
        except InvalidInput:
            self.close()
            raise

    # -- the loop ----------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T], verb: str) -> T:
        """Run ``coro`` on the loop for the verb named ``verb``; a transient error (or no
        answer within ``timeout``) raises ``BrokerUnavailable`` naming the verb."""
        try:
            return self._loop.run(coro, self.timeout + 1)
        except NotFoundError as exc:
            if exc.err_code not in (NO_STREAM, NO_CONSUMER):
                raise
            raise BrokerGone(self._missing(), exc.description or "") from None
        except (*_TRANSIENT, ConnectionClosedError) as exc:
            # ConnectionClosedError: the client stopped reconnecting (about a minute with no
            # server); unavailable still, to the caller, which may open a new broker.
            raise BrokerUnavailable(verb, f"{type(exc).__name__}: {exc}".rstrip(": ")
                                    ) from None

    def _missing(self) -> str:
        """Which of the broker's streams and consumers no longer exists, in words."""
        async def look() -> str:
            for stream, consumer in ((self.stream, CONSUMER), (self.dead_stream, None),
                                     (self.advisory_stream, PARKER)):
                try:
                    await self._api.stream_info(stream)
                except NotFoundError:
                    return f"the stream {stream!r}"
                if consumer is not None:
                    try:
                        await self._api.consumer_info(stream, consumer)
                    except NotFoundError:
                        return f"the consumer {consumer!r} of the stream {stream!r}"
            return f"a stream or consumer of {self.stream!r}"
        try:
            return self._loop.run(look(), self.timeout + 1)
        except Exception:  # noqa: BLE001 -- naming it is a courtesy: never hide the cause
            return f"a stream or consumer of {self.stream!r}"

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` again after a timeout, a missing responder or JetStream unavailable
        (a server restarting, a cluster electing a leader) until ``timeout`` runs out; the
        last error then."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            try:
                return await attempt()
            except _TRANSIENT:
                if asyncio.get_running_loop().time() + 0.25 >= deadline:
                    raise
                await asyncio.sleep(0.25)

    async def _open(self, name: str) -> None:
        # Fail fast when no server of the list accepts a connection: the client would keep
        # trying for as long as it reconnects (about a minute).
        if not any(await asyncio.gather(*(_reachable(s) for s in self.servers))):
            raise ConnectionRefusedError(f"no server answers at {', '.join(self.servers)}")
        self.nc = await nats.connect(
            servers=self.servers, name=name, connect_timeout=2,
            # Reconnect to any server of the list, for as long as it takes: a verb meanwhile
            # raises BrokerUnavailable after ``timeout``, and the worker backs off and tries
            # again (a client that gave up would leave it unavailable for good).
            allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            ping_interval=PING_S, max_outstanding_pings=MAX_PINGS,
            error_cb=self._quiet, disconnected_cb=self._quiet_event,
            reconnected_cb=self._quiet_event)
        self.js = self.nc.jetstream(timeout=self.timeout)
        # The same API with a short wait per attempt, for the requests _retrying repeats.
        self._api = self.nc.jetstream(timeout=min(self.timeout, _ATTEMPT_S))
        storage = api.StorageType.FILE
        await self._ensure_stream(api.StreamConfig(
            name=self.stream, subjects=[self.subject], storage=storage,
            retention=api.RetentionPolicy.WORK_QUEUE, num_replicas=self.replicas,
            duplicate_window=self.dedup_window))
        await self._ensure_stream(api.StreamConfig(
            name=self.dead_stream, subjects=[self.dead_subject], storage=storage,
            retention=api.RetentionPolicy.LIMITS, num_replicas=self.replicas))
        await self._ensure_stream(api.StreamConfig(
            name=self.advisory_stream, subjects=[self.advisory_subject], storage=storage,
            retention=api.RetentionPolicy.WORK_QUEUE, num_replicas=self.replicas))
        await self._ensure_consumer(self.stream, api.ConsumerConfig(
            durable_name=CONSUMER, ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL, ack_wait=self.ack_wait,
            max_deliver=self.max_receives, max_ack_pending=-1, max_waiting=512))
        await self._ensure_consumer(self.advisory_stream, api.ConsumerConfig(
            durable_name=PARKER, ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL, ack_wait=30.0))
        self._sub = await self.js.pull_subscribe_bind(CONSUMER, self.stream)
        self._parker = await self.js.pull_subscribe_bind(PARKER, self.advisory_stream)
        # The advisory itself, as a signal: a receive looks in the advisories stream only
        # after one came (or on its first call).
        self._signal = await self.nc.subscribe(self.advisory_subject, cb=self._on_advisory)

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        """Create the stream, or check that the one there has this broker's settings."""
        assert config.name is not None
        try:
            have = (await self.js.stream_info(config.name)).config
        except NotFoundError:
            if not self._create:
                raise InvalidInput("stream", config.name, "an existing stream (no such stream:"
                                                          " nothing was created)") from None
            try:
                await self.js.add_stream(config)
                return
            except BadRequestError:  # another process created it meanwhile: check it
                have = (await self.js.stream_info(config.name)).config
        if self._adopt and config.name == self.stream:  # as the workers' broker made it
            self.dedup_window = config.duplicate_window = have.duplicate_window
            self.replicas = config.num_replicas = have.num_replicas or 1
        mine = (config.subjects, config.retention, config.num_replicas,
                config.duplicate_window if config.name == self.stream else None)
        theirs = (have.subjects, have.retention, have.num_replicas,
                  have.duplicate_window if config.name == self.stream else None)
        if mine != theirs:
            raise InvalidInput("stream", config.name,
                               f"a stream with this broker's settings (subjects, retention,"
                               f" replicas, dedup_window {mine}), not {theirs}")

    async def _ensure_consumer(self, stream: str, config: api.ConsumerConfig) -> None:
        """Create the durable consumer, or check the one there: on 2.9.10 a create with
        another MaxDeliver or AckWait would silently *update* the consumer every worker of the
        stream shares, so a broker with other settings is refused instead."""
        assert config.durable_name is not None
        try:
            have = (await self.js.consumer_info(stream, config.durable_name)).config
        except NotFoundError:
            if not self._create:
                raise InvalidInput("stream", stream, f"a stream with its consumer"
                                                     f" {config.durable_name!r} (no such"
                                                     f" consumer: nothing was created)"
                                   ) from None
            await self.js.add_consumer(stream, config)  # the same config twice is no error
            return
        if config.durable_name != CONSUMER:
            return
        if self._adopt:  # as the workers made it
            self.max_receives = have.max_deliver
            self.ack_wait = have.ack_wait or self.ack_wait
            return
        # Name each setting that differs, with both values, and the ways on.
        differ = [(name, theirs, mine) for name, theirs, mine in (
            ("ack_wait", round(have.ack_wait or 0, 6), config.ack_wait),
            ("max_receives", have.max_deliver, config.max_deliver)) if theirs != mine]
        if differ:
            setting, theirs, mine = differ[0]
            exc = InvalidInput(setting, mine, _settings_differ(stream, differ, "URL"))
            exc.differ = differ  # type: ignore[attr-defined]  # open_url words it for its URL
            raise exc

    async def _on_advisory(self, msg: Any) -> None:
        self._advised = True

    async def _quiet(self, exc: Exception) -> None:
        """Connection errors: the client reconnects by itself, and a verb that fails for good
        raises in the caller; nothing to print from the loop thread."""

    async def _quiet_event(self) -> None:
        """Disconnected / reconnected: see :meth:`_quiet`."""

    def close(self) -> None:
        """Disconnect and stop the loop thread. The streams stay (:meth:`destroy` deletes
        them). Safe to call twice."""
        if hasattr(self, "nc") and not self.nc.is_closed:
            try:
                self._run(self.nc.close(), "close")
            except (NatsError, BrokerUnavailable):
                pass  # already gone: nothing left to release
        if hasattr(self, "_loop"):
            self._loop.stop()

    def destroy(self) -> None:
        """Delete the stream, its dead letters and its advisories (their consumers go with
        them), then :meth:`close`: what a test or a benchmark does after a run. Each delete is
        retried while a cluster elects a leader (a node just restarted, say); a delete whose
        answer was lost finds the stream gone on its retry, and that is what was wanted."""
        async def delete() -> None:
            for name in (self.stream, self.dead_stream, self.advisory_stream):
                try:
                    await self._retrying(functools.partial(self._api.delete_stream, name))
                except NotFoundError:
                    pass
        try:
            self._run(delete(), "destroy")
        finally:
            self.close()

    # -- send ------------------------------------------------------------------------------
    def send(self, event_id: str, type: str, payload: dict[str, Any], *,
             correlation_id: str | None = None, delay: float = 0.0,
             dedup_id: str | None = None) -> str:
        """Publish one message (at once: JetStream is another system, there is no caller's
        transaction to join) and return its message id, ``<stream>-<sequence>``.

        ``dedup_id`` becomes the ``Nats-Msg-Id`` header: a second send with it within
        :attr:`dedup_window` is not stored, and answers with the first send's sequence, hence
        its message id. ``delay > 0`` raises ``NotImplementedError``: JetStream 2.9 cannot
        hold a published message back."""
        text, delay = check_send(event_id, type, payload, correlation_id, delay, dedup_id)
        body = text.encode()
        if delay > 0:
            raise NotImplementedError(
                "send(delay=…) on JetStream: NATS 2.9 has no delayed publish (nack's delay"
                " works: nak(delay))")
        headers = {EVENT_ID: event_id, TYPE: type,
                   "Nats-Msg-Id": dedup_id if dedup_id is not None else uuid.uuid4().hex}
        if correlation_id is not None:
            headers[CORRELATION_ID] = correlation_id
        ack = self._run(self._publish(self.subject, body, headers), "send")
        return self._message_id(ack.seq)

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str]) -> Any:
        return await self._retrying(lambda: self.js.publish(subject, body, headers=headers,
                                                            timeout=min(self.timeout, 2.0)))

    def _message_id(self, seq: int) -> str:
        return f"{self.stream}-{seq}"

    # -- receive ---------------------------------------------------------------------------
    def receive(self, visibility_timeout: float, max_messages: int = 1, *,
                worker: str = "worker") -> Received:
        """Fetch up to ``max_messages`` from the durable consumer, waiting at most
        ``fetch_wait`` when none is there. The lease is the consumer's AckWait, whatever
        ``visibility_timeout`` says (checked, then unused: JetStream has one AckWait per
        consumer). Before returning, moves the messages the server gave up on (MaxDeliver,
        announced by the advisory) to the dead letters and lists them in ``parked``.

        A message with no event id (see :func:`event_id_of`: a foreign producer's, with
        neither our header nor a ``Nats-Msg-Id``) is never handed out: it goes to the dead
        letters at once, as it came plus the reason :data:`NO_MESSAGE_ID`, and is listed in
        ``parked``. A body that is not a JSON object is handed out as ``{"body": text}``
        (see :func:`payload_of`)."""
        check_number("visibility_timeout", visibility_timeout, minimum=0,
                     maximum=MAX_VISIBILITY_TIMEOUT_S)
        n = check_int("max_messages", max_messages, minimum=1, maximum=1000)
        msgs = self._run(self._fetch(n), "receive")
        now = self.clock.now()
        out, refused = [], []
        for m in msgs:
            md = m.metadata
            h = m.headers or {}
            seq = md.sequence.stream
            lease_until = now + self.ack_wait
            event_id = event_id_of(h)
            d = Delivery(seq, self._message_id(seq), event_id or "", h.get(TYPE, ""),
                         payload_of(m.data), h.get(CORRELATION_ID), m.reply, md.num_delivered,
                         lease_until, self._errors.get(seq))
            if event_id is None:
                refused.append(d)
                continue
            self._due[seq] = lease_until
            out.append(d)
        self.parked = [(d, NO_MESSAGE_ID) for d in refused if self._run(
            self._refuse(d), "receive")]
        if self._advised:
            self.parked += self._park()
        return Received(out, self.parked)

    async def _refuse(self, d: Delivery) -> bool:
        """Dead-letter a message with no event id at once (see :meth:`receive`): copied as it
        is in the stream (bytes and headers), deleted, and its delivery terminated."""
        moved = await self._move_to_dead(d.seq, d.delivery_count, NO_MESSAGE_ID)
        await self.nc.publish(d.receipt, b"+TERM")
        return moved is not None

    async def _fetch(self, n: int) -> list[Any]:
        try:
            return await self._sub.fetch(n, timeout=self.fetch_wait)
        except (TimeoutError, NatsTimeout, NoRespondersError):
            return []  # nothing came within fetch_wait (or no server answered): none leased

    def _park(self) -> list[tuple[Delivery, str]]:
        """Move each message an advisory announced to the dead letters; what was moved."""
        self._advised = False
        return self._run(self._park_advised(), "receive")

    async def _park_advised(self) -> list[tuple[Delivery, str]]:
        try:
            advisories = await self._parker.fetch(_ADVISORY_BATCH, timeout=_ADVISORY_WAIT)
        except (TimeoutError, NatsTimeout):
            return []
        parked = []
        for adv in advisories:
            info = json.loads(adv.data)
            seq, count = int(info["stream_seq"]), int(info["deliveries"])
            times = "once" if count == 1 else f"{count} times"
            reason = (f"received {times} (max_receives={self.max_receives});"
                      f" last error: {self._errors.get(seq) or 'none'}")
            moved = await self._move_to_dead(seq, count, reason)
            if moved is not None:
                parked.append((moved, reason))
            await adv.ack_sync()
        return parked

    async def _move_to_dead(self, seq: int, count: int, reason: str) -> Delivery | None:
        """Copy message ``seq`` into the dead letters and delete it from the queue; the
        delivery it was, or None if it is no longer queued. The copy's ``Nats-Msg-Id`` names
        the sequence, so a move repeated after a crash between its two steps stores one."""
        raw = await self._get(self.stream, seq)
        if raw is None:
            return None
        h = dict(raw.headers or {})
        event_id = event_id_of(h)
        if event_id is not None:  # kept when it was the producer's Nats-Msg-Id
            h[EVENT_ID] = event_id
        h.pop("Nats-Msg-Id", None)
        message_id = self._message_id(seq)
        h.update({MESSAGE_ID: message_id, DELIVERY_COUNT: str(count),
                  ERROR: " ".join(reason.split()), "Nats-Msg-Id": f"dead-{message_id}"})
        await self._publish(self.dead_subject, raw.data or b"{}", h)
        await self._delete(self.stream, seq)
        self._forget(seq)
        return Delivery(seq, message_id, h.get(EVENT_ID, ""), h.get(TYPE, ""),
                        payload_of(raw.data), h.get(CORRELATION_ID), "", count,
                        self.clock.now(), self._errors.get(seq))

    async def _get(self, stream: str, seq: int) -> Any:
        """Message ``seq`` of ``stream``, or None if there is none."""
        try:
            return await self._retrying(lambda: self._api.get_msg(stream, seq))
        except APIError as exc:
            if exc.err_code not in NO_MESSAGE:
                raise
            return None

    async def _delete(self, stream: str, seq: int) -> bool:
        """Delete message ``seq`` of ``stream``; False if there was none."""
        try:
            return await self._retrying(lambda: self._api.delete_msg(stream, seq))
        except APIError as exc:
            if exc.err_code not in NO_MESSAGE:
                raise
            return False

    def _forget(self, seq: int) -> None:
        self._due.pop(seq, None)
        self._errors.pop(seq, None)

    # -- settle ----------------------------------------------------------------------------
    def _held(self, d: Delivery) -> bool:
        """Whether this broker handed out ``d``'s message, has not settled it, and its lease
        has a quarter of AckWait (at most a second) left on our clock: the server gives the
        message to no one else meanwhile (see the module docstring)."""
        due = self._due.get(d.seq)
        return due is not None and self.clock.now() < due - min(1.0, self.ack_wait / 4)

    async def _settle(self, d: Delivery, body: bytes, confirm: bool,
                      look: bool = True) -> bool:
        """Send ``body`` (``+ACK``, ``-NAK…``, ``+WPI``, ``+TERM``) on ``d``'s reply subject.

        ``confirm``: if the message is still in the stream, as a request whose reply the
        broker waits for; whether it was. The server does not check that the reply subject is
        the message's latest delivery (see the module docstring). Not ``confirm`` (``ack()``,
        fire and forget): handed to the client's buffer and True, without asking the server
        anything, not even whether the message is still there. ``look=False``: confirmed,
        without first looking the message up (see :meth:`_held`)."""
        if not confirm:
            await self.nc.publish(d.receipt, body)
            return True
        if look and await self._get(self.stream, d.seq) is None:
            return False
        await self._retrying(lambda: self.nc.request(d.receipt, body,
                                                     timeout=min(self.timeout, 2.0)))
        return True

    def ack(self, delivery: Delivery, *, worker: str = "worker") -> bool:
        """Ack the message with ``ack_sync()``: False if it is no longer in the stream (looked
        up unless this broker holds the lease with time to spare), True once the server
        answered. A stale delivery's ack is *accepted* by the server and
        deletes the message whoever holds it now (an engine difference). With
        ``confirm_acks=False``, ``ack()``: always True, the server asked nothing; a connection
        that drops before the client flushes loses the ack, and the message comes back."""
        return self.ack_many([delivery], worker=worker)[0]

    def ack_many(self, deliveries: list[Delivery], *, worker: str = "worker") -> list[bool]:
        """Ack several deliveries, concurrently; one bool per delivery. Of several deliveries
        of one message in the batch, only the first is sent (the rest answer False)."""
        if not isinstance(deliveries, list | tuple):
            raise InvalidInput("deliveries", deliveries, "a list of deliveries")
        for d in deliveries:
            check_delivery(d)
        first: dict[int, int] = {}
        for i, d in enumerate(deliveries):
            first.setdefault(d.seq, i)

        looks = [(i, not self._held(deliveries[i])) for i in first.values()]

        async def ack_all() -> list[bool]:
            sent = await asyncio.gather(*(
                self._settle(deliveries[i], b"+ACK", self.confirm_acks, look=look)
                for i, look in looks))
            return list(sent)

        sent = dict(zip(first.values(), self._run(ack_all(), "ack"), strict=True))
        for d in deliveries:
            self._forget(d.seq)
        return [sent.get(i, False) for i in range(len(deliveries))]

    def extend(self, delivery: Delivery, seconds: float, *, worker: str = "worker") -> bool:
        """``in_progress()``: the server restarts the message's AckWait from now, so the lease
        ends ``ack_wait`` from now whatever ``seconds`` asks (checked, then unused); False if
        the message is no longer in the stream. Accepted on a stale delivery too."""
        check_delivery(delivery)
        check_number("seconds", seconds, minimum=0, maximum=MAX_VISIBILITY_TIMEOUT_S)
        ok = self._run(self._settle(delivery, b"+WPI", True), "extend")
        if ok:
            self._due[delivery.seq] = self.clock.now() + self.ack_wait
        return ok

    def nack(self, delivery: Delivery, delay: float = 0.0, *, error: str | None = None,
             worker: str = "worker") -> bool:
        """``nak(delay)``: the server hands the message out again after ``delay`` seconds,
        counting on. ``error`` is kept in this broker's memory only. False if the message is
        no longer in the stream; accepted on a stale delivery too."""
        check_delivery(delivery)
        wait = check_number("delay", delay, minimum=0, maximum=MAX_VISIBILITY_TIMEOUT_S)
        if error is not None:
            check_text("error", error, max_length=10_000)
        body = b"-NAK" if wait == 0 else b"-NAK " + json.dumps(
            {"delay": int(wait * 1e9)}).encode()
        ok = self._run(self._settle(delivery, body, True), "nack")
        if ok:
            self._due[delivery.seq] = self.clock.now() + wait
            if error is not None:
                self._errors[delivery.seq] = error
        return ok

    def dead_letter(self, delivery: Delivery, error: str, *, worker: str = "worker") -> bool:
        """Copy the message into the dead letters with ``error`` (its bytes and headers as they
        are in the stream), delete it from the queue and terminate the delivery (``term()``);
        False if it is no longer in the stream. Accepted on a stale delivery too."""
        check_delivery(delivery)
        check_text("error", error, max_length=10_000)

        async def move() -> bool:
            # The copy comes from the stream, as the message is there (its bytes and
            # headers), before the term: on a work-queue stream a term removes the message.
            # Copy and delete are each idempotent (the copy's Nats-Msg-Id names the
            # sequence), so a crash between them stores one dead letter.
            moved = await self._move_to_dead(delivery.seq, delivery.delivery_count, error)
            if moved is None:
                return False  # no longer in the stream: acked, dead-lettered or dropped
            await self.nc.publish(delivery.receipt, b"+TERM")  # never delivered again
            return True

        ok = self._run(move(), "dead_letter")
        self._forget(delivery.seq)
        return ok

    def redrive(self, message_ids: list[str] | None = None, *, worker: str = "operator") -> int:
        """Publish dead letters (all, or the given ids) to the queue again as new messages
        (new sequences, new ids, counted from 1) and delete them from the dead letters."""
        if message_ids is not None and (not isinstance(message_ids, list | tuple) or not all(
                isinstance(m, str) for m in message_ids)):
            raise InvalidInput("message_ids", message_ids, "a list of message ids or None")
        dead = {(r.headers or {}).get(MESSAGE_ID): r
                for r in self._run(self._read(self.dead_stream), "redrive")}
        if message_ids is None:  # a letter with no event id would only be refused again
            chosen = [r for r in dead.values() if (r.headers or {}).get(EVENT_ID)]
        else:
            chosen = []
            for mid in dict.fromkeys(message_ids):  # an id named twice moves once
                if mid not in dead:
                    raise InvalidInput("message_ids", mid, "the id of a dead letter")
                chosen.append(dead[mid])

        async def move() -> None:
            for raw in chosen:
                h = {k: v for k, v in (raw.headers or {}).items()
                     if k in (EVENT_ID, TYPE, CORRELATION_ID)}
                h["Nats-Msg-Id"] = uuid.uuid4().hex
                await self._publish(self.subject, raw.data or b"{}", h)
                await self._delete(self.dead_stream, raw.seq)

        self._run(move(), "redrive")
        return len(chosen)

    def drop(self, message_id: str, *, reason: str = "dropped", worker: str = "chaos") -> bool:
        """Delete the message from the stream whatever its lease (fault injection); False if
        it is not queued. The server forgets it: a worker holding it acks nothing."""
        check_text("message_id", message_id)
        prefix, _, seq = message_id.rpartition("-")
        if prefix != self.stream or not seq.isdigit():
            return False
        return self._run(self._delete(self.stream, int(seq)), "drop")

    def lose(self, delivery: Delivery, *, reason: str, worker: str = "chaos") -> bool:
        """:meth:`drop` for a message just received, by its stream sequence."""
        check_delivery(delivery)
        self._forget(delivery.seq)
        return self._run(self._delete(self.stream, delivery.seq), "lose")

    # -- look ------------------------------------------------------------------------------
    async def _counts(self) -> tuple[int, int, int]:
        """(messages in the queue stream, never delivered, dead letters)."""
        queue, consumer, dead = await asyncio.gather(
            self._retrying(lambda: self._api.stream_info(self.stream)),
            self._retrying(lambda: self._api.consumer_info(self.stream, CONSUMER)),
            self._retrying(lambda: self._api.stream_info(self.dead_stream)))
        return queue.state.messages, consumer.num_pending, dead.state.messages

    def depth(self) -> dict[str, int]:
        """From the server: ``visible`` = the consumer's never-delivered messages
        (``num_pending``); ``in_flight`` = every other message still in the stream (leased,
        nacked, waiting for redelivery after AckWait, or given up at MaxDeliver and not yet
        moved: the server does not tell these apart); ``dead_letters`` = the dead-letter
        stream's messages."""
        queued, pending, dead = self._run(self._counts(), "depth")
        return {"visible": pending, "in_flight": queued - pending, "dead_letters": dead}

    def next_visible_at(self) -> float | None:
        """Now if a message was never delivered; None if the stream is empty; otherwise the
        earliest lease end or nack delay this broker itself set, or, knowing none (another
        process holds them), ``ack_wait`` from now: at the latest then, an expired lease is
        redelivered."""
        queued, pending, _ = self._run(self._counts(), "next_visible_at")
        now = self.clock.now()
        # Forget what ended an AckWait ago: the server has redelivered it since (to whoever
        # asked), so it says nothing about this broker's messages any more.
        self._due = {seq: t for seq, t in self._due.items() if t > now - self.ack_wait}
        if pending:
            return now
        if not queued:
            return None
        return min(self._due.values()) if self._due else now + self.ack_wait

    async def _read(self, stream: str) -> list[Any]:
        """Every message of ``stream``, read by sequence from the first to the last (a
        deleted sequence reads as nothing), ``_READ_AHEAD`` requests at a time."""
        state = (await self._retrying(lambda: self._api.stream_info(stream))).state
        if not state.messages:
            return []
        out: list[Any] = []
        seqs = range(state.first_seq, state.last_seq + 1)
        for start in range(0, len(seqs), _READ_AHEAD):
            got = await asyncio.gather(*(self._get(stream, s)
                                         for s in seqs[start:start + _READ_AHEAD]))
            out.extend(r for r in got if r is not None)
        return out

    def queued_event_ids(self) -> set[str]:
        """The event ids of every message in the queue stream, read one by one (a message
        with none, which the next receive refuses, names none)."""
        return {e for r in self._run(self._read(self.stream), "queued_event_ids")
                if (e := event_id_of(r.headers)) is not None}

    def dead_lettered_event_ids(self) -> set[str]:
        """The event ids of every message in the dead-letter stream."""
        return {(r.headers or {})[EVENT_ID]
                for r in self._run(self._read(self.dead_stream), "dead_lettered_event_ids")
                if (r.headers or {}).get(EVENT_ID)}

    def dead_letters_without_id(self) -> int:
        """The dead letters with no event id (refused at once: :data:`NO_MESSAGE_ID`)."""
        return sum(1 for r in self._run(self._read(self.dead_stream), "dead_letters_without_id")
                   if not (r.headers or {}).get(EVENT_ID))


def _settings_differ(stream: str, differ: list[tuple[str, Any, Any]], url: str) -> str:
    """What to say when stream ``stream``'s consumer was made with other settings: each
    (setting, the stream's value, the value asked for) in ``differ``, and the two ways on."""
    where = {"ack_wait": "ack_wait= in the URL", "max_receives": "the worker's --max-receives"}
    pairs = "; ".join(f"{name}={theirs:g} there, {mine:g} here" for name, theirs, mine in differ)
    use = " and ".join(f"{name}={theirs:g} ({where[name]})" for name, theirs, _ in differ)
    return (f"a URL with the settings stream {stream!r} was made with, which every process of"
            f" the stream shares ({pairs}): use {use}, or remove the stream, its messages and dead"
            f" letters with 'deliverylab cleanup --broker {url!r} --yes' and start again")


async def _reachable(server: str) -> bool:
    """Whether ``nats://host:port`` accepts a TCP connection within 2 seconds."""
    host, _, port = server.removeprefix("nats://").rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


# -- by URL -----------------------------------------------------------------------------------
_URL_OPTIONS = {"stream", "replicas", "ack_wait", "dedup_window", "ack_sync"}


def parse_url(url: str, *, field: str = "broker") -> tuple[list[str], dict[str, Any]]:
    """``nats://host:port[,host:port…]?stream=NAME[&replicas=N][&ack_wait=S]
    [&dedup_window=S][&ack_sync=false]`` -> (server URLs, keyword arguments). Anything else is
    ``InvalidInput`` naming ``field`` and the part that is wrong."""
    def bad(expected: str) -> InvalidInput:
        return InvalidInput(field, url, expected)

    if not isinstance(url, str) or not url.lower().startswith("nats://"):
        raise bad("a nats://host:port?stream=NAME URL")
    parts = urlsplit(url)
    if "@" in parts.netloc or parts.path not in ("", "/") or parts.fragment:
        raise bad("nats://host:port[,host:port…]?stream=NAME: no user, path or fragment")
    servers = []
    for hostport in parts.netloc.split(","):
        host, _, port = hostport.strip().rpartition(":")
        if not host:
            host, port = port, str(DEFAULT_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise bad(f"host:port pairs separated by commas (got {hostport!r})")
        servers.append(f"nats://{host}:{port}")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(options) - _URL_OPTIONS
    if unknown:
        raise bad(f"only the options {', '.join(sorted(_URL_OPTIONS))}"
                  f" (got {', '.join(sorted(unknown))})")
    kw: dict[str, Any] = {}
    if not STREAM_NAME.match(options.get("stream", "")):
        raise bad("?stream=NAME, 1 to 48 letters, digits, '-' or '_'")
    kw["stream"] = options["stream"]
    try:
        if "replicas" in options:
            kw["replicas"] = int(options["replicas"])
        for key in ("ack_wait", "dedup_window"):
            if key in options:
                kw[key] = float(options[key])
    except ValueError:
        raise bad("replicas as an integer, ack_wait and dedup_window in seconds") from None
    if "ack_sync" in options:
        if options["ack_sync"] not in ("true", "false"):
            raise bad("ack_sync=true or ack_sync=false")
        kw["confirm_acks"] = options["ack_sync"] == "true"
    return servers, kw


def open_url(url: str, *, field: str = "broker", clock: Clock, ids: Ids,
             max_receives: int | None = None, worker: str = "worker",
             create: bool = True) -> JetStreamBroker:
    """The broker a ``nats://`` URL names (see :func:`parse_url`), connected; the registry's
    entry point. A bad URL, a bad option or no server answering is ``InvalidInput`` naming
    ``field``. ``max_receives=None`` opens the stream as the workers made it;
    ``create=False`` creates nothing (see :class:`JetStreamBroker`)."""
    servers, kw = parse_url(url, field=field)
    try:
        return JetStreamBroker(servers, clock=clock, ids=ids, max_receives=max_receives,
                               name=worker, field=field, create=create, **kw)
    except InvalidInput as exc:  # named by the URL the caller gave, whatever part was wrong
        if hasattr(exc, "differ"):  # the stream is there with other settings
            worded = InvalidInput(field, url, _settings_differ(kw["stream"], exc.differ, url))
            worded.differ = exc.differ  # type: ignore[attr-defined]  # kept for the caller
            raise worded from None
        raise InvalidInput(field, url, exc.expected if exc.field == field
                           else f"valid options ({exc})") from None


# -- for the registry ---------------------------------------------------------------------------
BROKER = JetStreamBroker
DEFAULT_URL = f"nats://127.0.0.1:{DEFAULT_PORT}"


def scratch_url(server: str, name: str, *, lease: float = 1.0,
                dedup_window: float | None = None) -> str:
    """The URL of stream ``name`` on ``server`` (a throwaway one: ``destroy()`` deletes it),
    with an AckWait of ``lease`` seconds and, if given, a duplicate window."""
    url = f"{server}?stream={name}&ack_wait={lease:g}"
    return url if dedup_window is None else f"{url}&dedup_window={dedup_window:g}"


def url_lease(url: str, *, field: str = "broker") -> UrlLease:
    """The lease a ``nats://`` URL fixes: its consumer's ``AckWait`` (``ack_wait=`` in the URL,
    30 s without), which JetStream gives every delivery whatever a receive asks. Read from the
    URL (:func:`parse_url`), without connecting."""
    _, kw = parse_url(url, field=field)
    seconds = float(kw.get("ack_wait", DEFAULT_ACK_WAIT_S))
    return UrlLease(seconds, "ack_wait", "ack_wait" in kw,
                    "the AckWait of the stream's consumer",
                    f"AckWait {seconds:g}s (the stream consumer's ack_wait)")


def removal_of(url: str, *, field: str = "broker") -> Removal:
    """What ``deliverylab cleanup`` removes for the ``nats://`` URL ``url``: the stream,
    ``STREAM_DEAD`` and ``STREAM_ADVISORIES`` (their consumers with them). Reads only; nothing
    is opened the way a worker opens it, so a stream made with other settings is removed all
    the same. A bad URL or no server answering is InvalidInput naming ``field``; a stream
    already gone is said, not refused."""
    servers, kw = parse_url(url, field=field)
    stream = kw["stream"]
    names = (stream, f"{stream}_DEAD", f"{stream}_ADVISORIES")

    async def quiet(exc: Exception) -> None:  # nats-py logs every failed attempt otherwise
        pass

    async def streams(names: tuple[str, ...], delete: bool) -> dict[str, int]:
        if not any(await asyncio.gather(*(_reachable(s) for s in servers))):
            raise InvalidInput(field, url, f"the URL of a reachable NATS server with JetStream"
                                           f" (no server answers at {', '.join(servers)})")
        try:
            nc = await nats.connect(servers=servers, connect_timeout=2, allow_reconnect=False,
                                    max_reconnect_attempts=1, error_cb=quiet,
                                    name="deliverylab-cleanup")
        except Exception as exc:  # nats-py raises several kinds: none is a reason to go on
            raise InvalidInput(field, url, f"the URL of a reachable NATS server with JetStream"
                                           f" ({type(exc).__name__}: {exc})".rstrip(": ")
                               ) from None
        try:
            js = nc.jetstream(timeout=5)
            out: dict[str, int] = {}
            for name in names:
                try:
                    info = await js.stream_info(name)
                except NotFoundError:
                    continue
                out[name] = info.state.messages
                if delete:
                    await js.delete_stream(name)
            return out
        finally:
            await nc.close()

    found = asyncio.run(streams(names, False))
    if not found:
        return Removal(f"JetStream stream {stream} (not there: nothing to remove)")

    def remove() -> None:
        asyncio.run(streams(tuple(found), True))

    return Removal(f"JetStream stream {stream}", remove,
                   [f"stream {n} ({found[n]} messages)" for n in names if n in found])
