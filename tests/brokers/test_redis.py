"""What the Redis Streams broker adds to the contract suite (which runs on it too): its URL,
and the zombie that Redis itself would let acknowledge.

On the shared server (127.0.0.1:6379, ``make services``); every test has its own stream,
deleted afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from deliverylab.brokers import registry
from deliverylab.brokers.redis import GROUP, RedisBroker, open_url
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.ids import Ids

SERVER = registry.server_url("redis")


@pytest.fixture
def stream_url() -> Iterator[str]:
    url = registry.scratch_url("redis", lease=0.3, prefix="test-redis")
    yield url
    client = redis.Redis.from_url(url.partition("?")[0])
    name = url.partition("stream=")[2].partition("&")[0]
    client.delete(name, f"{name}:dead", f"{name}:delayed")
    client.close()


@pytest.mark.parametrize(("url", "says"), [
    ("redis://127.0.0.1:6379/0", "naming one stream"),
    ("redis://127.0.0.1:6379/0?stream=a&stream=b", "naming one stream"),
    ("redis://127.0.0.1:6379/0?stream=has space", "naming one stream"),
    ("redis://127.0.0.1:6379/0?stream=s&lease=soon", "lease in seconds"),
    ("redis://127.0.0.1:6379/0?stream=s&lease=0", "lease in seconds"),
    ("redis://127.0.0.1:6379/0?stream=s&queue=q", "only the options stream and lease"),
    ("redis://127.0.0.1:notaport/0?stream=s", "a redis:// URL"),
    ("http://127.0.0.1:6379/0?stream=s", "a redis:// URL with a host"),
    ("redis://127.0.0.1:1/0?stream=s", "reachable Redis server"),
])
def test_a_bad_url_names_the_field_and_the_url(url, says):
    with pytest.raises(InvalidInput, match=says) as refused:
        open_url(url, field="--broker", clock=FakeClock(), ids=Ids(1))
    assert refused.value.field == "--broker"


def test_a_password_never_shows_in_a_refusal():
    with pytest.raises(InvalidInput) as refused:
        open_url("redis://:hunter2@127.0.0.1:1/0?stream=s", clock=FakeClock(), ids=Ids(1))
    assert "hunter2" not in str(refused.value) and ":***@" in str(refused.value)


def test_a_zombie_whose_entry_was_taken_over_cannot_settle_it(stream_url):
    """Redis accepts any consumer's XACK for any pending entry. Two consumers of one group:
    the first's lease runs out, the second takes the entry over (XAUTOCLAIM); the first's ack,
    extend, nack and dead-letter are then refused, and the second's ack is the one that
    counts."""
    zombie = open_url(stream_url, clock=FakeClock(), ids=Ids(1), worker="zombie")
    other = open_url(stream_url, clock=FakeClock(), ids=Ids(2), worker="other")
    try:
        zombie.send("e-1", "OrderPlaced", {"orderId": "o-1", "qty": 1})
        [old] = zombie.receive(1.0)
        time.sleep(zombie.lease + 0.1)  # the server times the lease
        [new] = other.receive(1.0)
        assert (new.message_id, new.delivery_count) == (old.message_id, 2)
        client = redis.Redis.from_url(SERVER, decode_responses=True)
        [entry] = client.xpending_range(other.stream, GROUP, "-", "+", 10)
        assert entry["consumer"] == other.consumer  # the PEL names the new holder
        client.close()
        assert zombie.ack(old) is False
        assert zombie.extend(old, 5) is False
        assert zombie.nack(old, 0, error="late") is False
        assert zombie.dead_letter(old, "late") is False
        assert other.depth() == {"visible": 0, "in_flight": 1, "dead_letters": 0}
        assert other.ack(new) is True
        assert other.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}
    finally:
        zombie.close()
        other.destroy()


def test_two_brokers_on_one_stream_share_its_group_and_never_take_the_same_entry(stream_url):
    a = open_url(stream_url, clock=FakeClock(), ids=Ids(1), worker="a")
    b = open_url(stream_url, clock=FakeClock(), ids=Ids(2), worker="b")
    try:
        for i in range(10):
            a.send(f"e-{i}", "OrderPlaced", {"orderId": f"o-{i}", "qty": 1})
        got = [*a.receive(1.0, 4), *b.receive(1.0, 4), *a.receive(1.0, 4)]
        assert sorted(d.event_id for d in got) == sorted(f"e-{i}" for i in range(10))
        assert isinstance(a, RedisBroker) and a.consumer != b.consumer
    finally:
        a.close()
        b.destroy()


def test_a_foreign_entry_with_no_id_is_dead_lettered_at_once_as_it_came(stream_url):
    """Another producer's XADD, without this project's fields: no inbox could tell its
    republish from a new message, so it is never handed out; it goes to the dead letters on
    its first receive, its fields kept, with the reason "no message id". A foreign entry whose
    body is not JSON but that has an event id is handed out, and ends in the dead letters at
    ``max_receives`` like any message a handler refuses."""
    broker = open_url(stream_url, clock=FakeClock(), ids=Ids(1), max_receives=2)
    client = redis.Redis.from_url(SERVER, decode_responses=True)
    try:
        client.xadd(broker.stream, {"order": "o-9", "qty": "3"})
        client.xadd(broker.stream, {"e": "evt-foreign", "p": "not json"})
        got = broker.receive(60, 10)
        assert [d.event_id for d in got] == ["evt-foreign"]
        assert got[0].payload == {"body": "not json"}
        [(refused, reason)] = got.parked
        assert reason == "no message id" and refused.event_id == ""
        [(_, dead)] = client.xrange(f"{broker.stream}:dead")
        assert (dead["order"], dead["qty"], dead["reason"]) == ("o-9", "3", "no message id")
        assert broker.nack(got[0], 0, error="payload is not an order")
        [again] = broker.receive(60)
        assert broker.nack(again, 0, error="payload is not an order")
        assert list(broker.receive(60)) == []
        assert broker.dead_lettered_event_ids() == {"evt-foreign"}
        assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 2}
    finally:
        client.close()
        broker.close()
