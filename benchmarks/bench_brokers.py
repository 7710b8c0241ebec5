"""Benchmark the same idempotent consumer on every engine, side by side, in one run.

    python benchmarks/bench_brokers.py [--messages 2000] [--repeat 3] [--engines …] [--cluster]

Per engine (``deliverylab.book.beyond``: SQLite, PostgreSQL, RabbitMQ, JetStream, Redis,
each on a queue, stream or schema of its own made for each run and removed after it; the store
is the broker's own database on SQLite (a file in WAL mode, ``synchronous=NORMAL``) and
PostgreSQL (the server's default settings), and a SQLite file beside RabbitMQ, JetStream and
Redis), on the wall clock, no faults:

* the idempotent consume cycle's throughput (receive, inbox row and projection in one
  transaction, ACK), one message per receive and, where the engine hands out batches, 100;
* in the same rounds, the same cycle written by hand on the same client library and the same
  store (sqlite3, psycopg, pika, nats-py, redis-py): claim, one store transaction with the
  inbox row and the projection, ACK; no trace, no fault points, no checks. That is the
  practical limit for the guarantee, and the table gives deliverylab ÷ hand-written;
* the redelivery latency after a lost ACK: one message received and never acknowledged,
  with a lease (visibility timeout, AckWait) of one second: the time from the receive that
  lost it to the receive that gets it again. The floor is the lease; what is above it is
  how the engine notices;
* with ``--cluster``, the publish pause after the stream leader of a three-node JetStream
  cluster is SIGKILLed (``deliverylab.book.cluster_run.publish_pauses``, ``--repeat`` kills):
  the longest gap between two confirmed publishes (``benchmarks/bench_cluster.py`` has more,
  and RabbitMQ's).

Rounds are interleaved, so the machine's load falls on every engine alike; the tables give
the median and the best, and ratios of medians against the SQLite single-message cycle of the
same run. An engine whose server does not answer is left out, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import deliverylab  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deliverylab.book import beyond
from deliverylab.engine import store
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.worker import CONSUMER, Worker

ITEMS = [f"item-{i}" for i in range(50)]
BATCH = 100
BASELINE = "sqlite: idempotent cycle, max_messages=1"


def fill(e: beyond.Engine, n: int) -> None:
    """``n`` messages on the engine's queue (not timed): in one transaction where the broker
    is the store's database, one send each elsewhere."""
    def send_all() -> None:
        for i in range(n):
            e.broker.send(f"evt-{i}", "OrderPlaced",
                          {"orderId": f"o-{i}", "itemId": ITEMS[i % len(ITEMS)], "qty": 1},
                          correlation_id=f"o-{i}")
    if e.broker.joins(e.store):
        with store.transaction(e.store):
            send_all()
    else:
        send_all()


def cycle(name: str, n: int, max_messages: int) -> Callable[[], float]:
    """A timed run: ``n`` messages consumed by one idempotent worker; messages per second."""
    def run() -> float:
        with tempfile.TemporaryDirectory() as tmp, \
                beyond.open_engine(name, clock=SystemClock(), directory=Path(tmp)) as e:
            fill(e, n)
            w = Worker(store=e.store, broker=e.broker, clock=e.clock, mode="idempotent",
                       max_messages=max_messages, visibility_timeout=30.0)
            t0 = time.perf_counter()
            w.run_until_idle()  # as a user runs it: steps until the queue is empty
            elapsed = time.perf_counter() - t0
            if w.stats.applied != n or w.stats.acked != n:
                raise RuntimeError(f"{name}: {w.stats.applied} applied, {w.stats.acked} acked"
                                   f" of {n}")
            return n / elapsed
    return run


# -- the same cycle, written by hand ----------------------------------------------------------
# What a user would write for the idempotent consumer with the engine's own client library:
# claim, one store transaction (the inbox row, then the projection if the row is new), ACK.
_INBOX = ("INSERT INTO inbox_processed (consumer, event_id, processed_at) VALUES (?, ?, ?)"
          " ON CONFLICT DO NOTHING")
_PROJECT = ("INSERT INTO inventory_projection (item_id, reserved_qty) VALUES (?, ?)"
            " ON CONFLICT (item_id) DO UPDATE"
            " SET reserved_qty = inventory_projection.reserved_qty + excluded.reserved_qty")
