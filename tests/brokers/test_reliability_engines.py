"""The reliability battery: the same attacks on every broker engine, wherever they apply.

Each engine of ``BROKER_ENGINES`` (``tests/conftest.py``) is attacked the way a flaky network,
a crashing process, a careless caller and a foreign producer would attack it:

* **lost ACKs**: the idempotent worker applies every order exactly once, the at-least-once
  worker applies some twice (the fault did strike);
* **kills**: a real ``deliverylab worker`` process SIGKILLed mid-run and started again loses
  nothing and applies nothing twice;
* **bad input**: every verb refuses a bad argument, naming it, and changes nothing;
* **foreign messages** (RabbitMQ and JetStream, the engines another producer can publish to,
  with raw pika and raw nats-py): a message with no id is dead-lettered at once, never
  applied, whatever happens to its ACKs; a body that is not a JSON object is retried and
  dead-lettered at ``max_receives`` with its bytes kept. On the queue tables (SQLite,
  PostgreSQL) only the project writes, and the table's NOT NULL ids refuse such a row.

What each case does on each engine is listed in ``lab/reliability.md``. Every test has queues,
streams and schemas of its own and removes them.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from support.brokers import AMQP_URL, BROKER_ENGINES, capabilities_of
from support.processes import Proc, no_failures, started

from deliverylab.brokers.base import NO_MESSAGE_ID, Broker, Delivery
from deliverylab.brokers.jetstream import JetStreamBroker
from deliverylab.brokers.rabbitmq import RabbitMQBroker
from deliverylab.engine import store
from deliverylab.engine.check import check
from deliverylab.engine.clock import FakeClock, SystemClock
from deliverylab.engine.errors import STORE_ERRORS, InvalidInput
from deliverylab.engine.faults import Faults
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.relay import Relay
from deliverylab.engine.worker import Worker

AMQP = AMQP_URL
NATS = "nats://127.0.0.1:4222"
ENGINES = list(BROKER_ENGINES)
FOREIGN = ["rabbitmq", "jetstream"]  # the engines another producer can publish to


def clock_for(engine: str) -> FakeClock | SystemClock:
    """An engine whose server times the lease (JetStream, Redis) runs its worker on the wall
    clock."""
    return SystemClock() if capabilities_of(engine).lease_clock == "server" else FakeClock()


def engine_of(request: pytest.FixtureRequest) -> str:
    return request.node.callspec.params["make_broker"]


def run_orders(broker: Broker, conn: sqlite3.Connection, n: int) -> None:
    """``n`` orders placed through the store (relayed from its outbox when the broker is
    apart from it)."""
    for i in range(n):
        place_order(broker, item_id=f"item-{i % 3}", qty=1 + i % 2, store=conn)
    if not broker.joins(conn):
        Relay(conn, broker, clock=broker.clock).run_until_idle()


def store_for(broker: Broker) -> sqlite3.Connection:
    """The consumer's store: the broker's own connection when it is the lab's queue table
    (SQLite in memory), else a store of its own."""
    conn = getattr(broker, "conn", None)
    if conn is not None and broker.joins(conn):
        return conn
    return store.init_db()


# -- lost ACKs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make_broker", ENGINES, indirect=True)
@pytest.mark.parametrize("mode", ["idempotent", "at-least-once"])
def test_lost_acks(make_broker, request, mode):
    """Both halves of a lost ACK (the request lost, the answer lost) at a high rate: the
    idempotent worker applies every order once; the at-least-once one applies some twice."""
    engine = engine_of(request)
    broker = make_broker(clock=clock_for(engine), max_receives=50)
    conn = store_for(broker)
    run_orders(broker, conn, 30)
    worker = Worker(store=conn, broker=broker, clock=broker.clock, mode=mode,
                    faults=Faults(seed=4, ack_fail=0.25, ack_answer_lost=0.25),
                    name="w-1", visibility_timeout=2.0, backoff_base=0.01, backoff_cap=0.05)
    worker.run_until_idle()
    result = check(conn, broker)
    assert worker.stats.ack_failed > 0  # the fault struck
    assert result.orders == 30 and result.lost == 0 and result.pending == 0, result.verdict
    if mode == "idempotent":
        assert result.ok and result.duplicated == 0, result.verdict
        assert worker.stats.duplicates_skipped > 0
    else:
        assert result.duplicated > 0, result.verdict


# -- kills ----------------------------------------------------------------------------------------
@pytest.fixture
def worker_command(request: pytest.FixtureRequest, tmp_path: Path
                   ) -> Iterator[Callable[[], tuple[list[str], Broker, sqlite3.Connection]]]:
    """For the param's engine: (the ``deliverylab worker`` flags naming store and broker, a
    producer broker, the store's connection); the queue, stream or schema is removed after."""
    engine = request.param
    closers: list[Callable[[], None]] = []

    def make() -> tuple[list[str], Broker, sqlite3.Connection]:
        clock, ids = SystemClock(), Ids(9)
        if engine.startswith("sqlite"):
            db = tmp_path / "lab.db"
            conn = store.init_db(db)
            from deliverylab.brokers.sqlite import Queue

            closers.append(conn.close)
            return ["--db", str(db)], Queue(conn, clock=clock, ids=ids), conn
        if engine == "postgresql":
            from contextlib import ExitStack

            from support.pg import schema

            from deliverylab.brokers.postgres import PostgresBroker
            from deliverylab.engine import store_postgres

            stack = ExitStack()
            url = stack.enter_context(schema())
            conn = store_postgres.connect(url)
            stack.callback(conn.close)
            closers.append(stack.close)
            return ["--db", url], PostgresBroker(conn, clock=clock, ids=ids), conn
        db = tmp_path / "lab.db"
        conn = store.init_db(db)
        closers.append(conn.close)
        if engine == "rabbitmq":
            url = f"{AMQP}?queue=test-{uuid.uuid4().hex}"
            from deliverylab.brokers.rabbitmq import open_url

            broker: Broker = open_url(url, clock=clock, ids=ids, max_receives=1000)
        else:
            url = f"{NATS}?stream=test-{uuid.uuid4().hex[:12]}&ack_wait=1"
            from deliverylab.brokers.jetstream import open_url as open_js

            broker = open_js(url, clock=clock, ids=ids, max_receives=1000)
        closers.append(broker.destroy)  # type: ignore[attr-defined]
        return ["--store", str(db), "--broker", url], broker, conn

    yield make
    for close in reversed(closers):
        close()


