"""A queue on a Redis stream: a consumer group, its pending-entries list as the lease.

How the contract maps onto Redis Streams (7.0):

- ``send`` is ``XADD`` to the stream; a delayed send waits in a sorted set (``<stream>:delayed``,
  scored by when it is due on the broker's clock) until a receive moves it into the stream.
- ``receive`` reads with ``XREADGROUP`` in the consumer group ``workers``: the entry goes into
  the group's pending-entries list (PEL) with this consumer as its owner and a delivery counter
  of 1. The lease is the PEL's idle time, timed by the Redis server: an entry idle for
  ``lease`` seconds is taken over by the next receive with ``XAUTOCLAIM``, which counts one more
  delivery. So the lease is the same for every receive (``capabilities.fixed_lease``), whatever
  ``visibility_timeout`` asks, and ``extend`` restarts it (``XCLAIM … JUSTID``, which resets the
  idle time and counts nothing).
- ``ack`` is ``XACK`` and ``XDEL``. Redis itself accepts any consumer's ``XACK`` for any pending
  entry, so a zombie whose entry another consumer took over would still "succeed"; here every
  settlement runs as one Lua script that first checks the PEL's delivery counter against the
  receipt's, so a stale receipt is refused and changes nothing.
- ``max_receives`` is checked against the PEL's delivery counter (plus the deliveries an entry
  carried from before a ``nack``): a receive that would exceed it moves the entry to the
  dead-letter stream ``<stream>:dead`` instead and lists it in the result's ``parked``.
  Redis has no dead letters of its own; this broker writes them.
- ``nack`` settles the entry and queues a copy with the same message id, its delivery count
  and error, due after ``delay`` (the PEL cannot hold an entry back for a chosen time).
- No producer dedup (``dedup_window`` is None): ``dedup_id`` is checked, then unused.

What Redis does not promise (the server's settings, not this module's): it is not durable by
default (without AOF, a restart loses everything; with ``appendfsync everysec``, about a
second of acknowledged writes), and replication is asynchronous, so a Sentinel or Cluster
failover can lose writes the old primary acknowledged.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis
import redis.exceptions
from redis.typing import EncodableT, FieldT

from ..engine.clock import Clock
from ..engine.errors import BrokerUnavailable, InvalidInput, check_int, check_number, check_text
from ..engine.ids import Ids
from ..engine.settings import DEFAULT_MAX_RECEIVES
from .base import (
    MAX_VISIBILITY_TIMEOUT_S,
    NO_MESSAGE_ID,
    Broker,
    Capabilities,
    Delivery,
    Received,
    Removal,
    UrlLease,
    check_delivery,
    check_send,
)

DEFAULT_URL = "redis://127.0.0.1:6379/0"
GROUP = "workers"  # the consumer group every worker of a stream shares
STREAM_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}\Z")
_SHIFT = 22  # a stream id "ms-n" as one int: ms << _SHIFT | n (Delivery.seq is an int)

# Settle an entry only while the PEL's delivery counter is the receipt's: one script per call,
# so no other consumer can claim the entry between the check and the settlement.
# KEYS: stream, dead stream, delayed set. ARGV: group, consumer, verb, then per entry:
# id, counter, and what the verb needs (JSON). Returns 1 or 0 per entry.
_SETTLE = """
local out = {}
local verb = ARGV[3]
for i = 4, #ARGV, 3 do
  local id, n, extra = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1]
  if p and tonumber(p[4]) == n then
    if verb == 'extend' then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
    else
      redis.call('XACK', KEYS[1], ARGV[1], id)
      redis.call('XDEL', KEYS[1], id)
      if verb == 'dead' then
        redis.call('XADD', KEYS[2], '*', unpack(cjson.decode(extra)))
      elseif verb == 'nack' then
        local e = cjson.decode(extra)
        redis.call('ZADD', KEYS[3], e[1], e[2])
      end
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# A receive, in one round trip: move the delayed messages due by ARGV[3] (the broker's clock)
# into the stream; take over up to ARGV[5] entries idle for ARGV[4] ms (XAUTOCLAIM, which
# counts a delivery), each with its PEL counter; then read new ones (XREADGROUP, counter 1).
# KEYS: stream, delayed. ARGV: group, consumer, now, lease in ms, how many. Returns
# {id, {field, value, …}, counter} per entry, taken-over first.
_RECEIVE = """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local n = tonumber(ARGV[5])
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3], 'LIMIT', 0, 1000)
for _, member in ipairs(due) do
  if redis.call('ZREM', KEYS[2], member) == 1 then
    redis.call('XADD', stream, '*', unpack(cjson.decode(member)))
  end
end
local out = {}
local cursor = '0-0'
while #out < n do
  local r = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[4], cursor,
                       'COUNT', n - #out)
  cursor = r[1]
  for _, e in ipairs(r[2]) do
    local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)[1]
    if p then out[#out + 1] = {e[1], e[2], p[4]} end
  end
  if cursor == '0-0' then break end
end
if #out < n then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n - #out,
                       'STREAMS', stream, '>')
  if r then
    for _, e in ipairs(r[1][2]) do out[#out + 1] = {e[1], e[2], 1} end
  end
end
return out
"""

