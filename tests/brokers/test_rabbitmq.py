"""The RabbitMQ broker on the real server: what the engine does, the worker on it, and real
``deliverylab worker`` processes SIGKILLed mid-run.

The contract's own cases run in ``tests/brokers/test_broker_contract.py`` (engine ``rabbitmq``); here
are the facts the broker is built on (each checked on the server, not assumed), the worker
over many seeded fault schedules, and processes. Every test has queues of its own, deleted
afterwards; a server that does not answer fails the test, naming the URL.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator

import pika
import pytest
from support.brokers import AMQP_URL, rabbitmq_queue
from support.processes import Proc, no_failures, started
from support.servers import HoldingProxy

from deliverylab.brokers.rabbitmq import RabbitMQBroker, open_url
from deliverylab.engine import store
from deliverylab.engine.check import check
from deliverylab.engine.clock import FakeClock, SystemClock
from deliverylab.engine.errors import BrokerUnavailable, InvalidInput
from deliverylab.engine.faults import Faults
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.relay import Relay, unsent
from deliverylab.engine.worker import Worker

URL = AMQP_URL
ITEMS = ["coffee-beans", "tea", "milk"]


@pytest.fixture
def queue_name() -> Iterator[str]:
    """A fresh queue name; the queue, its dead-letter queue and exchange are deleted after."""
    with rabbitmq_queue() as name:
        yield name


@pytest.fixture
def rabbit(queue_name: str) -> Iterator[Callable[..., RabbitMQBroker]]:
    """``rabbit(clock=…, seed=…, max_receives=…)``: a broker on the test's queue (several
    calls: several connections to one queue), closed after the test."""
    made: list[RabbitMQBroker] = []

    def make(*, clock: FakeClock | None = None, seed: int = 1,
             max_receives: int = 3) -> RabbitMQBroker:
        made.append(open_url(f"{URL}?queue={queue_name}", clock=clock or FakeClock(),
                             ids=Ids(seed), max_receives=max_receives, worker="pytest"))
        return made[-1]

    yield make
    for b in made:
        b.close()


def raw_get(queue: str) -> tuple[bool, int]:
    """(redelivered, x-delivery-count) of the head of ``queue``, read with plain pika; the
    message goes back when this connection closes."""
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    method, props, _ = conn.channel().basic_get(queue)
    assert method is not None, f"{queue} is empty"
    conn.close()
    return method.redelivered, int((props.headers or {}).get("x-delivery-count", 0))


# -- what the engine does ------------------------------------------------------------------
def test_a_closed_connection_gives_the_message_back_counted(rabbit):
    """Lease = the channel: no clock moves here; closing the holder's connection (what a
    process that dies does) is what brings the message back, one delivery later."""
    a, b = rabbit(), rabbit()
    a.send("e-1", "OrderPlaced", {"itemId": "tea", "qty": 1})
    first = a.receive(3600)[0]
    assert b.receive(3600) == []  # held by a
    a.close()
    again = b.receive(3600)[0]
    assert (again.message_id, again.delivery_count) == (first.message_id, 2)


def test_the_server_dead_letters_at_exactly_max_receives(rabbit):
    """x-delivery-limit = max_receives - 1: the max_receives-th delivery coming back unacked
    sends the message to the dead-letter queue. Driven by connections closing, on the server
    alone, so the limit is the server's and not the broker's bookkeeping."""
    holders = []
    producer = rabbit(max_receives=3)
    producer.send("e-1", "OrderPlaced", {"itemId": "tea", "qty": 1})
    for n in (1, 2, 3):
        holder = rabbit(max_receives=3)
        [d] = holder.receive(3600)
        assert d.delivery_count == n
        holder.close()
        holders.append(holder)
    deadline = time.monotonic() + 5
    while producer.depth()["dead_letters"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert producer.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 1}
    assert producer.dead_lettered_event_ids() == {"e-1"}


def test_a_lost_ack_closes_the_channel_and_the_message_is_back_at_once(rabbit, queue_name):
    """The worker's lost ACK: the effect commits, then the delivery's channel closes before
    basic.ack. RabbitMQ requeues it with redelivered=true and x-delivery-count bumped, at
    once: the clock never moves."""
    clock = FakeClock()
    broker = rabbit(clock=clock, max_receives=5)
    conn = store.init_db()
    placed = place_order(broker, item_id="tea", qty=2, store=conn)
    Relay(conn, broker, clock=clock).run_until_idle()  # from the store's outbox
    worker = Worker(store=conn, broker=broker, clock=clock, mode="idempotent",
                    faults=Faults(seed=1, ack_fail=1.0), name="w-1")
    assert worker.step() == 1
    assert (worker.stats.applied, worker.stats.ack_failed) == (1, 1)
    assert broker.depth() == {"visible": 1, "in_flight": 0, "dead_letters": 0}
    assert raw_get(queue_name) == (True, 1)  # as the server reports it
    # The raw read's connection closed: one more return. The redelivery is skipped, once.
    assert worker.step() == 1
    assert worker.stats.duplicates_skipped == 1
    rows = conn.execute("SELECT outcome, delivery_count FROM delivery_log"
                        " WHERE event_id = ? ORDER BY seq", (placed.event_id,)).fetchall()
    assert [tuple(r) for r in rows][:4] == [("received", 1), ("applied", 1), ("ack_failed", 1),
                                            ("received", 3)]
    assert clock.now() == 0.0
    conn.close()


def test_a_delayed_nack_is_held_and_a_dying_holder_gives_it_back_early(rabbit):
    """No delayed requeue in 3.10: nack(delay) keeps the message on its channel, invisible to
    everyone; if the holder dies first it comes back at once, never lost."""
    a, b = rabbit(), rabbit()
    a.send("e-1", "OrderPlaced", {"itemId": "tea", "qty": 1})
    d = a.receive(60)[0]
    assert a.nack(d, 600.0, error="boom") is True
    assert a.next_visible_at() == a.clock.now() + 600.0
    assert b.receive(60) == []
    a.close()
    assert b.receive(60)[0].delivery_count == 2


def test_the_server_knows_the_dead_letter_strategy_it_accepted(queue_name):
    """3.10.8 validates x-dead-letter-strategy (an unknown x-argument would be ignored), so
    the at-least-once strategy the broker declares is in effect."""
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="invalid_dlx_strategy"):
        conn.channel().queue_declare(queue_name, durable=True, arguments={
            "x-queue-type": "quorum", "x-dead-letter-strategy": "sometimes"})
    conn.close()


def test_another_max_receives_on_the_same_queue_is_refused(rabbit, queue_name):
    rabbit(max_receives=3)
    with pytest.raises(InvalidInput) as refused:
        rabbit(max_receives=5)
    assert refused.value.field == "broker"
    assert "x-delivery-limit" in str(refused.value) and queue_name in str(refused.value)


@pytest.mark.parametrize(("url", "reason"), [
    ("amqp://guest:guest@127.0.0.1:1/%2F?queue=q", "reachable RabbitMQ server"),
    ("amqp://guest:wrong@127.0.0.1:5672/%2F?queue=q", "login refused"),
    ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost?queue=q", "access refused"),
    ("amqp://guest:guest@127.0.0.1:5672/%2F", "naming one queue"),
    ("amqp://guest:guest@127.0.0.1:5672/%2F?queue=amq.x", "valid queue name"),
    ("amqp://guest:guest@127.0.0.1:5672/%2F?queue=a%0Ab", "valid queue name"),
    ("amqp://guest:guest@127.0.0.1:5672/%2F?queue=q&frobnicate=1", "pika accepts"),
    ("amqp://guest:wrong@127.0.0.1:port/%2F?queue=q", "amqp:// URL"),
    ("amqp:///%2F?queue=q", "with a host"),
])
def test_a_bad_url_names_the_field_and_the_url_and_creates_nothing(url, reason):
    with pytest.raises(InvalidInput) as refused:
        open_url(url, field="--broker", clock=FakeClock(), ids=Ids(1))
    assert refused.value.field == "--broker"
    assert reason in str(refused.value)
    assert "wrong" not in str(refused.value)  # the password is hidden
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
        conn.channel().queue_declare("q", passive=True)  # nothing was declared
    conn.close()


# -- the worker, in process, over many fault schedules -------------------------------------
FAULTS = {"ack_fail": 0.3, "crash_after_receive": 0.05, "crash_after_commit": 0.05,
          "process_error": 0.1}


def run(rabbit, mode: str, seed: int, *, lose: float = 0.0, orders: int = 30,
        max_messages: int = 1) -> tuple[object, Worker, RabbitMQBroker, object]:
    clock = FakeClock()
    broker = rabbit(clock=clock, seed=seed, max_receives=4)
    conn = store.init_db()
    for i in range(orders):
        place_order(broker, item_id=ITEMS[i % 3], qty=1 + i % 3, store=conn)
    Relay(conn, broker, clock=clock).run_until_idle()  # from the store's outbox
    worker = Worker(store=conn, broker=broker, clock=clock, mode=mode, name="w-1",
                    faults=Faults(seed=seed, lose_message=lose, **FAULTS),
                    max_messages=max_messages)
    worker.run_until_idle()
    return conn, worker, broker, check(conn, broker)


@pytest.mark.parametrize("max_messages", [1, 5])
@pytest.mark.parametrize("seed", range(6))
def test_idempotent_loses_nothing_and_applies_nothing_twice(rabbit, seed, max_messages):
    conn, worker, broker, result = run(rabbit, "idempotent", seed, max_messages=max_messages)
    assert worker.stats.ack_failed > 0  # lost ACKs happened, and were redelivered
    assert (result.duplicated, result.lost, result.pending) == (0, 0, 0), result.verdict
    assert result.correct + result.dead_lettered == result.orders
    # Every dead letter the worker saw is in the dead-letter queue (handler errors past
    # max_receives, and applied events whose ACK was lost max_receives times): redriven, each
    # is applied once or skipped as a duplicate.
    assert broker.depth()["dead_letters"] == worker.stats.dead_lettered
    assert broker.redrive() == worker.stats.dead_lettered
    Worker(store=conn, broker=broker, clock=broker.clock, name="w-2").run_until_idle()
    after = check(conn, broker)
    assert after.ok, after.verdict
    conn.close()


@pytest.mark.parametrize("seed", range(6))
def test_at_least_once_applies_a_lost_acks_event_again(rabbit, seed):
    conn, worker, broker, result = run(rabbit, "at-least-once", seed)
    assert (result.lost, result.pending) == (0, 0), result.verdict
    assert result.duplicated > 0, result.verdict
    # Every extra application follows a lost ACK or a crash after the commit: the queue gave
    # the message back because its channel closed before basic.ack.
    redelivered_after_commit = conn.execute(
        "SELECT count(*) FROM delivery_log AS a WHERE outcome = 'applied' AND EXISTS"
        " (SELECT 1 FROM delivery_log AS f WHERE f.event_id = a.event_id"
        "   AND f.outcome IN ('ack_failed', 'crashed') AND f.seq > a.seq)").fetchone()[0]
    assert result.extra_applications <= redelivered_after_commit
    conn.close()


@pytest.mark.parametrize("seed", range(6))
def test_at_most_once_loses_what_crashes_after_the_ack(rabbit, seed):
    conn, worker, broker, result = run(rabbit, "at-most-once", seed)
    assert result.duplicated == 0, result.verdict
    assert result.lost == worker.stats.lost > 0, result.verdict
    conn.close()


def test_the_relay_waits_out_a_lost_connection_and_publishes_every_row(queue_name,
                                                                      tmp_path):
    """The relay's link fails before it publishes: its first send raises BrokerUnavailable,
    ``run_forever`` backs off (counted, said) instead of ending, and the next step connects
    again and publishes every row once."""
    proxy = HoldingProxy((pika.URLParameters(URL).host, pika.URLParameters(URL).port))
    params = pika.URLParameters(URL)
    params.host, params.port = "127.0.0.1", proxy.port
    broker = RabbitMQBroker(queue_name, clock=SystemClock(), ids=Ids(4), parameters=params)
    conn = store.init_db(tmp_path / "lab.db")
    try:
        orders = 25
        for i in range(orders):
            place_order(broker, item_id=ITEMS[i % 3], qty=1, store=conn)
        proxy.cut(listen=True)
        lines: list[str] = []
        relay = Relay(conn, broker, clock=broker.clock, seed=1, echo=lines.append)

        def stop_when_sent() -> None:
            watch = store.connect(tmp_path / "lab.db")
            deadline = time.monotonic() + 20
            while unsent(watch) and time.monotonic() < deadline:
                time.sleep(0.02)
            watch.close()
            relay.stop()

        stopper = threading.Thread(target=stop_when_sent, daemon=True)
        stopper.start()
        stats = relay.run_forever(poll_interval=0.02)
        stopper.join(5)
        assert unsent(conn) == 0
        assert stats.broker_waits == 1 and stats.marked == orders
        (said,) = [line for line in lines if "broker unavailable during send" in line]
        assert "→ retry in" in said
        assert broker.depth()["visible"] == orders  # each row once: the first send never left
    finally:
        broker.destroy()
        conn.close()
        proxy.stop()


def test_a_lost_connection_is_broker_unavailable_and_the_next_verb_connects_again(
        queue_name):
    """The link to the server fails under a worker holding leases: the verb that meets it
    raises BrokerUnavailable (never pika's own error), the server gives the messages back,
    counted, and the worker goes on over a new connection: every order applied once."""
    host, port = pika.URLParameters(URL).host, pika.URLParameters(URL).port
    proxy = HoldingProxy((host, port))
    params = pika.URLParameters(URL)
    params.host, params.port = "127.0.0.1", proxy.port
    broker = RabbitMQBroker(queue_name, clock=SystemClock(), ids=Ids(3), max_receives=10,
                            parameters=params)
    conn = store.init_db()
    try:
        orders = 40
        for i in range(orders):
            place_order(broker, item_id=ITEMS[i % 3], qty=1 + i % 2, store=conn)
        Relay(conn, broker, clock=broker.clock).run_until_idle()
        held = broker.receive(30.0, 3)
        assert len(held) == 3
        proxy.cut(listen=True)  # the link fails; the proxy takes new connections again
        with pytest.raises(BrokerUnavailable, match="during ack_many: StreamLostError"):
            broker.ack(held[0])
        lines: list[str] = []
        worker = Worker(store=conn, broker=broker, clock=broker.clock, mode="idempotent",
                        faults=Faults(seed=2), max_messages=4, name="w-1",
                        echo=lines.append)
        worker.run_until_idle()  # connects again at its first receive
        result = check(conn, broker)
        assert (result.orders, result.lost, result.pending, result.duplicated) == \
            (orders, 0, 0, 0), result.verdict
        assert result.ok and result.projection_equals_truth, result.verdict
        # The three held when the link failed came back counted: delivered a second time.
        again = {r[0] for r in conn.execute(
            "SELECT event_id FROM delivery_log WHERE outcome = 'received'"
            " AND delivery_count = 2")}
        assert {d.event_id for d in held} <= again
        assert broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}
    finally:
        broker.close()
        conn.close()
        proxy.stop()


# -- real processes ------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkilled_worker_processes_on_one_queue_lose_nothing_idempotent(tmp_path,
                                                                         queue_name):
    """Three ``deliverylab worker --broker amqp://…`` processes on one quorum queue and one
    SQLite store, lost ACKs on, SIGKILLed at random moments and restarted: every order is
    applied exactly once, and the checker says so."""
    import random

    rng = random.Random(5)
    db = tmp_path / "lab.db"
    conn = store.init_db(db)
    url = f"{URL}?queue={queue_name}"
    producer = open_url(url, clock=SystemClock(), ids=Ids(5), max_receives=1000)
    placed = 0

    def place(n: int) -> None:
        nonlocal placed
        for _ in range(n):
            place_order(producer, item_id=rng.choice(ITEMS), qty=rng.randint(1, 4), store=conn)
        Relay(conn, producer, clock=producer.clock).run_until_idle()  # from the store's outbox
        placed += n

    procs: list[Proc] = []

    def start(k: int) -> Proc:
        procs.append(Proc(tmp_path / f"w{k}-{len(procs)}.log", "worker", "--broker", url,
                          "--store", str(db), "--name", f"w{k}", "--mode", "idempotent",
                          "--seed", str(40 + len(procs)), "--ack-fail-rate", "0.2",
                          "--visibility-timeout", "5", "--work-time", "0.002",
                          "--max-messages", str(1 + 2 * (k % 2)), "--max-receives", "1000",
                          "--poll-interval", "0.02"))
        return procs[-1]

    try:
        place(150)
        workers = [start(k) for k in range(3)]
        for _ in range(8):
            time.sleep(rng.uniform(0.1, 0.3))
            place(15)  # a backlog stays, so a kill lands mid-work
            k = rng.randrange(len(workers))
            started(workers[k])
            assert workers[k].alive(), workers[k].output()[-3000:]
            workers[k].p.send_signal(signal.SIGKILL)
            assert workers[k].p.wait(timeout=30) == -signal.SIGKILL
            workers[k] = start(k)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # drained: every order applied, nothing ready
            done = conn.execute("SELECT count(*) FROM inbox_processed").fetchone()[0]
            if done == placed and producer.depth()["visible"] == 0:
                break
            time.sleep(0.1)
        for w in workers:
            started(w)  # its signal handler is in place
            assert w.terminate() == 0, w.output()[-3000:]
        no_failures(*procs)
        logs = "".join(p.output() for p in procs)
        assert "ack failed" in logs and "duplicate skipped" in logs  # faults fired, redelivered

        result = check(conn, producer)  # the workers are gone: nothing is held elsewhere
        assert result.orders == placed
        assert result.ok and result.duplicated == 0, result.verdict
        assert producer.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}
    finally:
        for p in procs:
            p.stop()
        producer.close()
        conn.close()


@pytest.mark.parametrize(("url", "says"), [
    (URL, "naming one queue"),
    (f"{URL}?queue=amq.reserved", "valid queue name"),
    ("amqp://guest:guest@127.0.0.1:1/%2F?queue=q", "Connection refused"),
])
def test_the_worker_command_refuses_a_bad_broker_url_with_exit_2(tmp_path, url, says):
    import subprocess
    import sys

    from support.processes import child_env

    db = tmp_path / "lab.db"
    store.init_db(db).close()
    done = subprocess.run([sys.executable, "-m", "deliverylab", "worker", "--broker", url,
                           "--store", str(db)], env=child_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--broker must be" in done.stderr and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    conn = store.connect(db)
    assert conn.execute("SELECT count(*) FROM delivery_log").fetchone()[0] == 0
    conn.close()


def test_the_worker_command_refuses_transactional_before_declaring_anything(tmp_path,
                                                                            queue_name):
    import subprocess
    import sys

    from support.processes import child_env

    db = tmp_path / "lab.db"
    store.init_db(db).close()
    done = subprocess.run([sys.executable, "-m", "deliverylab", "worker", "--broker",
                           f"{URL}?queue={queue_name}", "--store", str(db), "--mode",
                           "transactional"], env=child_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert "mode must be a mode other than transactional" in done.stderr
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
        conn.channel().queue_declare(queue_name, passive=True)
    conn.close()
