"""Chapter 7, "Beyond one machine": the same consumer on every engine, measured side by side.

An *engine* here is a store (the consumer's own database) and a broker (where messages
wait), opened together on a throwaway queue, stream or schema that is removed afterwards:

==========  ================================  ==========================================
engine      broker                            store
==========  ================================  ==========================================
sqlite      the queue table in the store      an in-memory SQLite database (the lab's)
postgresql  the queue table in the store      a fresh schema on the PostgreSQL server
rabbitmq    a quorum queue on RabbitMQ        an in-memory SQLite database (or a file)
jetstream   a stream and consumer on NATS     an in-memory SQLite database (or a file)
redis       a stream and consumer group       an in-memory SQLite database (or a file)
==========  ================================  ==========================================

The engines after the first two are every engine of :mod:`deliverylab.brokers.registry`, in
its order: an engine added there is in every table here. Each is opened as every other part
of the lab opens a store and a broker, by
:func:`~deliverylab.brokers.registry.open_store_and_broker`, from a store URL and a broker URL. On SQLite and PostgreSQL time is a
:class:`~deliverylab.engine.clock.FakeClock` (leases are rows the engine compares with the
clock). On a broker with a server of its own it is the wall clock: JetStream and Redis time
their leases on the server (``capabilities.lease_clock``), and RabbitMQ's lease is a channel,
which the broker closes when the lease's time has passed. Those runs wait for real, and are
kept short (a lease of one second).
A fault still fires by (seed, point, event, delivery count), so the counts a run ends with are
the same on every run and on every engine; only the time it takes differs. Every function
here returns counts and verdicts; timings are the benchmark's (``benchmarks/bench_brokers.py``).
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..brokers import registry
from ..brokers.base import Broker, Delivery
from ..engine.check import CheckResult, check
from ..engine.clock import Clock, FakeClock, SystemClock
from ..engine.errors import InvalidInput, check_int, check_number
from ..engine.faults import Faults
from ..engine.ids import Ids
from ..engine.orders import place_order
from ..engine.relay import Relay
from ..engine.settings import DEFAULT_MAX_RECEIVES
from ..engine.worker import Mode, Worker
from .lab import ITEMS

if TYPE_CHECKING:
    import pandas as pd

ENGINES = ("sqlite", "postgresql", *registry.ENGINES)
REMOTE = tuple(registry.ENGINES)  # the brokers apart from the store, each on its own server
MODES = ("at-most-once", "at-least-once", "idempotent", "transactional")
# Where the servers are: the ones `make services` brings up (overridable, as pgdemo's is).
POSTGRES = os.environ.get("DELIVERYLAB_PG", "postgresql://127.0.0.1:5432/test")
# Chapter 1's scenario: its seed and its faults (a fifth of the ACK requests lost, a tenth of
# the ACKs' answers lost, a tenth of the deliveries crashing the worker before its work
# commits).
CHAPTER_SEED = 29
CHAPTER_FAULTS = {"ack_fail": 0.2, "ack_answer_lost": 0.1, "crash_after_receive": 0.1}
LEASE_S = 1.0  # the visibility timeout / AckWait of every run here


class EngineUnavailable(RuntimeError):
    """An engine's server did not answer; the message says how to start it."""


@dataclass
class Engine:
    """One engine, open: the consumer's ``store``, the ``broker``, and the clock both use.
    ``realtime`` is True when that clock is the wall clock: a wait is a real one."""

    name: str
    store: Any
    broker: Broker
    clock: Clock
    realtime: bool
    _closers: ExitStack = field(default_factory=ExitStack, repr=False)

    def close(self) -> None:
        self._closers.close()


def check_engine(name: object) -> str:
    """``name`` if it is one of :data:`ENGINES`, else InvalidInput naming ``engine``."""
    if name not in ENGINES:
        raise InvalidInput("engine", name, "one of " + ", ".join(ENGINES))
    return name


