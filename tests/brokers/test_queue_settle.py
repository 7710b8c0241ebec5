"""Two settling defects, pinned: the delivery count a dead letter records on each path, and
``ack_many`` with a stale and a current delivery of the same message."""

from __future__ import annotations

import itertools

import pytest

from deliverylab.app.status import collect
from deliverylab.brokers.sqlite import Queue

VT = 2.0


def deliver_until_parked(lab, q: Queue, path: str) -> int:
    """Deliver one message until the queue parks it; return how many deliveries happened."""
    lab.broker.send("evt-0", "OrderPlaced", {"itemId": "tea", "qty": 1}, correlation_id="o-0")
    delivered = 0
    while True:
        got = q.receive(VT)
        if not got:
            return delivered
        (d,) = got
        delivered += 1
        if path == "nack":  # the handler fails: the worker gives it back, then dead-letters
            if d.delivery_count >= q.max_receives:
                assert q.dead_letter(d, "boom")
                return delivered
            assert q.nack(d, 0, error="boom")
        else:  # the worker dies holding it: the lease runs out, the next receive counts it
            lab.clock.advance(VT)


@pytest.mark.parametrize("path", ["nack", "lease_expiry"])
def test_a_dead_letter_records_the_deliveries_that_happened(any_lab, path):
    lab = any_lab
    q = Queue(lab.store, clock=lab.clock, ids=lab.ids, max_receives=3)
    delivered = deliver_until_parked(lab, q, path)
    assert delivered == 3
    dead = lab.store.execute("SELECT delivery_count, last_error FROM dead_letters").fetchone()
    assert dead["delivery_count"] == delivered
    log = lab.store.execute("SELECT outcome, delivery_count FROM delivery_log ORDER BY seq"
                           ).fetchall()
    assert [r[0] for r in log].count("received") == delivered
    assert tuple(log[-1]) == ("dead_lettered", delivered)
    if path == "lease_expiry":
        assert dead["last_error"].startswith(f"received {delivered} times (max_receives=3)")
        assert [(d.delivery_count, reason) for d, reason in q.parked] == [
            (delivered, dead["last_error"])]
    (shown,) = collect(lab.store, now=lab.clock.now())["deadLetters"]
    assert shown["receives"] == delivered


def test_ack_many_acks_only_the_current_receipt(any_lab):
    """Whatever the order, ``ack_many`` answers as ``ack`` one by one would: the stale
    delivery is rejected, the current one acks, and the log says so."""
    lab = any_lab
    lab.broker.send("evt-0", "OrderPlaced", {"i": 0}, correlation_id="o-0")
    (stale,) = lab.broker.receive(VT)
    lab.clock.advance(VT)
    (current,) = lab.broker.receive(VT)
    assert stale.seq == current.seq and stale.receipt != current.receipt
    for batch in itertools.permutations([stale, current]):
        lab.store.execute("SAVEPOINT try")
        expected = [d is current for d in batch]
        first = lab.store.execute("SELECT max(seq) FROM delivery_log").fetchone()[0]
        assert lab.broker.ack_many(list(batch)) == expected
        logged = {r["delivery_count"]: r["outcome"] for r in lab.store.execute(
            "SELECT delivery_count, outcome FROM delivery_log WHERE seq > ?", (first,))}
        assert logged == {stale.delivery_count: "ack_rejected",
                          current.delivery_count: "acked"}
        assert lab.broker.depth()["in_flight"] == 0
        lab.store.execute("ROLLBACK TO try")
        lab.store.execute("RELEASE try")
