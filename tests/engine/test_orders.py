"""Placing orders: the transactional outbox, the idempotent producer, and input validation."""

from __future__ import annotations

import json
import sqlite3

import pytest

from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.check import check
from deliverylab.engine.errors import InvalidInput, OrderConflict, SimulatedCrash
from deliverylab.engine.orders import (
    EVENT_TYPE,
    MAX_QTY,
    get_order,
    list_orders,
    place_order,
    request_hash,
)


def counts(lab):
    c = store.table_counts(lab.store)
    return c["orders"], c["queue_messages"]


def test_an_order_and_its_event_are_written_together(any_lab):
    lab = any_lab
    placed = lab.order("coffee-beans", 2, order_id="o-001")
    assert placed.created and placed.order_id == "o-001"
    order = get_order(lab.store, "o-001")
    assert (order.item_id, order.qty, order.event_id) == ("coffee-beans", 2, placed.event_id)
    msg = lab.store.execute("SELECT * FROM queue_messages").fetchone()
    assert msg["event_id"] == placed.event_id and msg["type"] == EVENT_TYPE
    assert msg["correlation_id"] == "o-001"
    assert json.loads(msg["payload"]) == {"orderId": "o-001", "itemId": "coffee-beans", "qty": 2}
    assert msg["created_at"] == order.created_at == lab.clock.now()


def test_order_ids_are_generated_when_not_given_and_are_unique(lab):
    ids = {lab.order("tea", 1).order_id for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("o-") for i in ids)
    assert counts(lab) == (50, 50)


# -- the outbox: a crash between the order and its event leaves neither ------------------------

def test_a_database_error_on_the_event_insert_rolls_back_the_order(any_lab):
    lab = any_lab
    lab.store.execute("CREATE TRIGGER outbox_fails BEFORE INSERT ON queue_messages"
                     " BEGIN SELECT RAISE(ABORT, 'disk full (simulated)'); END")
    before = store.dump(lab.store)
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        lab.order("coffee-beans", 1, order_id="o-001")
    assert counts(lab) == (0, 0)
    assert store.dump(lab.store) == before
    assert not lab.store.in_transaction


def test_a_crash_after_the_order_insert_leaves_neither(any_lab, monkeypatch):
    lab = any_lab
    real_send = Queue.send

    def send_then_die(self, *args, **kwargs):
        # The order row is already written in this transaction; so is the event. Then the
        # process "dies" before the commit.
        assert counts(lab) == (1, 0)
        real_send(self, *args, **kwargs)
        assert counts(lab) == (1, 1)
        raise SimulatedCrash("between order and event")

    monkeypatch.setattr(Queue, "send", send_then_die)
    with pytest.raises(SimulatedCrash):
        lab.order("coffee-beans", 1, order_id="o-001")
    assert counts(lab) == (0, 0)
    monkeypatch.undo()
    # The client retries the same request: now it goes through, exactly once.
    assert lab.order("coffee-beans", 1, order_id="o-001").created
    assert counts(lab) == (1, 1)


def test_the_seeds_dual_write_loses_the_event_and_the_checker_sees_it(lab):
    """Contrast: order committed on its own, then the process dies before the second write."""
    with store.transaction(lab.store):
        lab.store.execute(
            "INSERT INTO orders (order_id, item_id, qty, event_id, request_hash, created_at)"
            " VALUES ('o-001', 'coffee-beans', 1, 'evt-1', ?, 0)",
            (request_hash("coffee-beans", 1),))
    # ... crash here: the queue insert never happens.
    assert counts(lab) == (1, 0)
    result = check(lab.store)
    assert result.lost == 1 and not result.ok


# -- the idempotent producer --------------------------------------------------------------------

def test_replaying_the_same_order_returns_the_first_result_and_writes_nothing(any_lab):
    lab = any_lab
    first = lab.order("coffee-beans", 1, order_id="o-001")
    before = store.dump(lab.store)
    lab.clock.advance(3)
    again = lab.order("coffee-beans", 1, order_id="o-001")
    assert (again.order_id, again.event_id, again.created) == ("o-001", first.event_id, False)
    assert store.dump(lab.store) == before
    assert counts(lab) == (1, 1)


def test_the_same_order_id_with_a_different_body_is_a_conflict(any_lab):
    lab = any_lab
    lab.order("coffee-beans", 1, order_id="o-001")
    before = store.dump(lab.store)
    with pytest.raises(OrderConflict, match="orderId 'o-001' was already used"):
        lab.order("coffee-beans", 2, order_id="o-001")
    with pytest.raises(OrderConflict):
        lab.order("tea", 1, order_id="o-001")
    assert store.dump(lab.store) == before


