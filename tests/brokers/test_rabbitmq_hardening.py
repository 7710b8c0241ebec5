"""RabbitMQ under the faults an operator, a network and a foreign producer bring.

A silent link (a proxy this test runs, black-holing every byte both ways), a queue deleted
under a running worker, the operator commands on a queue a worker declared and on one that
does not exist, and URLs whose queue name does not decode cleanly. The foreign producer's
cases (no message id, bodies that are not JSON) are in ``tests/brokers/test_reliability_engines.py``.
Every test has queues of its own and deletes them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pika
import pytest
from support.brokers import AMQP_URL, rabbitmq_declared, rabbitmq_queue
from support.processes import Proc, cli, started
from support.servers import HoldingProxy

from deliverylab.brokers.rabbitmq import HEARTBEAT_S, RabbitMQBroker, open_url
from deliverylab.engine import store
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.errors import BrokerUnavailable, InvalidInput
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.relay import Relay
from deliverylab.engine.worker import Worker

URL = AMQP_URL
# pika checks every heartbeat + 5 s that the server sent something since the last check: a
# dead link is noticed within two checks.
SILENT_LINK_BOUND_S = 2 * (HEARTBEAT_S + 5)


@pytest.fixture
def queue_name() -> Iterator[str]:
    """A fresh queue name; the queue, its dead-letter queue and exchange are deleted after."""
    with rabbitmq_queue() as name:
        yield name


class BlackHole(HoldingProxy):
    """The holding proxy, dropping what either side sends while ``hold()`` is on: a link whose
    packets vanish, no reset, no error. ``heal()`` lets new bytes through again."""

    async def _pump(self, reader, writer, *, holdable: bool) -> None:  # noqa: ARG002
        while data := await reader.read(65536):
            if self.holding:
                self.held += len(data)
                continue
            writer.write(data)
            await writer.drain()

    def heal(self) -> None:
        self.holding = False


# -- a silent link -------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_black_holed_link_is_broker_unavailable_within_the_heartbeat_bound(queue_name):
    """Every byte dropped both ways, nothing refused: the verb waiting on the link raises
    BrokerUnavailable within 2 × (heartbeat + 5) seconds (before: about two minutes, the
    server's 60 s heartbeat), and once the link heals the next verb connects again and the
    message, given back by the server with the dead connection, is delivered again."""
    params = pika.URLParameters(URL)
    proxy = BlackHole((params.host, params.port))
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F?queue={queue_name}"
    broker = open_url(url, clock=SystemClock(), ids=Ids(3), max_receives=5)
    try:
        broker.send("e-1", "OrderPlaced", {"itemId": "tea", "qty": 1})
        [first] = broker.receive(60)
        proxy.hold()
        started_at = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            while True:  # each verb waits on the link until pika's heartbeat check gives up
                broker.depth()
                time.sleep(0.2)
        waited = time.monotonic() - started_at
        assert waited < SILENT_LINK_BOUND_S + 5, waited  # measured: 27 to 30 s
        proxy.heal()
        deadline = time.monotonic() + 60
        again = []
        while not again and time.monotonic() < deadline:
            try:  # the server drops the old connection at its own heartbeat check
                again = broker.receive(60)
            except BrokerUnavailable:
                time.sleep(0.5)
        assert [(d.message_id, d.event_id) for d in again] == [(first.message_id, "e-1")]
        assert again[0].delivery_count == 2
        assert broker.ack(again[0])
    finally:
        broker.close()
        proxy.stop()


def test_the_heartbeat_is_the_documented_bound_and_a_url_may_choose_its_own(queue_name):
    broker = open_url(f"{URL}?queue={queue_name}", clock=SystemClock(), ids=Ids(1))
    chosen = open_url(f"{URL}?queue={queue_name}&heartbeat=30", clock=SystemClock(),
                      ids=Ids(1))
    try:
        assert broker._conn._impl.params.heartbeat == HEARTBEAT_S == 10
        assert chosen._conn._impl.params.heartbeat == 30
    finally:
        broker.close()
        chosen.close()


# -- a queue deleted under a running worker ------------------------------------------------
@pytest.mark.parametrize("deleted", ["queue", "dlq"])
def test_a_queue_deleted_under_a_running_worker_is_one_line_and_exit_2(tmp_path, queue_name,
                                                                       deleted):
    db = tmp_path / "lab.db"
    store.init_db(db).close()
    url = f"{URL}?queue={queue_name}"
    w = Proc(tmp_path / "w.log", "worker", "--broker", url, "--store", str(db),
             "--max-receives", "3", "--poll-interval", "0.05")
    try:
        started(w)
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        conn.channel().queue_delete(queue_name if deleted == "queue" else f"{queue_name}.dlq")
        conn.close()
        assert w.p.wait(timeout=30) == 2, w.output()[-3000:]
        out = w.output()
        assert "Traceback" not in out, out
        last = out.strip().splitlines()[-1]
        name = queue_name if deleted == "queue" else f"{queue_name}.dlq"
        assert last.startswith("deliverylab worker: error: the ") and repr(name) in last, out
        assert "no longer exists" in last
        assert not rabbitmq_declared(name)  # not recreated behind the operator's back
    finally:
        w.stop()


# -- the operator commands -------------------------------------------------------------------
def test_status_with_messages_waiting_reports_depth_and_verdict(tmp_path, queue_name):
    """``status --broker amqp://…`` while messages wait (before: NotImplementedError)."""
    db = tmp_path / "lab.db"
    conn = store.init_db(db)
    url = f"{URL}?queue={queue_name}"
    producer = open_url(url, clock=SystemClock(), ids=Ids(2), max_receives=3)
    try:
        for i in range(4):
            place_order(producer, item_id="tea", qty=1 + i, store=conn)
        Relay(conn, producer, clock=producer.clock).run_until_idle()
        text = cli("status", "--db", str(db), "--broker", url)
        assert text.returncode == 0, text.stderr
        assert "Traceback" not in text.stderr
        assert "queue        4 visible" in text.stdout
        assert "cannot list waiting messages" in text.stdout
        assert "verdict      PENDING: 4 pending" in text.stdout, text.stdout
        as_json = cli("status", "--db", str(db), "--broker", url, "--json")
        assert as_json.returncode == 0, as_json.stderr
        report = json.loads(as_json.stdout)
        assert report["queue"]["visible"] == 4 and report["queue"]["listed"] is False
        assert report["check"]["pending"] == 4 and report["verdict"].startswith("PENDING")
        assert producer.depth()["visible"] == 4  # status received nothing
    finally:
        producer.close()
        conn.close()


def test_status_on_a_queue_that_does_not_exist_says_so_and_creates_nothing(tmp_path,
                                                                          queue_name):
    db = tmp_path / "lab.db"
    store.init_db(db).close()
    url = f"{URL}?queue={queue_name}"
    for command in (["status"], ["status", "--json"], ["redrive"]):
        done = cli(*command, "--db", str(db), "--broker", url)
        assert done.returncode == 2, done.stderr
        assert "no such queue" in done.stderr and "Traceback" not in done.stderr
    assert not rabbitmq_declared(queue_name) and not rabbitmq_declared(f"{queue_name}.dlq")
    assert not rabbitmq_declared(f"{queue_name}.dlx", "exchange")


def test_a_queue_a_worker_declared_with_max_receives_3_is_open_to_every_command(
        tmp_path, queue_name):
    """Before, status, redrive, drop and relay each exited 2 with PRECONDITION_FAILED
    x-delivery-limit (they declared the queue with the default limit)."""
    db = tmp_path / "lab.db"
    conn = store.init_db(db)
    url = f"{URL}?queue={queue_name}"
    w = Proc(tmp_path / "w.log", "worker", "--broker", url, "--store", str(db),
             "--max-receives", "3")
    try:
        started(w)
        assert w.terminate() == 0, w.output()
    finally:
        w.stop()
    place_order(open_url(url, clock=SystemClock(), ids=Ids(1)), item_id="tea", qty=1,
                store=conn)  # into the store's outbox: the relay publishes it
    conn.close()
    relay = Proc(tmp_path / "r.log", "relay", "--broker", url, "--store", str(db),
                 "--poll-interval", "0.05")
    try:
        started(relay)
        deadline = time.monotonic() + 20
        while "published" not in relay.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert relay.terminate() == 0, relay.output()
        said = relay.output()
    finally:
        relay.stop()
    assert "PRECONDITION_FAILED" not in said and "published" in said, said
    for command in (["status"], ["status", "--json"], ["redrive"]):
        done = cli(*command, "--db", str(db), "--broker", url)
        assert done.returncode == 0, done.stderr
        assert "PRECONDITION_FAILED" not in done.stdout + done.stderr
    drop = cli("drop", "--db", str(db), "--broker", url)
    assert "PRECONDITION_FAILED" not in drop.stderr  # refused for its own documented reason
    assert "a database whose queue 'deliverylab drop' can list" in drop.stderr
    broker = open_url(url, clock=SystemClock(), ids=Ids(1))  # as it is: the worker's limit
    try:
        assert broker.max_receives == 3 and broker.depth()["visible"] == 1
    finally:
        broker.close()


def test_open_as_it_is_reads_the_delivery_limit_and_never_changes_the_queue(queue_name):
    made = open_url(f"{URL}?queue={queue_name}", clock=SystemClock(), ids=Ids(1),
                    max_receives=7)
    made.close()
    adopted = open_url(f"{URL}?queue={queue_name}", clock=SystemClock(), ids=Ids(1))
    adopted.close()
    assert adopted.max_receives == 7
    with pytest.raises(InvalidInput, match="max_receives=4"):  # a worker's choice: checked
        open_url(f"{URL}?queue={queue_name}", clock=SystemClock(), ids=Ids(1), max_receives=4)


@pytest.mark.parametrize("query", ["queue=x%FF", "queue=ok%C3", "queue=a%ED%A0%80b"])
def test_a_queue_name_that_does_not_decode_cleanly_is_refused(query):
    """Before, ``x%FF`` became ``x\\ufffd`` and a queue of that name was declared."""
    with pytest.raises(InvalidInput) as refused:
        open_url(f"{URL}?{query}", field="--broker", clock=SystemClock(), ids=Ids(1))
    assert refused.value.field == "--broker" and "UTF-8" in str(refused.value)
    assert not rabbitmq_declared("x\ufffd")


def test_a_percent_sign_in_a_queue_name_is_decoded_once(queue_name):
    """``%2541`` is ``%41`` once decoded, not ``A`` (before: decoded twice)."""
    broker = open_url(f"{URL}?queue={queue_name}%2541", clock=SystemClock(), ids=Ids(1))
    try:
        assert broker.queue == f"{queue_name}%41"
    finally:
        broker.destroy()


def test_the_worker_over_a_link_cut_twice_reconnects_and_applies_everything(tmp_path,
                                                                          queue_name):
    """The connection dies under a running worker (the proxy closes it), twice: each time
    it says so in one line, backs off, connects again, and goes on."""
    params = pika.URLParameters(URL)
    proxy = HoldingProxy((params.host, params.port))
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F?queue={queue_name}"
    conn = store.init_db(tmp_path / "lab.db")
    broker = open_url(url, clock=SystemClock(), ids=Ids(6), max_receives=50)
    lines: list[str] = []
    try:
        for i in range(60):
            place_order(broker, item_id=f"item-{i % 3}", qty=1, store=conn)
        Relay(conn, broker, clock=broker.clock).run_until_idle()
        worker = Worker(store=conn, broker=broker, clock=broker.clock, mode="idempotent",
                        name="w-1", work_time=0.01, backoff_base=0.01, backoff_cap=0.2,
                        echo=lines.append)

        def cut_twice() -> None:
            for at in (15, 35):
                while worker.stats.applied < at:
                    time.sleep(0.005)
                proxy.cut(listen=True)
            deadline = time.monotonic() + 30
            while worker.stats.applied + worker.stats.duplicates_skipped < 60 and \
                    time.monotonic() < deadline:
                time.sleep(0.02)
            worker.stop()

        threading.Thread(target=cut_twice, daemon=True).start()
        worker.run_forever(poll_interval=0.02)
        assert worker.stats.broker_waits >= 2, lines[-10:]
        from deliverylab.engine.check import check

        result = check(conn, broker)
        assert result.ok and result.orders == 60, result.verdict
    finally:
        broker.destroy()
        conn.close()
        proxy.stop()


def test_a_broker_object_survives_its_queue_being_deleted_with_a_clear_error(queue_name):
    """In a library caller too: BrokerGone naming the queue, and the object is closed, not
    left holding dead channels."""
    from deliverylab.brokers.base import BrokerGone

    broker = RabbitMQBroker(queue_name, clock=SystemClock(), ids=Ids(1))
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    conn.channel().queue_delete(queue_name)
    conn.close()
    with pytest.raises(BrokerGone, match=f"the queue '{queue_name}' no longer exists"):
        broker.receive(1)
    broker.close()
    assert not rabbitmq_declared(queue_name)
