"""The claim on PostgreSQL: SQLite's claim statement hands one message to two workers there;
the broker's ``FOR UPDATE SKIP LOCKED`` claim never does.

The interleaving is forced, not hoped for: worker A claims inside an open transaction (its row
lock held), worker B claims on its own connection, and A commits only once B is either waiting
for A's lock (seen in ``pg_stat_activity``) or done. Both at READ COMMITTED, PostgreSQL's
default and the connections' level.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from support.processes import env

from deliverylab.book.pgdemo import claim_race, race
from deliverylab.brokers.postgres import CLAIM, NAIVE_CLAIM, PostgresBroker
from deliverylab.brokers.sqlite import SQLiteBroker

NAIVE_BATCH_CLAIM = SQLiteBroker._CLAIM
from deliverylab.engine import store_postgres as pgstore
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.ids import Ids


def _send(url: str, n: int) -> None:
    with pgstore.connect(url) as conn:
        q = PostgresBroker(conn, clock=FakeClock(), ids=Ids(1))
        for i in range(n):
            q.send(f"evt-{i}", "OrderPlaced", {"i": i})


def _race(url: str, sql: str, n: int = 1) -> tuple[list[tuple], list[tuple], bool]:
    with pgstore.connect(url) as conn:
        assert conn.execute("SHOW transaction_isolation").fetchone()[0] == "read committed"
    return race(url, sql, n)


def test_sqlite_claim_hands_one_message_to_two_workers_on_postgres(pg_url):
    _send(pg_url, 2)
    got_a, got_b, waited = _race(pg_url, NAIVE_CLAIM)
    # B's subquery chose seq 1 from its snapshot; its UPDATE waited for A's row lock, then
    # re-checked only "seq = 1" on A's committed version, which still holds, and claimed it.
    assert waited
    (seq_a, *_, receipt_a, count_a, _lease_a, _), = got_a
    (seq_b, *_, receipt_b, count_b, _lease_b, _), = got_b
    assert seq_a == seq_b == 1  # one message, two workers, both leases "valid" until 30.0
    assert (receipt_a, count_a) == ("rcpt-a.1", 1)
    assert (receipt_b, count_b) == ("rcpt-b.2", 2)  # and seq 2 sat there, visible, unclaimed


def test_skip_locked_claim_gives_the_second_worker_another_message(pg_url):
    _send(pg_url, 2)
    got_a, got_b, waited = _race(pg_url, CLAIM)
    assert not waited  # SKIP LOCKED: B passed A's locked row without waiting
    assert [r[0] for r in got_a] == [1]
    assert [r[0] for r in got_b] == [2]
    assert [r[7] for r in got_a + got_b] == [1, 1]  # each received once


def test_skip_locked_claim_with_one_message_leaves_the_second_worker_empty(pg_url):
    _send(pg_url, 1)
    got_a, got_b, _ = _race(pg_url, CLAIM)
    assert [r[0] for r in got_a] == [1]
    assert got_b == []


def test_the_brokers_batch_claim_locks_too(pg_url):
    """The broker's receive runs one claim for a batch: the batch form must lock too (it did
    not once, and only the process test below noticed)."""
    _send(pg_url, 3)
    got_a, got_b, waited = _race(pg_url, PostgresBroker._CLAIM, n=2)
    assert not waited and [r[0] for r in got_a] == [1, 2] and [r[0] for r in got_b] == [3]


def test_a_batch_claim_of_sqlite_takes_the_same_messages_twice(pg_url):
    _send(pg_url, 3)
    got_a, got_b, waited = _race(pg_url, NAIVE_BATCH_CLAIM, n=2)
    assert waited and [r[0] for r in got_a] == [r[0] for r in got_b] == [1, 2]


def test_the_book_table_shows_the_double_claim_and_its_absence():
    naive, locked = claim_race("sqlite"), claim_race("skip_locked")
    assert list(naive["message"]) == [1, 1] and list(naive["waited_for_lock"]) == [False, True]
    assert list(locked["message"]) == [1, 2] and list(locked["delivery_count"]) == [1, 1]


CLAIMER = """
import json, sys, time
from pathlib import Path
from deliverylab.engine import store_postgres as pgstore
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.ids import Ids
from deliverylab.brokers.postgres import PostgresBroker
url, name, n, barrier, parties = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
conn = pgstore.connect(url)
q = PostgresBroker(conn, clock=SystemClock(), ids=Ids())
(barrier / (name + ".ready")).touch()
deadline = time.time() + 60
while len(list(barrier.glob("*.ready"))) < parties and time.time() < deadline:
    time.sleep(0.001)
got = []
while True:
    batch = q.receive(3600, n, worker=name)
    if not batch:
        break
    got.extend([d.seq, d.receipt, d.delivery_count] for d in batch)
