"""Benchmark the deliverylab queue against a plain-sqlite3 lease queue, in one run.

    python benchmarks/bench_engine.py [--messages 10000] [--repeat 5]

Everything runs on a database file in WAL mode with ``synchronous=NORMAL`` in a temporary
directory, one process, the wall clock, no faults. Every measurement runs ``--repeat`` times
on a fresh database, in interleaved rounds so that the machine's load falls on all of them
alike; the table gives the median and the best, and ratios of medians. Each timed run ends
with a checkpoint, so it pays for moving what it wrote into the database file. The baseline is
the smallest correct design: one ``UPDATE … RETURNING`` statement leases a message with a fresh
receipt, one ``DELETE … WHERE id = ? AND receipt = ?`` acknowledges it — two commits per
message, SQLite's default page size and checkpoint interval. A second baseline row gets the
engine's settings, to show what those settings are worth on their own.

Targets:

* the idempotent consume cycle (receive + inbox and projection + ack: three commits) runs at
  >= 0.5x the two-commit baseline cycle;
* with 100,000 messages waiting it runs at >= 0.8x its rate with 1,000 waiting;
* batched (``max_messages=100``) it consumes >= 50,000 messages/s, a target set where the
  baseline cycle ran at about 28,000 messages/s.

The same idempotent cycle runs on PostgreSQL too (``--postgres URL``, default the local
server; ``--postgres none`` to leave it out), broker and store in one schema made for each run
and dropped after it, at the server's own settings (``synchronous_commit`` on: every commit
waits for its WAL flush, like SQLite's ``FULL``, stricter than the ``NORMAL`` of the SQLite
rows); and with ``synchronous_commit=off`` for this session (commits return before their
flush: a crash of the server can lose the last fraction of a second of them, as a power cut
can lose SQLite's under ``NORMAL``). Those rows are compared with the SQLite baseline cycle of
the same run. No target: they say what the move costs.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

try:
    import deliverylab  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.worker import Worker

PG_DEFAULT = "postgresql://127.0.0.1:5432/test"

ITEMS = [f"item-{i}" for i in range(50)]
# The baseline cycle's rate on the machine the 50,000 msg/s target was set on.
BASELINE_AT_TARGET = 28_000


# -- the baseline: plain sqlite3, a lease by UPDATE … RETURNING, an ack by DELETE --------------

class Baseline:
    def __init__(self, path: Path, *, checkpoint: int | None = None,
                 page_size: int | None = None) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        if page_size is not None:  # the engine's own setting, for comparison
            self.conn.execute(f"PRAGMA page_size = {page_size}")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        if checkpoint is not None:  # the engine's own setting, for comparison
            self.conn.execute(f"PRAGMA wal_autocheckpoint = {checkpoint}")
        self.conn.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, body TEXT NOT NULL,"
                          " visible_at REAL NOT NULL, receipt TEXT,"
                          " delivery_count INTEGER NOT NULL DEFAULT 0)")
        self.conn.execute("CREATE INDEX q_visible ON q (visible_at)")

    def send(self, body: str) -> None:
        self.conn.execute("INSERT INTO q (body, visible_at) VALUES (?, ?)", (body, time.time()))

    def fill(self, n: int) -> None:
        now = time.time()
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.executemany("INSERT INTO q (body, visible_at) VALUES (?, ?)",
                              ((body(i), now) for i in range(n)))
        self.conn.execute("COMMIT")
        settle(self.conn)

    def cycle(self) -> bool:
        now = time.time()
        row = self.conn.execute(
            "UPDATE q SET visible_at = ?, receipt = ?, delivery_count = delivery_count + 1"
            " WHERE id IN (SELECT id FROM q WHERE visible_at <= ? ORDER BY visible_at, id"
            " LIMIT 1) RETURNING id, body, receipt",
            (now + 30, uuid.uuid4().hex, now)).fetchone()
        if row is None:
            return False
        self.conn.execute("DELETE FROM q WHERE id = ? AND receipt = ?", (row[0], row[2]))
        return True


def settle(conn: sqlite3.Connection) -> None:
    """Checkpoint the setup's writes, so the measurement starts from messages at rest
    and does not pay for copying the whole fill into the database file."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def body(i: int) -> str:
    return f'{{"orderId":"o-{i}","itemId":"{ITEMS[i % len(ITEMS)]}","qty":1}}'


# -- the engine ------------------------------------------------------------------------------------

