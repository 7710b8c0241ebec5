"""Orders through a three-node JetStream cluster while its stream leader is SIGKILLed.

The run, as real processes on this machine:

1. a three-node cluster (:mod:`deliverylab.clusters.nats_cluster`) and a stream replicated on
   all three;
2. ``orders`` orders placed in a SQLite store with the transactional outbox: each order and its
   ``OrderPlaced`` event commit together in the store's ``outbox`` table;
3. the engine's outbox relay (:class:`deliverylab.engine.relay.Relay`, stepped one row at a
   time by a thread here, at a steady rate) publishes them to the stream, each publish
   confirmed by the stream's leader before the row is marked sent; a publish the broker could
   not confirm is published again with the same ``dedup_id`` (the event id), so a retry whose
   first attempt was stored after all is dropped by the stream's duplicate window;
4. three ``deliverylab worker --broker nats://… --store lab.db`` processes with lost ACKs;
5. mid-run, the stream's leader gets SIGKILL; once a new leader serves, the killed node is
   restarted and catches up; later, once the workers receive again, the leader of the moment
   (another node) gets SIGKILL too. With three replicas a stream needs two alive, so the first
   node is back before the second goes down;
6. when every event has been published and the checker has nothing pending, the workers stop
   and the checker gives its verdict.

The *publish pause* of a kill is the longest gap between two confirmed publishes from the last
one before the kill until the new leader has confirmed for a while: how long producers waited
while the replicas noticed the death and elected a leader.

Run it with ``mode="idempotent"`` (every order applied exactly once) and with
``mode="at-least-once"`` (the lost ACKs apply orders twice: the cluster's replication does
nothing for a consumer without an inbox).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import deliverylab

from ..brokers.registry import open_broker
from ..clusters.nats_cluster import DEFAULT_BASE_PORT, NatsCluster, check_base_port
from ..engine.check import CheckResult, check
from ..engine.clock import SystemClock
from ..engine.errors import BrokerUnavailable, InvalidInput, check_int, check_number
from ..engine.ids import Ids
from ..engine.orders import place_order
from ..engine.relay import Relay
from ..engine.store import Store, connect, init_db, transaction
from ..engine.worker import Mode
from .lab import ITEMS

if TYPE_CHECKING:
    import pandas as pd

    from ..brokers.base import Broker

WORKERS = 3
# Every client of the stream shares its one durable consumer, whose MaxDeliver is set by the
# first to open it: the relay, the checker and the workers must all ask for the same.
MAX_RECEIVES = 100


@dataclasses.dataclass(frozen=True, slots=True)
class Kill:
    """One SIGKILL of a stream leader: which node, when (seconds into the run), who led
    next, how long publishing paused around it (``pause``), and how long the workers received
    nothing (``delivery_pause``: the consumer elects its own leader; a worker whose
    request outlasts its broker's timeout waits and tries again)."""

    node: str
    at: float
    new_leader: str
    pause: float
    usual_gap: float  # the median gap between confirmations before the kill: the baseline
    delivery_pause: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterRun:
    """What a run did, counted from the store's trace and the checker."""

    mode: str
    orders: int
    applied: int  # 'applied' rows: effects that committed
    double_applied: int  # orders whose effect committed more than once
    extra_applications: int
    duplicates_skipped: int  # deliveries the inbox recognised
    deliveries: int
    redeliveries: int  # deliveries with a count above 1
    publish_retries: int  # relay steps the broker cut short, published again (broker_waits)
    worker_restarts: int  # worker processes that exited and were started again (none should)
    kills: tuple[Kill, ...]
    check: CheckResult
    # (seconds into the run, outcome) for every row of the store's delivery_log
    timeline: tuple[tuple[float, str], ...] = dataclasses.field(repr=False)

    @property
    def verdict(self) -> str:
        return self.check.verdict

    @property
    def leader_changed(self) -> bool:
        return all(k.new_leader != k.node for k in self.kills)

    def counts(self) -> dict[str, object]:
        """The counts and the verdict, never times. Which deliveries an election catches
        depends on timing, so redeliveries and duplicates (and an at-least-once verdict) vary
        from run to run; what holds every time is ``check.ok`` for the idempotent run and
        ``double_applied > 0`` for the at-least-once one."""
        return {"mode": self.mode, "orders": self.orders, "applied": self.applied,
                "double_applied": self.double_applied,
                "duplicates_skipped": self.duplicates_skipped,
                "redeliveries": self.redeliveries, "leader_kills": len(self.kills),
                "leader_changed": self.leader_changed, "verdict": self.verdict}

    def timeline_frame(self, bin_seconds: float = 1.0) -> pd.DataFrame:
        """Deliveries per ``bin_seconds`` by outcome (received, applied, duplicate_skipped,
        ack_failed), for a plot with the kill times (``kills``) drawn over it."""
        import pandas as pd

        frame = pd.DataFrame(list(self.timeline), columns=["t", "outcome"])
        frame["t"] = (frame["t"] // bin_seconds) * bin_seconds
        return frame.pivot_table(index="t", columns="outcome", aggfunc="size", fill_value=0)


class PacedRelay(threading.Thread):
    """The engine's outbox relay in a thread: one row per :meth:`Relay.step
    <deliverylab.engine.relay.Relay.step>`, ``rate`` steps a second. A step that returns with
    its row is a publish the stream confirmed (and the row marked): its time goes to ``acks``,
    what the publish pause is measured on. A step the broker cut short (``BrokerUnavailable``)
    is waited out by the relay's own backoff, timed in ``retries``, and stepped again."""

    def __init__(self, store_path: Path, url: str, *, rate: float) -> None:
        super().__init__(name="relay", daemon=True)
        self.store_path, self.url = store_path, url
        self.rate = check_number("rate", rate, minimum=1, maximum=100_000)
        self.acks: list[float] = []
        self.retries: list[float] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._halt = threading.Event()

    def halt(self) -> None:
        self._halt.set()

    def run(self) -> None:
        clock = SystemClock()
        conn = connect(self.store_path)
        broker = None
        try:
            broker = open_broker(self.url, field="url", clock=clock, ids=Ids(),
                                 max_receives=MAX_RECEIVES, worker="relay")
            # Retries every 50 ms at first: the pause measured is the election's, not a wait.
            relay = Relay(conn, broker, clock=clock, backoff_base=0.05, backoff_cap=0.25)
            next_at = time.monotonic()
            while not self._halt.is_set():
                try:
                    if relay.step(1) == 0:
                        break
                except BrokerUnavailable as exc:
                    self.retries.append(time.time())
                    relay.wait_for_broker(exc)
                    continue
                self.acks.append(time.time())
                next_at = max(next_at + 1 / self.rate, time.monotonic() - 1)
                time.sleep(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # reported by the run, which waits on ``done``
            self.error = exc
        finally:
            if broker is not None:
                broker.close()
            conn.close()
            self.done.set()


def longest_gap(acks: list[float], since: float, until: float) -> float:
    """The longest wait between consecutive confirmations, counting from the last one at or
    before ``since`` up to the first one after ``until``."""
    before = [t for t in acks if t <= since]
    start = before[-1] if before else since
    times = [start] + [t for t in acks if start < t]
    gaps = [b - a for a, b in itertools.pairwise(times) if a <= until]
    return max(gaps, default=0.0)


def _env() -> dict[str, str]:
    """The workers import this very package (a checkout's ``src`` wins over an install)."""
    src = str(Path(deliverylab.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else "")}


class Workers:
    """``deliverylab worker`` processes, kept running as a service manager would
    (``Restart=on-failure``): one that exits is started again, and counted in ``restarts``.
    A worker waits out an election by itself (``BrokerUnavailable``), so none should exit:
    the count is there to show it, and a run's tests assert it stays 0.
    Every worker runs the same fault seed: the schedule is a function of (event, delivery),
    whichever worker gets the delivery."""

    def __init__(self, url: str, store_path: Path, logs: Path, *, mode: Mode, seed: int,
                 ack_fail: float, ack_wait: float, count: int = WORKERS) -> None:
        self.logs = logs
        self.commands = {
            f"w{i + 1}": [sys.executable, "-m", "deliverylab", "worker", "--broker", url,
                          "--store", str(store_path), "--mode", mode.value,
                          "--name", f"w{i + 1}", "--seed", str(seed),
                          "--ack-fail-rate", f"{ack_fail:g}",
                          "--visibility-timeout", f"{ack_wait:g}",
                          "--max-receives", str(MAX_RECEIVES), "--poll-interval", "0.05"]
            for i in range(count)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts = 0

    def _start(self, name: str) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                self.commands[name], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=_env(), start_new_session=True)

    def start(self) -> None:
        for name in self.commands:
            self._start(name)

    def keep_running(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                self.restarts += 1
                self._start(name)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (each stops after its current step), then SIGKILL after ``timeout``."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _counts(conn: Store) -> dict[str, int]:
    row = conn.execute(
        "SELECT sum(CASE WHEN outcome = 'applied' THEN 1 ELSE 0 END),"
        " sum(CASE WHEN outcome = 'duplicate_skipped' THEN 1 ELSE 0 END),"
        " sum(CASE WHEN outcome = 'received' THEN 1 ELSE 0 END),"
        " sum(CASE WHEN outcome = 'received' AND delivery_count > 1 THEN 1 ELSE 0 END)"
        " FROM delivery_log").fetchone()
    names = ["applied", "duplicates_skipped", "deliveries", "redeliveries"]
    return {name: value or 0 for name, value in zip(names, row, strict=True)}


def _received_since(conn: Store, at: float) -> bool:
    return conn.execute("SELECT EXISTS (SELECT 1 FROM delivery_log WHERE outcome = 'received'"
                        " AND at > ?)", (at,)).fetchone()[0] == 1


def _place_orders(conn: Store, orders: int, seed: int) -> None:
    """``orders`` orders, each with its event in the store's outbox, in one transaction;
    items and quantities from ``seed``."""
    rng = random.Random(seed)
    clock, ids = SystemClock(), Ids(seed)
    with transaction(conn):
        for _ in range(orders):
            place_order(None, item_id=rng.choice(ITEMS), qty=rng.randint(1, 3), store=conn,
                        clock=clock, ids=ids)


Wait = Callable[[str, Callable[[], bool]], None]


def _open_new_stream(url: str, worker: str, deadline: float) -> Broker:
    """The broker on a cluster this run just started, creating its three-replica stream. On a
    loaded machine the first stream of a fresh cluster can take longer than the broker's own
    timeout (the replicas elect the stream's leader); the URL is the run's own, so a failure
    here is that wait, tried again until the run's deadline."""
    while True:
        try:
            return open_broker(url, field="url", clock=SystemClock(), ids=Ids(),
                               max_receives=MAX_RECEIVES, worker=worker)
        except InvalidInput:
            if time.monotonic() + 1 > deadline:
                raise
            time.sleep(1)


def _waiter(relay: PacedRelay, deadline: float, timeout: float, where: Path,
            tick: Callable[[], None] = lambda: None) -> Callable[..., None]:
    """``wait(what, ready, poll=0.02)``: poll until ``ready()``, calling ``tick`` each time;
    raise the relay's error if it failed, TimeoutError past ``deadline``."""
    def wait(what: str, ready: Callable[[], bool], poll: float = 0.02) -> None:
        while not ready():
            if relay.error is not None:
                raise relay.error
            tick()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run took longer than {timeout:g}s, waiting for {what}"
                                   f" (logs in {where})")
            time.sleep(poll)
    return wait


def kill_stream_leader(cluster: NatsCluster, stream: str, relay: PacedRelay, wait: Wait, *,
                       after: int, t0: float, say: Callable[[str], None]) -> Kill:
    """Once the relay has ``after`` confirmed publishes, SIGKILL ``stream``'s leader; wait for
    another leader and for 50 more confirmations (or the relay's end); return the kill with
    the publish pause around it."""
    wait(f"{after} events relayed", lambda: len(relay.acks) >= after or relay.done.is_set())
    leader = cluster.wait_stream_leader(stream)
    cluster.kill(leader)
    at = time.time()
    say(f"t={at - t0:.1f}s SIGKILL {leader}, the leader of {stream}")
    new = cluster.wait_stream_leader(stream, other_than=leader)
    confirmed = len(relay.acks) + 50
    wait("publishes on the new leader",
         lambda: len(relay.acks) >= confirmed or relay.done.is_set())
    pause = longest_gap(relay.acks, at, time.time())
    say(f"t={time.time() - t0:.1f}s {new} leads; publishing paused {pause:.2f}s")
    before = [t for t in relay.acks if t <= at]
    usual = statistics.median(b - a for a, b in itertools.pairwise(before)) \
        if len(before) > 1 else 0.0
    return Kill(leader, at - t0, new, pause, usual)


def rejoin(cluster: NatsCluster, stream: str, name: str, wait: Wait) -> None:
    """Restart node ``name`` and wait until it is in ``stream``'s group again (it names the
    leader): with three replicas, no other node may die before that."""
    cluster.restart(name)
    wait(f"{name} back in the stream",
         lambda: cluster.stream_leaders(stream).get(name) is not None)


def _check_common(count: tuple[str, int], seed: int, rate: float, base_port: int,
                  timeout: float, directory: object) -> Path:
    """The arguments both runs take, checked; the directory as a Path."""
    check_int(count[0], count[1], minimum=1, maximum=100_000)
    check_int("seed", seed, minimum=0)
    check_number("rate", rate, minimum=1, maximum=10_000)
    check_base_port(base_port)
    check_number("timeout", timeout, minimum=1)
    if not isinstance(directory, str | Path) or not str(directory).strip():
        raise InvalidInput("directory", directory, "a directory path")
    return Path(directory)


def cluster_run(directory: str | Path, *, mode: Mode | str = Mode.IDEMPOTENT,
                orders: int = 2000, seed: int = 0, ack_fail: float = 0.2,
                rate: float = 100.0, ack_wait: float = 1.0,
                base_port: int = DEFAULT_BASE_PORT, second_kill: bool = True,
                timeout: float = 150.0, echo: Callable[[str], None] | None = None,
                ) -> ClusterRun:
    """The run described above, in ``directory`` (the cluster's files, ``lab.db`` and the
    workers' logs; it must not hold a ``lab.db`` yet).

    ``rate``: events relayed per second (the run lasts about ``orders / rate`` seconds plus
    the pauses). The first kill lands when a quarter of the events are out, the second when
    60% are and the workers receive again since the first (a worker that exited during the
    election is back).
    ``ack_wait``: seconds before JetStream redelivers an unacknowledged message. The cluster,
    the relay and the workers are stopped when the run ends, whatever happens; ``timeout``
    bounds the whole run."""
    mode = Mode.parse(mode)
    if mode is Mode.TRANSACTIONAL:
        raise InvalidInput("mode", mode.value, "a mode for an external broker (at-most-once,"
                                               " at-least-once or idempotent)")
    directory = _check_common(("orders", orders), seed, rate, base_port, timeout, directory)
    check_number("ack_fail", ack_fail, minimum=0, maximum=0.9)
    check_number("ack_wait", ack_wait, minimum=0.1, maximum=60)
    store_path = directory / "lab.db"
    if store_path.exists():
        raise InvalidInput("directory", str(directory), "a directory without a lab.db")
    say = echo or (lambda text: None)
    stream = f"DL_{mode.name}_{seed}"
    deadline = time.monotonic() + timeout
    directory.mkdir(parents=True, exist_ok=True)

    with contextlib.ExitStack() as cleanup:  # undone in reverse, each step even if one fails
        conn = init_db(store_path)
        cleanup.callback(conn.close)
        cluster = NatsCluster(directory / "cluster", base_port=base_port)
        cleanup.callback(cluster.stop)
        cluster.start()
        url = cluster.url(stream=stream, replicas=3, ack_wait=f"{ack_wait:g}")
        # Opening the broker creates the stream, on three replicas, before anyone publishes.
        checker = _open_new_stream(url, "checker", deadline)
        cleanup.callback(checker.close)
        say(f"stream {stream} on 3 replicas, leader {cluster.wait_stream_leader(stream)}")
        _place_orders(conn, orders, seed)
        t0 = time.time()
        workers = Workers(url, store_path, directory / "workers", mode=mode, seed=seed,
                          ack_fail=ack_fail, ack_wait=ack_wait)
        cleanup.callback(workers.stop)
        workers.start()
        relay = PacedRelay(store_path, url, rate=rate)
        cleanup.callback(relay.join, 15)
        cleanup.callback(relay.halt)
        relay.start()
        wait = _waiter(relay, deadline, timeout, directory, workers.keep_running)

        kills: list[Kill] = []
        for fraction in (0.25, 0.6) if second_kill else (0.25,):
            if kills:  # deliveries resumed since the last kill, before another node dies
                wait("deliveries after the last kill",
                     functools.partial(_received_since, conn, t0 + kills[-1].at))
            kills.append(kill_stream_leader(cluster, stream, relay, wait,
                                            after=int(fraction * orders), t0=t0, say=say))
            rejoin(cluster, stream, kills[-1].node, wait)
            say(f"t={time.time() - t0:.1f}s {kills[-1].node} restarted")
        wait("every event relayed", relay.done.is_set)
        if relay.error is not None:
            raise relay.error

        def settled() -> bool:
            result = check(conn, checker)
            return result.pending == 0 and result.correct + result.duplicated == orders

        wait("every order applied", settled, poll=0.5)
        workers.stop()
        result = check(conn, checker)
        counts = _counts(conn)
        timeline = tuple((at - t0, outcome) for at, outcome in conn.execute(
            "SELECT at, outcome FROM delivery_log ORDER BY seq"))
        received = sorted(t for t, outcome in timeline if outcome == "received")
        # The gap that spans the kill: counting on to the next kill would take that kill's
        # gap too (it starts before the next kill), and both kills would show the longer one.
        kills = [dataclasses.replace(k, delivery_pause=longest_gap(received, k.at, k.at))
                 for k in kills]
        say(f"t={time.time() - t0:.1f}s {result.verdict}")
        return ClusterRun(mode=mode.value, orders=orders, applied=counts["applied"],
                          double_applied=result.duplicated,
                          extra_applications=result.extra_applications,
                          duplicates_skipped=counts["duplicates_skipped"],
                          deliveries=counts["deliveries"], redeliveries=counts["redeliveries"],
                          publish_retries=len(relay.retries),
                          worker_restarts=workers.restarts, kills=tuple(kills),
                          check=result, timeline=timeline)


def publish_pauses(directory: str | Path, *, repetitions: int = 5, events: int = 1200,
                   rate: float = 200.0, base_port: int = DEFAULT_BASE_PORT,
                   timeout: float = 300.0, echo: Callable[[str], None] | None = None,
                   ) -> list[Kill]:
    """The publish pause alone, ``repetitions`` times on one cluster: each time a fresh R3
    stream, the relay publishing ``events`` events at ``rate`` (no workers), the stream's
    leader SIGKILLed after a quarter of them, then restarted before the next repetition."""
    directory = _check_common(("events", events), 0, rate, base_port, timeout, directory)
    check_int("repetitions", repetitions, minimum=1, maximum=100)
    say = echo or (lambda text: None)
    deadline = time.monotonic() + timeout
    directory.mkdir(parents=True, exist_ok=True)
    kills = []
    with contextlib.ExitStack() as cleanup:
        cluster = NatsCluster(directory / "cluster", base_port=base_port)
        cleanup.callback(cluster.stop)
        cluster.start()
        for rep in range(repetitions):
            stream = f"DL_PAUSE_{rep}"
            url = cluster.url(stream=stream, replicas=3)
            with contextlib.ExitStack() as this:
                keeper = _open_new_stream(url, "bench", deadline)
                this.callback(keeper.close)  # the streams go with the cluster's directory
                store_path = directory / f"pause-{rep}.db"
                conn = init_db(store_path)
                this.callback(conn.close)
                _place_orders(conn, events, rep)
                relay = PacedRelay(store_path, url, rate=rate)
                this.callback(relay.join, 15)
                this.callback(relay.halt)
                relay.start()
                wait = _waiter(relay, deadline, timeout, directory)
                kills.append(kill_stream_leader(cluster, stream, relay, wait, after=events // 4,
                                                t0=time.time(), say=say))
                rejoin(cluster, stream, kills[-1].node, wait)
    return kills


def main(argv: list[str] | None = None) -> int:
    """``python -m deliverylab.book.cluster_run DIR [--mode M] [--orders N] …``: one run,
    narrated, then its counts."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m deliverylab.book.cluster_run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where the cluster, lab.db and the logs go (new)")
    parser.add_argument("--mode", default=Mode.IDEMPOTENT.value,
                        choices=[m.value for m in Mode if m is not Mode.TRANSACTIONAL])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ack-fail-rate", type=float, default=0.2)
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    args = parser.parse_args(argv)
    try:
        run = cluster_run(args.directory, mode=args.mode, orders=args.orders, seed=args.seed,
                          ack_fail=args.ack_fail_rate, base_port=args.base_port, echo=print)
    except InvalidInput as exc:
        flag = {"ack_fail": "--ack-fail-rate", "directory": "DIR"}.get(
            exc.field, "--" + exc.field.replace("_", "-"))
        print(f"{parser.prog}: error: {flag}: {exc}", file=sys.stderr)
        return 2
    for key, value in run.counts().items():
        print(f"{key}: {value}")
    for k in run.kills:
        print(f"SIGKILL {k.node} at {k.at:.1f}s: {k.new_leader} led next; publishing paused"
              f" {k.pause:.2f}s (usually {k.usual_gap * 1000:.1f} ms between confirmations),"
              f" deliveries paused {k.delivery_pause:.2f}s")
    print(f"worker restarts: {run.worker_restarts}; publishes retried: {run.publish_retries}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
