"""The consumer on NATS JetStream (``deliverylab.brokers.jetstream``), on the shared server.

What the contract suite cannot show: the URL a worker is given, the worker itself over seeded
fault schedules and as real processes killed mid-run, the producer's ``Nats-Msg-Id`` window
(and what happens after it), and what ``ack()`` promises against ``ack_sync()``. Leases are
the server's AckWait, so these tests run on the wall clock, with short AckWaits. Every test
has streams of its own and deletes them.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import Proc, no_failures
from support.servers import HoldingProxy, OwnServer

from deliverylab.brokers.jetstream import JetStreamBroker, open_url
from deliverylab.brokers.registry import open_broker
from deliverylab.engine import store
from deliverylab.engine.check import check
from deliverylab.engine.clock import FakeClock, SystemClock
from deliverylab.engine.errors import BrokerUnavailable, InvalidInput
from deliverylab.engine.faults import Faults
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.relay import Relay
from deliverylab.engine.worker import Worker

SERVER = "nats://127.0.0.1:4222"


def new_stream() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_js() -> Iterator:
    """``make_js(**kw)``: a JetStream broker on a stream of its own (unless ``stream=`` names
    one), on the wall clock, 0.5 s AckWait unless told; every stream made is deleted after
    the test."""
    made: list[JetStreamBroker] = []

    def make(servers: str | list[str] = SERVER, **kw) -> JetStreamBroker:
        kw.setdefault("stream", new_stream())
        kw.setdefault("clock", SystemClock())
        kw.setdefault("ids", Ids(1))
        kw.setdefault("ack_wait", 0.5)
        made.append(JetStreamBroker(servers, **kw))
        return made[-1]

    yield make
    destroyed = set()
    for broker in made:  # each stream through one broker still connected; close the rest
        if broker.stream not in destroyed and not broker.nc.is_closed:
            destroyed.add(broker.stream)
            broker.destroy()
        else:
            broker.close()


def received(broker: JetStreamBroker, n: int, within: float = 5.0) -> list:
    """Receive until ``n`` deliveries came or ``within`` seconds passed."""
    got: list = []
    deadline = time.monotonic() + within
    while len(got) < n and time.monotonic() < deadline:
        got += broker.receive(1.0, n - len(got))
    return got


# -- the URL ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "says"), [
    ("nats://127.0.0.1:4222", "?stream=NAME"),
    ("nats://127.0.0.1:4222?stream=a.b", "?stream=NAME"),
    ("nats://127.0.0.1:4222?stream=s&acks=1", "only the options"),
    ("nats://127.0.0.1:4222?stream=s&replicas=three", "replicas as an integer"),
    ("nats://127.0.0.1:4222?stream=s&ack_wait=0", "ack_wait must be"),
    ("nats://127.0.0.1:4222?stream=s&ack_sync=maybe", "ack_sync=true or ack_sync=false"),
    ("nats://127.0.0.1:99999?stream=s", "host:port pairs"),
    ("nats://user:pw@127.0.0.1:4222?stream=s", "no user"),
    ("nats://127.0.0.1:1?stream=s", "a reachable NATS server"),
    ("nats://127.0.0.1:1,127.0.0.1:2?stream=s", "a reachable NATS server"),
])
def test_a_bad_url_names_the_field(url, says):
    started = time.monotonic()
    with pytest.raises(InvalidInput) as refused:
        open_broker(url, field="--broker", clock=FakeClock(), ids=Ids(1))
    assert refused.value.field == "--broker"
    assert refused.value.value == url or "no server answers" in str(refused.value)
    assert says in str(refused.value)
    assert time.monotonic() - started < 5  # no server: said at once, not after reconnecting


def test_a_url_with_a_server_list_and_options_opens_the_stream(make_js):
    stream = new_stream()
    url = (f"nats://127.0.0.1:4222,127.0.0.1:4222?stream={stream}&ack_wait=0.7"
           f"&dedup_window=3&ack_sync=false")
    broker = open_broker(url, clock=SystemClock(), ids=Ids(1), max_receives=4, worker="w-1")
    try:
        assert isinstance(broker, JetStreamBroker)
        assert (broker.stream, broker.ack_wait, broker.dedup_window, broker.max_receives,
                broker.confirm_acks) == (stream, 0.7, 3.0, 4, False)
        assert broker.servers == ["nats://127.0.0.1:4222"] * 2
        # A second broker on the stream with another MaxDeliver is refused, naming it.
        with pytest.raises(InvalidInput, match="max_receives") as refused:
            open_url(url, field="--broker", clock=SystemClock(), ids=Ids(1), max_receives=9)
        assert refused.value.field == "--broker"
    finally:
        broker.destroy()


# -- the worker, in process ------------------------------------------------------------------
FAULTS = {"ack_fail": 0.3, "crash_after_receive": 0.05, "crash_after_commit": 0.05,
          "process_error": 0.1}


def run_worker(make_js, *, mode: str, seed: int, max_messages: int, orders: int = 30):
    conn = store.init_db()
    # A crash gives back every lease of its batch: MaxDeliver high enough that no message
    # runs out of deliveries (the contract suite covers dead letters).
    broker = make_js(ids=Ids(seed), max_receives=50, ack_wait=0.4)
    for i in range(orders):
        place_order(broker, item_id=f"item-{i % 3}", qty=1 + i % 2, store=conn)
    Relay(conn, broker, clock=broker.clock).run_until_idle()  # the store's outbox, published
    worker = Worker(store=conn, broker=broker, clock=broker.clock, mode=mode,
                    faults=Faults(seed=seed, **FAULTS), max_messages=max_messages, name="w-1",
                    backoff_cap=0.5)
    worker.run_until_idle()
    return conn, broker, worker


@pytest.mark.parametrize(("seed", "max_messages"), [(3, 1), (11, 10), (29, 4)])
def test_idempotent_worker_under_faults_loses_nothing_and_applies_nothing_twice(
        make_js, seed, max_messages):
    conn, broker, worker = run_worker(make_js, mode="idempotent", seed=seed,
                                      max_messages=max_messages)
    assert worker.stats.ack_failed + worker.stats.crashed > 0  # the faults did fire
    assert worker.stats.duplicates_skipped > 0  # lost ACKs came back: the inbox caught them
    result = check(conn, broker)
    assert result.orders == 30
    assert (result.lost, result.pending, result.dead_lettered, result.duplicated) == \
        (0, 0, 0, 0), result.verdict
    assert result.ok and result.projection_equals_truth, result.verdict
    assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}
    conn.close()


def test_at_least_once_worker_applies_a_lost_acks_event_twice(make_js):
    conn, broker, worker = run_worker(make_js, mode="at-least-once", seed=3, max_messages=1)
    assert worker.stats.ack_failed > 0
    result = check(conn, broker)
    assert result.duplicated > 0 and result.extra_applications > 0, result.verdict
    assert (result.lost, result.pending) == (0, 0), result.verdict
    # A lost ACK = the effect committed and no ack was sent: JetStream redelivered it after
    # AckWait, with the next delivery count.
    redelivered = conn.execute(
        "SELECT count(*) FROM delivery_log a JOIN delivery_log b ON b.event_id = a.event_id"
        " AND b.outcome = 'applied' AND b.delivery_count = a.delivery_count + 1"
        " WHERE a.outcome = 'ack_failed'").fetchone()[0]
    assert redelivered > 0
    conn.close()


def test_a_message_the_server_gives_up_on_is_a_dead_letter_recorded_in_the_store(make_js):
    """A worker that dies holding the lease every time never acks or nacks: the server stops
    at MaxDeliver and announces it; the next receive moves the message to the dead letters,
    and the worker records that in the store, where the checker finds it."""
    conn = store.init_db()
    broker = make_js(max_receives=2, ack_wait=0.3)
    placed = place_order(broker, item_id="tea", qty=1, store=conn)
    Relay(conn, broker, clock=broker.clock).run_until_idle()
    worker = Worker(store=conn, broker=broker, clock=broker.clock, name="w-1",
                    faults=Faults(seed=1, crash_after_receive=1.0))
    deadline = time.monotonic() + 10
    while not worker.stats.dead_lettered and time.monotonic() < deadline:
        worker.step()
    assert (worker.stats.crashed, worker.stats.dead_lettered) == (2, 1)
    rows = conn.execute("SELECT outcome, delivery_count, detail FROM delivery_log"
                        " WHERE event_id = ? ORDER BY seq", (placed.event_id,)).fetchall()
    assert [(r[0], r[1]) for r in rows] == [("received", 1), ("crashed", 1), ("received", 2),
                                            ("crashed", 2), ("dead_lettered", 2)]
    assert "max_receives=2" in rows[-1][2]
    assert broker.dead_lettered_event_ids() == {placed.event_id}
    assert broker.queued_event_ids() == set()
    result = check(conn, broker)
    assert (result.dead_lettered, result.lost, result.pending) == (1, 0, 0), result.verdict
    conn.close()


# -- the producer's Nats-Msg-Id ----------------------------------------------------------------
def test_a_dedup_id_within_the_window_is_stored_once_even_after_the_first_was_acked(make_js):
    broker = make_js(dedup_window=5.0)
    assert broker.dedup_window == 5.0
    first = broker.send("e-1", "OrderPlaced", {"qty": 1}, dedup_id="evt-1")
    again = broker.send("e-1", "OrderPlaced", {"qty": 1}, dedup_id="evt-1")
    assert again == first  # the PubAck's sequence is the first send's
    assert broker.depth()["visible"] == 1
    [d] = received(broker, 1)
    assert broker.ack(d) is True
    # Acked and gone from the work-queue stream, yet still within the window: not stored.
    assert broker.send("e-1", "OrderPlaced", {"qty": 1}, dedup_id="evt-1") == first
    assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}
    other = broker.send("e-2", "OrderPlaced", {"qty": 1}, dedup_id="evt-2")
    assert other != first


def test_after_the_window_the_same_dedup_id_is_stored_again(make_js):
    broker = make_js(dedup_window=1.0)
    first = broker.send("e-1", "OrderPlaced", {"qty": 1}, dedup_id="evt-1")
    assert broker.send("e-1", "OrderPlaced", {"qty": 1}, dedup_id="evt-1") == first
    time.sleep(1.5)  # the server forgets ids older than the window (checked on a timer)
    later = broker.send("e-1", "OrderPlaced", {"qty": 1}, dedup_id="evt-1")
    assert later != first
    assert broker.depth()["visible"] == 2
    got = received(broker, 2)
    assert [d.event_id for d in got] == ["e-1", "e-1"]  # twice: the consumer's inbox decides
    assert broker.queued_event_ids() == {"e-1"}


# -- a server that goes away and comes back --------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[OwnServer]:
    server = OwnServer(tmp_path / "nats")
    server.directory.mkdir()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("max_messages", [1, 5])
def test_a_worker_rides_out_its_server_sigkilled_and_restarted(own_server, tmp_path,
                                                               max_messages):
    """The worker's only server gets SIGKILL mid-run and stays down for longer than the
    broker's timeout, so the worker's verbs raise BrokerUnavailable; it waits, keeps going
    when the server is back (on the same storage), and every order is applied exactly once.

    The worker runs until the store has every order (run_until_idle would wait for an empty
    stream: a SIGKILLed server may come back holding messages whose acks it had recorded but
    whose deletion it had not written, which its consumer never delivers again)."""
    conn = store.init_db(tmp_path / "lab.db")
    broker = JetStreamBroker(own_server.url, stream=new_stream(), clock=SystemClock(),
                             ids=Ids(7), ack_wait=1.0, max_receives=50, timeout=1.0)
    orders = 300
    for i in range(orders):
        place_order(broker, item_id=f"item-{i % 4}", qty=1 + i % 3, store=conn)
    Relay(conn, broker, clock=broker.clock).run_until_idle()  # the store's outbox, published
    lines: list[str] = []
    worker = Worker(store=conn, broker=broker, clock=broker.clock, mode="idempotent",
                    faults=Faults(seed=5, ack_fail=0.1), max_messages=max_messages,
                    work_time=0.01, backoff_cap=0.5, name="w-1", echo=lines.append)
    outage: dict[str, object] = {}

    def kill_and_restart() -> None:
        try:
            deadline = time.monotonic() + 30
            while worker.stats.applied < orders // 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            outage["applied_at_kill"] = worker.stats.applied
            own_server.kill()
            time.sleep(3.0)  # three times the broker's timeout: verbs give up meanwhile
            own_server.start()
            watch = store.connect(tmp_path / "lab.db")
            deadline = time.monotonic() + 60
            while watch.execute("SELECT count(*) FROM inbox_processed").fetchone()[0] < orders:
                if time.monotonic() > deadline:
                    outage["error"] = "not every order applied within 60 s of the restart"
                    break
                time.sleep(0.05)
            watch.close()
        except BaseException as exc:  # reported below, in the test's thread
            outage["error"] = exc
        finally:
            worker.stop()

    killer = threading.Thread(target=kill_and_restart, daemon=True)
    killer.start()
    try:
        worker.run_forever(poll_interval=0.02)  # never raises: the outage is waited out
        killer.join(10)
        assert "error" not in outage, outage
        assert 0 < outage["applied_at_kill"] < orders  # the kill landed mid-run
        assert worker.stats.broker_waits > 0  # the verbs did give up during the outage
        waits = [line for line in lines if "broker unavailable during" in line]
        assert len(waits) == worker.stats.broker_waits, lines[-20:]
        assert all("→ retry in" in line for line in waits)
        result = check(conn, broker)
        assert result.orders == orders
        assert (result.lost, result.pending, result.dead_lettered, result.duplicated) == \
            (0, 0, 0, 0), result.verdict
        assert result.ok and result.projection_equals_truth, result.verdict
    finally:
        broker.destroy()
        conn.close()


# -- ack() against ack_sync() ---------------------------------------------------------------


def test_ack_answers_before_the_server_has_it_and_ack_sync_waits_for_the_server(make_js):
    proxy = HoldingProxy()
    try:
        direct = make_js(ack_wait=1.0)
        for i in range(4):
            direct.send(f"e-{i}", "OrderPlaced", {"qty": 1})
        via = make_js(f"nats://127.0.0.1:{proxy.port}", stream=direct.stream, ack_wait=1.0,
                      confirm_acks=False, timeout=1.0)
        got = received(via, 4)
        assert len(got) == 4
        proxy.hold()  # from now on nothing the client sends reaches the server
        assert via.ack_many(got[:3]) == [True, True, True]  # ack(): "done", the server asked nothing
        deadline = time.monotonic() + 5
        while not proxy.held and time.monotonic() < deadline:  # the client flushes them...
            time.sleep(0.01)
        assert proxy.held > 0  # ... into the proxy, which holds them
        via.confirm_acks = True  # ack_sync(): waits for the server's answer, which never comes
        with pytest.raises(BrokerUnavailable, match="during ack"):
            via.ack(got[3])
        proxy.cut()  # the connection dies with the acks it held
        via.close()
        # The server never heard any of the four acks: after AckWait all four come back,
        # the three that ack() called done among them.
        back = received(direct, 4, within=10)
        assert sorted(d.event_id for d in back) == ["e-0", "e-1", "e-2", "e-3"]
        assert {d.delivery_count for d in back} == {2}
        # ack_sync on a working connection: confirmed, and nothing acked comes back.
        assert direct.ack_many(back) == [True] * 4
        time.sleep(direct.ack_wait + 0.3)
        assert direct.receive(1.0, 10) == []
        assert direct.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}
    finally:
        proxy.stop()


# -- real processes --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["idempotent", "at-least-once"])
def test_sigkilled_worker_processes_on_jetstream(make_js, tmp_path: Path, mode):
    """Three ``deliverylab worker --broker nats://…`` processes on one SQLite store, losing
    ACKs, each SIGKILLed once mid-run and restarted (its leases run out and come back).
    Idempotent: the checker says OK; at-least-once: lost ACKs were applied twice."""
    db = tmp_path / "lab.db"
    conn = store.init_db(db)
    # MaxDeliver far above what lost ACKs and kills add up to: a dead letter here would be
    # chance (four lost ACKs in a row), not what the test is about.
    broker = make_js(ack_wait=1.0, ids=Ids(5), max_receives=50)
    url = f"{SERVER}?stream={broker.stream}&ack_wait=1"
    placed = 0

    def place(n: int) -> None:
        nonlocal placed
        for i in range(n):
            place_order(broker, item_id=f"item-{(placed + i) % 4}", qty=1 + i % 3, store=conn)
        Relay(conn, broker, clock=broker.clock).run_until_idle()
        placed += n

    def start(k: int) -> Proc:
        return Proc(tmp_path / f"w{k}-{time.monotonic_ns()}.log", "worker", "--store", str(db),
                    "--broker", url, "--mode", mode, "--name", f"w{k}", "--seed", str(40 + k),
                    "--ack-fail-rate", "0.2", "--work-time", "0.01", "--poll-interval", "0.02",
                    "--max-messages", str(1 + 2 * (k % 2)), "--max-receives", "50")

    place(100)
    workers = [start(k) for k in range(3)]
    procs = list(workers)
    for k in range(3):  # each worker in turn, SIGKILLed once it holds leases
        deadline = time.monotonic() + 30
        while " received" not in workers[k].output() and time.monotonic() < deadline:
            assert workers[k].alive(), workers[k].output()[-3000:]
            time.sleep(0.02)
        assert " received" in workers[k].output(), workers[k].output()[-3000:]
        time.sleep(0.05)
        workers[k].p.send_signal(signal.SIGKILL)
        assert workers[k].p.wait(timeout=10) == -signal.SIGKILL
        place(30)
        workers[k] = start(k)
        procs.append(workers[k])
    deadline = time.monotonic() + 60
    while sum(broker.depth().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}
    for w in workers:
        assert w.terminate() == 0, w.output()[-3000:]
    no_failures(*procs)
    assert any(" ack failed" in p.output() for p in procs)

    result = check(conn, broker)
    assert result.orders == placed
    assert (result.pending, result.lost, result.dead_lettered) == (0, 0, 0), result.verdict
    projection = dict(conn.execute("SELECT item_id, reserved_qty FROM inventory_projection"))
    truth = dict(conn.execute("SELECT item_id, sum(qty) FROM orders GROUP BY item_id"))
    if mode == "at-least-once":
        assert result.duplicated > 0, result.verdict
        assert all(projection[i] >= q for i, q in truth.items())
    else:
        assert result.ok and result.duplicated == 0, result.verdict
        assert projection == truth
    conn.close()

