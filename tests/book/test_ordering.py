"""The order-status projection: the producer's versions, last write wins going wrong under
redelivery, retries and concurrent workers, and newer wins staying right."""

from __future__ import annotations

import re

import pytest

from deliverylab.book import ordering
from deliverylab.book.lab import Lab
from deliverylab.book.ordering import change_status, status_check, status_run
from deliverylab.brokers.base import Delivery
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.worker import PoisonMessage

SEEDS = range(30)


@pytest.fixture
def lab() -> Lab:
    lab = Lab(seed=3)
    ordering.install(lab.store)
    lab.place_order("coffee-beans", 1, order_id="o-1")
    yield lab
    lab.store.close()


def written(lab: Lab) -> tuple[int, int]:
    changes = lab.store.execute("SELECT count(*) FROM order_status_changes").fetchone()[0]
    return changes, lab.store.execute("SELECT count(*) FROM queue_messages").fetchone()[0]


# -- the producer -------------------------------------------------------------------------------

def test_each_change_gets_the_next_version_and_an_event_carrying_it(lab) -> None:
    paid = change_status(lab.broker, "o-1", "paid")
    shipped = change_status(lab.broker, "o-1", "shipped")
    assert (paid.version, shipped.version) == (2, 3)
    payloads = [r[0] for r in lab.store.execute(
        "SELECT payload FROM queue_messages WHERE type = ? ORDER BY seq", (ordering.STATUS_EVENT,))]
    assert payloads == ['{"orderId":"o-1","status":"paid","version":2}',
                        '{"orderId":"o-1","status":"shipped","version":3}']


@pytest.mark.parametrize(("steps", "bad", "field", "words"), [
    ((), "shipped", "status", "may follow 'placed': paid or cancelled"),
    (("cancelled",), "paid", "status", "nothing (it is final)"),
    (("paid", "shipped"), "cancelled", "status", "nothing (it is final)"),
    ((), "placed", "status", "one of paid, shipped, cancelled"),
    ((), "refunded", "status", "one of paid, shipped, cancelled"),
])
def test_a_change_the_life_cycle_forbids_is_refused_and_writes_nothing(lab, steps, bad, field,
                                                                     words) -> None:
    for step in steps:
        change_status(lab.broker, "o-1", step)
    before = written(lab)
    with pytest.raises(InvalidInput, match=re.escape(words)) as refused:
        change_status(lab.broker, "o-1", bad)
    assert refused.value.field == field and refused.value.value == bad
    assert written(lab) == before


def test_a_fact_reported_after_the_cancellation_is_a_change_and_the_order_stays_cancelled(
        lab) -> None:
    lab.place_order("coffee-beans", 1, order_id="o-2")
    changes = ordering.live(lab.broker, "o-1", ("paid", "cancelled", "shipped"))
    assert [(c.status, c.version) for c in changes] == [
        ("paid", 2), ("cancelled", 3), ("shipped", 4)]
    ordering.live(lab.broker, "o-2", ("cancelled", "paid"))
    assert written(lab) == (5, 2 + 5)  # each change has its event, beside the two OrderPlaced
    truth = {r[0]: (r[1], r[2]) for r in ordering.status_rows(lab.store)}
    assert truth == {"o-1": ("cancelled", 3), "o-2": ("cancelled", 2)}
    with pytest.raises(InvalidInput, match=re.escape("nothing (it is final)")):
        change_status(lab.broker, "o-1", "paid")  # the producer's own life cycle is over


@pytest.mark.parametrize(("steps", "bad", "field", "words"), [
    (("paid",), "shipped", "order_id", "the id of a cancelled order"),
    ((), "paid", "order_id", "the id of a cancelled order"),
    (("cancelled",), "shipped", "status", "may follow 'placed': paid or cancelled"),
    (("paid", "shipped"), "cancelled", "order_id", "the id of a cancelled order"),
    (("paid", "cancelled", "shipped"), "paid", "status", "may follow 'shipped': nothing"),
    (("cancelled",), "cancelled", "status", "a status other than cancelled"),
])
def test_a_fact_after_the_cancellation_must_follow_the_life_before_it(lab, steps, bad, field,
                                                                      words) -> None:
    ordering.live(lab.broker, "o-1", steps)
    before = written(lab)
    with pytest.raises(InvalidInput, match=re.escape(words)) as refused:
        ordering.report_after_cancel(lab.broker, "o-1", bad)
    assert refused.value.field == field
    assert written(lab) == before


def test_an_unknown_order_is_refused_naming_it(lab) -> None:
    before = written(lab)
    with pytest.raises(InvalidInput, match="the id of a placed order") as refused:
        change_status(lab.broker, "o-404", "paid")
    assert (refused.value.field, refused.value.value) == ("order_id", "o-404")
    assert written(lab) == before