def _unavailable(name: str, where: str, exc: BaseException) -> EngineUnavailable:
    return EngineUnavailable(f"the {name} engine needs its server at {where}, which did not"
                             f" answer ({exc}); start it with 'make services'")


def _urls(name: str, directory: Path | None, dedup_window: float | None) -> tuple[str, str | None]:
    """The store URL and the broker URL of a fresh run of engine ``name``: an in-memory SQLite
    store (or a file in ``directory``) with its own queue table, a fresh schema on the
    PostgreSQL server with its own, or a SQLite store beside a fresh queue or stream of an
    engine of the registry (a lease of :data:`LEASE_S` where the engine fixes it per queue)."""
    from ..engine import store_postgres

    if name == "postgresql":
        return store_postgres.url_for(POSTGRES, f"dl_beyond_{secrets.token_hex(4)}"), None
    store = ":memory:" if directory is None else str(directory / f"{name}-store.db")
    if name == "sqlite":
        return store, None
    return store, registry.scratch_url(name, lease=LEASE_S, dedup_window=dedup_window,
                                       prefix="dl-beyond")


def _open(e: Engine, ids: Ids, max_receives: int, directory: Path | None,
          dedup_window: float | None) -> None:
    """Open engine ``e.name`` on fresh URLs (:func:`_urls`), removed again on close: a
    PostgreSQL schema is dropped, a queue or stream destroyed."""
    from ..engine import store_postgres

    store_url, broker_url = _urls(e.name, directory, dedup_window)
    try:
        opened = registry.open_store_and_broker(store_url, broker_url, clock=e.clock, ids=ids,
                                                max_receives=max_receives, init=True)
    except InvalidInput as exc:
        where = POSTGRES if e.name == "postgresql" else registry.server_url(e.name)
        raise _unavailable(e.name, where, exc) from None
    if e.name == "postgresql":
        e._closers.callback(store_postgres.drop_schema, store_url)
    e._closers.callback(opened.close)
    if broker_url is not None:
        e._closers.callback(opened.broker.destroy)
    e.store, e.broker = opened.store, opened.broker


@contextmanager
def open_engine(name: str, *, seed: int = CHAPTER_SEED,
                max_receives: int = DEFAULT_MAX_RECEIVES,
                clock: Clock | None = None, directory: Path | None = None,
                dedup_window: float | None = None) -> Iterator[Engine]:
    """The engine ``name`` on a fresh queue, stream or schema, removed on exit. ``clock``
    defaults to a FakeClock where the engine keeps its leases as rows and to the wall clock on
    an engine with a server of its own; an engine whose server times the leases takes no
    other. A SQLite store is in memory, or a file in ``directory`` (the caller's to remove).
    ``dedup_window`` (seconds) sets the producer dedup window of an engine that has one
    (JetStream's stream duplicate window)."""
    check_engine(name)
    check_int("seed", seed)
    check_int("max_receives", max_receives, minimum=1, maximum=1000)
    caps = registry.capabilities(name) if name in REMOTE else None
    if dedup_window is not None:
        if caps is None or caps.dedup_window is None:
            with_dedup = [n for n in REMOTE if registry.capabilities(n).dedup_window]
            raise InvalidInput("dedup_window", dedup_window,
                               f"None for {name}: only {', '.join(with_dedup)} has producer"
                               f" dedup")
        check_number("dedup_window", dedup_window, minimum=0.1, maximum=3600)
    if clock is None:
        clock = FakeClock() if caps is None else SystemClock()
    elif caps is not None and caps.lease_clock == "server" and not isinstance(clock,
                                                                            SystemClock):
        raise InvalidInput("clock", clock, f"the wall clock (SystemClock): the {name} server"
                                           f" times its leases itself")
    # The store and the broker are None only until the engine's opener sets them.
    e = Engine(name, None, None, clock, isinstance(clock, SystemClock))  # type: ignore[arg-type]
    try:
        _open(e, Ids(seed), max_receives, directory, dedup_window)
        yield e
    finally:
        e.close()