T = TypeVar("T")


def _reachable(verb: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """A lost or refused connection is BrokerUnavailable naming ``verb``, never redis-py's."""
    def wrap(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def run(self: RedisBroker, *args: Any, **kw: Any) -> T:
            try:
                return method(self, *args, **kw)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                raise BrokerUnavailable(verb, f"Redis did not answer ({exc})") from None
        return run
    return wrap


def _stream_id(seq: int) -> str:
    return f"{seq >> _SHIFT}-{seq & ((1 << _SHIFT) - 1)}"


def _seq(stream_id: str) -> int:
    ms, _, n = stream_id.partition("-")
    return int(ms) << _SHIFT | int(n)


def _count(text: str | None) -> int:
    """The deliveries an entry had before it was put back (field ``n``); 0 when absent or
    not a count (a foreign producer's entry)."""
    try:
        return max(0, int(text or 0))
    except ValueError:
        return 0


def _payload(text: str | None) -> dict[str, Any]:
    """The body as a JSON object; anything else (a foreign producer's) as
    ``{"body": <the text>}``, which the worker's handler refuses, so the entry is retried and
    dead-lettered at ``max_receives`` with its text kept."""
    try:
        payload = json.loads(text or "")
    except ValueError:
        payload = None
    return payload if isinstance(payload, dict) else {"body": text or ""}


class RedisBroker(Broker):
    """A queue on the Redis stream ``stream`` (``client``: a ``redis.Redis``), its consumer
    group ``workers``, its dead letters ``<stream>:dead`` and delayed messages
    ``<stream>:delayed``. ``lease`` (seconds) is the PEL idle time after which another
    receive takes an entry over. ``name`` names this consumer in the group (made unique per
    broker). :meth:`destroy` deletes the three keys; :meth:`close` disconnects."""

    capabilities = Capabilities(lease_clock="server", fixed_lease=30.0)

    def __init__(self, client: redis.Redis, *, stream: str, clock: Clock, ids: Ids,
                 max_receives: int = DEFAULT_MAX_RECEIVES, lease: float = 30.0,
                 name: str = "worker") -> None:
        if not isinstance(client, redis.Redis):
            raise InvalidInput("client", client, "a redis.Redis client")
        if not isinstance(stream, str) or not STREAM_NAME.match(stream):
            raise InvalidInput("stream", stream, "a stream name of 1 to 100 letters, digits,"
                                                 " '-', '_', '.' or ':'")
        self.clock, self.ids = clock, ids
        self.max_receives = check_int("max_receives", max_receives, minimum=1)
        self.lease = check_number("lease", lease, minimum=0.01,
                                  maximum=MAX_VISIBILITY_TIMEOUT_S)
        self.capabilities = Capabilities(lease_clock="server", fixed_lease=self.lease)
        self.stream, self.dead, self.delayed = stream, f"{stream}:dead", f"{stream}:delayed"
        self._keys = [self.stream, self.dead, self.delayed]
        self._r = client
        self.consumer = f"{name}-{ids.receipt()}"
        self.parked: list[tuple[Delivery, str]] = []
        # When each entry this broker leased is due back, on its clock (next_visible_at).
        self._due: dict[str, float] = {}
        self._settle = client.register_script(_SETTLE)
        self._receive = client.register_script(_RECEIVE)
        try:
            client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # the group exists: another worker made it
                raise

    # -- send ------------------------------------------------------------------------------
    @_reachable("send")
    def send(self, event_id: str, type: str, payload: dict[str, Any], *,
             correlation_id: str | None = None, delay: float = 0.0,
             dedup_id: str | None = None) -> str:
        """``XADD`` at once (Redis has no transaction shared with the caller's store), or,
        with a ``delay``, into the delayed set until due. ``dedup_id`` is checked, then
        unused: no producer dedup."""
        body, delay = check_send(event_id, type, payload, correlation_id, delay, dedup_id)
        message_id = self.ids.message_id()
        fields = ["m", message_id, "e", event_id, "t", type, "p", body,
                  "c", correlation_id or "", "n", "0", "err", ""]
        if delay > 0:
            self._r.zadd(self.delayed, {json.dumps(fields): self.clock.now() + delay})
        else:
            self._r.xadd(self.stream, dict(zip(fields[::2], fields[1::2], strict=True)))
        return message_id

    # -- receive ---------------------------------------------------------------------------
    @_reachable("receive")
    def receive(self, visibility_timeout: float, max_messages: int = 1, *,
                worker: str = "worker") -> Received:
        """Take over up to ``max_messages`` entries idle past the lease (``XAUTOCLAIM``), then
        read new ones (``XREADGROUP``), oldest first: one script, one round trip. The lease
        is ``lease``, whatever ``visibility_timeout`` says (checked, then unused). An entry
        whose delivery would exceed ``max_receives`` goes to the dead letters and is listed
        in ``parked``."""
        check_number("visibility_timeout", visibility_timeout, minimum=0,
                     maximum=MAX_VISIBILITY_TIMEOUT_S)
        n = check_int("max_messages", max_messages, minimum=1, maximum=1000)
        now = self.clock.now()
        rows = self._receive(keys=self._keys[::2], args=[
            GROUP, self.consumer, repr(now), int(self.lease * 1000), n])
        # (id, fields, PEL counter) per entry
        got = [(sid, dict(zip(flat[::2], flat[1::2], strict=True)), int(counter))
               for sid, flat, counter in rows]
        token, lease_until = self.ids.receipt(), now + self.lease
        out: list[Delivery] = []
        parked: list[tuple[Delivery, str]] = []
        for sid, fields, counter in got:
            count = _count(fields.get("n")) + counter
            d = Delivery(_seq(sid), fields.get("m") or sid, fields.get("e") or "",
                         fields.get("t") or "", _payload(fields.get("p")),
                         fields.get("c") or None, f"{token}.{sid}.{counter}", count,
                         lease_until, fields.get("err") or None)
            if not fields.get("e"):
                # A foreign producer's entry (XADD without this project's fields): no inbox
                # could tell its republish from a new message. Dead-lettered at once, its
                # fields kept as they came.
                dead = json.dumps([x for kv in fields.items() for x in kv]
                                  + ["reason", NO_MESSAGE_ID, "at", repr(self.clock.now())])
                if self._settle_many("dead", [(sid, counter, dead)])[0]:
                    parked.append((d, NO_MESSAGE_ID))
            elif count > self.max_receives:
                d = d._replace(delivery_count=count - 1)  # the deliveries that happened
                times = "once" if d.delivery_count == 1 else f"{d.delivery_count} times"
                reason = (f"received {times} (max_receives={self.max_receives});"
                          f" last error: {d.last_error or 'none'}")
                if self._settle_many("dead", [(sid, counter, self._dead_fields(d, reason))])[0]:
                    parked.append((d, reason))
            else:
                self._due[sid] = lease_until
                out.append(d)
        self.parked = parked
        return Received(out, parked)

    # -- settle ----------------------------------------------------------------------------
    def _settle_many(self, verb: str, items: list[tuple[str, int | str, str]]) -> list[bool]:
        """Run the settle script for (stream id, PEL counter, extra) triples; one bool each."""
        if not items:
            return []
        args: list[Any] = [GROUP, self.consumer, verb]
        for item in items:
            args += item
        done = [bool(x) for x in self._settle(keys=self._keys, args=args)]
        for (sid, _, _), ok in zip(items, done, strict=True):
            if ok and verb != "extend":
                self._due.pop(sid, None)
        return done

    @staticmethod
    def _held(d: Delivery, extra: str = "") -> tuple[str, int | str, str]:
        """What the settle script needs of a delivery: its entry and the PEL counter its
        receipt was given with (the receipt's last part)."""
        return _stream_id(d.seq), d.receipt.rpartition(".")[2], extra

    @staticmethod
    def _fields(d: Delivery, *, count: int, error: str | None) -> list[str]:
        return ["m", d.message_id, "e", d.event_id, "t", d.type,
                "p", json.dumps(d.payload, sort_keys=True, separators=(",", ":")),
                "c", d.correlation_id or "", "n", str(count), "err", error or ""]

    def _dead_fields(self, d: Delivery, reason: str) -> str:
        return json.dumps(self._fields(d, count=d.delivery_count, error=d.last_error)
                          + ["reason", reason, "at", repr(self.clock.now())])

    @_reachable("ack")
    def ack(self, delivery: Delivery, *, worker: str = "worker") -> bool:
        """``XACK`` and ``XDEL`` while the receipt is current; False if it is stale."""
        return self._settle_many("ack", [self._held(check_delivery(delivery))])[0]

    @_reachable("ack")
    def ack_many(self, deliveries: list[Delivery], *, worker: str = "worker") -> list[bool]:
        """:meth:`ack` for each, in one script call."""
        if not isinstance(deliveries, list | tuple):
            raise InvalidInput("deliveries", deliveries, "a list of deliveries")
        return self._settle_many("ack", [self._held(check_delivery(d)) for d in deliveries])

    @_reachable("extend")
    def extend(self, delivery: Delivery, seconds: float, *, worker: str = "worker") -> bool:
        """Restart the lease (``XCLAIM … JUSTID`` to this consumer resets the idle time): it
        ends ``lease`` from now, whatever ``seconds`` asks (checked, then unused). False if
        the receipt is stale."""
        d = check_delivery(delivery)
        check_number("seconds", seconds, minimum=0, maximum=MAX_VISIBILITY_TIMEOUT_S)
        ok = self._settle_many("extend", [self._held(d)])[0]
        if ok:
            self._due[_stream_id(d.seq)] = self.clock.now() + self.lease
        return ok

    @_reachable("nack")
    def nack(self, delivery: Delivery, delay: float = 0.0, *, error: str | None = None,
             worker: str = "worker") -> bool:
        """Settle the entry and queue a copy (same message id, its delivery count, ``error``),
        due ``delay`` seconds from now; False if the receipt is stale."""
        d = check_delivery(delivery)
        delay = check_number("delay", delay, minimum=0, maximum=MAX_VISIBILITY_TIMEOUT_S)
        if error is not None and not isinstance(error, str):
            raise InvalidInput("error", error, "a string or None")
        member = json.dumps(self._fields(d, count=d.delivery_count, error=error))
        return self._settle_many("nack", [self._held(d, json.dumps([self.clock.now() + delay,
                                                                    member]))])[0]

    @_reachable("dead_letter")
    def dead_letter(self, delivery: Delivery, error: str, *, worker: str = "worker") -> bool:
        """Move the entry to ``<stream>:dead`` with ``error``; False if the receipt is
        stale."""
        d = check_delivery(delivery)
        check_text("error", error, max_length=10_000)
        return self._settle_many("dead", [self._held(d, self._dead_fields(
            d._replace(last_error=error), error))])[0]

    @_reachable("redrive")
    def redrive(self, message_ids: list[str] | None = None, *, worker: str = "operator") -> int:
        """Move dead letters (all, or the given message ids) back to the stream as new
        messages (new message ids, delivery count 0)."""
        if message_ids is not None and (not isinstance(message_ids, list | tuple) or not all(
                isinstance(m, str) for m in message_ids)):
            raise InvalidInput("message_ids", message_ids, "a list of message ids or None")
        dead = {f["m"]: (sid, f) for sid, f in self._entries(self.dead)}
        if message_ids is None:
            chosen = list(dead)
        else:
            chosen = list(dict.fromkeys(message_ids))  # an id named twice moves once
            for mid in chosen:
                if mid not in dead:
                    raise InvalidInput("message_ids", mid, "the id of a dead letter")
        for mid in chosen:
            sid, f = dead[mid]
            fields: dict[FieldT, EncodableT] = {k: f.get(k, "") for k in ("e", "t", "p", "c")}
            pipe = self._r.pipeline(transaction=True)
            pipe.xadd(self.stream, {"m": self.ids.message_id(), **fields, "n": "0", "err": ""})
            pipe.xdel(self.dead, sid)
            pipe.execute()
        return len(chosen)

    # -- faults ----------------------------------------------------------------------------
    @_reachable("drop")
    def drop(self, message_id: str, *, reason: str = "dropped", worker: str = "chaos") -> bool:
        """Forget the message ``message_id`` (queued, leased or delayed). Scans the stream:
        fault injection, not a hot path."""
        for sid, f in self._entries(self.stream):
            if f["m"] == message_id:
                return self._forget(sid)
        for member in self._members(self.delayed):
            if json.loads(member)[1] == message_id:
                return bool(self._r.zrem(self.delayed, member))
        return False

    @_reachable("lose")
    def lose(self, delivery: Delivery, *, reason: str, worker: str = "chaos") -> bool:
        """Forget the entry just received, whoever holds it now."""
        return self._forget(_stream_id(check_delivery(delivery).seq))

    def _forget(self, sid: str) -> bool:
        pipe = self._r.pipeline(transaction=True)
        pipe.xack(self.stream, GROUP, sid)
        pipe.xdel(self.stream, sid)
        self._due.pop(sid, None)
        return bool(pipe.execute()[1])

    # The client decodes every reply (decode_responses=True): ids, fields and members are str,
    # which redis-py's annotations (bytes or str, for any client) cannot tell.
    def _entries(self, key: str) -> list[tuple[str, dict[str, str]]]:
        """The entries of the stream ``key``, first to last: each id with its fields."""
        return cast("list[tuple[str, dict[str, str]]]", self._r.xrange(key))

    def _members(self, key: str) -> list[str]:
        """The members of the sorted set ``key``, lowest score first."""
        return cast("list[str]", self._r.zrange(key, 0, -1))

    # -- look ------------------------------------------------------------------------------
    def _expired(self) -> int:
        """Pending entries idle past the lease: another receive would take them over."""
        return len(self._r.xpending_range(self.stream, GROUP, "-", "+", 10_000,
                                          idle=int(self.lease * 1000)))

    @_reachable("depth")
    def depth(self) -> dict[str, int]:
        """Visible: entries never delivered, plus pending ones idle past the lease. In flight:
        the other pending ones, plus the delayed."""
        pending = self._r.xpending(self.stream, GROUP)["pending"]
        expired = self._expired() if pending else 0
        return {"visible": self._r.xlen(self.stream) - pending + expired,
                "in_flight": pending - expired + self._r.zcard(self.delayed),
                "dead_letters": self._r.xlen(self.dead)}

    @_reachable("next_visible_at")
    def next_visible_at(self) -> float | None:
        """Now if anything is visible; else the earliest of the delayed messages' due times
        and the pending entries' lease ends (this broker's own record for the entries it
        leased, the server's idle time for the others)."""
        now = self.clock.now()
        pending = cast("list[dict[str, Any]]",
                       self._r.xpending_range(self.stream, GROUP, "-", "+", 10_000))
        if self._r.xlen(self.stream) > len(pending):
            return now
        ends = [self._due.get(p["message_id"],
                              now + max(0.0, self.lease - p["time_since_delivered"] / 1000))
                for p in pending]
        self._due = {p["message_id"]: self._due[p["message_id"]] for p in pending
                     if p["message_id"] in self._due}
        first = cast("list[tuple[str, float]]",
                     self._r.zrange(self.delayed, 0, 0, withscores=True))
        if first:
            ends.append(first[0][1])
        return max(now, min(ends)) if ends else None

    @_reachable("queued_event_ids")
    def queued_event_ids(self) -> set[str]:
        """The event ids in the stream (visible or leased) and in the delayed set."""
        events = {f["e"] for _, f in self._entries(self.stream) if f.get("e")}
        for member in self._members(self.delayed):
            fields = json.loads(member)
            events.add(fields[fields.index("e") + 1])
        return events

    @_reachable("dead_lettered_event_ids")
    def dead_lettered_event_ids(self) -> set[str]:
        return {f["e"] for _, f in self._entries(self.dead) if f.get("e")}

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Disconnect (the client's connection pool)."""
        self._r.close()

    def destroy(self) -> None:
        """Delete the stream (its group with it), the dead letters and the delayed set, then
        close."""
        try:
            self._r.delete(*self._keys)
        finally:
            self.close()


# -- by URL -----------------------------------------------------------------------------------
def _shown(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def open_url(url: str, *, field: str = "broker", clock: Clock, ids: Ids,
             max_receives: int | None = None, worker: str = "worker",
             create: bool = True) -> RedisBroker:
    """Connect to ``redis://[user:password@]host:port/db?stream=NAME[&lease=S]``. A bad URL,
    an unknown option or a server that does not answer is :class:`InvalidInput` naming
    ``field`` and the URL (password hidden), with the reason. ``max_receives=None`` is 5:
    Redis keeps no delivery limit of its own (the broker counts, the server does not), so
    there is nothing to open "as it is". ``create=False`` (the operator's commands) creates
    nothing: a stream that does not exist is refused with "no such stream"."""
    if not isinstance(url, str):
        raise InvalidInput(field, url, "a redis:// URL")
    shown = _shown(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        raise InvalidInput(field, shown, f"a redis:// URL ({exc})") from None
    if parts.scheme.lower() != "redis" or not parts.hostname:
        raise InvalidInput(field, shown, "a redis:// URL with a host"
                                         " (redis://host:6379/0?stream=NAME)")
    options = parse_qsl(parts.query, keep_blank_values=True)
    unknown = sorted({k for k, _ in options} - {"stream", "lease"})
    if unknown:
        raise InvalidInput(field, shown, f"only the options stream and lease"
                                         f" (got {', '.join(unknown)})")
    found = dict(options)
    if [k for k, _ in options].count("stream") != 1 or not STREAM_NAME.match(found["stream"]):
        raise InvalidInput(field, shown, "a redis:// URL naming one stream (?stream=NAME: 1 to"
                                         " 100 letters, digits, '-', '_', '.' or ':')")
    kw: dict[str, Any] = {"stream": found["stream"]}
    if "lease" in found:
        try:
            kw["lease"] = check_number("lease", float(found["lease"]), minimum=0.01,
                                       maximum=MAX_VISIBILITY_TIMEOUT_S)
        except (ValueError, InvalidInput):
            raise InvalidInput(field, shown, "lease in seconds (0.01 to 43200)") from None
    try:
        client = redis.Redis.from_url(urlunsplit(parts._replace(query="", fragment="")),
                                      decode_responses=True, socket_timeout=5,
                                      socket_connect_timeout=5)
    except ValueError as exc:
        raise InvalidInput(field, shown, f"a redis:// URL redis-py accepts ({exc})") from None
    try:
        client.ping()
        if not create and not client.exists(kw["stream"]):
            client.close()
            raise InvalidInput(field, shown, "an existing stream (no such stream: nothing was"
                                             " created)")
        return RedisBroker(client, clock=clock, ids=ids,
                           max_receives=(DEFAULT_MAX_RECEIVES if max_receives is None
                                         else max_receives),
                           name=worker, **kw)
    except redis.exceptions.AuthenticationError:
        client.close()
        raise InvalidInput(field, shown, "a redis:// URL whose password the server accepts"
                                         " (login refused)") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        client.close()
        raise InvalidInput(field, shown, f"the URL of a reachable Redis server ({exc})") \
            from None


# -- for the registry ---------------------------------------------------------------------------
BROKER = RedisBroker


def scratch_url(server: str, name: str, *, lease: float = 1.0,
                dedup_window: float | None = None) -> str:
    """The URL of stream ``name`` on ``server`` (a throwaway one: ``destroy()`` deletes it),
    leased for ``lease`` seconds. Redis has no producer dedup."""
    if dedup_window is not None:
        raise InvalidInput("dedup_window", dedup_window, "None: Redis has no producer dedup")
    return f"{server}?stream={name}&lease={lease:g}"


def url_lease(url: str, *, field: str = "broker") -> UrlLease:
    """The lease a ``redis://`` URL fixes: the idle time after which another consumer takes a
    pending entry over (``lease=`` in the URL, 30 s without). Like JetStream's AckWait it is
    the stream's, not a receive's. Read from the URL, without connecting."""
    found = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    seconds = RedisBroker.capabilities.fixed_lease
    if "lease" in found:
        try:
            seconds = check_number("lease", float(found["lease"]), minimum=0.01,
                                   maximum=MAX_VISIBILITY_TIMEOUT_S)
        except (ValueError, InvalidInput):
            raise InvalidInput(field, _shown(url), "lease in seconds (0.01 to 43200)") from None
    return UrlLease(seconds, "lease", "lease" in found,  # type: ignore[arg-type]
                    "the idle time after which another consumer takes an entry over",
                    f"{seconds:g}s (the stream's: lease= in the --broker URL)")


def removal_of(url: str, *, field: str = "broker") -> Removal:
    """What ``deliverylab cleanup`` removes for the ``redis://`` URL ``url``: the stream (its
    consumer group with it), ``STREAM:dead`` and ``STREAM:delayed``. Reads only. A bad URL or
    a server that does not answer is InvalidInput naming ``field``; a stream already gone is
    said, not refused."""
    parts = urlsplit(url)
    options = parse_qsl(parts.query, keep_blank_values=True)
    streams = [v for k, v in options if k == "stream"]
    if not parts.hostname or len(streams) != 1 or not STREAM_NAME.match(streams[0]):
        raise InvalidInput(field, _shown(url), "a redis:// URL with a host, naming one stream"
                                               " (redis://host:6379/0?stream=NAME)")
    stream = streams[0]
    names = (stream, f"{stream}:dead", f"{stream}:delayed")
    try:
        client = redis.Redis.from_url(urlunsplit(parts._replace(query="", fragment="")),
                                      decode_responses=True, socket_timeout=5,
                                      socket_connect_timeout=5)
        found = {n: client.xlen(n) if client.type(n) == "stream" else client.zcard(n)
                 for n in names if client.exists(n)}
    except (ValueError, redis.exceptions.RedisError) as exc:
        raise InvalidInput(field, _shown(url), f"the URL of a reachable Redis server"
                                               f" ({type(exc).__name__}: {exc})") from None
    if not found:
        client.close()
        return Removal(f"Redis stream {stream} (not there: nothing to remove)")

    def remove() -> None:
        try:
            client.delete(*found)
        finally:
            client.close()

    return Removal(f"Redis stream {stream}", remove,
                   [f"{n} ({found[n]} entries)" for n in names if n in found])