print(json.dumps(got))
"""


@pytest.mark.slow
def test_competing_worker_processes_never_share_a_message(pg_url, tmp_path):
    """Four processes claim 600 messages as fast as they can, single and batched: every
    message is handed out exactly once, at its first delivery."""
    total, parties = 600, 4
    _send(pg_url, total)
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, pg_url, f"w{k}", str(1 + 4 * (k % 2)),
                               str(tmp_path), str(parties)],
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(parties)]
    claims = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        claims.append(json.loads(out))
    seqs = Counter(seq for got in claims for seq, _, _ in got)
    assert sorted(seqs) == list(range(1, total + 1))
    assert set(seqs.values()) == {1}
    assert {count for got in claims for _, _, count in got} == {1}
    assert sum(1 for got in claims if got) >= 2  # they really competed


def test_the_claim_that_writes_its_trace_rows_locks_too(pg_url):
    """The broker's receive with the trace on runs the claim and its ``received`` rows as one
    statement: it must skip a row another claim holds, as CLAIM does."""
    import threading

    from deliverylab.book.pgdemo import wait_until_blocked

    _send(pg_url, 2)
    a, b = pgstore.connect(pg_url), pgstore.connect(pg_url)
    try:
        qa = PostgresBroker(a, clock=FakeClock(), ids=Ids(1))
        qb = PostgresBroker(b, clock=FakeClock(), ids=Ids(2))
        a.raw.execute("BEGIN")
        got_a = qa.receive(30, 1, worker="a")
        got_b = []
        t = threading.Thread(target=lambda: got_b.extend(qb.receive(30, 1, worker="b")))
        t.start()
        waited = wait_until_blocked(pg_url, b.raw.info.backend_pid, t)
        a.execute("COMMIT")
        t.join(10)
        assert not waited
        assert [d.seq for d in got_a] == [1] and [d.seq for d in got_b] == [2]
        logged = a.execute("SELECT worker, event_id, outcome FROM delivery_log"
                           " ORDER BY seq").fetchall()
        assert sorted(tuple(r) for r in logged) == [("a", "evt-0", "received"),
                                                    ("b", "evt-1", "received")]
    finally:
        a.close()
        b.close()


def _settle_script(q, clock) -> list:
    """Receives and acks that take every path of receive and ack_many: a batch with a message
    due for the dead letters in it, stale and current deliveries of one message in one ack,
    the same delivery twice. What each call answered."""
    q.send("evt-0", "OrderPlaced", {"i": 0}, correlation_id="o-0")
    seen = []
    first = q.receive(1, 1, worker="w1")
    clock.advance(2)
    second = q.receive(1, 1, worker="w1")  # evt-0 again: its second delivery
    clock.advance(2)
    for i in range(1, 4):
        q.send(f"evt-{i}", "OrderPlaced", {"i": i}, correlation_id=f"o-{i}")
    batch = q.receive(10, 4, worker="w2")  # evt-0 over max_receives=2; evt-1 to evt-3
    seen.append([(d.event_id, d.delivery_count) for d in first + second + batch])
    seen.append([(d.event_id, d.delivery_count, r) for d, r in batch.parked])
    seen.append(q.ack_many([batch[0], batch[1]], worker="w2"))
    clock.advance(20)
    again = q.receive(10, 1, worker="w3")  # evt-3, its lease over
    seen.append(q.ack_many([again[0], again[0], first[0]], worker="w3"))
    seen.append(q.ack_many([again[0]], worker="w3"))  # already acked: refused
    return seen


def test_the_postgres_broker_answers_and_traces_as_the_sqlite_broker(pg_url):
    """The same verbs on the SQLite broker and on the PostgreSQL one (whose receive and ack
    take one statement each where they can): the same answers, the same trace rows in the
    same order, the same queue and dead letters."""
    from deliverylab.engine import store

    def run(conn) -> tuple:
        clock = FakeClock()
        broker = (PostgresBroker if conn is not lite else SQLiteBroker)(
            conn, clock=clock, ids=Ids(5), max_receives=2)
        seen = _settle_script(broker, clock)
        trace = [tuple(r) for r in conn.execute(
            "SELECT at, worker, correlation_id, event_id, message_id, delivery_count, outcome,"
            " detail FROM delivery_log ORDER BY seq")]
        queued = [tuple(r) for r in conn.execute(
            "SELECT event_id, delivery_count, receipt FROM queue_messages ORDER BY seq")]
        dead = [tuple(r) for r in conn.execute(
            "SELECT event_id, delivery_count, last_error FROM dead_letters ORDER BY event_id")]
        return seen, trace, queued, dead

    lite = store.init_db(":memory:")
    with pgstore.connect(pg_url) as pg:
        expected, got = run(lite), run(pg)
    assert got == expected
    seen, trace, _, dead = got
    assert [e for e, _, _ in seen[1]] == ["evt-0"] and [e for e, _, _ in dead] == ["evt-0"]
    assert seen[2:] == [[True, True], [True, False, False], [False]]
    assert {r[6] for r in trace} >= {"received", "dead_lettered", "acked", "ack_rejected"}
