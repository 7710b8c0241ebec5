"""Real ``deliverylab worker`` processes on one PostgreSQL schema: SIGKILLs at random moments
(between any two statements), lost ACKs, crashes that end the process between the effect's
commit and the ACK, and repairs racing the workers. Every wait is bounded.

Idempotent and transactional lose nothing and apply nothing twice; at-least-once applies a
lost ACK's event twice and at-most-once loses a crash after the ACK, as on SQLite.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.pg import schema
from support.processes import Proc, no_failures, started

from deliverylab.brokers.postgres import PostgresBroker
from deliverylab.engine import store as db
from deliverylab.engine import store_postgres as pgstore
from deliverylab.engine.check import check
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.reconcile import repair

CRASH_EXIT = 70
ITEMS = ["coffee-beans", "tea", "milk", "oat-milk"]


class PgProcessRig:
    """One PostgreSQL schema and the worker processes running on it."""

    def __init__(self, url: str, tmp: Path, seed: int) -> None:
        self.url, self.tmp, self.rng = url, tmp, random.Random(seed)
        self.store = pgstore.connect(url)
        self.broker = PostgresBroker(self.store, clock=SystemClock(), ids=Ids(seed))
        self.procs: list[Proc] = []
        self.placed = 0

    def place(self, n: int) -> None:
        with db.transaction(self.store):
            for _ in range(n):
                place_order(self.broker, item_id=self.rng.choice(ITEMS),
                            qty=self.rng.randint(1, 4))
        self.placed += n

    def worker(self, name: str, *extra: str) -> Proc:
        proc = Proc(self.tmp / f"{name}-{len(self.procs)}.log", "worker", "--db", self.url,
                    "--name", name, "--poll-interval", "0.02", *extra)
        self.procs.append(proc)
        return proc

    def queued(self) -> int:
        return self.store.execute("SELECT count(*) FROM queue_messages").fetchone()[0]

    def projection(self) -> dict[str, int]:
        return dict(self.store.execute("SELECT item_id, reserved_qty FROM inventory_projection"))

    def truth(self) -> dict[str, int]:
        return dict(self.store.execute("SELECT item_id, sum(qty) FROM orders GROUP BY item_id"))

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        self.store.close()


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator:
    labs: list[PgProcessRig] = []
    with schema() as url:
        def make(seed: int) -> PgProcessRig:
            labs.append(PgProcessRig(url, tmp_path, seed))
            return labs[-1]
        try:
            yield make
        finally:
            for lab in labs:
                lab.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["idempotent", "transactional", "at-least-once"])
def test_sigkilled_worker_processes_on_postgres(make_lab, mode):
    lab = make_lab(11)
    lab.place(120)

    def start(k: int) -> Proc:
        return lab.worker(f"w{k}", "--mode", mode, "--seed", str(40 + k),
                          "--ack-fail-rate", "0.2", "--visibility-timeout", "0.3",
                          "--work-time", "0.004", "--max-messages", str(1 + 2 * (k % 2)),
                          "--max-receives", "1000")

    workers = [start(k) for k in range(3)]
    kills = 0
    while kills < 12:
        time.sleep(lab.rng.uniform(0.05, 0.2))
        lab.place(max(5, 120 - lab.queued()))  # the backlog stays: every kill lands mid-work
        k = lab.rng.randrange(len(workers))
        started(workers[k])
        assert workers[k].alive(), workers[k].output()[-3000:]
        workers[k].p.send_signal(signal.SIGKILL)
        assert workers[k].p.wait(timeout=30) == -signal.SIGKILL
        kills += 1
        workers[k] = start(k)
    deadline = time.monotonic() + 120
    while lab.queued() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab.queued() == 0, "the queue did not drain in 120 s"
    for w in workers:
        started(w)  # a worker started again just now handles SIGTERM once it says so
        assert w.terminate() == 0, w.output()[-3000:]
    no_failures(*lab.procs)

    result = check(lab.store)
    assert result.orders == lab.placed
    assert (result.pending, result.lost, result.dead_lettered) == (0, 0, 0), result.verdict
    if mode == "at-least-once":  # lost ACKs were redelivered and applied again
        assert result.duplicated > 0
        assert all(lab.projection()[i] >= q for i, q in lab.truth().items())
    else:
        assert result.ok and result.duplicated == 0, result.verdict
        assert lab.projection() == lab.truth()


TEAMS = [("idempotent",), ("transactional",), ("idempotent", "transactional"),
         ("at-least-once",), ("at-most-once",)]


@pytest.mark.slow
@pytest.mark.parametrize("modes", TEAMS, ids="+".join)
def test_repairs_racing_worker_processes_on_postgres(make_lab, modes):
    """Workers that crash between the effect's commit and the ACK (exit 70, restarted as a
    supervisor would), lose ACKs, and race repairs: after the last repair the projection
    equals the truth in every mode; the fence keeps a late delivery from counting again."""
    lab = make_lab(7)
    modes = modes * (3 - len(modes))  # at least two processes on the queue

    def start(i: int) -> Proc:
        return lab.worker(f"w{i}-{modes[i]}", "--mode", modes[i], "--seed", str(100 + i),
                          "--ack-fail-rate", "0.3", "--crash-after-receive-rate", "0.05",
                          "--crash-after-commit-rate", "0.1", "--crash-exits",
                          "--visibility-timeout", "0.3", "--max-receives", "1000",
                          "--max-messages", str(1 + 2 * (i % 2)), "--work-time", "0.002")

    def supervise() -> int:
        restarted = 0
        for i, w in enumerate(workers):
            if not w.alive():
                assert w.p.returncode == CRASH_EXIT, w.output()[-3000:]
                workers[i] = start(i)
                restarted += 1
        return restarted

    lab.place(60)
    workers = [start(i) for i in range(len(modes))]
    crashes = repairs = in_queue_at_last = 0
    for left in range(3, 0, -1):
        deadline = time.monotonic() + lab.rng.uniform(0.3, 1.0)
        while time.monotonic() < deadline:
            crashes += supervise()
            time.sleep(0.02)
        lab.place(lab.rng.randint(5, 15))
        if left == 1:
            in_queue_at_last = lab.queued()
        repair(lab.store, clock=SystemClock())
        repairs += 1
    deadline = time.monotonic() + 120
    while lab.queued() and time.monotonic() < deadline:
        crashes += supervise()
        time.sleep(0.05)
    assert lab.queued() == 0, "the queue did not drain in 120 s"
    for w in workers:
        if w.alive():
            w.terminate()
    no_failures(*lab.procs)

    result = check(lab.store)
    assert crashes > 0 and repairs == 3 and in_queue_at_last > 0
    assert lab.projection() == lab.truth(), result.verdict
    assert result.ok, result.verdict
