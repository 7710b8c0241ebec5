"""Reconciliation at a size a lab never reaches: 100,000 drifted orders.

The drift is built with a few set-based statements (a recursive CTE), not 100,000 calls to
``place_order``: a third of the orders still queued, a third applied (some of them twice), a
third lost. ``diff``, ``repair``, ``reconcile --dry-run`` and ``reconcile`` must all handle it
without hitting SQLite's limit on bound variables.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from support.processes import env

from deliverylab.brokers.sqlite import SQLiteBroker
from deliverylab.engine import store
from deliverylab.engine.check import check
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.reconcile import diff, repair
from deliverylab.engine.worker import Worker

N = 100_000


def build_drift(conn: sqlite3.Connection, n: int = N) -> dict[str, int]:
    """``n`` orders over 50 items: i % 3 == 0 queued, == 1 applied (every 7th twice), == 2
    lost. Returns how many orders are in each state."""
    with store.transaction(conn):
        conn.execute("""
            INSERT INTO orders (order_id, item_id, qty, event_id, idempotency_key,
                                request_hash, created_at)
            WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?)
            SELECT printf('o-%06d', i), 'item-' || (i % 50), 1 + i % 4, printf('evt-%06d', i),
                   NULL, 'h', i FROM k""", (n,))
        conn.execute("""
            INSERT INTO queue_messages (message_id, event_id, type, payload, correlation_id,
                                        visible_at, created_at)
            SELECT 'msg-' || substr(event_id, 5), event_id, 'OrderPlaced',
                   json_object('orderId', order_id, 'itemId', item_id, 'qty', qty),
                   order_id, 0, created_at
              FROM orders WHERE created_at % 3 = 0""")
        applied = """
            INSERT INTO delivery_log (at, worker, correlation_id, event_id, message_id,
                                      delivery_count, outcome, detail)
            SELECT created_at, 'w', order_id, event_id, NULL, 1, 'applied', 'at-least-once'
              FROM orders WHERE created_at % 3 = 1"""
        conn.execute(applied)
        conn.execute(applied + " AND created_at % 7 = 0")  # the duplicates
        conn.execute("""
            INSERT INTO inventory_projection (item_id, reserved_qty)
            SELECT o.item_id, sum(o.qty) FROM delivery_log AS l JOIN orders AS o
             USING (event_id) WHERE l.outcome = 'applied' GROUP BY o.item_id""")
    i = range(1, n + 1)
    return {"pending": sum(1 for x in i if x % 3 == 0),
            "duplicated": sum(1 for x in i if x % 3 == 1 and x % 7 == 0),
            "lost": sum(1 for x in i if x % 3 == 2)}


@pytest.fixture
def big(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    path = tmp_path / "big.db"
    conn = store.init_db(path)
    counts = build_drift(conn)
    conn.close()
    return path, counts


@pytest.mark.slow
def test_diff_and_repair_of_100000_drifted_orders(big) -> None:
    path, counts = big
    conn = store.connect(path)
    before = check(conn)
    assert (before.pending, before.duplicated, before.lost) == (
        counts["pending"], counts["duplicated"], counts["lost"])
    drift = diff(conn)
    assert len(drift.unapplied) == counts["pending"] + counts["lost"]
    assert len(drift.items) == 50

    result = repair(conn, clock=FakeClock(1e6))
    assert (result.orders, result.events_fenced) == (N, N)
    assert result.orders_recounted == counts["pending"] + counts["lost"] + counts["duplicated"]
    after = check(conn)
    assert after.ok and diff(conn).clean
    assert after.repaired_duplicated == counts["duplicated"]
    assert after.repaired_never_applied == counts["pending"] + counts["lost"]
    assert after.verdict.startswith(
        f"OK (repaired): projection equals truth; {counts['duplicated']:d} orders had"
        " duplicated effects before the repair")

    # The queued third now arrives at a batched at-least-once worker: all fenced.
    late = FakeClock(1e6)
    w = Worker(store=conn, clock=late, broker=SQLiteBroker(conn, clock=late, ids=Ids(1)),
               mode="at-least-once", max_messages=500)
    for _ in range(4):
        w.step()
    assert (w.stats.received, w.stats.fenced, w.stats.applied) == (2000, 2000, 0)
    assert check(conn).ok
    conn.close()


def deliverylab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deliverylab", *args], env=env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_reconcile_command_on_100000_drifted_orders(big) -> None:
    path, counts = big
    log = "SELECT count(*) FROM delivery_log"
    logged = store.connect(path).execute(log).fetchone()[0]
    dry = deliverylab("reconcile", "--dry-run", "--db", str(path))
    assert dry.returncode == 0, dry.stderr
    assert (f"events not applied: {counts['lost']} lost, {counts['pending']} pending"
            in dry.stdout)
    assert dry.stdout.rstrip().endswith("dry run: nothing written")
    assert store.connect(path).execute(log).fetchone()[0] == logged  # nothing written

    done = deliverylab("reconcile", "--db", str(path))
    assert done.returncode == 0, done.stderr
    recounted = counts["pending"] + counts["lost"] + counts["duplicated"]
    assert f"(50 item(s) changed, {recounted} order(s) recounted); fenced {N} event(s)" \
        in done.stdout
    assert "verdict: OK (repaired): projection equals truth;" in done.stdout
    again = deliverylab("reconcile", "--db", str(path))
    assert again.returncode == 0 and again.stdout.startswith("nothing to repair")