@pytest.mark.slow
@pytest.mark.parametrize("worker_command", ["sqlite-file", "postgresql", "rabbitmq", "jetstream"],
                         indirect=True)
def test_a_sigkilled_worker_process_loses_nothing_and_applies_nothing_twice(
        worker_command, tmp_path):
    """A ``deliverylab worker --mode idempotent`` is SIGKILLed while it works through the
    queue, twice, and started again: in the end every order is applied exactly once."""
    flags, broker, conn = worker_command()
    orders = 60
    run_orders(broker, conn, orders)
    procs: list[Proc] = []

    def start() -> Proc:
        procs.append(Proc(tmp_path / f"w{len(procs)}.log", "worker", *flags, "--name", "w",
                          "--mode", "idempotent", "--max-receives", "1000",
                          "--visibility-timeout", "1", "--work-time", "0.02",
                          "--poll-interval", "0.02"))
        return procs[-1]

    def applied() -> int:
        return len(set(r[0] for r in conn.execute(
            "SELECT event_id FROM delivery_log WHERE outcome = 'applied'").fetchall()))

    try:
        for round_ in (1, 2):
            w = start()
            started(w)
            deadline = time.monotonic() + 60
            while applied() < round_ * orders // 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert w.alive(), w.output()[-2000:]
            w.p.send_signal(signal.SIGKILL)
            assert w.p.wait(timeout=30) == -signal.SIGKILL
        w = start()
        started(w)
        deadline = time.monotonic() + 90
        while applied() < orders and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.terminate() == 0, w.output()[-3000:]
        no_failures(*procs)
        result = check(conn, broker)
        assert result.orders == orders
        assert result.ok and result.duplicated == 0, result.verdict
    finally:
        for p in procs:
            p.stop()