# -- running ------------------------------------------------------------------------------
def place_orders(e: Engine, n: int, *, seed: int = CHAPTER_SEED) -> None:
    """Chapter 1's ``n`` orders: items and quantities from ``random.Random(seed)`` and ids from
    ``Ids(seed)``, drawn in the order chapter 1's lab draws them (an order id, an event id,
    then the id of the event's queue row), so every event has chapter 1's id and meets
    chapter 1's fault schedule, whatever ids the engine gives its messages. Where the broker is
    the store's own database the event is sent in the order's transaction (the queue table is
    the outbox); elsewhere it is written to the store's outbox, and the relay publishes it."""
    check_int("n", n, minimum=0, maximum=100_000)
    rng, producer = random.Random(seed), Ids(seed)
    joined = e.broker.joins(e.store)
    for _ in range(n):
        place_order(e.broker, item_id=rng.choice(list(ITEMS)), qty=rng.randint(1, 3),
                    store=None if joined else e.store, ids=producer)
        producer.message_id()  # the id chapter 1's queue row takes from the same source
    if not joined:
        Relay(e.store, e.broker, clock=e.clock).run_until_idle()


def drain(e: Engine, *workers: Worker, timeout: float = 120.0) -> None:
    """Step the workers in turn until nothing is queued (visible or leased), sleeping on the
    engine's clock until the next message is due whenever no worker got one. A run that
    does not drain within ``timeout`` seconds on that clock raises RuntimeError."""
    check_number("timeout", timeout, minimum=0)
    deadline = e.clock.now() + timeout
    while e.clock.now() <= deadline:
        if sum(w.step() for w in workers):
            continue
        nxt = e.broker.next_visible_at()
        if nxt is None:
            return
        e.clock.sleep_until(min(nxt, deadline + 0.001) if not e.realtime
                            else min(nxt, e.clock.now() + 0.05))
    raise RuntimeError(f"the {e.name} queue did not drain in {timeout:g}s: {e.broker.depth()}")


def refusal(e: Engine, mode: str) -> str | None:
    """Why the worker refuses ``mode`` on this engine (its InvalidInput's reason), or None."""
    try:
        Worker(store=e.store, broker=e.broker, clock=e.clock, mode=mode)
    except InvalidInput as exc:
        return exc.expected
    return None


def run_mode(name: str, mode: str, *, orders: int, faults: Faults,
             seed: int = CHAPTER_SEED, max_messages: int = 1) -> tuple[CheckResult | None,
                                                                      int, str | None]:
    """One run on a fresh engine: place ``orders`` orders, drain them with one worker in
    ``mode`` under ``faults``, and return (the checker's result, deliveries received, None);
    or (None, 0, the worker's reason) when the engine cannot run that mode."""
    with open_engine(name, seed=seed) as e:
        why = refusal(e, mode)
        if why is not None:
            return None, 0, why
        place_orders(e, orders, seed=seed)
        worker = Worker(store=e.store, broker=e.broker, clock=e.clock, mode=mode,
                        faults=faults, visibility_timeout=LEASE_S if e.realtime else 2.0,
                        max_messages=max_messages, name="worker-1")
        drain(e, worker)
        return check(e.store, e.broker), worker.stats.received, None


