"""The worker over a broker and a store: the same run on every broker.

The lab's broker is the queue table on the store's own connection. Any other broker (each
engine of ``make_broker`` in ``tests/conftest.py``, in a database of its own) must give the
same run: the same fault schedule for the same seed, the same trace in the store, the same
checker verdict and the same repair. Only ``transactional`` differs: it needs the ACK and the
effect in one transaction, so it is refused where the broker is not the store. An engine
whose lease is a connection (``capabilities.lease_is_connection``: RabbitMQ) gives a message
back at once after a lost ACK or a crash, so its run interleaves differently: there every
event's story is compared, and in batches the mode's guarantee.
"""

from __future__ import annotations

import sqlite3

import pytest
from support.brokers import BROKER_ENGINES, capabilities_of

from deliverylab.brokers.base import Broker
from deliverylab.brokers.sqlite import SQLiteBroker
from deliverylab.engine import store
from deliverylab.engine.check import check
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.reconcile import diff, repair
from deliverylab.engine.relay import Relay
from deliverylab.engine.worker import Worker

FAULTS = {"ack_fail": 0.3, "crash_after_receive": 0.02, "crash_after_commit": 0.02,
          "process_error": 0.2, "lose_message": 0.05}
# An engine whose lease is a connection (RabbitMQ: the channel) gives a message back at once
# after a lost ACK or a crash (``Broker.abandon``), not when a lease timer runs out, so the run
# interleaves differently from the lab's. Faults are drawn per event and delivery, so with one
# message per receive every event lives the same story; in batches a crash takes another batch
# with it, and only the mode's guarantee is compared.


def stories(trace: list[tuple]) -> dict[str, list[tuple[int, str]]]:
    """Each event's (delivery count, outcome) rows, in order: its story, whatever the timing."""
    out: dict[str, list[tuple[int, str]]] = {}
    for row in trace:
        out.setdefault(row[3], []).append((row[5], row[6]))
    return out
TRACE = ("SELECT at, worker, correlation_id, event_id, message_id, delivery_count, outcome,"
         " detail FROM delivery_log ORDER BY seq")


def run(conn: sqlite3.Connection, broker: Broker, *, mode: str, max_messages: int,
        seed: int, orders: int = 40) -> Worker:
    # Apart from the store, an order's event goes to the store's outbox and the relay
    # publishes it: relayed at once, so ids are drawn in the same order as when joined.
    relay = None if broker.joins(conn) else Relay(conn, broker, clock=broker.clock)
    for i in range(orders):
        place_order(broker, item_id=f"item-{i % 3}", qty=1 + i % 2, store=conn)
        if relay is not None:
            relay.run_until_idle()
    worker = Worker(store=conn, broker=broker, clock=broker.clock, mode=mode,
                    faults=Faults(seed=seed, **FAULTS), max_messages=max_messages,
                    name="w-1", visibility_timeout=2.0)
    worker.run_until_idle()
    return worker


# A run replayed row for row needs leases that expire when the FakeClock says so. Engines whose
# server times the leases (``capabilities.lease_clock == "server"``) run on the wall clock:
# their worker runs are in their own tests (tests/brokers/test_jetstream.py).
@pytest.mark.parametrize("make_broker", [e for e in BROKER_ENGINES
                                         if capabilities_of(e).lease_clock == "injected"],
                         indirect=True)
@pytest.mark.parametrize("mode", ["at-most-once", "at-least-once", "idempotent"])
@pytest.mark.parametrize("max_messages", [1, 10])
@pytest.mark.parametrize("seed", [3, 11])
def test_a_broker_apart_from_the_store_gives_the_same_run(make_broker, mode, max_messages,
                                                         seed):
    one_db = store.init_db()
    clock = FakeClock()
    joined = SQLiteBroker(one_db, clock=clock, ids=Ids(seed), max_receives=3)
    a = run(one_db, joined, mode=mode, max_messages=max_messages, seed=seed)

    apart_store = store.init_db()
    apart = make_broker(seed=seed, max_receives=3)
    assert not apart.joins(apart_store)
    b = run(apart_store, apart, mode=mode, max_messages=max_messages, seed=seed)

    assert b.stats.crashed + b.stats.ack_failed + b.stats.lost > 0  # the faults did fire
    trace_a = [tuple(r) for r in one_db.execute(TRACE)]
    trace_b = [tuple(r) for r in apart_store.execute(TRACE)]
    assert {"received", "acked"} <= {r[6] for r in trace_a}
    verdict = check(one_db)
    gives_back_at_once = apart.capabilities.lease_is_connection
    if gives_back_at_once:
        got = check(apart_store, apart)
        if max_messages == 1:  # the same story for every event; only the steps differ
            assert stories(trace_a) == stories(trace_b)
            assert a.stats.as_dict() | {"steps": 0} == b.stats.as_dict() | {"steps": 0}
            assert got == verdict
        else:  # lost: only what the broker was told to lose (maybe a message already applied)
            assert got.lost <= b.stats.lost and got.pending == 0
            if mode == "idempotent":
                assert got.duplicated == 0
    else:
        # The same fault schedule, hence the same run, row for row: the worker wrote the
        # trace rows of the broker's verbs into the store itself.
        assert a.stats == b.stats
        assert trace_a == trace_b
        assert check(apart_store, apart) == verdict
        assert diff(apart_store, apart).unapplied.equals(diff(one_db).unapplied)

    # The repair works on the store alone, whatever the broker.
    repair(one_db, clock=clock)
    repair(apart_store, clock=apart.clock)
    if not gives_back_at_once or max_messages == 1:
        assert check(apart_store, apart) == check(one_db)  # the same history, repaired
    assert check(apart_store, apart).projection_equals_truth
    one_db.close()
    apart_store.close()


