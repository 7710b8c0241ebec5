"""How long publishing stops when a replicated queue loses its leader, on a three-node cluster.

    python benchmarks/bench_cluster.py [--repeat 5] [--rate 200] [--base-port N]
                                       [--rabbitmq] [--dir PATH]

NATS JetStream: one three-node cluster (``deliverylab.brokers.nats_cluster``) on 127.0.0.1.
Each repetition creates a stream on three replicas, and the project's outbox relay publishes
to it through the project's JetStream broker at ``--rate`` events a second, every publish
confirmed by the leader; after a quarter of the events the stream's leader gets SIGKILL. The
*pause* is the longest gap between two confirmations from the last one before the kill until
the new leader has confirmed fifty more (``deliverylab.book.cluster_run.publish_pauses``). The
baseline, measured in the same repetition, is the median gap between confirmations before the
kill. The killed node is restarted before the next repetition. The table gives the median, the
shortest and the longest pause, and the servers' resident memory.

RabbitMQ (``--rabbitmq``, needs ``rabbitmq-server`` and root or the ``rabbitmq`` user's rights
to run it): three more nodes beside any running one, each with its own node name, ports,
data directory and no plugins, joined into one cluster; a quorum queue on the three; a pika
publisher with publisher confirms, connected to a node that does not lead the queue, and the
queue's leader SIGKILLed in the same way. Reported: the time to start and to join the three
nodes, their memory, and the pauses. The nodes are stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
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
from deliverylab.brokers.nats_cluster import NatsCluster, free_base_port


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
RABBIT = "/usr/lib/rabbitmq/bin"


class RabbitNodes:
    """Three RabbitMQ nodes ``dlbenchN@localhost`` on AMQP ports ``base + N`` with their own
    data, logs and Erlang cookie under ``where``."""

    def __init__(self, where: Path, base: int) -> None:
        self.where, self.base = where, base
        self.names = [f"dlbench{i}@localhost" for i in (1, 2, 3)]
        self.home = where / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(os.urandom(16).hex())
        cookie.chmod(0o400)
        (where / "plugins").write_text("[].\n")
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self, i: int) -> dict[str, str]:
        node = self.where / f"n{i}"
        return {**os.environ, "HOME": str(self.home),
                "RABBITMQ_NODENAME": self.names[i], "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.base + i), "RABBITMQ_DIST_PORT": str(self.base + 100 + i),
                "RABBITMQ_MNESIA_BASE": str(node / "mnesia"), "RABBITMQ_LOG_BASE": str(node / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.where / "plugins"),
                "RABBITMQ_CONFIG_FILE": str(node / "rabbitmq"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(node / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(node / "env"),
                "RABBITMQ_PID_FILE": str(node / "pid")}

    def ctl(self, i: int, *args: str) -> str:
        done = subprocess.run([f"{RABBIT}/rabbitmqctl", "-n", self.names[i], *args],
                              env=self.env(i), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.names[i]}: {done.stderr}")
        return done.stdout

    def start(self) -> None:
        for i in range(3):
            (self.where / f"n{i}").mkdir(exist_ok=True)
            with open(self.where / f"n{i}.out", "wb") as out:
                self.procs.append(subprocess.Popen(
                    [f"{RABBIT}/rabbitmq-server"], env=self.env(i), stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True))
        for i in range(3):
            self.await_startup(i)

    def await_startup(self, i: int, timeout: float = 120.0) -> None:
        """Until the node has booted (rabbitmqctl cannot wait for a node that epmd does not
        list yet, so ask again until it does)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctl(i, "await_startup", "--timeout", "60")
                return
            except RuntimeError:
                if time.monotonic() > deadline or self.procs[i].poll() is not None:
                    raise
                time.sleep(1)

    def join(self) -> None:
        for i in (1, 2):
            self.ctl(i, "stop_app")
            self.ctl(i, "join_cluster", self.names[0])
            self.ctl(i, "start_app")

    def beam_pid(self, i: int) -> int:
        return int((self.where / f"n{i}" / "pid").read_text().strip())

    def rss_kib(self, i: int) -> int:
        for line in Path(f"/proc/{self.beam_pid(i)}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def leader(self, queue: str, via: int) -> int:
        out = self.ctl(via, "list_queues", "name", "leader", "--formatter", "json")
        for q in json.loads(out):
            if q["name"] == queue:
                return self.names.index(q["leader"])
        raise RuntimeError(f"no queue {queue}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def rabbit_pause(nodes: RabbitNodes, rep: int, rate: float) -> tuple[float, float, int]:
    """One quorum queue, a confirming publisher on a non-leader, the leader SIGKILLed:
    (pause, usual gap, killed node). The killed node is started again and rejoins."""
    import pika

    queue = f"dl-bench-{rep}"
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", nodes.base))
    conn.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    leader = nodes.leader(queue, via=0)
    via = next(i for i in range(3) if i != leader)
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", nodes.base + via))
    channel = conn.channel()
    channel.confirm_delivery()
    acks: list[float] = []
    killed: list[float] = []

    def kill_later() -> None:
        time.sleep(2.0)
        os.kill(nodes.beam_pid(leader), signal.SIGKILL)
        killed.append(time.time())

    threading.Thread(target=kill_later, daemon=True).start()
    end = time.time() + 12
    while time.time() < end:
        channel.basic_publish("", queue, b"x", pika.BasicProperties(delivery_mode=2))
        acks.append(time.time())  # basic_publish returns once the broker confirmed
        time.sleep(1 / rate)
    channel.queue_delete(queue)
    conn.close()
    at = killed[0]
    before = [t for t in acks if t <= at]
    usual = statistics.median(b - a for a, b in itertools.pairwise(before))
    pause = longest_gap(acks, at, end)
    # Start the killed node again (its process group is gone with the beam) and wait for it.
    proc = nodes.procs[leader]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(nodes.where / f"n{leader}.out", "ab") as out:
        nodes.procs[leader] = subprocess.Popen(
            [f"{RABBIT}/rabbitmq-server"], env=nodes.env(leader), stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    nodes.await_startup(leader)
    return pause, usual, leader


def rabbitmq(args: argparse.Namespace, where: Path) -> tuple[str, str]:
    nodes = RabbitNodes(where / "rabbitmq", args.rabbit_base_port)
    try:
        started = time.monotonic()
        nodes.start()
        up = time.monotonic() - started
        started = time.monotonic()
        nodes.join()
        joined = time.monotonic() - started
        kib = [nodes.rss_kib(i) for i in range(3)]
        results = []
        for rep in range(args.repeat):
            pause, usual, killed = rabbit_pause(nodes, rep, args.rate)
            print(f"  rabbitmq: SIGKILL {nodes.names[killed]}: publishing paused {pause:.2f}s",
                  flush=True)
            results.append((pause, usual))
    finally:
        nodes.stop()
    row = summary("RabbitMQ quorum queue", [p for p, _ in results], [u for _, u in results])
    note = (f"RabbitMQ: 3 nodes started in {up:.1f}s, joined in {joined:.1f}s; resident"
            f" memory per node {', '.join(f'{v / 1024:.0f}' for v in kib)} MiB")
    return row, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rate", type=float, default=200.0, help="publishes per second")
    parser.add_argument("--base-port", type=int, default=None,
                        help="the NATS cluster's base port (default: free ports)")
    parser.add_argument("--rabbitmq", action="store_true",
                        help="also measure a three-node RabbitMQ cluster")
    parser.add_argument("--rabbit-base-port", type=int, default=25700)
    parser.add_argument("--dir", default=None, help="where the clusters' files go (temporary)")
    args = parser.parse_args()
    if args.base_port is None:
        args.base_port = free_base_port()
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