def guarantee_matrix(engines: Sequence[str] = ENGINES, *, orders: int = 200,
                     faults: Faults | None = None, seed: int = CHAPTER_SEED,
                     modes: Sequence[str] = MODES) -> pd.DataFrame:
    """Chapter 1's guarantee matrix on each engine: the same orders, the same fault schedule
    (chapter 1's by default), each mode; one row per (engine, mode) with the checker's counts
    and verdict. A mode the engine cannot run (``transactional`` where the broker is not the
    store's database) gets no counts and the worker's reason as its verdict."""
    import pandas as pd

    for name in engines:
        check_engine(name)
    modes = [str(Mode.parse(m)) for m in modes]
    faults = faults if faults is not None else Faults(seed=seed, **CHAPTER_FAULTS)
    rows: list[dict[str, Any]] = []
    for name in engines:
        for mode in modes:
            result, received, why = run_mode(name, mode, orders=orders, faults=faults,
                                             seed=seed)
            if result is None:
                assert why is not None  # run_mode gives its reason when it gives no result
                reason = why.split(": ", 1)[-1].split(" (")[0]
                rows.append({"engine": name, "mode": mode, "verdict": f"refused: {reason}"})
                continue
            rows.append({"engine": name, "mode": mode, "orders": result.orders,
                         "correct": result.correct, "lost": result.lost,
                         "duplicated": result.duplicated,
                         "extra_applications": result.extra_applications,
                         "dead_lettered": result.dead_lettered, "deliveries": received,
                         "verdict": result.verdict})
    counts = ["orders", "correct", "lost", "duplicated", "extra_applications",
              "dead_lettered", "deliveries"]
    frame = pd.DataFrame(rows, columns=["engine", "mode", *counts, "verdict"])
    frame[counts] = frame[counts].astype("Int64")
    return frame


# -- the real-systems table, measured ----------------------------------------------------
def receive_one(e: Engine, *, timeout: float = 10.0) -> Delivery | None:
    """The next delivery, waiting on the engine's clock up to ``timeout`` seconds for a
    message to come due; None if none did."""
    deadline = e.clock.now() + timeout
    while True:
        got = e.broker.receive(LEASE_S, 1, worker="probe")
        if got:
            return got[0]
        nxt = e.broker.next_visible_at()
        if nxt is None or e.clock.now() >= deadline:
            return None
        e.clock.sleep_until(min(nxt, deadline) if not e.realtime
                            else min(nxt, e.clock.now() + 0.02))


@dataclass(frozen=True)
class LostAck:
    """What a lost ACK led to: the redelivery's count, and how long it took on the clock."""

    first_count: int
    redelivered_count: int | None
    seconds: float


def lost_ack(e: Engine) -> LostAck:
    """Send one message, receive it, never ACK it; receive until it comes back."""
    e.broker.send("evt-lost-ack", "OrderPlaced", {"orderId": "o-1", "itemId": "tea", "qty": 1})
    first = receive_one(e)
    if first is None:
        raise RuntimeError(f"{e.name}: the message sent was never delivered")
    t0 = e.clock.now()
    again = receive_one(e, timeout=10 * LEASE_S)
    seconds = e.clock.now() - t0
    if again is not None:
        e.broker.ack(again, worker="probe")
    return LostAck(first.delivery_count, None if again is None else again.delivery_count,
                   seconds)


def dead_letter_probe(e: Engine) -> dict[str, Any]:
    """One message that fails every delivery (nacked at once) under ``max_receives``: how many
    deliveries happened, whether it landed in the dead letters, and what a redrive gives."""
    e.broker.send("evt-poison", "OrderPlaced", {"orderId": "o-2", "itemId": "tea", "qty": 1})
    deliveries = 0
    while (d := receive_one(e, timeout=3 * LEASE_S)) is not None:
        deliveries += 1
        e.broker.nack(d, 0.0, error="always fails", worker="probe")
        if deliveries > e.broker.max_receives + 1:
            break
    dead = "evt-poison" in e.broker.dead_lettered_event_ids()
    moved = e.broker.redrive() if dead else 0
    back = receive_one(e) if moved else None
    if back is not None:
        e.broker.ack(back, worker="probe")
    return {"deliveries before dead letter": deliveries, "dead-lettered": dead,
            "redriven": moved,
            "delivery count after redrive": None if back is None else back.delivery_count}


def producer_dedup_probe(e: Engine) -> dict[str, Any]:
    """Two sends with the same ``dedup_id`` (a relay re-publishing after a crash): how many
    messages the consumer then receives, and the engine's dedup window."""
    for _ in range(2):
        e.broker.send("evt-twice", "OrderPlaced", {"orderId": "o-3", "itemId": "tea",
                                                   "qty": 1}, dedup_id="evt-twice")
    received = 0
    while (d := receive_one(e, timeout=0.5)) is not None:
        received += 1
        e.broker.ack(d, worker="probe")
    return {"messages from two sends": received, "dedup window (s)": e.broker.dedup_window}


