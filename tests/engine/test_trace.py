"""The trace: every delivery's outcome lands in ``delivery_log``, keyed by the order id."""

from __future__ import annotations

from collections import defaultdict

import pytest
from support.engine import make_lab

from deliverylab.book.traceviews import COLUMNS, delivery_counts, log_frame, timeline
from deliverylab.engine.faults import Faults
from deliverylab.engine.reconcile import repair
from deliverylab.engine.trace import Outcome
from deliverylab.engine.worker import Mode

# How a delivery can end: one of these must follow every 'received' row of that delivery.
SETTLED = {"acked", "ack_failed", "ack_rejected", "crashed", "lost", "nacked", "dead_lettered"}
FAULTY = dict(ack_fail=0.3, crash_after_receive=0.1, crash_after_commit=0.1, process_error=0.1,
              lose_message=0.05)


def faulty_run(mode, max_messages=1, orders=120):
    lab = make_lab(seed=12)
    for i in range(orders):
        lab.order(f"item-{i % 5}", 1 + i % 3)
        lab.clock.advance(0.05)
    faults = Faults(seed=3, **FAULTY)
    ws = [lab.worker(mode=mode, faults=faults, max_messages=max_messages, name=f"w{k}")
          for k in range(2)]
    lab.drain(*ws)
    return lab


@pytest.mark.parametrize("max_messages", [1, 8])
@pytest.mark.parametrize("mode", [m.value for m in Mode])
def test_every_received_delivery_has_an_outcome(mode, max_messages):
    lab = faulty_run(mode, max_messages)
    by_delivery = defaultdict(list)
    for message_id, n, outcome in lab.store.execute(
            "SELECT message_id, delivery_count, outcome FROM delivery_log ORDER BY seq"):
        by_delivery[(message_id, n)].append(outcome)
    received = [k for k, v in by_delivery.items() if "received" in v]
    assert received
    unsettled = {k: v for k, v in by_delivery.items() if "received" in v and not SETTLED & set(v)}
    assert unsettled == {}
    for outcomes in by_delivery.values():
        if "received" in outcomes:
            assert outcomes[0] == "received"  # nothing happens to a delivery before it exists


@pytest.mark.parametrize("mode", [m.value for m in Mode])
def test_the_correlation_id_is_the_order_id_on_every_row(mode):
    lab = faulty_run(mode)
    repair(lab.store, clock=lab.clock)
    lab.broker.redrive()
    lab.drain(lab.worker(mode=mode))
    mismatched = lab.store.execute(
        "SELECT count(*) FROM delivery_log AS l JOIN orders AS o USING (event_id)"
        " WHERE l.correlation_id IS NOT o.order_id").fetchone()[0]
    orphans = lab.store.execute(
        "SELECT count(*) FROM delivery_log WHERE event_id NOT IN (SELECT event_id FROM orders)"
    ).fetchone()[0]
    assert (mismatched, orphans) == (0, 0)


def test_every_outcome_can_be_seen():
    """One scenario that exercises every outcome the trace knows."""
    run = faulty_run("idempotent", max_messages=4)
    repair(run.store, clock=run.clock)
    run.broker.redrive()
    run.drain(run.worker())
    run.order("tea", 1)
    (d,) = run.broker.receive(2.0)
    run.broker.extend(d, 5)
    run.clock.advance(6)
    (d2,) = run.broker.receive(2.0)
    run.broker.ack(d)
    run.broker.ack(d2)
    seen = {r[0] for r in run.store.execute("SELECT DISTINCT outcome FROM delivery_log")}
    assert seen == {o.value for o in Outcome}


def test_log_rows_are_stamped_by_the_clock_in_order(lab):
    lab.order("coffee-beans", 1, order_id="o-001")
    w = lab.worker(faults=Faults(seed=2, ack_fail=0.5), max_receives=20)
    lab.clock.advance(1.25)
    lab.drain(w)
    frame = log_frame(lab.store)
    assert list(frame.columns) == COLUMNS
    assert frame.seq.is_monotonic_increasing and frame["at"].is_monotonic_increasing
    assert frame["at"].iloc[0] == 1.25
    assert set(frame.worker) == {"worker-1"}


def test_timeline_tells_one_orders_story_in_order(lab):
    a = lab.order("coffee-beans", 1, order_id="o-001")
    lab.order("tea", 2, order_id="o-002")
    event = a.event_id
    seed = next(s for s in range(10_000)
                if Faults(seed=s, ack_fail=0.5).fires("ack_fail", event, 1)
                and not Faults(seed=s, ack_fail=0.5).fires("ack_fail", event, 2))
    lab.drain(lab.worker(faults=Faults(seed=seed, ack_fail=0.5)))
    story = timeline(lab.store, "o-001")
    assert list(story.columns) == ["at", "worker", "delivery_count", "outcome", "detail",
                                   "message_id"]
    assert list(zip(story.delivery_count, story.outcome, strict=True)) == [
        (1, "received"), (1, "applied"), (1, "ack_failed"),
        (2, "received"), (2, "duplicate_skipped"), (2, "acked")]
    assert story["at"].is_monotonic_increasing
    assert story["at"].iloc[3] == story["at"].iloc[0] + 2.0  # after the lease ran out
    assert (log_frame(lab.store, event_id=event).outcome == story.outcome).all()
    assert set(log_frame(lab.store, correlation_id="o-002").correlation_id) == {"o-002"}


def test_delivery_counts_per_event(lab):
    lab.order("coffee-beans", 1, order_id="o-001")
    lab.order("tea", 1, order_id="o-002")
    lab.drain(lab.worker(faults=Faults(seed=5, ack_fail=0.6), max_receives=30))
    counts = delivery_counts(lab.store)
    assert list(counts.columns) == ["event_id", "deliveries"]
    expected = dict(lab.store.execute(
        "SELECT event_id, count(*) FROM delivery_log WHERE outcome = 'received'"
        " GROUP BY event_id"))
    assert dict(zip(counts.event_id, counts.deliveries, strict=True)) == expected
    assert set(expected) == {r[0] for r in lab.store.execute("SELECT event_id FROM orders")}


def test_an_empty_log_gives_empty_frames(lab):
    assert log_frame(lab.store).empty and list(log_frame(lab.store).columns) == COLUMNS
    assert timeline(lab.store, "o-nope").empty
    assert delivery_counts(lab.store).empty