class Engine:
    def __init__(self, path: Path) -> None:
        self.conn = store.init_db(path)
        self.clock = SystemClock()
        self.queue = Queue(self.conn, clock=self.clock, ids=Ids())

    def send(self, i: int) -> None:
        self.queue.send(f"evt-{i}", "OrderPlaced",
                        {"orderId": f"o-{i}", "itemId": ITEMS[i % len(ITEMS)], "qty": 1},
                        correlation_id=f"o-{i}")

    def place(self, i: int) -> None:
        place_order(self.queue, item_id=ITEMS[i % len(ITEMS)], qty=1, order_id=f"o-{i}")

    def fill(self, n: int, start: int = 0) -> None:
        with store.transaction(self.conn):
            for i in range(start, start + n):
                self.send(i)
        settle(self.conn)

    def worker(self, max_messages: int) -> Worker:
        return Worker(store=self.conn, clock=self.clock, mode="idempotent",
                      max_messages=max_messages, broker=self.queue)


class PgEngine(Engine):
    """The engine on a fresh PostgreSQL schema: the broker and the store in one database."""

    made: list[str] = []  # every schema made, dropped at the end of the run

    def __init__(self, server: str, *, sync: bool = True) -> None:
        from deliverylab.brokers.postgres import PostgresBroker
        from deliverylab.engine import store_postgres

        url = store_postgres.url_for(server, f"dl_bench_{uuid.uuid4().hex[:12]}")
        if not sync:  # this session's commits do not wait for their WAL flush
            url += "%20-csynchronous_commit%3Doff"
        PgEngine.made.append(url)
        self.conn = store_postgres.init_db(url)
        self.clock = SystemClock()
        self.queue = PostgresBroker(self.conn, clock=self.clock, ids=Ids())

    def fill(self, n: int, start: int = 0) -> None:
        with store.transaction(self.conn):
            for i in range(start, start + n):
                self.send(i)
        self.conn.execute("VACUUM ANALYZE queue_messages")  # the planner sees the backlog


def pg_cycle(server: str, n: int, *, max_messages: int = 1, sync: bool = True):
    def make(_path: Path):
        e = PgEngine(server, sync=sync)
        e.fill(n)
        w = e.worker(max_messages)

        def run() -> int:
            got = 0
            while got < n:
                got += w.step()
            assert w.stats.applied == got and w.stats.acked == got
            e.conn.close()
            return got
        return run
    return make


def pg_server(url: str) -> str | None:
    """``url`` when a PostgreSQL server answers there, else None (said on stdout)."""
    if url == "none":
        return None
    try:
        import psycopg

        psycopg.connect(url, connect_timeout=3).close()
    except Exception as exc:  # no driver, no server: the SQLite rows still run
        print(f"PostgreSQL rows left out: {url} did not answer ({str(exc).splitlines()[0]});"
              f" 'make services' starts it\n")
        return None
    return url


# -- measuring ------------------------------------------------------------------------------------