_CLAIM = ("UPDATE queue_messages SET visible_at = ?, lease_until = ?, receipt = ?,"
          " delivery_count = delivery_count + 1"
          " WHERE seq IN (SELECT seq FROM queue_messages WHERE visible_at <= ?"
          " ORDER BY visible_at, seq LIMIT ?{lock}) RETURNING seq, event_id, payload, receipt")


_INBOX_MANY = ("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
               " SELECT ?, value, ? FROM json_each(?) WHERE true ON CONFLICT DO NOTHING"
               " RETURNING event_id")


def _totals(batch: list[tuple[str, dict[str, Any]]], new: set[str]) -> list[tuple[str, int]]:
    """The projection's increments for the events the inbox took: one row per item."""
    totals: dict[str, int] = {}
    for event_id, payload in batch:
        if event_id in new:
            totals[payload["itemId"]] = totals.get(payload["itemId"], 0) + payload["qty"]
    return list(totals.items())


def _apply_sqlite(conn: Any, batch: list[tuple[str, dict[str, Any]]]) -> None:
    """One store transaction on a sqlite3 connection: the inbox rows (one statement for a
    batch), then the projection for the events that were new (one UPSERT per item)."""
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    if len(batch) == 1:
        [(event_id, payload)] = batch
        if conn.execute(_INBOX, (CONSUMER, event_id, now)).rowcount:
            conn.execute(_PROJECT, (payload["itemId"], payload["qty"]))
    else:
        new = {r[0] for r in conn.execute(_INBOX_MANY, (CONSUMER, now,
                                                        json.dumps([e for e, _ in batch])))}
        conn.executemany(_PROJECT, _totals(batch, new))
    conn.execute("COMMIT")


