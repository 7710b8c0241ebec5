"""Real crashes: worker processes are SIGKILLed at random (seeded) moments while orders keep
arriving, and restarted; once the queue is drained the guarantees still hold."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import defaultdict

import pytest
from support.engine import make_lab
from support.processes import env
from support.worker_script import command

from deliverylab.engine import store
from deliverylab.engine.check import check

WORKERS = 3
KILLS = 24
BACKLOG = 200  # kept queued while the kills go on, so every worker is always busy
SETTLED = {"acked", "ack_failed", "ack_rejected", "crashed", "lost", "nacked", "dead_lettered"}


def place(lab, n, start):
    with store.transaction(lab.store):
        for i in range(start, start + n):
            lab.order(f"item-{i % 8}", 1 + i % 4, order_id=f"o-{i:05d}")
    return start + n


def interrupted_deliveries(conn):
    """Deliveries that were received and then never settled: a worker died holding them."""
    seen = defaultdict(set)
    for message_id, n, outcome in conn.execute(
            "SELECT message_id, delivery_count, outcome FROM delivery_log"):
        seen[(message_id, n)].add(outcome)
    return sum(1 for v in seen.values() if "received" in v and not SETTLED & v)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["idempotent", "transactional", "at-least-once"])
def test_sigkilled_workers_restart_and_the_guarantee_holds(tmp_path, mode):
    rng = random.Random(20)
    lab = make_lab(tmp_path / "lab.db")
    stop = tmp_path / "stop"
    placed = place(lab, BACKLOG, 0)

    def start(k: int) -> subprocess.Popen:
        return subprocess.Popen(
            command("work", lab.path, "--name", f"worker-{k}", "--mode", mode,
                    "--ack-fail", 0.1, "--fault-seed", 3, "--visibility-timeout", 0.3,
                    "--work-time", 0.004,  # processing takes time: kills land mid-delivery
                    "--max-messages", 1 + k % 2, "--stop-file", stop),
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_ready(proc: subprocess.Popen) -> None:
        """Block until the worker is connected and working (once per process)."""
        if not getattr(proc, "ready", False):
            assert proc.stdout.readline() == "ready\n", proc.communicate()[1]
            proc.ready = True

    procs = [start(k) for k in range(WORKERS)]
    kills = 0
    while kills < KILLS:
        time.sleep(rng.uniform(0.02, 0.12))
        # The producer keeps going through the crashes, topping the backlog up.
        queued = store.table_counts(lab.store)["queue_messages"]
        placed = place(lab, max(10, BACKLOG - queued), placed)
        k = rng.randrange(WORKERS)
        victim = procs[k]
        wait_ready(victim)  # a kill during start-up would prove nothing
        assert victim.poll() is None, victim.communicate()[1]  # nobody exits on their own
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)
        assert victim.returncode == -signal.SIGKILL
        kills += 1
        procs[k] = start(k)

    stop.touch()
    for p in procs:
        _, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr
        assert "Traceback" not in stderr and "database is locked" not in stderr, stderr

    assert kills >= 20
    # Most kills landed while a worker held a delivery (between its receive and its ACK).
    assert interrupted_deliveries(lab.store) >= KILLS // 3
    result = check(lab.store)
    assert result.orders == placed
    assert (result.pending, result.lost, result.dead_lettered) == (0, 0, 0), result.verdict
    if mode == "at-least-once":
        assert all(lab.projection()[i] >= q for i, q in lab.truth().items())
    else:
        assert result.ok, result.verdict
        assert result.duplicated == 0
        assert lab.projection() == lab.truth()
    assert store.table_counts(lab.store)["queue_messages"] == 0
