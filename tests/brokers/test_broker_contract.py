"""The broker contract (``deliverylab.engine.broker.Broker``), the same cases for every engine.

``broker`` comes from ``tests/conftest.py``, one param per engine; every broker has its own
FakeClock (``broker.clock``), so leases run out by moving the clock, never by sleeping. (On
RabbitMQ the lease is the delivery's channel: the broker closes it at its first verb after the
lease's end on its clock, so moving the clock ends a lease there too.)

Except where the server times the leases (``capabilities.lease_clock == "server"``): there
:func:`wait` sleeps as well as moving the FakeClock, with a margin for the server's timers.

Where an engine cannot do what the contract says, its ``capabilities`` say so, its module
documents the substitute, and the test asserts that documented behaviour in the same test
(nothing is skipped, and no test names an engine): a fixed lease for every receive
(``fixed_lease``, which ``extend`` restarts), no delayed send, no listing of ready messages,
and a stale receipt that is accepted, acting on the message whoever holds it now.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from deliverylab.engine import store
from deliverylab.engine.broker import Broker, Capabilities, Delivery, Received
from deliverylab.engine.errors import InvalidInput

VT = 2.0  # the visibility timeout used throughout


def send(broker: Broker, n: int = 1, prefix: str = "e") -> list[str]:
    return [broker.send(f"{prefix}-{i}", "OrderPlaced", {"orderId": f"o-{i}", "qty": 1},
                        correlation_id=f"o-{i}") for i in range(n)]


def one(broker: Broker, vt: float = VT) -> Delivery:
    got = broker.receive(vt)
    assert len(got) == 1, got
    return got[0]


def on_server_clock(broker: Broker) -> bool:
    """Whether the engine's leases run on its server's clock, not on ours."""
    return broker.capabilities.lease_clock == "server"


def lease_of(broker: Broker, vt: float = VT) -> float:
    """How long a ``receive(vt)`` leases: ``vt``, or the engine's fixed lease."""
    return broker.capabilities.lease_for(vt)


def margin(broker: Broker) -> float:
    """How close to a lease's end a test may look: a millisecond on the FakeClock; on a
    server's clock, enough for its timers and a fetch."""
    return 0.3 if on_server_clock(broker) else 0.001


def wait(broker: Broker, seconds: float) -> None:
    """Let ``seconds`` pass: on the FakeClock, and on the server's clock too (a sleep)."""
    broker.clock.advance(seconds)
    if on_server_clock(broker):
        time.sleep(seconds)


def expire(broker: Broker, d: Delivery) -> None:
    """Let time pass just past ``d``'s lease."""
    wait(broker, d.lease_until - broker.clock.now() + margin(broker))


def test_is_a_broker(broker):
    assert isinstance(broker, Broker)
    assert broker.max_receives == 3


def test_capabilities_are_frozen_data_that_agree_with_the_broker(broker):
    caps = broker.capabilities
    assert isinstance(caps, Capabilities)
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.delayed_send = not caps.delayed_send  # type: ignore[misc]
    assert broker.dedup_window == caps.dedup_window
    assert caps.lease_for(VT) == (VT if caps.fixed_lease is None else caps.fixed_lease)
    elsewhere = store.init_db()  # a store the broker is not on: never joined
    assert broker.joins(elsewhere) is False
    elsewhere.close()
    if not caps.joins_store:
        assert not broker.joins(getattr(broker, "conn", None))


def test_send_then_receive_hands_out_the_message_once_per_lease(broker):
    [mid] = send(broker)
    d = one(broker)
    assert (d.message_id, d.event_id, d.type, d.correlation_id) == (mid, "e-0", "OrderPlaced",
                                                                     "o-0")
    assert d.payload == {"orderId": "o-0", "qty": 1}
    assert d.delivery_count == 1
    assert d.lease_until == broker.clock.now() + lease_of(broker)
    assert broker.receive(VT) == []  # leased: invisible to everyone else
    assert broker.depth() == {"visible": 0, "in_flight": 1, "dead_letters": 0}


def test_the_lease_runs_out_and_the_message_comes_back_with_a_new_receipt(broker):
    send(broker)
    first = one(broker)
    wait(broker, lease_of(broker) - margin(broker))
    assert broker.receive(VT) == []  # not yet
    wait(broker, 2 * margin(broker))
    second = one(broker)
    assert second.message_id == first.message_id
    assert second.delivery_count == 2
    assert second.receipt != first.receipt


