"""Benchmark the same idempotent consumer on every engine, side by side, in one run.

    python benchmarks/bench_brokers.py [--messages 2000] [--repeat 3] [--engines …] [--cluster]

Per engine (``deliverylab.book.beyond``: SQLite, PostgreSQL, RabbitMQ, JetStream, each on a
queue, stream or schema of its own made for each run and removed after it; the store is the
broker's own database on SQLite (a file in WAL mode, ``synchronous=NORMAL``) and PostgreSQL
(the server's default settings), and a SQLite file beside RabbitMQ and JetStream), on the
wall clock, no faults:

* the idempotent consume cycle's throughput (receive, inbox row and projection in one
  transaction, ACK), one message per receive and, where the engine hands out batches, 100;
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
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

try:
    import deliverylab  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deliverylab.book import beyond
from deliverylab.engine import store
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.worker import Worker

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
            got = 0
            deadline = t0 + 300
            while got < n and time.perf_counter() < deadline:
                got += w.step()
            elapsed = time.perf_counter() - t0
            if w.stats.applied != n or w.stats.acked != n:
                raise RuntimeError(f"{name}: {w.stats.applied} applied, {w.stats.acked} acked"
                                   f" of {n}")
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


def available(name: str) -> bool:
    """Whether the engine opens here; says why not on stdout."""
    try:
        with beyond.open_engine(name, clock=SystemClock()):
            return True
    except (beyond.EngineUnavailable, ImportError) as exc:
        print(f"{name} left out: {exc}")
        return False


def measure(repeat: int, plan: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Every measurement once per round, round after round."""
    values: dict[str, list[float]] = {label: [] for label in plan}
    for _ in range(repeat):
        for label, run in plan.items():
            values[label].append(run())
    return values


def cluster_pauses(repetitions: int) -> list[str]:
    """The publish pause after a stream leader's SIGKILL on a three-node JetStream cluster
    (``cluster_run.publish_pauses``: a fresh R3 stream each time, confirmed publishes at 200 a
    second, the leader killed after a quarter of them): one row."""
    from deliverylab.book.cluster_run import publish_pauses
    from deliverylab.brokers.nats_cluster import free_base_port

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
          f" ratios of medians against the {BASELINE}\n", flush=True)

    throughput: dict[str, Callable[[], float]] = {}
    for name in names:
        throughput[f"{name}: idempotent cycle, max_messages=1"] = cycle(name, n, 1)
        throughput[f"{name}: idempotent cycle, max_messages={BATCH}"] = cycle(name, n, BATCH)
    latency = {f"{name}: redelivery after a lost ACK (lease {beyond.LEASE_S:g} s)":
               redelivery(name) for name in names}
    rates = measure(r, throughput)
    delays = measure(r, latency)

    med = {label: statistics.median(v) for label, v in rates.items()}
    print("| measurement | median msg/s | best msg/s | ratio of medians |")
    print("|---|---:|---:|---|")
    for label, values in rates.items():
        print(f"| {label} | {med[label]:,.0f} | {max(values):,.0f} |"
              f" {med[label] / med[BASELINE]:.2f}x |")
    print()
    print("| measurement | median | best | worst |")
    print("|---|---:|---:|---:|")
    for label, values in delays.items():
        print(f"| {label} | {statistics.median(values):.3f} s | {min(values):.3f} s |"
              f" {max(values):.3f} s |")
    if args.cluster:
        print("\n".join(cluster_pauses(r)))


if __name__ == "__main__":
    main()