def test_the_worker_writes_the_broker_verbs_into_the_store(make_broker):
    conn = store.init_db()
    broker = make_broker()
    placed = place_order(broker, item_id="tea", qty=2, store=conn)
    Relay(conn, broker, clock=broker.clock).run_until_idle()
    Worker(store=conn, broker=broker, clock=broker.clock).run_until_idle()
    rows = conn.execute("SELECT outcome, event_id FROM delivery_log ORDER BY seq").fetchall()
    assert [tuple(r) for r in rows] == [("received", placed.event_id),
                                        ("applied", placed.event_id),
                                        ("acked", placed.event_id)]
    assert check(conn, broker).verdict.startswith("OK: all 1 orders")
    conn.close()


def test_transactional_is_refused_where_the_broker_is_not_the_store(make_broker):
    conn = store.init_db()
    broker = make_broker()
    with pytest.raises(InvalidInput, match="another system") as refused:
        Worker(store=conn, broker=broker, clock=broker.clock, mode="transactional")
    assert refused.value.field == "mode"
    assert "cannot commit in the effect's transaction" in str(refused.value)
    # The other modes run on it.
    for mode in ("at-most-once", "at-least-once", "idempotent"):
        Worker(store=conn, broker=broker, clock=broker.clock, mode=mode)
    conn.close()


def test_a_second_connection_to_the_same_file_is_another_system(tmp_path):
    """One transaction cannot span two connections, even to one file: refused too."""
    path = tmp_path / "app.db"
    conn, other = store.init_db(path), store.connect(path)
    clock = FakeClock()
    elsewhere = SQLiteBroker(other, clock=clock, ids=Ids(1))
    with pytest.raises(InvalidInput, match="transactional"):
        Worker(store=conn, broker=elsewhere, clock=clock, mode="transactional")
    own = SQLiteBroker(conn, clock=clock, ids=Ids(1))
    assert Worker(store=conn, broker=own, clock=clock, mode="transactional").mode == \
        "transactional"
    assert Worker(store=conn, clock=clock, broker=own, mode="transactional").broker.joins(conn)
    conn.close()
    other.close()


def test_old_or_missing_arguments_are_named():
    conn, other = store.init_db(), store.init_db()
    clock = FakeClock()
    own = SQLiteBroker(conn, clock=clock, ids=Ids(1))
    # One name for each role: store= and broker=. The older names, the unused ids and the
    # broker's own max_receives are refused, each named with its value.
    for old, value in (("conn", other), ("queue", own), ("ids", Ids(1)), ("max_receives", 9)):
        with pytest.raises(InvalidInput, match=f"^{old} must be a keyword Worker takes") \
                as refused:
            Worker(store=conn, broker=own, clock=clock, **{old: value})
        assert (refused.value.field, refused.value.value) == (old, value)
    with pytest.raises(TypeError):  # the store is named, never positional
        Worker(conn, broker=own, clock=clock)  # type: ignore[misc]
    with pytest.raises(InvalidInput, match="the engine opens none") as refused:
        Worker(store=conn, clock=clock)  # no broker: the engine builds none
    assert refused.value.field == "broker"
    with pytest.raises(InvalidInput) as refused:
        Worker(store=conn, broker="a queue", clock=clock)
    assert refused.value.field == "broker"
    with pytest.raises(InvalidInput) as refused:
        Worker(store="app.db", broker=own, clock=clock)
    assert refused.value.field == "store"
    conn.close()
    other.close()