@pytest.mark.parametrize("verb", ["ack", "extend", "nack", "dead_letter"])
def test_a_stale_receipt_is_refused_and_changes_nothing(broker, verb):
    send(broker)
    stale = one(broker)
    expire(broker, stale)
    current = one(broker)
    refused = {"ack": lambda: broker.ack(stale),
               "extend": lambda: broker.extend(stale, 60),
               "nack": lambda: broker.nack(stale, 0, error="boom"),
               "dead_letter": lambda: broker.dead_letter(stale, "boom")}[verb]()
    if not broker.capabilities.refuses_stale_receipts:
        # The engine finds the message, not the delivery: the stale receipt is accepted and
        # acts on the message the current holder has.
        assert refused is True
        STALE_ACCEPTED[verb](broker, current)
        return
    assert refused is False
    assert broker.depth() == {"visible": 0, "in_flight": 1, "dead_letters": 0}
    assert broker.receive(VT) == []  # the current lease still holds
    assert broker.ack(current) is True
    assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}


def _stale_ack_deleted_it(broker: Broker, current: Delivery) -> None:
    assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}
    assert broker.ack(current) is False  # the holder's own ack finds nothing


def _stale_extend_restarted_the_holders_lease(broker: Broker, current: Delivery) -> None:
    assert broker.depth() == {"visible": 0, "in_flight": 1, "dead_letters": 0}
    assert broker.receive(VT) == []
    assert broker.ack(current) is True


def _stale_nack_handed_it_out_again(broker: Broker, current: Delivery) -> None:
    third = one(broker)  # at once, while the current lease still runs
    assert (third.message_id, third.delivery_count) == (current.message_id, 3)
    assert broker.ack(third) is True
    assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}


def _stale_dead_letter_moved_it(broker: Broker, current: Delivery) -> None:
    assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 1}
    assert broker.dead_lettered_event_ids() == {current.event_id}
    assert broker.ack(current) is False


STALE_ACCEPTED = {"ack": _stale_ack_deleted_it,
                      "extend": _stale_extend_restarted_the_holders_lease,
                      "nack": _stale_nack_handed_it_out_again,
                      "dead_letter": _stale_dead_letter_moved_it}


def test_ack_twice_acks_once(broker):
    send(broker)
    d = one(broker)
    assert broker.ack(d) is True
    assert broker.ack(d) is False
    assert broker.queued_event_ids() == set()


def test_extend_moves_the_lease(broker):
    send(broker)
    d = one(broker)
    wait(broker, 0.75 * lease_of(broker))
    assert broker.extend(d, 5.0) is True
    # An engine with a fixed lease restarts it from now: it cannot set 5 seconds.
    extended = lease_of(broker, 5.0)
    wait(broker, extended - margin(broker))  # past the first lease, inside the extended one
    assert broker.receive(VT) == []
    wait(broker, 2 * margin(broker))
    assert one(broker).delivery_count == 2


def test_nack_makes_it_visible_after_the_delay_and_keeps_counting(broker):
    send(broker)
    d = one(broker)
    assert broker.nack(d, 3.0, error="handler failed") is True
    assert broker.next_visible_at() == broker.clock.now() + 3.0
    wait(broker, 3.0 - margin(broker))
    assert broker.receive(VT) == []
    wait(broker, 2 * margin(broker))
    again = one(broker)
    assert again.delivery_count == 2
    assert again.last_error == "handler failed"
    if not broker.capabilities.refuses_stale_receipts:  # accepted, acting on the message
        assert broker.ack(d) is True
        assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}
        return
    assert broker.ack(d) is False  # the nacked delivery's receipt is spent


def test_dead_letters_at_exactly_max_receives(broker):
    send(broker)
    for n in range(1, broker.max_receives + 1):  # max_receives deliveries are handed out
        d = one(broker)
        assert d.delivery_count == n
        expire(broker, d)
    got = broker.receive(VT)
    assert isinstance(got, Received)
    assert got == []  # the next receive parks it instead, and says so
    [(parked, reason)] = got.parked
    assert parked.event_id == "e-0"
    assert parked.delivery_count == broker.max_receives  # the deliveries that happened
    assert f"max_receives={broker.max_receives}" in reason
    assert broker.dead_lettered_event_ids() == {"e-0"}
    assert broker.queued_event_ids() == set()
    assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 1}
    assert broker.next_visible_at() is None


def test_dead_letter_by_hand_then_redrive_as_a_new_message(broker):
    send(broker, 2)
    d = one(broker)
    assert broker.dead_letter(d, "poison") is True
    assert broker.dead_lettered_event_ids() == {d.event_id}
    assert broker.redrive() == 1
    assert broker.dead_lettered_event_ids() == set()
    if not broker.capabilities.lists_queue:
        with pytest.raises(NotImplementedError, match="2 messages are ready"):
            broker.queued_event_ids()
    else:
        assert broker.queued_event_ids() == {"e-0", "e-1"}
    got = broker.receive(VT, 10)
    back = next(x for x in got if x.event_id == d.event_id)
    assert back.message_id != d.message_id  # a new message
    assert back.delivery_count == 1  # counted afresh