def test_without_its_tables_the_module_says_which_install_to_run() -> None:
    bare = Lab(seed=4)
    bare.place_order("coffee-beans", 1, order_id="o-1")
    with pytest.raises(InvalidInput, match="ordering.install") as refused:
        change_status(bare.broker, "o-1", "paid")
    assert refused.value.field == "conn"
    with pytest.raises(InvalidInput, match="order_status_changes, order_status"):
        status_check(bare.store)


# -- the projection, event by event --------------------------------------------------------------

def delivery(status: str, version: int, n: int = 1) -> Delivery:
    return Delivery(seq=version, message_id=f"msg-{version}", event_id=f"evt-{version}",
                    type=ordering.STATUS_EVENT,
                    payload={"orderId": "o-1", "status": status, "version": version},
                    correlation_id="o-1", receipt="r", delivery_count=n, lease_until=0.0)


@pytest.mark.parametrize(("versioned", "final"), [(False, "paid"), (True, "shipped")])
def test_an_older_event_after_a_newer_one(lab, versioned, final) -> None:
    handle = ordering.status_handler(versioned=versioned, clock=FakeClock())
    handle(lab.store, delivery("shipped", 3))
    handle(lab.store, delivery("paid", 2))
    assert lab.store.execute("SELECT status FROM order_status").fetchone()[0] == final


def test_newer_wins_ignores_order_and_repetition(lab) -> None:
    import itertools

    events = [delivery("paid", 2), delivery("shipped", 3), delivery("paid", 2, n=2)]
    handle = ordering.status_handler(versioned=True, clock=FakeClock())
    for order in itertools.permutations(events):
        lab.store.execute("DELETE FROM order_status")
        for d in order:
            handle(lab.store, d)
        assert tuple(lab.store.execute("SELECT status, version FROM order_status").fetchone()) == (
            "shipped", 3)


@pytest.mark.parametrize("payload", [{"orderId": "o-1", "status": "lost", "version": 2},
                                     {"orderId": "o-1", "status": "paid", "version": 0},
                                     {"orderId": "o-1", "status": "paid", "version": True},
                                     {"status": "paid", "version": 2}])
def test_a_bad_status_event_is_a_poison_message(lab, payload) -> None:
    handle = ordering.status_handler(versioned=True, clock=FakeClock())
    bad = delivery("paid", 2)._replace(payload=payload)
    with pytest.raises(PoisonMessage):
        handle(lab.store, bad)
    with pytest.raises(PoisonMessage, match="unknown event type"):
        handle(lab.store, delivery("paid", 2)._replace(type="OrderShipped"))


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(InvalidInput, match="versioned"):
        ordering.status_handler(versioned="yes", clock=FakeClock())  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="rate"):
        ordering.Overlap(FakeClock(), lambda: None, rate=2)
    with pytest.raises(InvalidInput, match="orders"):
        status_run(versioned=True, orders=-1)
    with pytest.raises(InvalidInput, match="life"):
        ordering.live(None, "o-1", ["paid"])  # type: ignore[arg-type]


def test_the_check_counts_missing_statuses_while_events_are_queued(lab) -> None:
    change_status(lab.broker, "o-1", "paid")
    assert status_check(lab.store) == ordering.StatusCheck(orders=1, correct=0, wrong=0, missing=1)
    assert status_check(lab.store).verdict == "BROKEN: 1 missing of 1 order statuses"


# -- over many seeds ------------------------------------------------------------------------------

SCENARIOS = {
    "lost ACKs, no inbox": {"mode": "at-least-once", "ack_fail": 0.3},
    "failed first attempts": {"process_error": 0.2},
    "two workers at once": {"overlap": 0.5},
    "everything": {"ack_fail": 0.2, "process_error": 0.1, "overlap": 0.3},
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_newer_wins_ends_every_order_in_its_true_status(scenario) -> None:
    for seed in SEEDS:
        run = status_run(versioned=True, orders=30, seed=seed, **SCENARIOS[scenario])
        assert run.correct == 30 and run.wrong == run.missing == 0, (scenario, seed)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_last_write_wins_ends_some_orders_in_a_stale_status(scenario) -> None:
    for seed in SEEDS:
        run = status_run(versioned=False, orders=30, seed=seed, **SCENARIOS[scenario])
        assert run.wrong > 0 and run.missing == 0, (scenario, seed)


def test_with_an_inbox_lost_acks_alone_do_no_harm_to_last_write_wins() -> None:
    for seed in range(10):
        run = status_run(versioned=False, orders=30, seed=seed, ack_fail=0.5)
        assert run.wrong == 0, seed


def test_the_same_seed_gives_the_same_run() -> None:
    a = status_run(versioned=False, orders=20, seed=9, ack_fail=0.2, overlap=0.4)
    b = status_run(versioned=False, orders=20, seed=9, ack_fail=0.2, overlap=0.4)
    assert a == b and a.overlaps > 0
