"""Reconciliation against real ``deliverylab worker`` processes on one SQLite file.

First the command-line scenario that used to break: orders posted, two messages dropped,
``deliverylab reconcile``, then a worker of any mode drains the queue — the status must stay
OK. Then repairs fired at random moments while real workers of every mode (alone and mixed on
one queue) drain under lost ACKs and crashes that end the process (``--crash-exits``); the
crashed workers are restarted, as a supervisor would. Every wait is bounded.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import HOST, Proc, ProcessRig, cli, no_failures

from deliverylab.brokers.sqlite import Queue
from deliverylab.engine.check import check
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.reconcile import repair

CRASH_EXIT = 70


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[ProcessRig]:
    lab = ProcessRig(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def queued(lab: ProcessRig) -> int:
    conn = lab.connect()
    try:
        return conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
    finally:
        conn.close()


def wait_empty(lab: ProcessRig, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while queued(lab) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queued(lab) == 0, f"the queue did not drain in {timeout}s"


@pytest.mark.slow
@pytest.mark.parametrize("modes", [("transactional",), ("at-least-once",), ("at-most-once",),
                                   ("idempotent",), ("idempotent", "transactional")],
                         ids="+".join)
def test_drop_reconcile_then_a_worker_of_any_mode_keeps_it_ok(lab: ProcessRig, modes) -> None:
    lab.api()
    for i, item in enumerate(["coffee-beans", "tea", "coffee-beans", "milk"]):
        placed = cli("order", "--item", item, "--qty", "1", "--order-id", f"o-{i}",
                     "--url", f"http://{HOST}:{lab.port}")
        assert placed.returncode == 0, placed.stderr
    dropped = cli("drop", "--count", "2", "--db", str(lab.db))
    assert dropped.returncode == 0 and "2 message(s) dropped" in dropped.stdout
    fixed = cli("reconcile", "--db", str(lab.db))
    assert fixed.returncode == 0, fixed.stderr

    workers = [lab.worker(f"w-{i}", "--mode", mode) for i, mode in enumerate(modes)]
    for w in workers:  # started: its SIGTERM handler is in place
        deadline = time.monotonic() + 30
        while "started:" not in w.output() and time.monotonic() < deadline:
            assert w.alive(), w.output()
            time.sleep(0.05)
    wait_empty(lab, 30)
    for w in workers:
        assert w.terminate() == 0
    no_failures(*workers)
    status = json.loads(cli("status", "--json", "--db", str(lab.db)).stdout)
    assert status["items"] == [
        {"itemId": "coffee-beans", "truth": 2, "projection": 2, "delta": 0},
        {"itemId": "milk", "truth": 1, "projection": 1, "delta": 0},
        {"itemId": "tea", "truth": 1, "projection": 1, "delta": 0}]
    assert status["ok"] is True and status["check"]["duplicated"] == 0
    assert status["verdict"] == ("OK (repaired): projection equals truth; 4 orders were never"
                                 " applied (lost or in flight) and counted by the repair")
    assert "fenced 4 event(s)" in fixed.stdout and "verdict: OK (repaired)" in fixed.stdout
    text = cli("status", "--db", str(lab.db)).stdout
    assert "verdict      OK (repaired)" in text and "BROKEN" not in text
    stopped = " ".join(w.output() for w in workers)
    assert stopped.count("fenced: a repair already counted it → not applied") == 2


TEAMS = [("at-most-once",), ("at-least-once",), ("idempotent",), ("transactional",),
         ("idempotent", "transactional"), ("at-least-once", "idempotent")]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("modes", TEAMS, ids="+".join)
def test_repairs_racing_real_workers_under_ack_loss_and_crashes(lab: ProcessRig, modes, seed) -> None:
    if len(modes) == 1 and seed == 2:
        modes = (modes[0], modes[0])  # the second seed: two processes of the one mode
    rng = random.Random(seed)
    conn = lab.connect()
    queue = Queue(conn, clock=SystemClock(), ids=Ids(seed))
    items = ["coffee-beans", "tea", "milk", "oat-milk"]

    def place(n: int) -> None:
        for _ in range(n):
            place_order(queue, item_id=rng.choice(items), qty=rng.randint(1, 4))

    def start(i: int) -> Proc:
        return lab.worker(
            f"w{i}-{modes[i]}", "--mode", modes[i], "--seed", str(seed * 100 + i),
            "--ack-fail-rate", "0.3", "--crash-after-receive-rate", "0.05",
            "--crash-after-commit-rate", "0.1", "--crash-exits",
            "--visibility-timeout", "0.3", "--max-receives", "1000",
            "--max-messages", str(rng.choice([1, 3])), "--work-time", "0.002")

    def supervise() -> int:
        """Restart every worker that crashed (exit 70); any other exit is a failure."""
        restarted = 0
        for i, w in enumerate(workers):
            if not w.alive():
                assert w.p.returncode == CRASH_EXIT, w.output()[-3000:]
                workers[i] = start(i)
                restarted += 1
        return restarted

    place(40)
    workers = [start(i) for i in range(len(modes))]
    crashes = repairs = in_queue_at_last = 0
    try:
        for left in range(rng.randint(2, 4), 0, -1):
            deadline = time.monotonic() + rng.uniform(0.2, 1.5)
            while time.monotonic() < deadline:
                crashes += supervise()
                time.sleep(0.02)
            if rng.random() < 0.5:
                place(rng.randint(1, 10))
            if left == 1:
                if queued(lab) == 0:
                    place(10)  # the last repair always races events still in the queue
                in_queue_at_last = queued(lab)
            repair(conn, clock=SystemClock())
            repairs += 1
        deadline = time.monotonic() + 90
        while queued(lab) and time.monotonic() < deadline:
            crashes += supervise()
            time.sleep(0.05)
        assert queued(lab) == 0, "the queue did not drain in 90 s"
    finally:
        for w in workers:
            if w.alive():
                w.terminate()
    no_failures(*workers)
    result = check(conn)
    truth = dict(conn.execute("SELECT item_id, sum(qty) FROM orders GROUP BY item_id"))
    projection = dict(conn.execute("SELECT item_id, reserved_qty FROM inventory_projection"))
    conn.close()
    assert projection == truth, result.verdict
    assert result.ok, result.verdict
    assert repairs >= 2 and in_queue_at_last > 0