def test_redrive_by_id_refuses_an_unknown_id_and_moves_an_id_once(broker):
    send(broker)
    d = one(broker)
    broker.dead_letter(d, "poison")
    [dead_id] = [d.message_id]
    with pytest.raises(InvalidInput, match="message_ids"):
        broker.redrive([dead_id, "no-such-message"])
    assert broker.dead_lettered_event_ids() == {"e-0"}  # nothing moved
    assert broker.redrive([dead_id, dead_id]) == 1
    assert broker.depth() == {"visible": 1, "in_flight": 0, "dead_letters": 0}


def test_batch_receive_takes_the_oldest_first_and_never_twice(broker):
    for i in range(5):
        send(broker, 1, prefix=f"b{i}")
        broker.clock.advance(0.01)
    first = broker.receive(VT, 3)
    assert [d.event_id for d in first] == ["b0-0", "b1-0", "b2-0"]
    rest = broker.receive(VT, 3)
    assert [d.event_id for d in rest] == ["b3-0", "b4-0"]
    assert len({d.message_id for d in first + rest}) == 5
    assert broker.ack_many(first + rest) == [True] * 5
    assert broker.depth()["in_flight"] == 0


def test_ack_many_with_a_stale_and_a_current_receipt(broker):
    send(broker)
    stale = one(broker)
    expire(broker, stale)
    current = one(broker)
    # Where a stale receipt is accepted, it acks; the current one then finds nothing.
    assert broker.ack_many([stale, current]) == (
        [False, True] if broker.capabilities.refuses_stale_receipts else [True, False])
    assert broker.queued_event_ids() == set()
    assert broker.ack_many([current, current]) == [False, False]


def test_the_same_delivery_twice_in_ack_many_acks_once(broker):
    send(broker)
    d = one(broker)
    assert broker.ack_many([d, d]) == [True, False]


def test_depth_and_next_visible_at(broker):
    assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}
    assert broker.next_visible_at() is None
    send(broker, 3)
    if not broker.capabilities.delayed_send:  # refused, naming the delay; nothing sent
        with pytest.raises((InvalidInput, NotImplementedError), match="delay"):
            broker.send("later", "OrderPlaced", {"orderId": "o-x", "qty": 1}, delay=10.0)
        one(broker)
        assert broker.depth() == {"visible": 2, "in_flight": 1, "dead_letters": 0}
        later = set()
    else:
        broker.send("later", "OrderPlaced", {"orderId": "o-x", "qty": 1}, delay=10.0)
        one(broker)
        assert broker.depth() == {"visible": 2, "in_flight": 2, "dead_letters": 0}
        later = {"later"}
    assert broker.next_visible_at() == broker.clock.now()
    broker.receive(VT, 10)
    assert broker.next_visible_at() == broker.clock.now() + lease_of(broker)
    assert broker.queued_event_ids() == {"e-0", "e-1", "e-2"} | later


def test_drop_and_lose_forget_a_message_whatever_its_lease(broker):
    [a, b] = send(broker, 2)
    d = broker.receive(VT, 1)[0]
    assert broker.lose(d, reason="lost in transit") is True
    assert broker.lose(d, reason="again") is False
    other = b if d.message_id == a else a
    if not broker.capabilities.lists_queue:  # a queued message cannot be picked by id
        with pytest.raises(NotImplementedError, match="not held by this broker"):
            broker.drop(other)
        assert broker.depth() == {"visible": 1, "in_flight": 0, "dead_letters": 0}
        held = one(broker)
        assert broker.drop(held.message_id) is True  # a message it holds: forgotten
        with pytest.raises(NotImplementedError):
            broker.drop(held.message_id)  # gone: no longer held here either
    else:
        assert broker.drop(other) is True
        assert broker.drop(other) is False
    assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}


@pytest.mark.parametrize(("call", "field"), [
    (lambda b: b.receive(-1), "visibility_timeout"),
    (lambda b: b.receive(VT, 0), "max_messages"),
    (lambda b: b.send("e-1", "OrderPlaced", ["not", "a", "dict"]), "payload"),
    (lambda b: b.send("e\n1", "OrderPlaced", {}), "event_id"),
    (lambda b: b.send("e-1", "OrderPlaced", {}, delay=-1), "delay"),
    (lambda b: b.ack("msg-1"), "delivery"),
    (lambda b: b.ack_many("msg-1"), "deliveries"),
    (lambda b: b.redrive("msg-1"), "message_ids"),
])
def test_bad_input_names_the_field_and_changes_nothing(broker, call, field):
    send(broker)
    with pytest.raises(InvalidInput) as refused:
        call(broker)
    assert refused.value.field == field
    assert broker.depth() == {"visible": 1, "in_flight": 0, "dead_letters": 0}