# -- bad input ------------------------------------------------------------------------------------
BAD_CALLS: dict[str, tuple[str, Callable[[Broker, Delivery], Any]]] = {
    "send event_id": ("event_id", lambda b, d: b.send("", "OrderPlaced", {"qty": 1})),
    "send payload": ("payload", lambda b, d: b.send("e-x", "OrderPlaced", [1, 2])),
    "send type": ("type", lambda b, d: b.send("e-x", "Order\x1b[2J", {"qty": 1})),
    "receive visibility": ("visibility_timeout", lambda b, d: b.receive(-1)),
    "receive max_messages": ("max_messages", lambda b, d: b.receive(1, 0)),
    "ack not a delivery": ("delivery", lambda b, d: b.ack(d.message_id)),
    "nack delay": ("delay", lambda b, d: b.nack(d, float("nan"))),
    "extend seconds": ("seconds", lambda b, d: b.extend(d, -5)),
    "dead_letter error": ("error", lambda b, d: b.dead_letter(d, "")),
    "redrive unknown id": ("message_ids", lambda b, d: b.redrive(["no-such-message"])),
}


@pytest.mark.parametrize("make_broker", ENGINES, indirect=True)
def test_bad_input_is_named_and_changes_nothing(make_broker):
    broker = make_broker()
    broker.send("e-1", "OrderPlaced", {"qty": 1}, correlation_id="o-1")
    [d] = broker.receive(60)
    before = broker.depth()
    for name, (field, call) in BAD_CALLS.items():
        with pytest.raises(InvalidInput) as refused:
            call(broker, d)
        assert refused.value.field == field, name
        assert broker.depth() == before, name
    assert broker.ack(d)  # the lease is still the caller's: nothing was taken from it


# -- foreign producers ------------------------------------------------------------------------
def publish_raw(broker: Broker, body: bytes, *, message_id: str | None = None,
                type: str | None = None, headers: dict[str, str] | None = None) -> None:
    """Publish as another producer would, with the engine's own client library and none of
    this project's code: pika's defaults (no message_id), nats-py's (no headers). The
    documented names: RabbitMQ's ``message_id`` and ``type`` properties, JetStream's
    ``Nats-Msg-Id`` and ``Deliverylab-Type`` headers."""
    if isinstance(broker, RabbitMQBroker):
        conn = pika.BlockingConnection(pika.URLParameters(AMQP))
        conn.channel().basic_publish("", broker.queue, body, pika.BasicProperties(
            message_id=message_id, type=type, headers=headers))
        conn.close()
        return
    assert isinstance(broker, JetStreamBroker)

    async def publish() -> None:
        import nats

        nc = await nats.connect(NATS)
        h = dict(headers or {})
        if message_id is not None:
            h["Nats-Msg-Id"] = message_id
        if type is not None:
            h["Deliverylab-Type"] = type
        await nc.jetstream().publish(broker.subject, body, headers=h or None)
        await nc.close()

    asyncio.run(publish())


def raw_dead_letters(broker: Broker) -> list[tuple[bytes, dict[str, Any]]]:
    """The dead letters as bytes and headers, read with the engine's client library."""
    if isinstance(broker, RabbitMQBroker):
        conn = pika.BlockingConnection(pika.URLParameters(AMQP))
        ch = conn.channel()
        out = []
        while True:
            method, props, body = ch.basic_get(broker.dlq)
            if method is None:
                break
            out.append((body, dict(props.headers or {})))
        conn.close()  # unacked: they go back
        return out
    assert isinstance(broker, JetStreamBroker)

    async def read() -> list[tuple[bytes, dict[str, Any]]]:
        import nats

        nc = await nats.connect(NATS)
        js = nc.jetstream()
        info = await js.stream_info(broker.dead_stream)
        got = [await js.get_msg(broker.dead_stream, s)
               for s in range(info.state.first_seq, info.state.last_seq + 1)
               if info.state.messages]
        await nc.close()
        return [(m.data or b"", dict(m.headers or {})) for m in got]

    return asyncio.run(read())