def real_systems(engines: Sequence[str] = ENGINES, *, max_receives: int = 3) -> pd.DataFrame:
    """The measured half of the real-systems table: per engine, what a lost ACK, a message that
    always fails and a duplicate send do, each on a fresh queue. Counts and yes/no only."""
    import pandas as pd

    rows = {}
    for name in engines:
        with open_engine(name, max_receives=max_receives) as e:
            ack = lost_ack(e)
            row: dict[str, Any] = {
                "redelivered after a lost ACK": ack.redelivered_count is not None,
                "delivery count: first, redelivery": f"{ack.first_count}, "
                                                     f"{ack.redelivered_count}",
                "transactional mode": refusal(e, "transactional") is None}
        with open_engine(name, max_receives=max_receives) as e:
            row.update(dead_letter_probe(e))
        with open_engine(name, max_receives=max_receives) as e:
            row.update(producer_dedup_probe(e))
        rows[name] = row
    return pd.DataFrame(rows).T.rename_axis("engine")



# -- the outbox relay's duplicate ----------------------------------------------------------
def relay_run(name: str, *, mode: str, orders: int = 20, crash_after_publish: float = 0.3,
              seed: int = CHAPTER_SEED, dedup_window: float | None = None,
              restart_after: float = 0.0) -> dict[str, Any]:
    """Orders through the outbox and a relay that dies between a publish and its mark (the
    ``crash_after_publish`` fault, decided by seed, event and attempt), restarted
    ``restart_after`` seconds later on the engine's clock; then one worker in ``mode``, with no
    fault of its own. The relay publishes one row per step, so a crash republishes exactly
    the row it had published. Counts: publishes, messages the worker received, and the
    checker's."""
    check_number("restart_after", restart_after, minimum=0, maximum=60)
    with open_engine(name, seed=seed, dedup_window=dedup_window) as e:
        if e.broker.joins(e.store):
            raise InvalidInput("engine", name, "a broker outside the store: with the queue"
                                               " table in the store there is no relay")
        rng, producer = random.Random(seed), Ids(seed)
        for _ in range(orders):
            place_order(e.broker, item_id=rng.choice(list(ITEMS)), qty=rng.randint(1, 3),
                        store=e.store, ids=producer)
        relay = Relay(e.store, e.broker, clock=e.clock, seed=seed,
                      crash_after_publish=crash_after_publish)
        crashed = 0
        while relay.step(batch=1):
            if relay.stats.crashed > crashed:  # died after a publish: back after a while
                crashed = relay.stats.crashed
                e.clock.sleep(restart_after)
        worker = Worker(store=e.store, broker=e.broker, clock=e.clock, mode=mode,
                        visibility_timeout=LEASE_S, name="worker-1")
        drain(e, worker)
        result = check(e.store, e.broker)
        return {"engine": name, "mode": mode, "orders": result.orders,
                "publishes": relay.stats.published, "relay crashes": relay.stats.crashed,
                "messages received": worker.stats.received,
                "duplicates skipped": worker.stats.duplicates_skipped,
                "duplicated": result.duplicated, "verdict": result.verdict}


def relay_table(engines: Sequence[str] = REMOTE, *, orders: int = 20,
                crash_after_publish: float = 0.3, seed: int = CHAPTER_SEED,
                modes: Sequence[str] = ("at-least-once", "idempotent")) -> pd.DataFrame:
    """:func:`relay_run` for each engine and worker mode: the relay's duplicate publishes,
    what producer dedup kept of them, and what the consumer made of the rest."""
    import pandas as pd

    return pd.DataFrame([relay_run(name, mode=mode, orders=orders, seed=seed,
                                   crash_after_publish=crash_after_publish)
                         for name in engines for mode in modes])