def test_idempotency_key_replay_and_conflict(any_lab):
    lab = any_lab
    first = lab.order("coffee-beans", 1, idempotency_key="req-42")
    before = store.dump(lab.store)
    again = lab.order("coffee-beans", 1, idempotency_key="req-42")
    assert (again.order_id, again.event_id, again.created) == (first.order_id, first.event_id,
                                                               False)
    with pytest.raises(OrderConflict, match="Idempotency-Key 'req-42' was already used"):
        lab.order("coffee-beans", 5, idempotency_key="req-42")
    with pytest.raises(OrderConflict, match="Idempotency-Key 'req-42'"):
        lab.order("coffee-beans", 1, idempotency_key="req-42", order_id="o-other")
    assert store.dump(lab.store) == before
    # A new key is a new order, even with the same body.
    assert lab.order("coffee-beans", 1, idempotency_key="req-43").created
    assert counts(lab) == (2, 2)


def test_idempotency_key_with_its_own_order_id_replays(lab):
    first = lab.order("tea", 3, order_id="o-7", idempotency_key="k")
    again = lab.order("tea", 3, order_id="o-7", idempotency_key="k")
    assert again == first.__class__(first.order_id, first.event_id, False)


# -- bad input ---------------------------------------------------------------------------------

BAD_ORDERS = [
    ("qty", {"qty": 1.0}), ("qty", {"qty": 2.5}), ("qty", {"qty": True}), ("qty", {"qty": False}),
    ("qty", {"qty": "1"}), ("qty", {"qty": None}), ("qty", {"qty": 0}), ("qty", {"qty": -1}),
    ("qty", {"qty": MAX_QTY + 1}),
    ("itemId", {"item_id": ""}), ("itemId", {"item_id": "   "}), ("itemId", {"item_id": "x" * 101}),
    ("itemId", {"item_id": None}), ("itemId", {"item_id": 7}),
    ("orderId", {"order_id": ""}), ("orderId", {"order_id": "o" * 101}),
    ("orderId", {"order_id": 12}),
    ("Idempotency-Key", {"idempotency_key": ""}),
    ("Idempotency-Key", {"idempotency_key": "k" * 201}),
]


@pytest.mark.parametrize(("field", "change"), BAD_ORDERS,
                         ids=[f"{f}={next(iter(c.values()))!r}"[:40] for f, c in BAD_ORDERS])
def test_bad_order_names_the_field_and_value_and_writes_nothing(any_lab, field, change):
    lab = any_lab
    lab.order("coffee-beans", 1, order_id="o-000")
    before = store.dump(lab.store)
    kwargs = {"item_id": "coffee-beans", "qty": 1, **change}
    (value,) = change.values()
    with pytest.raises(InvalidInput) as info:
        place_order(lab.broker, **kwargs)
    assert info.value.field == field and info.value.value == value
    assert str(info.value).startswith(f"{field} must be ")
    assert str(info.value).endswith(f"got {value!r}")
    assert store.dump(lab.store) == before


def test_qty_message_states_the_bounds(lab):
    with pytest.raises(InvalidInput) as info:
        lab.order("coffee-beans", 0)
    assert str(info.value) == f"qty must be an integer >= 1 and <= {MAX_QTY}, got 0"


def test_the_bounds_themselves_are_accepted(lab):
    lab.order("x" * 100, MAX_QTY, order_id="o" * 100)
    lab.order("y", 1)
    assert counts(lab) == (2, 2)


# -- reading orders back -------------------------------------------------------------------------

def test_get_and_list_orders(lab):
    for i in range(5):
        lab.order("tea", i + 1, order_id=f"o-{i}")
        lab.clock.advance(1)
    assert get_order(lab.store, "o-missing") is None
    assert [o.order_id for o in list_orders(lab.store)] == [f"o-{i}" for i in range(5)]
    assert [o.qty for o in list_orders(lab.store, limit=2, offset=1)] == [2, 3]
    with pytest.raises(InvalidInput, match="^limit must be an integer >= 1 and <= 10000, got 0$"):
        list_orders(lab.store, limit=0)
    with pytest.raises(InvalidInput, match="^offset must be an integer >= 0, got -1$"):
        list_orders(lab.store, offset=-1)
