"""Several threads and several processes on one database file: no message is claimed twice,
no event is applied twice, the projection equals the truth, and nobody sees "database is
locked"."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections import Counter

import pytest
from support.engine import make_lab
from support.processes import env
from support.worker_script import command

from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.check import check
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.worker import Worker

ITEMS = [f"item-{i}" for i in range(10)]


def fill(lab, n):
    with store.transaction(lab.store):  # one commit for the whole setup
        for i in range(n):
            lab.order(ITEMS[i % len(ITEMS)], 1 + i % 5)


def run_all(cmds, timeout=240):
    procs = [subprocess.Popen(c, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in cmds]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def assert_clean_exit(results):
    for code, _, stderr in results:
        assert code == 0, stderr
        assert "Traceback" not in stderr and "database is locked" not in stderr, stderr


def assert_each_delivery_received_once(conn):
    """A delivery is (message, count): if two workers had claimed the same one, its
    'received' row would appear twice."""
    dup = conn.execute(
        "SELECT message_id, delivery_count, count(*) FROM delivery_log"
        " WHERE outcome = 'received' GROUP BY 1, 2 HAVING count(*) > 1").fetchall()
    assert dup == []


# -- threads -------------------------------------------------------------------------------------

def test_threads_with_their_own_connections_never_claim_the_same_message(file_lab):
    lab = file_lab
    fill(lab, 1200)
    claimed: dict[int, list[str]] = {}
    errors: list[Exception] = []

    start = threading.Barrier(4)

    def claimer(k: int) -> None:
        try:
            q = Queue(store.connect(lab.path), clock=SystemClock(), ids=Ids(k))  # same-ish seeds
            rng = random.Random(k)
            got = claimed.setdefault(k, [])
            start.wait(30)  # all connected before anyone claims, so they really compete
            while batch := q.receive(3600, rng.randint(1, 5), worker=f"t{k}"):
                got.extend(d.message_id for d in batch)
                time.sleep(0)  # let the other threads in between claims
        except Exception as exc:  # reported below, in the test's own thread
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    every = [m for got in claimed.values() for m in got]
    assert len(every) == len(set(every)) == 1200
    assert sum(1 for got in claimed.values() if got) >= 2  # they really did compete
    assert_each_delivery_received_once(lab.store)


def test_worker_threads_upserting_the_same_items_reach_the_truth(file_lab):
    """at-least-once without faults: every effect once, on few hot items, from 3 threads."""
    lab = file_lab
    fill(lab, 900)
    stats = []

    def run(k: int) -> None:
        conn = store.connect(lab.path)
        w = Worker(store=conn, clock=SystemClock(), mode="at-least-once",
                   broker=Queue(conn, clock=SystemClock(), ids=Ids()),
                   visibility_timeout=60, name=f"t{k}")
        while w.step():
            pass
        stats.append(w.stats)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(s.applied for s in stats) == 900
    assert lab.projection() == lab.truth()
    assert check(lab.store).ok


# -- processes -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_processes_never_claim_the_same_message(tmp_path):
    lab = make_lab(tmp_path / "lab.db")
    fill(lab, 1500)
    barrier = tmp_path / "barrier"  # every process imported and connected before any claims
    barrier.mkdir()
    results = run_all([command("claim", lab.path, "--name", f"p{k}", "--max-messages", 1 + k,
                               "--barrier", barrier, "--parties", 3, "--pause", 0.001)
                      for k in range(3)])
    assert_clean_exit(results)
    got = [json.loads(stdout) for _, stdout, _ in results]
    every = [m for g in got for m in g]
    assert len(every) == len(set(every)) == 1500
    assert sum(1 for g in got if g) >= 2
    assert_each_delivery_received_once(lab.store)


@pytest.mark.slow
def test_three_worker_processes_with_lost_acks_apply_every_event_once(tmp_path):
    lab = make_lab(tmp_path / "lab.db")
    fill(lab, 2000)
    results = run_all([command("work", lab.path, "--name", f"worker-{k}", "--mode", "idempotent",
                               "--ack-fail", 0.3, "--fault-seed", 7,
                               "--visibility-timeout", 0.3) for k in range(3)])
    assert_clean_exit(results)
    stats = [json.loads(stdout.splitlines()[-1]) for _, stdout, _ in results]
    total = Counter()
    for s in stats:
        total.update(s)
    assert all(s["received"] > 0 for s in stats)  # all three took part
    assert total["applied"] == 2000
    # About 30% of ACKs were lost, and every one of those came back as a duplicate.
    assert 0.2 < total["ack_failed"] / total["received"] < 0.4
    assert total["duplicates_skipped"] >= total["ack_failed"]
    result = check(lab.store)
    assert result.ok, result.verdict
    assert (result.duplicated, result.lost, result.pending) == (0, 0, 0)
    assert lab.projection() == lab.truth()
    assert_each_delivery_received_once(lab.store)
    assert store.table_counts(lab.store)["queue_messages"] == 0