def worker_on(broker: Broker, conn: sqlite3.Connection, lines: list[str], *,
              faults: Faults | None = None, name: str = "w-1") -> Worker:
    return Worker(store=conn, broker=broker, clock=broker.clock, mode="idempotent",
                  faults=faults or Faults(seed=1), name=name, visibility_timeout=2.0,
                  echo=lines.append, backoff_base=0.01, backoff_cap=0.05)


def drain(worker: Worker, broker: Broker, within: float = 20.0) -> None:
    """Step until nothing is queued (on JetStream, redeliveries come on the server's clock)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        worker.run_until_idle(max_steps=200)
        d = broker.depth()
        if d["visible"] + d["in_flight"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"not drained within {within:g}s: {broker.depth()}")


@pytest.mark.parametrize("make_broker", FOREIGN, indirect=True)
def test_a_message_with_no_id_is_dead_lettered_at_once_and_never_applied(make_broker, request):
    """A raw producer's message with no id, its ACK lost on every delivery: it is refused on
    its first delivery, said so in the worker's log, counted as a dead letter without id, and
    never reaches the handler (before: applied three times, its id a per-process counter)."""
    broker = make_broker(clock=clock_for(engine_of(request)), max_receives=5)
    conn = store.init_db()
    body = b'{"itemId": "tea", "qty": 2, "orderId": "o-foreign"}'
    publish_raw(broker, body, headers={"x-origin": "billing"})
    lines: list[str] = []
    worker = worker_on(broker, conn, lines, faults=Faults(seed=1, ack_fail=1.0))
    drain(worker, broker)
    assert worker.stats.received == 0 and worker.stats.applied == 0
    assert worker.stats.dead_lettered == 1
    assert any(NO_MESSAGE_ID in line and "dead-lettered" in line for line in lines), lines
    assert conn.execute("SELECT count(*) FROM inventory_projection").fetchone()[0] == 0
    assert broker.dead_letters_without_id() == 1
    assert broker.dead_lettered_event_ids() == set()
    [(dead_body, headers)] = raw_dead_letters(broker)
    assert dead_body == body  # as it came, bytes and headers
    assert headers.get("x-origin") == "billing"
    assert broker.redrive() == 0  # it would only be refused again: it stays


@pytest.mark.parametrize("make_broker", FOREIGN, indirect=True)
def test_two_messages_with_no_id_read_by_fresh_workers_are_both_refused(make_broker, request):
    """Each read by a newly started worker (before: both got the id ``amqp-1``, the second was
    skipped as a duplicate and its effect lost)."""
    broker = make_broker(clock=clock_for(engine_of(request)))
    conn = store.init_db()  # one store: a second "amqp-1" would be skipped as a duplicate
    for k, qty in ((1, 1), (2, 3)):
        publish_raw(broker, f'{{"itemId": "tea", "qty": {qty}}}'.encode(), type="OrderPlaced")
        lines: list[str] = []
        worker = worker_on(broker, conn, lines, name=f"w-{k}")
        drain(worker, broker)
        assert (worker.stats.dead_lettered, worker.stats.applied,
                worker.stats.duplicates_skipped) == (1, 0, 0), lines
    assert broker.dead_letters_without_id() == 2
    assert conn.execute("SELECT count(*) FROM inbox_processed").fetchone()[0] == 0


@pytest.mark.parametrize("make_broker", FOREIGN, indirect=True)
def test_a_producer_set_id_makes_a_foreign_message_idempotent(make_broker, request):
    """The documented way for another producer: RabbitMQ's ``message_id`` property, or
    JetStream's ``Nats-Msg-Id`` header. The id is the message's own, the same on every
    redelivery: with the ACK's answer lost, it is applied once, then skipped."""
    broker = make_broker(clock=clock_for(engine_of(request)), max_receives=10)
    conn = store.init_db()
    publish_raw(broker, b'{"itemId": "tea", "qty": 2}', message_id="billing-42",
                type="OrderPlaced")
    lines: list[str] = []
    worker = worker_on(broker, conn, lines,
                       faults=Faults(seed=2, ack_answer_lost=0.5))
    drain(worker, broker)
    assert worker.stats.applied == 1, lines
    assert dict(conn.execute("SELECT item_id, reserved_qty FROM inventory_projection")) == \
        {"tea": 2}
    assert [r[0] for r in conn.execute("SELECT event_id FROM inbox_processed")] == ["billing-42"]