def _store_beside(e: beyond.Engine) -> Any:
    """A second connection to the SQLite file the engine's store is, with the store's
    settings (WAL, ``synchronous=NORMAL``)."""
    conn = sqlite3.connect(e.store.execute("PRAGMA database_list").fetchone()[2],
                           isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _hand_sqlite(e: beyond.Engine, n: int, k: int) -> None:
    conn, token, got = _store_beside(e), uuid.uuid4().hex, 0
    while got < n:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(_CLAIM.format(lock=""), (now + 30, now + 30, token, now, k)).fetchall()
        conn.execute("COMMIT")
        _apply_sqlite(conn, [(r[1], json.loads(r[2])) for r in rows])
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("DELETE FROM queue_messages WHERE seq = ? AND receipt = ?",
                         [(r[0], r[3]) for r in rows])
        conn.execute("COMMIT")
        got += len(rows)
    conn.close()


_PG_INBOX_MANY = ("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                  " SELECT %s, unnest(%s::text[]), %s ON CONFLICT DO NOTHING RETURNING event_id")


def _hand_postgres(e: beyond.Engine, n: int, k: int) -> None:
    import psycopg

    claim = _CLAIM.format(lock=" FOR UPDATE SKIP LOCKED").replace("?", "%s")
    inbox, project = _INBOX.replace("?", "%s"), _PROJECT.replace("?", "%s")
    token, got = uuid.uuid4().hex, 0
    with psycopg.connect(e.store.url, autocommit=True) as conn:
        while got < n:
            now = time.time()
            rows = conn.execute(claim, (now + 30, now + 30, token, now, k)).fetchall()
            batch = [(r[1], json.loads(r[2])) for r in rows]
            with conn.transaction():
                if len(batch) == 1:
                    [(event_id, p)] = batch
                    if conn.execute(inbox, (CONSUMER, event_id, now)).rowcount:
                        conn.execute(project, (p["itemId"], p["qty"]))
                elif batch:
                    new = {r[0] for r in conn.execute(_PG_INBOX_MANY, (
                        CONSUMER, [e for e, _ in batch], now))}
                    with conn.cursor() as cur:
                        cur.executemany(project, _totals(batch, new))
            delete = "DELETE FROM queue_messages WHERE seq = %s AND receipt = %s"
            if len(rows) == 1:  # one statement (executemany pipelines: three round trips)
                conn.execute(delete, (rows[0][0], rows[0][3]))
            else:
                with conn.cursor() as cur:
                    cur.executemany(delete, [(r[0], r[3]) for r in rows])
            got += len(rows)


def _hand_rabbitmq(e: beyond.Engine, n: int, k: int) -> None:
    import pika

    from deliverylab.brokers.rabbitmq import EVENT_ID

    conn, got = _store_beside(e), 0
    amqp = pika.BlockingConnection(pika.URLParameters(beyond.registry.server_url("rabbitmq")))
    channel = amqp.channel()
    while got < n:
        batch, last = [], None
        for _ in range(k):  # AMQP has no batch get: one basic.get per message
            method, props, body = channel.basic_get(e.broker.queue)
            if method is None:
                break
            batch.append((props.headers[EVENT_ID], json.loads(body)))
            last = method.delivery_tag
        if last is None:
            continue
        _apply_sqlite(conn, batch)
        channel.basic_ack(last, multiple=True)  # one ACK for the whole batch
        got += len(batch)
    amqp.close()
    conn.close()


def _hand_jetstream(e: beyond.Engine, n: int, k: int) -> None:
    import asyncio

    import nats

    from deliverylab.brokers.jetstream import CONSUMER as DURABLE
    from deliverylab.brokers.jetstream import EVENT_ID

    async def consume() -> None:
        conn, got = _store_beside(e), 0
        nc = await nats.connect(beyond.registry.server_url("jetstream"))
        sub = await nc.jetstream().pull_subscribe(e.broker.subject, durable=DURABLE,
                                                  stream=e.broker.stream)
        while got < n:
            msgs = await sub.fetch(k, timeout=5)
            _apply_sqlite(conn, [(m.headers[EVENT_ID], json.loads(m.data)) for m in msgs])
            # Confirmed ACKs, as deliverylab's default, all in flight at once (as its broker
            # sends a batch's): the server has each ACK.
            await asyncio.gather(*(m.ack_sync() for m in msgs))
            got += len(msgs)
        await nc.close()
        conn.close()

    asyncio.run(consume())


def _hand_redis(e: beyond.Engine, n: int, k: int) -> None:
    import redis

    from deliverylab.brokers.redis import GROUP

    conn, got = _store_beside(e), 0
    r = redis.Redis.from_url(beyond.registry.server_url("redis"), decode_responses=True)
    stream = e.broker.stream
    while got < n:
        [(_, entries)] = r.xreadgroup(GROUP, "by-hand", {stream: ">"}, count=k) or [(0, [])]
        if not entries:
            continue
        _apply_sqlite(conn, [(f["e"], json.loads(f["p"])) for _, f in entries])
        ids = [sid for sid, _ in entries]
        pipe = r.pipeline(transaction=False)
        pipe.xack(stream, GROUP, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()
        got += len(entries)
    r.close()
    conn.close()


BY_HAND: dict[str, Callable[[beyond.Engine, int, int], None]] = {
    "sqlite": _hand_sqlite, "postgresql": _hand_postgres, "rabbitmq": _hand_rabbitmq,
    "jetstream": _hand_jetstream, "redis": _hand_redis}


def by_hand(name: str, n: int, max_messages: int) -> Callable[[], float]:
    """A timed run of the hand-written cycle on the same engine and store; messages per
    second. Checked after the clock stops: every message applied once."""
    def run() -> float:
        with tempfile.TemporaryDirectory() as tmp, \
                beyond.open_engine(name, clock=SystemClock(), directory=Path(tmp)) as e:
            fill(e, n)
            t0 = time.perf_counter()
            BY_HAND[name](e, n, max_messages)
            elapsed = time.perf_counter() - t0
            applied = e.store.execute("SELECT count(*), coalesce(sum(reserved_qty), 0)"
                                      " FROM inventory_projection").fetchone()
            inbox = e.store.execute("SELECT count(*) FROM inbox_processed").fetchone()[0]
            if applied[1] != n or inbox != n:
                raise RuntimeError(f"{name} by hand: {applied[1]} applied, {inbox} in the"
                                   f" inbox, of {n}")
            return n / elapsed
    return run


def redelivery(name: str) -> Callable[[], float]:
    """A timed run: seconds from a lost ACK to the redelivery."""
    def run() -> float:
        with beyond.open_engine(name, clock=SystemClock()) as e:
            lost = beyond.lost_ack(e)
            if lost.redelivered_count is None:
                raise RuntimeError(f"{name}: the message never came back")
            return lost.seconds
    return run


NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "rabbitmq": "RabbitMQ",
         "jetstream": "JetStream", "redis": "Redis"}


def shown(label: str) -> str:
    """``label`` with its engine's name as the tables write it (``sqlite: …``: ``SQLite: …``)."""
    name, sep, rest = label.partition(":")
    return NAMES.get(name, name) + sep + rest


def available(name: str) -> bool:
    """Whether the engine opens here; says why not on stdout."""
    try:
        with beyond.open_engine(name, clock=SystemClock()):
            return True
    except (beyond.EngineUnavailable, ImportError) as exc:
        print(f"{name} left out: {exc}")
        return False


def measure(repeat: int, plan: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Every measurement once per round, round after round; every other round in the
    reverse order, so neither of two measurements side by side always runs first."""
    values: dict[str, list[float]] = {label: [] for label in plan}
    for i in range(repeat):
        for label, run in (reversed(plan.items()) if i % 2 else plan.items()):
            values[label].append(run())
    return values


def cluster_pauses(repetitions: int) -> list[str]:
    """The publish pause after a stream leader's SIGKILL on a three-node JetStream cluster
    (``cluster_run.publish_pauses``: a fresh R3 stream each time, confirmed publishes at 200 a
    second, the leader killed after a quarter of them): one row."""
    from deliverylab.book.cluster_run import publish_pauses
    from deliverylab.clusters.nats_cluster import free_base_port

    with tempfile.TemporaryDirectory(prefix="dl-bench-cluster-") as tmp:
        pauses = [k.pause for k in publish_pauses(tmp, repetitions=repetitions,
                                                  base_port=free_base_port())]
    return [f"| JetStream, 3 nodes: publish pause after the stream leader's SIGKILL |"
            f" {statistics.median(pauses):.2f} s | {min(pauses):.2f} s | {max(pauses):.2f} s |"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default=",".join(beyond.ENGINES),
                        help="comma-separated, from " + ", ".join(beyond.ENGINES))
    parser.add_argument("--cluster", action="store_true",
                        help="also kill the stream leader of a three-node JetStream cluster,"
                             " --repeat times")
    args = parser.parse_args(argv)
    names = [beyond.check_engine(x.strip()) for x in args.engines.split(",") if x.strip()]
    names = [n for n in names if available(n)]
    if "sqlite" not in names:
        parser.error("the sqlite engine is the baseline: keep it in --engines")
    n, r = args.messages, args.repeat
    print(f"deliverylab broker benchmark: {n:,} messages per run, {r} interleaved rounds,"
          f" ratios of medians against the {shown(BASELINE)}\n", flush=True)

    throughput: dict[str, Callable[[], float]] = {}
    for name in names:
        for k in (1, BATCH):
            throughput[f"{name}: idempotent cycle, max_messages={k}"] = cycle(name, n, k)
            throughput[f"{name}: by hand, {k} per claim"] = by_hand(name, n, k)
    latency = {f"{name}: redelivery after a lost ACK (lease {beyond.LEASE_S:g} s)":
               redelivery(name) for name in names}
    rates = measure(r, throughput)
    delays = measure(r, latency)

    med = {label: statistics.median(v) for label, v in rates.items()}
    print("| measurement | median msg/s | best msg/s | ratio of medians |")
    print("|---|---:|---:|---|")
    for label, values in rates.items():
        print(f"| {shown(label)} | {med[label]:,.0f} | {max(values):,.0f} |"
              f" {med[label] / med[BASELINE]:.2f}x |")
    print()
    # deliverylab ÷ by hand: each round's two runs are back to back, so the machine's load of
    # the moment falls on both; the median of the rounds' ratios, and their range.
    print("| engine | deliverylab ÷ by hand, one at a time | deliverylab ÷ by hand, batches"
          f" of {BATCH} |")
    print("|---|---:|---:|")
    for name in names:
        cells = []
        for k in (1, BATCH):
            ratios = [a / b for a, b in zip(rates[f"{name}: idempotent cycle, max_messages={k}"],
                                            rates[f"{name}: by hand, {k} per claim"],
                                            strict=True)]
            cells.append(f"{statistics.median(ratios):.2f}x"
                         f" ({min(ratios):.2f} to {max(ratios):.2f})")
        print(f"| {shown(name)} | {cells[0]} | {cells[1]} |")
    print()
    print("| measurement | median | best | worst |")
    print("|---|---:|---:|---:|")
    for label, values in delays.items():
        print(f"| {shown(label)} | {statistics.median(values):.3f} s | {min(values):.3f} s |"
              f" {max(values):.3f} s |")
    if args.cluster:
        print("\n".join(cluster_pauses(r)))


if __name__ == "__main__":
    main()