def timed(fn: Callable[[], int]) -> float:
    """Run ``fn`` (which returns how many messages it handled); messages per second."""
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def checkpoint_wal(conn: sqlite3.Connection) -> None:
    """End of a timed run: copy what the run wrote from the WAL into the database file, so a
    run pays for its checkpoint however long its engine lets the WAL grow."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def measure(repeat: int, makers: dict[str, Callable[[Path], Callable[[], int]]],
            ) -> dict[str, list[float]]:
    """Run every measurement once per round, round after round, each on a fresh database:
    a burst of load on the machine then falls on all of them alike."""
    rates: dict[str, list[float]] = {label: [] for label in makers}
    for _ in range(repeat):
        for label, make in makers.items():
            with tempfile.TemporaryDirectory() as tmp:
                rates[label].append(timed(make(Path(tmp) / "bench.db")))
    return rates


def baseline_send(n: int):
    def make(path: Path):
        b = Baseline(path)

        def run() -> int:
            for i in range(n):
                b.send(body(i))
            checkpoint_wal(b.conn)
            return n
        return run
    return make


def baseline_cycle(n: int, waiting: int | None = None, checkpoint: int | None = None,
                   page_size: int | None = None):
    def make(path: Path):
        b = Baseline(path, checkpoint=checkpoint, page_size=page_size)
        b.fill(waiting or n)

        def run() -> int:
            for _ in range(n):
                assert b.cycle()
            checkpoint_wal(b.conn)
            return n
        return run
    return make


def engine_send(n: int, verb: str = "send"):
    def make(path: Path):
        e = Engine(path)
        fn = getattr(e, verb)

        def run() -> int:
            for i in range(n):
                fn(i)
            checkpoint_wal(e.conn)
            return n
        return run
    return make


def engine_cycle(n: int, *, waiting: int | None = None, max_messages: int = 1):
    def make(path: Path):
        e = Engine(path)
        e.fill(waiting or n)
        w = e.worker(max_messages)

        def run() -> int:
            got = 0
            while got < n:
                got += w.step()
            checkpoint_wal(e.conn)
            assert w.stats.applied == got and w.stats.acked == got
            return got
        return run
    return make


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--postgres", default=PG_DEFAULT, metavar="URL",
                        help=f"the PostgreSQL server for the PostgreSQL rows (default"
                             f" {PG_DEFAULT}; 'none' leaves them out)")
    args = parser.parse_args(argv)
    n, r = args.messages, args.repeat
    try:
        run(n, r, pg_server(args.postgres))
    finally:
        from deliverylab.engine import store_postgres

        for url in PgEngine.made:
            store_postgres.drop_schema(url)


def run(n: int, r: int, pg: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # the engine's page size and checkpoint interval
        probe = store.connect(Path(tmp) / "probe.db", must_exist=False)
        probe.execute("CREATE TABLE t (x INTEGER)")
        page = probe.execute("PRAGMA page_size").fetchone()[0]
        ckpt = probe.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        probe.close()

    print(f"deliverylab benchmark: SQLite {sqlite3.sqlite_version}, Python "
          f"{sys.version.split()[0]}, WAL + synchronous=NORMAL, {n:,} messages;"
          f" {r} interleaved rounds, ratios of medians\n", flush=True)
    base_send, base = "baseline send (INSERT, 1 commit)", \
        "baseline cycle (UPDATE…RETURNING + DELETE, 2 commits)"
    tuned = f"baseline cycle with the engine's page_size={page}, wal_autocheckpoint={ckpt}"
    single, shallow, deep, batched = (
        "idempotent cycle, max_messages=1 (3 commits)",
        "idempotent cycle, 1,000 waiting (1,000 consumed)",
        "idempotent cycle, 100,000 waiting (1,000 consumed)",
        "idempotent cycle, max_messages=100")
    # label -> (what to run, the label it is compared with)
    plan: dict[str, tuple[Callable[[Path], Callable[[], int]], str | None]] = {
        base_send: (baseline_send(n), None),
        base: (baseline_cycle(n), None),
        tuned: (baseline_cycle(n, checkpoint=ckpt, page_size=page), base),
        "send (1 commit)": (engine_send(n), base_send),
        "place_order: order + event (1 commit)": (engine_send(n, "place"), base_send),
        single: (engine_cycle(n), base),
        shallow: (engine_cycle(1_000, waiting=1_000), base),
        deep: (engine_cycle(1_000, waiting=100_000), shallow),
        batched: (engine_cycle(n, max_messages=100), base),
    }
    if pg is not None:
        # At most 2,000 messages: with every commit waiting for its flush, 10,000 single
        # cycles would take minutes a round. A rate is a rate.
        m = min(n, 2_000)
        plan["PostgreSQL: idempotent cycle, max_messages=1 (3 commits)"] = (
            pg_cycle(pg, m), base)
        plan["PostgreSQL: idempotent cycle, max_messages=100"] = (
            pg_cycle(pg, n, max_messages=100), base)
        plan["PostgreSQL, synchronous_commit=off: idempotent cycle, max_messages=1"] = (
            pg_cycle(pg, m, sync=False), base)
        plan["PostgreSQL, synchronous_commit=off: idempotent cycle, max_messages=100"] = (
            pg_cycle(pg, n, max_messages=100, sync=False), base)
    rates = measure(r, {label: make for label, (make, _) in plan.items()})
    med = {label: statistics.median(v) for label, v in rates.items()}

    print("| measurement | median msg/s | best msg/s | ratio of medians |")
    print("|---|---:|---:|---|")
    for label, (_, against) in plan.items():
        ratio = f"{med[label] / med[against]:.2f}x {against.split(' (')[0]}" if against else ""
        print(f"| {label} | {med[label]:,.0f} | {max(rates[label]):,.0f} | {ratio} |")

    targets = [
        (f"single-message idempotent cycle >= 0.5x baseline cycle"
         f" ({med[single] / med[base]:.2f}x)", med[single] / med[base] >= 0.5),
        (f"100,000 waiting >= 0.8x 1,000 waiting ({med[deep] / med[shallow]:.2f}x)",
         med[deep] / med[shallow] >= 0.8),
        (f"batched cycle >= 50,000 msg/s ({med[batched]:,.0f})", med[batched] >= 50_000),
    ]
    print()
    for text, ok in targets:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    print(f"\n  For scale: against the baseline given the engine's own page size and checkpoint"
          f" interval,\n  the single-message cycle runs at {med[single] / med[tuned]:.2f}x."
          f" The batched cycle runs at {med[batched] / med[base]:.2f}x the baseline cycle;"
          f"\n  50,000 msg/s is {50_000 / BASELINE_AT_TARGET:.1f}x a baseline cycle of"
          f" {BASELINE_AT_TARGET:,} msg/s, which is {med[base]:,.0f} msg/s here.")


if __name__ == "__main__":
    main()
