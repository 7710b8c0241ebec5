"""How long publishing stops when a replicated queue loses its leader, on a three-node cluster.

    python benchmarks/bench_cluster.py [--repeat 5] [--rate 200] [--base-port N]
                                       [--rabbitmq] [--rabbit-base-port N] [--dir PATH]

NATS JetStream: one three-node cluster (``deliverylab.clusters.nats_cluster``) on 127.0.0.1.
Each repetition creates a stream on three replicas, and the project's outbox relay publishes
to it through the project's JetStream broker at ``--rate`` events a second, every publish
confirmed by the leader; after a quarter of the events the stream's leader gets SIGKILL. The
*pause* is the longest gap between two confirmations from the last one before the kill until
the new leader has confirmed fifty more (``deliverylab.book.cluster_run.publish_pauses``). The
baseline, measured in the same repetition, is the median gap between confirmations before the
kill. The killed node is restarted before the next repetition. The table gives the median, the
shortest and the longest pause, and the servers' resident memory.

RabbitMQ (``--rabbitmq``, needs ``rabbitmq-server`` and the rights to run it): three more
nodes beside any running one (``deliverylab.clusters.rabbitmq_cluster``), joined into one
cluster; a quorum queue on the three; a pika publisher with publisher confirms, connected to a
node that does not lead the queue, and the queue's leader SIGKILLed in the same way. Reported:
the time to start and join the three nodes, their memory, and the pauses. The nodes are
stopped at the end.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    import deliverylab  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deliverylab.book.cluster_run import longest_gap, publish_pauses
from deliverylab.clusters.nats_cluster import NatsCluster, free_base_port
from deliverylab.clusters.rabbitmq_cluster import RabbitCluster
from deliverylab.clusters.rabbitmq_cluster import free_base_port as rabbit_base_port


def summary(name: str, pauses: list[float], baselines: list[float]) -> str:
    return (f"{name:<22} {len(pauses):>4} {statistics.median(pauses):>9.2f}"
            f" {min(pauses):>8.2f} {max(pauses):>8.2f}"
            f" {statistics.median(baselines) * 1000:>12.1f}")


def nats(args: argparse.Namespace, where: Path) -> tuple[str, str]:
    """The JetStream rows: the pauses, and the cluster's start time and memory."""
    memory = NatsCluster(where / "memory", base_port=args.base_port)
    started = time.monotonic()
    try:
        memory.start()
        ready = time.monotonic() - started
        kib = memory.memory_kib()
    finally:
        memory.stop()
    kills = publish_pauses(where / "pauses", repetitions=args.repeat, rate=args.rate,
                           base_port=args.base_port,
                           echo=lambda line: print("  " + line, flush=True))
    row = summary("NATS JetStream R3", [k.pause for k in kills], [k.usual_gap for k in kills])
    note = (f"NATS: 3 nodes ready (meta leader) in {ready:.1f}s; resident memory per node"
            f" {', '.join(f'{v / 1024:.0f}' for v in kib.values())} MiB")
    return row, note


# -- RabbitMQ: three nodes of its own, started here and stopped at the end -------------------
def rabbit_pause(cluster: RabbitCluster, rep: int, rate: float) -> tuple[float, float, int]:
    """One quorum queue, a confirming publisher on a node that does not lead it, the leader
    SIGKILLed two seconds in: (pause, usual gap, killed node). The node is started again."""
    import pika

    queue = f"dl-bench-{rep}"
    conn = pika.BlockingConnection(pika.URLParameters(cluster.url(0)))
    conn.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    leader = cluster.queue_leader(queue)
    assert leader is not None, f"quorum queue {queue} has no leader"
    via = next(i for i in range(3) if i != leader)
    conn = pika.BlockingConnection(pika.URLParameters(cluster.url(via)))
    channel = conn.channel()
    channel.confirm_delivery()
    acks: list[float] = []
    killed: list[float] = []

    def kill_later() -> None:
        time.sleep(2.0)
        cluster.kill(leader)
        killed.append(time.time())

    killer = threading.Thread(target=kill_later, daemon=True)
    killer.start()
    end = time.time() + 12
    while time.time() < end:
        channel.basic_publish("", queue, b"x", pika.BasicProperties(delivery_mode=2))
        acks.append(time.time())  # with confirms on, basic_publish returns once confirmed
        time.sleep(1 / rate)
    killer.join()
    channel.queue_delete(queue)
    conn.close()
    at = killed[0]
    before = [t for t in acks if t <= at]
    usual = statistics.median(b - a for a, b in itertools.pairwise(before))
    cluster.restart(leader)
    return longest_gap(acks, at, end), usual, leader


def rabbitmq(args: argparse.Namespace, where: Path) -> tuple[str, str]:
    cluster = RabbitCluster(where / "rabbitmq", base_port=args.rabbit_base_port)
    try:
        started = time.monotonic()
        cluster.start()
        up = time.monotonic() - started
        kib = cluster.memory_kib()
        results = []
        for rep in range(args.repeat):
            pause, usual, killed = rabbit_pause(cluster, rep, args.rate)
            print(f"  rabbitmq: SIGKILL {cluster.names[killed]}: publishing paused"
                  f" {pause:.2f}s", flush=True)
            results.append((pause, usual))
    finally:
        cluster.stop()
    row = summary("RabbitMQ quorum queue", [p for p, _ in results], [u for _, u in results])
    note = (f"RabbitMQ: 3 nodes started and joined in {up:.1f}s; resident memory per node"
            f" {', '.join(f'{v / 1024:.0f}' for v in kib)} MiB")
    return row, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rate", type=float, default=200.0, help="publishes per second")
    parser.add_argument("--base-port", type=int, default=None,
                        help="the NATS cluster's base port (default: free ports)")
    parser.add_argument("--rabbitmq", action="store_true",
                        help="also measure a three-node RabbitMQ cluster")
    parser.add_argument("--rabbit-base-port", type=int, default=None,
                        help="the RabbitMQ nodes' base port (default: free ports)")
    parser.add_argument("--dir", default=None, help="where the clusters' files go (temporary)")
    args = parser.parse_args()
    if args.base_port is None:
        args.base_port = free_base_port()
    if args.rabbit_base_port is None:
        args.rabbit_base_port = rabbit_base_port()
    where = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        rows, notes = [], []
        for measure in [nats] + ([rabbitmq] if args.rabbitmq else []):
            row, note = measure(args, where)
            rows.append(row)
            notes.append(note)
    finally:
        if not args.dir:
            shutil.rmtree(where, ignore_errors=True)
    print()
    print(f"publish pause after a SIGKILL of the leader, {args.rate:g} publishes/s,"
          f" each confirmed")
    print(f"{'queue':<22} {'runs':>4} {'median s':>9} {'min s':>8} {'max s':>8}"
          f" {'usual gap ms':>12}")
    print("\n".join(rows))
    print("\n".join(notes))


if __name__ == "__main__":
    main()
