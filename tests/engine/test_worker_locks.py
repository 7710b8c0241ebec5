"""A worker outlives a write lock held past its busy timeout.

Another connection (here: the test, with ``BEGIN IMMEDIATE`` on a real file) keeps the write
lock longer than the worker's busy timeout, so SQLite answers "database is locked". The worker
says so in one line, backs off (exponential, full jitter, capped, drawn from its seed), counts
the wait, and tries again; once the lock is released it drains the queue, every order applied
exactly once.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.check import check
from deliverylab.engine.clock import FakeClock, SystemClock
from deliverylab.engine.faults import Faults
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.worker import Worker

SRC = Path(__file__).resolve().parents[2] / "src"
BUSY = 0.05  # the worker's busy timeout in these tests, in seconds


def lab_file(tmp_path: Path, orders: int) -> Path:
    path = tmp_path / "app.db"
    conn = store.init_db(path)
    queue = Queue(conn, clock=SystemClock(), ids=Ids(7))
    for i in range(orders):
        place_order(queue, item_id=("tea", "coffee-beans")[i % 2], qty=i + 1,
                    order_id=f"o-{i:03d}")
    conn.close()
    return path


def hold_write_lock(path: Path) -> sqlite3.Connection:
    """A second, real connection holding the write lock until it rolls back."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def locked_worker(path: Path, clock: FakeClock, said: list[str], seed: int, name: str = "w-1"):
    conn = store.connect(path, busy_timeout=BUSY)
    return Worker(store=conn, clock=clock, broker=Queue(conn, clock=clock, ids=Ids(seed)),
                  faults=Faults(seed=seed), name=name,
                  backoff_base=0.1, backoff_cap=0.8, echo=said.append)


def waits(said: list[str]) -> list[float]:
    return [float(m.group(1)) for line in said if (m := re.search(r"retry in ([\d.]+)s", line))]


def test_a_step_under_a_held_lock_backs_off_and_counts_it(tmp_path: Path) -> None:
    path = lab_file(tmp_path, 3)
    holder = hold_write_lock(path)
    runs = []
    for _ in range(2):  # the same seed and name: the same waits, so a run replays
        clock, said = FakeClock(), []
        worker = locked_worker(path, clock, said, seed=11)
        for _ in range(8):
            assert worker.step() == 0
        worker.conn.close()
        runs.append((waits(said), clock.now(), said, worker.stats))
    holder.execute("ROLLBACK")
    delays, slept, said, stats = runs[0]
    assert runs[1][0] == delays
    assert stats.lock_waits == 8 and stats.received == 0 and stats.steps == 0
    assert len(said) == 8 and all("database is locked (receive: nothing leased)" in s
                                  for s in said)
    for n, delay in enumerate(delays):  # wait n in a row: uniform(0, min(cap, base * 2**n))
        assert 0 <= delay <= min(0.8, 0.1 * 2 ** n) + 1e-9
    assert len(set(delays)) > 1
    assert abs(slept - sum(delays)) <= 0.0005 * len(delays)  # what it said (to the ms), slept
    other = []
    locked_twin = locked_worker(path, FakeClock(), other, seed=11, name="w-2")
    holder = hold_write_lock(path)
    for _ in range(8):
        locked_twin.step()
    holder.execute("ROLLBACK")
    assert waits(other) != delays  # another worker spreads out from this one
    locked_twin.conn.close()


def test_run_until_idle_waits_out_the_lock_then_drains(tmp_path: Path) -> None:
    path = lab_file(tmp_path, 4)
    holder = hold_write_lock(path)
    clock, said = FakeClock(), []
    worker = locked_worker(path, clock, said, seed=3)
    released = []

    def release_on_third_wait(line: str) -> None:  # the lock is let go while the worker waits
        said.append(line)
        if len(waits(said)) == 3 and not released:
            holder.execute("ROLLBACK")
            released.append(line)

    worker.echo = release_on_third_wait
    stats = worker.run_until_idle()
    assert released and stats.lock_waits == 3
    assert stats.applied == 4 and stats.acked == 4
    result = check(worker.conn)
    assert result.ok and result.correct == 4
    worker.conn.close()


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_RATE") and k not in ("DELIVERYLAB_DB", "DELIVERYLAB_URL")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_a_worker_process_survives_a_lock_held_past_its_busy_timeout(tmp_path: Path) -> None:
    """A real worker, a real second connection holding BEGIN IMMEDIATE for far longer than the
    worker's busy timeout; released, the worker drains the queue, each order applied once."""
    path = lab_file(tmp_path, 20)
    log = tmp_path / "worker.log"
    holder = hold_write_lock(path)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deliverylab", "worker", "--db", str(path), "--name", "w-1",
             "--busy-timeout", "0.2", "--backoff-base", "0.05", "--backoff-cap", "0.2",
             "--poll-interval", "0.05", "--seed", "5"],
            env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and log.read_text().count("database is locked") < 3:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.05)
            assert proc.poll() is None, log.read_text()
            assert holder.execute("SELECT count(*) FROM queue_messages").fetchone()[0] == 20
            holder.execute("ROLLBACK")  # held for at least three busy timeouts; now let go
            conn = store.connect(path)
            try:
                while time.monotonic() < deadline:
                    if conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0] == 0:
                        break
                    time.sleep(0.05)
                result = check(conn)
            finally:
                conn.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert result.ok and result.correct == 20 and result.duplicated == 0, result.verdict
    locked = [line for line in text.splitlines() if "database is locked" in line]
    assert len(locked) >= 3
    assert all(re.match(r"^\[w-1\] \d\d:\d\d:\d\d\.\d{3} database is locked \(receive:", line)
               and "retry in" in line for line in locked), locked
    (stopped,) = [line for line in text.splitlines() if " stopped: " in line]
    counts = dict(kv.split("=") for kv in stopped.split(" stopped: ")[1].split())
    assert int(counts["lock_waits"]) == len(locked) and int(counts["applied"]) == 20


class LockingClock(FakeClock):
    """A fake clock that, the first time the worker pretends to work (``work_time``), lets a
    second connection take the write lock: the step's next transaction then finds it held."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path, self.holder = path, None

    def sleep(self, seconds: float) -> None:
        if seconds == 0.25 and self.holder is None:
            self.holder = hold_write_lock(self.path)
        super().sleep(seconds)


def test_a_lock_taken_mid_step_is_waited_out_and_the_message_comes_back(tmp_path: Path) -> None:
    """Received, then locked out of the effect's transaction: the worker waits, its lease runs
    out, and the message is delivered again and applied once."""
    path = lab_file(tmp_path, 2)
    clock, said = LockingClock(path), []
    conn = store.connect(path, busy_timeout=BUSY)
    worker = Worker(store=conn, clock=clock, broker=Queue(conn, clock=clock, ids=Ids(2)),
                    faults=Faults(seed=2), name="w-1",
                    visibility_timeout=1.0, work_time=0.25, backoff_base=0.5, backoff_cap=2.0)

    def echo(line: str) -> None:
        said.append(line)
        if "database is locked" in line and clock.holder is not None:
            clock.holder.execute("ROLLBACK")  # let go while the worker backs off

    worker.echo = echo
    stats = worker.run_until_idle()
    (locked,) = [line for line in said if "database is locked" in line]
    assert "mid-step: its leases will run out and come back" in locked
    assert stats.lock_waits == 1 and stats.applied == 2 and stats.received == 3
    assert not conn.in_transaction
    result = check(conn)
    assert result.ok and result.correct == 2 and result.duplicated == 0
    conn.close()
