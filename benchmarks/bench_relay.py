"""The outbox relay: its throughput, and what each defence does with the duplicates it makes.

    python benchmarks/bench_relay.py [--orders 2000] [--repeat 3] [--crash-rate 0.05]
                                     [--postgres URL|none] [--nats URL|none]

Two measurements, in one run:

* **throughput**: the relay publishing ``--orders`` outbox rows from a SQLite store to a
  broker in another SQLite file (batches of 1 and 100 rows), against a baseline measured in the
  same run: the same events sent straight to that broker, one ``send`` each, with no outbox
  (what a producer without the outbox does, and why it loses events on a crash). Rounds are
  interleaved so the machine's load falls on all of them alike; the table gives the median
  and best rows/s and the ratio of the medians.
* **duplicates per defence**: the relay with ``crash_after_publish`` at ``--crash-rate``
  (seeded, so every row below sees the same crash schedule), then a worker draining the
  broker. Counted: rows published (a republish after a crash counts again), messages the
  broker stored, deliveries the worker received, and effects applied, against the orders.
  The defences: none (an at-least-once worker); the consumer's inbox (the idempotent worker)
  on a SQLite file and on PostgreSQL (``--postgres``); JetStream's ``Nats-Msg-Id`` duplicate
  window (``--nats``), inside the window and after it (a stream whose window is shorter than
  the relay's restart), each with the inbox behind it.

Counts are what matter here: they do not depend on the machine. Rates do, and move by a third
between runs on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import deliverylab  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deliverylab.brokers.base import Broker
from deliverylab.brokers.sqlite import SQLiteBroker
from deliverylab.engine import store
from deliverylab.engine.check import check
from deliverylab.engine.clock import FakeClock, SystemClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import EVENT_TYPE, place_order
from deliverylab.engine.relay import Relay
from deliverylab.engine.worker import Worker

PG_DEFAULT = "postgresql://127.0.0.1:5432/test"
NATS_DEFAULT = "nats://127.0.0.1:4222"
SEED = 11


# -- throughput -----------------------------------------------------------------------------
def _outbox(where: Path, orders: int) -> tuple[Any, SQLiteBroker]:
    """A store file with ``orders`` orders in its outbox, and an empty broker file."""
    conn = store.init_db(where / "store.db")
    broker = SQLiteBroker(store.init_db(where / "broker.db"), clock=SystemClock(),
                          ids=Ids(1), trace=False)
    with store.transaction(conn):
        for i in range(orders):
            place_order(broker, item_id=f"item-{i % 50}", qty=1, store=conn)
    return conn, broker


def relay_rate(where: Path, orders: int, batch: int) -> float:
    conn, broker = _outbox(where, orders)
    relay = Relay(conn, broker, clock=broker.clock)
    start = time.perf_counter()
    stats = relay.run_until_idle(batch=batch)
    seconds = time.perf_counter() - start
    assert stats.marked == orders and broker.depth()["visible"] == orders
    conn.close()
    broker.conn.close()
    return orders / seconds


def direct_rate(where: Path, orders: int) -> float:
    """The baseline: the same events sent straight to the broker, no outbox."""
    conn, broker = _outbox(where, orders)
    rows = conn.execute("SELECT event_id, payload, correlation_id FROM outbox").fetchall()
    payloads = [(r[0], json.loads(r[1]), r[2]) for r in rows]
    start = time.perf_counter()
    for event_id, payload, order_id in payloads:
        broker.send(event_id, EVENT_TYPE, payload, correlation_id=order_id)
    seconds = time.perf_counter() - start
    conn.close()
    broker.conn.close()
    return orders / seconds


def throughput(orders: int, repeat: int) -> list[tuple[str, list[float]]]:
    runs: dict[str, list[float]] = {"baseline: send straight to the broker, no outbox": [],
                                    "relay, batch 1 (a mark commit per row)": [],
                                    "relay, batch 100": []}
    names = list(runs)
    for r in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            for i, name in enumerate(names):
                where = Path(tmp) / f"{r}-{i}"
                where.mkdir()
                runs[name].append(direct_rate(where, orders) if i == 0 else
                                  relay_rate(where, orders, 1 if i == 1 else 100))
    return list(runs.items())


# -- duplicates per defence -----------------------------------------------------------------
def defence_run(broker: Broker, orders: int, crash_rate: float, mode: str, batch: int, *,
                wait: Callable[[], None] | None = None) -> dict[str, Any]:
    """Orders into a fresh store's outbox, the relay with crashes, then a worker draining the
    broker: the counts. ``stored`` is the broker's depth once the relay is done, before any
    receive. ``wait`` runs after each crash (JetStream's window running out)."""
    conn = store.init_db()
    clock = broker.clock
    for i in range(orders):
        place_order(broker, item_id=f"item-{i % 7}", qty=1, store=conn)
    relay = Relay(conn, broker, clock=clock, crash_after_publish=crash_rate, seed=SEED)
    crashes = 0
    while relay.step(batch):
        if wait is not None and relay.stats.crashed > crashes:
            wait()
        crashes = relay.stats.crashed
    stored = sum(broker.depth().values())
    worker = Worker(store=conn, broker=broker, clock=clock, mode=mode, name="w-1",
                    visibility_timeout=30.0)
    worker.run_until_idle()
    result = check(conn, broker)
    out = {"published": relay.stats.published, "crashes": relay.stats.crashed,
           "stored": stored, "received": worker.stats.received,
           "applied": worker.stats.applied, "verdict": result.verdict.split(";")[0]}
    conn.close()
    return out


@contextlib.contextmanager
def sqlite_broker(tmp: Path, name: str) -> Iterator[Broker]:
    broker = SQLiteBroker(store.init_db(tmp / f"{name}.db"), clock=FakeClock(), ids=Ids(3),
                          trace=False, max_receives=50)
    try:
        yield broker
    finally:
        broker.conn.close()


@contextlib.contextmanager
def postgres_broker(url: str) -> Iterator[Broker]:
    import secrets

    from deliverylab.brokers.postgres import PostgresBroker
    from deliverylab.engine import store_postgres

    schema = store_postgres.url_for(url, f"dl_bench_{secrets.token_hex(4)}")
    conn = store_postgres.init_db(schema)
    try:
        yield PostgresBroker(conn, clock=FakeClock(), ids=Ids(3), trace=False,
                             max_receives=50)
    finally:
        conn.close()
        store_postgres.drop_schema(schema)


def defences(orders: int, crash_rate: float, batch: int, postgres: str | None,
             nats: str | None) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with sqlite_broker(Path(tmp), "none") as broker:
            rows.append(("none (at-least-once worker), SQLite file",
                         defence_run(broker, orders, crash_rate, "at-least-once", batch)))
        with sqlite_broker(Path(tmp), "inbox") as broker:
            rows.append(("inbox (idempotent worker), SQLite file",
                         defence_run(broker, orders, crash_rate, "idempotent", batch)))
    if postgres is not None:
        with postgres_broker(postgres) as broker:
            rows.append(("inbox (idempotent worker), PostgreSQL",
                         defence_run(broker, orders, crash_rate, "idempotent", batch)))
    if nats is not None:
        rows += jetstream_rows(nats, orders, crash_rate, batch)
    return rows


def jetstream_rows(url: str, orders: int, crash_rate: float,
                   batch: int) -> list[tuple[str, dict[str, Any]]]:
    """JetStream's duplicate window: the default 120 s, which every restart here falls
    within; then a 1 s window with each restart of the relay 1.5 s after its crash (past the
    window). Each with the inbox behind it. On the wall clock: the window is the server's."""
    import uuid

    from deliverylab.brokers.jetstream import JetStreamBroker

    rows = []
    for label, window, pause in (("Nats-Msg-Id, restart within the 120 s window + inbox",
                                  120.0, 0.0),
                                 ("Nats-Msg-Id, restart after a 1 s window + inbox", 1.0, 1.5)):
        broker = JetStreamBroker(url, stream=f"bench-relay-{uuid.uuid4().hex[:8]}",
                                 clock=SystemClock(), ids=Ids(3), max_receives=50,
                                 dedup_window=window)
        try:
            rows.append((label, defence_run(
                broker, orders, crash_rate, "idempotent", batch,
                wait=(lambda p=pause: time.sleep(p)) if pause else None)))
        finally:
            broker.destroy()
    return rows


# -- the report -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--defence-orders", type=int, default=500)
    parser.add_argument("--crash-rate", type=float, default=0.02)
    parser.add_argument("--defence-batch", type=int, default=10,
                        help="rows the relay publishes before each mark (default 10)")
    parser.add_argument("--postgres", default=PG_DEFAULT, metavar="URL",
                        help=f"a PostgreSQL server for the inbox row (default {PG_DEFAULT};"
                             " 'none' leaves it out)")
    parser.add_argument("--nats", default=NATS_DEFAULT, metavar="URL",
                        help=f"a NATS server with JetStream for the dedup rows (default"
                             f" {NATS_DEFAULT}; 'none' leaves them out)")
    args = parser.parse_args(argv)
    postgres = None if args.postgres == "none" else args.postgres
    nats = None if args.nats == "none" else args.nats

    print(f"relay throughput: {args.orders:,} outbox rows, SQLite store -> SQLite broker file,"
          f" {args.repeat} interleaved rounds\n")
    print("| measurement | median rows/s | best rows/s | ratio of medians |")
    print("|---|---:|---:|---|")
    results = throughput(args.orders, args.repeat)
    base = statistics.median(results[0][1])
    for name, rates in results:
        median = statistics.median(rates)
        ratio = "" if name.startswith("baseline") else f"{median / base:.2f}x baseline"
        print(f"| {name} | {median:,.0f} | {max(rates):,.0f} | {ratio} |")

    print(f"\nduplicates per defence: {args.defence_orders} orders, crash_after_publish="
          f"{args.crash_rate:g} (seed {SEED}), relay batch {args.defence_batch}\n")
    print("| defence | crashes | published | stored by the broker | delivered | applied |"
          " verdict |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, row in defences(args.defence_orders, args.crash_rate, args.defence_batch,
                              postgres, nats):
        print(f"| {name} | {row['crashes']} | {row['published']} | {row['stored']} |"
              f" {row['received']} | {row['applied']} | {row['verdict']} |")


if __name__ == "__main__":
    main()
