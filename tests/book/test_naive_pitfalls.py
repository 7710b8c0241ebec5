"""Spot the bug: every pitfall of the seed's design, FAILING on the naive variant and FIXED on
the engine — both asserted, so neither the lesson nor the fix can rot.

The naive variants live in ``deliverylab.book.naive`` (wrong on purpose). Chapter 3 shows the same
scenarios; the SELECT-then-UPDATE race runs here with two real processes on one SQLite file.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest

from deliverylab.book import naive
from deliverylab.book.lab import Lab
from deliverylab.book.toolkit import WhileWorking, catalogue_handler, place_order_with_crash
from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.check import check
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.errors import SimulatedCrash
from deliverylab.engine.ids import Ids
from deliverylab.engine.worker import Worker, apply_order_placed

FORK = multiprocessing.get_context("fork")


def file_lab(tmp_path: Path, name: str = "lab.db", seed: int = 1, **kw) -> tuple[Lab, Path]:
    path = tmp_path / name
    return Lab(path, seed=seed, **kw), path


# -- 1. the dual write --------------------------------------------------------------------------

def test_naive_dual_write_crash_loses_the_event_for_good(lab):
    with pytest.raises(SimulatedCrash, match="between_order_and_event"):
        naive.dual_write_place_order(lab.store, clock=lab.clock, ids=lab.ids,
                                     item_id="coffee-beans", qty=1, order_id="o-100",
                                     crash_between=True)
    counts = store.table_counts(lab.store)
    assert (counts["orders"], counts["queue_messages"]) == (1, 0)  # an order with no event
    # The client retries the same order: the primary key refuses it, the event is never written.
    with pytest.raises(sqlite3.IntegrityError, match="orders.order_id"):
        naive.dual_write_place_order(lab.store, clock=lab.clock, ids=lab.ids,
                                     item_id="coffee-beans", qty=1, order_id="o-100")
    lab.worker().run_until_idle()
    result = check(lab.store)
    assert (result.orders, result.lost) == (1, 1) and not result.projection_equals_truth


def test_naive_dual_write_without_a_crash_works_so_the_bug_hides(lab):
    naive.dual_write_place_order(lab.store, clock=lab.clock, ids=lab.ids, item_id="tea", qty=2)
    lab.worker().run_until_idle()
    assert check(lab.store).ok


def test_engine_outbox_crash_writes_nothing_and_the_retry_succeeds(lab):
    with pytest.raises(SimulatedCrash, match="between_order_and_event"):
        place_order_with_crash(lab.broker, item_id="coffee-beans", qty=1, order_id="o-100")
    counts = store.table_counts(lab.store)
    assert (counts["orders"], counts["queue_messages"]) == (0, 0)  # both or neither
    placed = lab.order("coffee-beans", 1, order_id="o-100")
    assert placed.created
    lab.worker().run_until_idle()
    assert check(lab.store).ok and lab.projection() == {"coffee-beans": 1}


# -- 2. SELECT, then UPDATE ---------------------------------------------------------------------

def test_naive_select_then_update_two_connections_lease_the_same_message(tmp_path):
    lab, path = file_lab(tmp_path)
    lab.place_order("coffee-beans", 1, order_id="o-200")
    a, b = store.connect(path), store.connect(path)
    found_a, found_b = naive.select_visible(a, 0.0), naive.select_visible(b, 0.0)
    got_a = naive.lease(a, found_a, now=0.0, visibility_timeout=2.0, worker="worker-a")
    got_b = naive.lease(b, found_b, now=0.0, visibility_timeout=2.0, worker="worker-b")
    assert got_a.message_id == got_b.message_id
    assert lab.queue_table().delivery_count.tolist() == [2]  # two claims, one message


def test_engine_claim_two_connections_never_share(tmp_path):
    lab, path = file_lab(tmp_path)
    lab.place_order("coffee-beans", 1, order_id="o-200")
    qa = Queue(store.connect(path), clock=lab.clock, ids=Ids(1))
    qb = Queue(store.connect(path), clock=lab.clock, ids=Ids(2))
    assert len(qa.receive(2.0, worker="worker-a")) == 1
    assert qb.receive(2.0, worker="worker-b") == []


ROUNDS = 40


def _claim_in_lockstep(path: str, kind: str, barrier, out) -> None:
    """Each round: both processes find a message at the same moment, then both claim it."""
    conn = store.connect(path)
    queue = Queue(conn, clock=SystemClock(), ids=Ids())
    got = []
    for _ in range(ROUNDS):
        barrier.wait()
        if kind == "naive":
            found = naive.select_visible(conn, time.time())
            barrier.wait()  # the other process's SELECT has run too
            if found is not None:
                naive.lease(conn, found, now=time.time(), visibility_timeout=3600)
                got.append(found.message_id)
        else:
            barrier.wait()
            got.extend(d.message_id for d in queue.receive(3600))
    out.put(got)


def _claim_free_running(path: str, kind: str, pause: float, out) -> None:
    """Claim until nothing is left, with ``pause`` seconds between the naive SELECT and UPDATE
    (the seed's worker made a round trip to the database between them)."""
    conn = store.connect(path)
    queue = Queue(conn, clock=SystemClock(), ids=Ids())
    got = []
    while True:
        if kind == "naive":
            found = naive.select_visible(conn, time.time())
            if found is None:
                break
            time.sleep(pause)
            naive.lease(conn, found, now=time.time(), visibility_timeout=3600)
            got.append(found.message_id)
        else:
            batch = queue.receive(3600)
            if not batch:
                break
            time.sleep(pause)
            got.extend(d.message_id for d in batch)
    out.put(got)


def _two_processes(target, path: Path, *args) -> tuple[list[str], list[str]]:
    """Run ``target`` in two forked processes on the file; no connection crosses the fork."""
    out = FORK.Queue()
    procs = [FORK.Process(target=target, args=(str(path), *args, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results[0], results[1]


def _message_ids(path: Path) -> set[str]:
    conn = store.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT message_id FROM queue_messages")}
    finally:
        conn.close()


def queued(tmp_path: Path, n: int) -> tuple[Path, set[str]]:
    """A database file with ``n`` queued orders, and no connection left open on it."""
    lab, path = file_lab(tmp_path)
    lab.place_orders(n)
    lab.store.close()
    return path, _message_ids(path)


def test_naive_lease_race_two_processes_in_lockstep_claim_every_message_twice(tmp_path):
    path, ids = queued(tmp_path, ROUNDS)
    a, b = _two_processes(_claim_in_lockstep, path, "naive", FORK.Barrier(2, timeout=60))
    assert len(a) == len(b) == ROUNDS
    assert set(a) == set(b) == ids  # every message was leased by both processes


def test_engine_claim_two_processes_in_lockstep_never_share(tmp_path):
    path, ids = queued(tmp_path, ROUNDS)
    a, b = _two_processes(_claim_in_lockstep, path, "engine", FORK.Barrier(2, timeout=60))
    assert not set(a) & set(b)
    assert len(a) + len(b) == ROUNDS and set(a) | set(b) == ids


def test_naive_lease_race_two_free_running_processes_duplicate_claims(tmp_path):
    path, ids = queued(tmp_path, 200)
    a, b = _two_processes(_claim_free_running, path, "naive", 0.001)
    assert set(a) | set(b) == ids
    assert len(set(a) & set(b)) > 0  # measured: most of the 200 are claimed twice


def test_engine_claim_two_free_running_processes_never_share(tmp_path):
    path, ids = queued(tmp_path, 200)
    a, b = _two_processes(_claim_free_running, path, "engine", 0.001)
    assert not set(a) & set(b) and len(a) + len(b) == 200 and set(a) | set(b) == ids


# -- 3. ACK by message id -----------------------------------------------------------------------

def stale_and_current(lab: Lab):
    """worker-1 receives and stalls past its lease; worker-2 receives the redelivery."""
    lab.place_order("coffee-beans", 1, order_id="o-300")
    stale = lab.broker.receive(2.0, worker="worker-1")[0]
    lab.clock.advance(2.5)
    current = lab.broker.receive(2.0, worker="worker-2")[0]
    lab.clock.advance(0.5)
    assert (stale.delivery_count, current.delivery_count) == (1, 2)
    return stale, current


def test_naive_ack_by_id_lets_a_stale_worker_delete_the_message_another_holds():
    lab = Lab(seed=2)
    stale, current = stale_and_current(lab)
    assert naive.ack_by_id(lab.store, stale.message_id)  # "yes" to a worker that is late
    assert lab.queue_table().empty                     # gone, though worker-2's lease runs
    assert lab.clock.now() < current.lease_until
    assert not lab.broker.extend(current, 2.0, worker="worker-2")  # the holder is robbed
    assert not lab.broker.ack(current, worker="worker-2")
    log = lab.log()
    assert log[log.worker == "worker-1"].outcome.tolist() == ["received"]  # nobody learns
    # that worker-1 was late, so nobody learns that the visibility timeout is too short


def test_engine_ack_needs_the_current_receipt():
    lab = Lab(seed=2)
    stale, current = stale_and_current(lab)
    assert not lab.broker.ack(stale, worker="worker-1")
    assert lab.queue_table().receipt.tolist() == [current.receipt]
    assert lab.broker.extend(current, 2.0, worker="worker-2")
    assert lab.broker.ack(current, worker="worker-2")
    log = lab.log()
    rejected = log[log.outcome == "ack_rejected"]
    assert rejected[["worker", "delivery_count"]].values.tolist() == [["worker-1", 1]]


# -- 4. read, then write ------------------------------------------------------------------------

def two_orders_two_connections(tmp_path):
    lab, path = file_lab(tmp_path)
    lab.place_order("coffee-beans", 1, order_id="o-401")
    lab.place_order("coffee-beans", 2, order_id="o-402")
    a, b = store.connect(path), store.connect(path)
    qa, qb = (Queue(c, clock=lab.clock, ids=Ids(i)) for i, c in enumerate((a, b)))
    return lab, (a, qa.receive(2.0)[0]), (b, qb.receive(2.0)[0])


def test_naive_read_then_write_loses_an_update(tmp_path):
    lab, (a, da), (b, db_) = two_orders_two_connections(tmp_path)
    lab.store.execute("INSERT INTO inventory_projection VALUES ('coffee-beans', 0)")
    seen_a = naive.read_reserved(a, "coffee-beans")
    seen_b = naive.read_reserved(b, "coffee-beans")
    naive.write_reserved(a, "coffee-beans", seen_a, da.payload["qty"])
    naive.write_reserved(b, "coffee-beans", seen_b, db_.payload["qty"])
    assert lab.projection().projection.tolist() == [2]  # 1 + 2 reserved, 2 recorded
    assert lab.projection().truth.tolist() == [3]


def test_naive_read_then_write_races_on_the_first_insert_too(tmp_path):
    lab, (a, da), (b, db_) = two_orders_two_connections(tmp_path)
    seen_a = naive.read_reserved(a, "coffee-beans")
    seen_b = naive.read_reserved(b, "coffee-beans")
    assert seen_a is seen_b is None
    naive.write_reserved(a, "coffee-beans", seen_a, da.payload["qty"])
    with pytest.raises(sqlite3.IntegrityError, match="inventory_projection.item_id"):
        naive.write_reserved(b, "coffee-beans", seen_b, db_.payload["qty"])


def test_naive_read_then_write_in_deferred_transactions_sqlite_refuses_the_second_writer(
        tmp_path):
    # SQLite serialises writers: inside transactions the lost update becomes an error (the
    # second writer's snapshot is stale), an error the seed's catch-all then hides.
    lab, (a, da), (b, db_) = two_orders_two_connections(tmp_path)
    lab.store.execute("INSERT INTO inventory_projection VALUES ('coffee-beans', 0)")
    a.execute("BEGIN")
    b.execute("BEGIN")
    seen_a = naive.read_reserved(a, "coffee-beans")
    seen_b = naive.read_reserved(b, "coffee-beans")
    naive.write_reserved(a, "coffee-beans", seen_a, da.payload["qty"])
    a.execute("COMMIT")
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        naive.write_reserved(b, "coffee-beans", seen_b, db_.payload["qty"])
    b.execute("ROLLBACK")


def test_engine_upsert_adds_inside_the_database(tmp_path):
    lab, (a, da), (b, db_) = two_orders_two_connections(tmp_path)
    apply_order_placed(a, da)
    apply_order_placed(b, db_)
    assert lab.projection().projection.tolist() == [3] == lab.projection().truth.tolist()


# -- 5. the catch-all inbox insert --------------------------------------------------------------

def test_naive_catch_all_turns_a_locked_database_into_a_lost_event(tmp_path):
    lab, path = file_lab(tmp_path)
    lab.place_order("coffee-beans", 2, order_id="o-500")
    api = store.connect(path)
    seed = naive.SeedWorker(store.connect(path, busy_timeout=0), clock=lab.clock)
    m = seed.receive()
    api.execute("BEGIN IMMEDIATE")  # the API is writing an order at this very moment
    assert seed.process(m) is False  # "duplicate skipped": the error was "database is locked"
    api.execute("COMMIT")
    assert seed.ack(m)
    result = check(lab.store)
    assert (result.lost, result.correct) == (1, 0)
    assert store.table_counts(lab.store)["inbox_processed"] == 0  # never processed, yet acked


def test_engine_lets_the_locked_database_surface_and_applies_the_event_later(tmp_path):
    lab, path = file_lab(tmp_path)
    lab.place_order("coffee-beans", 2, order_id="o-500")
    api = store.connect(path)
    clock = WhileWorking(lab.clock, lambda: api.execute("BEGIN IMMEDIATE"))
    conn = store.connect(path, busy_timeout=0.05)
    worker = Worker(store=conn, clock=clock, broker=Queue(conn, clock=clock, ids=Ids(9)),
                    work_time=0.05)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        worker.step()  # received, then the API took the lock while the worker worked
    assert lab.queue_table().delivery_count.tolist() == [1]  # still there, leased, not acked
    api.execute("COMMIT")
    worker.run_until_idle()
    assert check(lab.store).ok and worker.stats.applied == 1


def full_disk(conn: sqlite3.Connection) -> None:
    """A TEMP trigger on this connection only: every inbox insert fails, standing in for a
    full disk (SQLite reports a trigger's RAISE as a constraint error)."""
    conn.execute("CREATE TEMP TRIGGER full_disk BEFORE INSERT ON main.inbox_processed"
                 " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")


def test_naive_catch_all_hides_a_failing_insert_as_a_duplicate(lab):
    lab.order("coffee-beans", 1)
    full_disk(lab.store)
    seed = naive.SeedWorker(lab.store, clock=lab.clock)
    seed.run(10)
    assert (seed.stats.duplicates_skipped, seed.stats.applied, seed.stats.acked) == (1, 0, 1)
    assert check(lab.store).lost == 1


def test_engine_surfaces_a_failing_insert_and_retries_after_the_fix(lab):
    lab.order("coffee-beans", 1)
    full_disk(lab.store)
    worker = lab.worker()
    with pytest.raises(sqlite3.IntegrityError, match="database or disk is full"):
        worker.step()
    assert worker.stats.duplicates_skipped == 0
    lab.store.execute("DROP TRIGGER temp.full_disk")  # space freed
    worker.run_until_idle()
    assert check(lab.store).ok and worker.stats.applied == 1


# -- 6. reconcile while events are in flight ----------------------------------------------------

def drifted() -> Lab:
    """20 orders: 12 applied, 3 lost, 5 still queued when the repair runs."""
    lab = Lab(seed=6)
    lab.place_orders(15)
    lab.lose_messages(3)
    lab.run_until_idle()
    lab.place_orders(5)
    return lab


def test_naive_rebuild_double_counts_the_events_in_flight():
    lab = drifted()
    naive.rebuild_projection(lab.store)
    assert lab.check().projection_equals_truth  # looks repaired ...
    in_flight = int(lab.orders().qty.tail(5).sum())
    lab.run_until_idle()  # ... until the five queued events arrive
    drift = lab.projection()
    assert int(drift.delta.sum()) == in_flight > 0
    assert not lab.check().projection_equals_truth


def test_engine_repair_fences_in_flight_events():
    lab = drifted()
    outcome = lab.reconcile()
    assert outcome.orders_recounted == 3 + 5 and outcome.events_fenced == outcome.orders == 20
    lab.run_until_idle()
    assert lab.check().ok and lab.stats().fenced == 5


# -- 7. no redelivery limit ---------------------------------------------------------------------

OLD_CATALOGUE = ("coffee-beans", "green-tea")  # the consumer was deployed before oat milk


def poisoned(lab: Lab) -> None:
    """Three orders the consumer knows and one it cannot process: a poison message."""
    for i, item in enumerate(("coffee-beans", "green-tea", "coffee-beans", "oat-milk")):
        lab.place_order(item, 1 + i, order_id=f"o-70{i}")


def test_naive_worker_redelivers_a_poison_message_forever():
    lab = Lab(seed=7)
    poisoned(lab)
    seed = naive.SeedWorker(lab.store, clock=lab.clock, handler=catalogue_handler(OLD_CATALOGUE))
    for steps in (50, 500):
        seed.run(steps)
        left = lab.queue_table()
        assert left.order_id.tolist() == ["o-703"]  # it never leaves ...
        assert left.delivery_count.tolist() == [seed.stats.failed]  # ... and keeps coming
    assert seed.stats.failed > 250 and seed.stats.applied == 3


def test_engine_dead_letters_after_max_receives_and_redrives_after_the_fix():
    lab = Lab(seed=7, max_receives=4, handler=catalogue_handler(OLD_CATALOGUE))
    poisoned(lab)
    result = lab.run_until_idle()
    assert lab.queue_table().empty and result.dead_lettered == 1
    parked = lab.dead_letters()
    assert parked[["order_id", "delivery_count"]].values.tolist() == [["o-703", 4]]
    assert parked.last_error.str.contains("UnknownItem: item 'oat-milk'").all()
    # The fix: deploy the handler with the new catalogue, then redrive.
    fixed = Worker(store=lab.store, clock=lab.clock, broker=lab.broker, name="worker-2",
                   handler=catalogue_handler((*OLD_CATALOGUE, "oat-milk")))
    assert lab.broker.redrive() == 1
    fixed.run_until_idle()
    assert fixed.stats.applied == 1 and lab.check().ok and lab.dead_letters().empty


# -- 8. visibility timeout shorter than the work ------------------------------------------------

def overlapping(mode: str, visibility_timeout: float, work_time: float = 3.0) -> Lab:
    """worker-2 polls while worker-1 is still working on the only message."""
    lab = Lab(seed=8, mode=mode)
    lab.place_order("coffee-beans", 1, order_id="o-800")
    kw = {"broker": lab.broker, "mode": mode,
          "visibility_timeout": visibility_timeout, "work_time": work_time}
    w2 = Worker(store=lab.store, clock=lab.clock, name="worker-2", **kw)
    w1 = Worker(store=lab.store, clock=WhileWorking(lab.clock, w2.step), name="worker-1", **kw)
    w1.step()
    return lab


def test_short_visibility_timeout_redelivers_while_the_first_worker_still_works():
    lab = overlapping("at-least-once", visibility_timeout=2.0)
    log = lab.log("o-800")
    received = log[log.outcome == "received"]
    assert received[["worker", "delivery_count", "at"]].values.tolist() == [
        ["worker-1", 1, 0.0], ["worker-2", 2, 3.0]]
    result = lab.check()
    assert result.duplicated == 1  # without an inbox, the overlap is a double effect
    assert "ack_rejected" in set(log.outcome)  # the engine's receipt at least tells worker-1


def test_the_inbox_absorbs_the_overlap_but_the_work_is_still_done_twice():
    lab = overlapping("idempotent", visibility_timeout=2.0)
    assert lab.check().ok
    assert sorted(lab.log("o-800").outcome) == sorted(
        ["received", "received", "applied", "acked", "duplicate_skipped", "ack_rejected"])


def test_a_timeout_sized_from_the_work_time_delivers_once():
    lab = overlapping("at-least-once", visibility_timeout=2 * 3.0)
    assert lab.check().ok
    assert lab.log("o-800").outcome.tolist() == ["received", "applied", "acked"]


def test_extending_the_lease_while_working_delivers_once():
    lab = Lab(seed=8)
    lab.place_order("coffee-beans", 1, order_id="o-800")
    d = lab.broker.receive(2.0, worker="worker-1")[0]
    for _ in range(3):  # a heartbeat every second of a three-second job
        lab.clock.advance(1.0)
        assert lab.broker.receive(2.0, worker="worker-2") == []
        assert lab.broker.extend(d, 2.0, worker="worker-1")
    assert lab.broker.ack(d, worker="worker-1")
    assert lab.log("o-800").outcome.tolist() == ["received"] + ["extended"] * 3 + ["acked"]