@pytest.mark.parametrize("body", [b"not json at all", b"\xff\xfe\x00binary", b"[1, 2, 3]"],
                         ids=["text", "binary", "json-array"])
@pytest.mark.parametrize("make_broker", FOREIGN, indirect=True)
def test_a_body_that_is_no_json_object_is_dead_lettered_at_max_receives_bytes_kept(
        make_broker, request, body):
    """Retried, then dead-lettered at exactly ``max_receives``, the worker running on (before,
    on JetStream: a JSONDecodeError traceback on every start; on RabbitMQ the dead letter's
    body was rewritten as lossy UTF-8)."""
    broker = make_broker(clock=clock_for(engine_of(request)), max_receives=3)
    conn = store.init_db()
    publish_raw(broker, body, message_id="foreign-1", headers={"x-origin": "billing"})
    lines: list[str] = []
    worker = worker_on(broker, conn, lines)
    drain(worker, broker, within=30)
    assert worker.stats.applied == 0 and worker.stats.dead_lettered == 1, lines
    assert broker.dead_lettered_event_ids() == {"foreign-1"}
    [(dead_body, headers)] = raw_dead_letters(broker)
    assert dead_body == body
    assert headers.get("x-origin") == "billing"


@pytest.mark.parametrize("make_broker", ["sqlite-file", "postgresql"], indirect=True)
def test_a_queue_table_refuses_a_row_with_no_id(make_broker):
    """Where the queue is a table only the project writes, a row with no ids cannot exist:
    the schema refuses it (NOT NULL), and the queue is unchanged."""
    broker = make_broker()
    conn = broker.conn  # type: ignore[attr-defined]
    before = broker.depth()
    with pytest.raises(STORE_ERRORS):
        conn.execute("INSERT INTO queue_messages (message_id, event_id, type, payload,"
                     " visible_at, created_at) VALUES (?, NULL, 'OrderPlaced', '{}', 0, 0)",
                     ("m-1",))
    if conn.in_transaction:
        conn.rollback()
    assert broker.depth() == before


@pytest.mark.parametrize("make_broker", FOREIGN, indirect=True)
def test_status_counts_the_dead_letters_with_no_id(make_broker, request):
    """``deliverylab status`` (and ``GET /status``): the refused message is a dead letter of
    its own kind, with no event and no order, and the page says why."""
    from deliverylab.app.status import collect, render

    broker = make_broker(clock=clock_for(engine_of(request)))
    conn = store.init_db()
    place_order(broker, item_id="tea", qty=1, store=conn)
    Relay(conn, broker, clock=broker.clock).run_until_idle()
    publish_raw(broker, b'{"itemId": "tea", "qty": 5}', type="OrderPlaced")
    lines: list[str] = []
    drain(worker_on(broker, conn, lines), broker)
    report = collect(conn, broker=broker)
    assert [(d["eventId"], d["lastError"]) for d in report["deadLetters"]] == \
        [(None, NO_MESSAGE_ID)]
    assert report["ok"] and report["check"]["dead_lettered"] == 0, report["verdict"]
    text = render(report)
    assert "dead letters 1 (1 with no message id" in text, text