# -- the cluster run ----------------------------------------------------------------------
def cluster_demo(mode: str = "idempotent", *, orders: int = 1000, seed: int = 1,
                 ack_fail: float = 0.2) -> Any:
    """The cluster run (:func:`deliverylab.book.cluster_run.cluster_run`) in a temporary
    directory, on free ports: three nodes on this machine, three worker processes with lost
    ACKs, two leader SIGKILLs. Returns its :class:`~deliverylab.book.cluster_run.ClusterRun`."""
    import tempfile

    from ..clusters.nats_cluster import free_base_port
    from .cluster_run import cluster_run

    with tempfile.TemporaryDirectory(prefix="dl-cluster-") as tmp:
        return cluster_run(tmp, mode=mode, orders=orders, seed=seed, ack_fail=ack_fail,
                           base_port=free_base_port())


def cluster_summary(run: Any) -> pd.Series:
    """What the chapter prints of a cluster run: the counts that do not depend on timing, and
    the verdict, naming what went wrong rather than how often. (How many deliveries came
    back, and when, depends on where the kills land; the pauses are timings: both are in the
    figure, not in the table.)"""
    import pandas as pd

    result = run.check
    if result.ok:
        verdict = run.verdict  # every count in it is the number of orders
    else:  # which kinds of wrong, not how many: that depends on where the kills land
        wrong = [kind for kind, n in (("duplicated", result.duplicated), ("lost", result.lost),
                                      ("pending", result.pending),
                                      ("dead-lettered", result.dead_lettered)) if n]
        verdict = f"BROKEN: some orders {' and '.join(wrong) or 'wrong'}"
    return pd.Series({"mode": run.mode, "orders": run.orders, "leader kills": len(run.kills),
                      "a new leader each time": run.leader_changed,
                      "orders applied at least once": result.orders - result.lost
                      - result.pending - result.dead_lettered,
                      "some orders applied twice": run.double_applied > 0,
                      "verdict": verdict}, name=run.mode)


def plot_cluster_run(run: Any, *, bin_seconds: float = 0.5) -> Any:
    """Deliveries over time in a cluster run: what the workers received, applied and skipped
    as duplicates per ``bin_seconds``, a red line at each leader SIGKILL, and the publish
    pause after it shaded (from the kill until the new leader confirmed again)."""
    import matplotlib.pyplot as plt

    check_number("bin_seconds", bin_seconds, minimum=0.05, maximum=60)
    frame = run.timeline_frame(bin_seconds)
    if frame.empty:
        raise InvalidInput("run", run.mode, "a run whose trace has deliveries")
    # Every bin, the empty ones included: a stretch with no delivery is the point of the plot.
    steps = int(round(frame.index.max() / bin_seconds)) + 1
    frame = frame.reindex([round(i * bin_seconds, 6) for i in range(steps)], fill_value=0)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    styles = {"received": ("#1f77b4", "-"), "applied": ("#2ca02c", "-"),
              "duplicate_skipped": ("#ff7f0e", "--"), "ack_failed": ("#7f7f7f", ":")}
    for outcome, (color, ls) in styles.items():
        if outcome in frame.columns:
            ax.step(frame.index, frame[outcome] / bin_seconds, where="post", color=color,
                    ls=ls, lw=1.4, label=outcome.replace("_", " "))
    top = ax.get_ylim()[1]
    for k, kill in enumerate(run.kills):
        ax.axvspan(kill.at, kill.at + kill.pause, color="#d62728", alpha=0.12,
                   label="publishing paused" if k == 0 else None)
        ax.axvline(kill.at, color="#d62728", lw=2, label="leader SIGKILLed" if k == 0 else None)
        ax.text(kill.at, top * 0.97, f" SIGKILL {kill.node}\n new leader {kill.new_leader}",
                color="#d62728", va="top", ha="left", fontsize=8)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("deliveries per second")
    ax.set_title(f"{run.orders} orders through a three-node JetStream cluster, {run.mode}"
                 f" workers\n{run.verdict}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=6,
              frameon=False)
    fig.tight_layout()
    return fig
