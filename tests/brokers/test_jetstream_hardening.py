"""JetStream under the faults an operator and a foreign producer bring, as real processes.

A body that is not JSON on the queue's subject, the stream or the consumer deleted under a
running ``deliverylab worker``, and the operator commands on a stream a worker made with its
own ``--max-receives`` and on one that does not exist. The foreign producer's engine-level
cases are in ``tests/brokers/test_reliability_engines.py``. Every test has streams of its own and
deletes them (on the shared server: nothing here restarts it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import nats
import pytest
from nats.js.errors import NotFoundError
from support.processes import Proc, cli, started

from deliverylab.brokers.jetstream import CONSUMER, JetStreamBroker, open_url
from deliverylab.engine import store
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order

SERVER = "nats://127.0.0.1:4222"


async def _js(action):  # noqa: ANN001 -- a coroutine function of the JetStream context
    nc = await nats.connect(SERVER)
    try:
        return await action(nc.jetstream())
    finally:
        await nc.close()


def js(action):  # noqa: ANN001
    """Run ``action(jetstream)`` with raw nats-py, none of this project's code."""
    return asyncio.run(_js(action))


@pytest.fixture
def stream() -> Iterator[str]:
    """A fresh stream name; the stream, its dead letters and advisories are deleted after."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name

    async def delete(j) -> None:  # noqa: ANN001
        for s in (name, f"{name}_DEAD", f"{name}_ADVISORIES"):
            try:
                await j.delete_stream(s)
            except NotFoundError:
                pass
    js(delete)


def stream_exists(name: str) -> bool:
    async def look(j) -> bool:  # noqa: ANN001
        try:
            await j.stream_info(name)
            return True
        except NotFoundError:
            return False
    return js(look)


def url_of(stream: str) -> str:
    return f"{SERVER}?stream={stream}&ack_wait=1"


def test_a_body_that_is_not_json_is_dead_lettered_and_the_worker_goes_on(tmp_path, stream):
    """Before: a JSONDecodeError traceback, exit 1, on every start. Now retried and
    dead-lettered at --max-receives with its bytes kept, and the orders after it applied."""
    db = tmp_path / "lab.db"
    conn = store.init_db(db)
    producer = open_url(url_of(stream), clock=SystemClock(), ids=Ids(1), max_receives=3)
    try:
        js(lambda j: j.publish(producer.subject, b"\x00not json\xff",
                               headers={"Nats-Msg-Id": "foreign-7"}))
        for i in range(5):
            place_order(producer, item_id="tea", qty=1 + i, store=conn)
        from deliverylab.engine.relay import Relay

        Relay(conn, producer, clock=producer.clock).run_until_idle()
        w = Proc(tmp_path / "w.log", "worker", "--broker", url_of(stream), "--store", str(db),
                 "--max-receives", "3", "--poll-interval", "0.05", "--backoff-base", "0.05",
                 "--backoff-cap", "0.1")
        try:
            started(w)
            deadline = time.monotonic() + 30
            while (producer.depth()["dead_letters"] == 0 or conn.execute(
                    "SELECT count(*) FROM inbox_processed").fetchone()[0] < 5) and \
                    time.monotonic() < deadline:
                assert w.alive(), w.output()[-3000:]
                time.sleep(0.1)
            assert w.alive() and "Traceback" not in w.output(), w.output()[-3000:]
            assert w.terminate() == 0
            out = w.output()
        finally:
            w.stop()
        assert "event=foreign-7" in out and "dead-lettered after 3 receives" in out, out
        assert producer.dead_lettered_event_ids() == {"foreign-7"}
        dead = js(lambda j: j.get_msg(producer.dead_stream, 1))
        assert dead.data == b"\x00not json\xff"
    finally:
        producer.close()
        conn.close()


@pytest.mark.parametrize("deleted", ["stream", "consumer"])
def test_a_stream_or_consumer_deleted_under_a_running_worker_is_one_line_and_exit_2(
        tmp_path, stream, deleted):
    db = tmp_path / "lab.db"
    store.init_db(db).close()
    w = Proc(tmp_path / "w.log", "worker", "--broker", url_of(stream), "--store", str(db),
             "--max-receives", "3", "--poll-interval", "0.05")
    try:
        started(w)
        if deleted == "stream":
            js(lambda j: j.delete_stream(stream))
        else:
            js(lambda j: j.delete_consumer(stream, CONSUMER))
        assert w.p.wait(timeout=30) == 2, w.output()[-3000:]
        out = w.output()
    finally:
        w.stop()
    assert "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("deliverylab worker: error: the "), out
    assert f"the {deleted} " in last and "no longer exists" in last, last
    assert (deleted == "stream") != stream_exists(stream)  # nothing recreated


def test_status_on_a_stream_that_does_not_exist_says_so_and_creates_nothing(tmp_path, stream):
    db = tmp_path / "lab.db"
    store.init_db(db).close()
    for command in (["status"], ["status", "--json"], ["redrive"]):
        done = cli(*command, "--db", str(db), "--broker", url_of(stream))
        assert done.returncode == 2, done.stderr
        assert "no such stream" in done.stderr and "Traceback" not in done.stderr
    for name in (stream, f"{stream}_DEAD", f"{stream}_ADVISORIES"):
        assert not stream_exists(name)


def test_a_stream_a_worker_made_with_max_receives_3_is_open_to_every_command(tmp_path, stream):
    """Before: status, redrive and relay refused it (their default max_receives 5 is not the
    consumer's MaxDeliver 3)."""
    db = tmp_path / "lab.db"
    conn = store.init_db(db)
    w = Proc(tmp_path / "w.log", "worker", "--broker", url_of(stream), "--store", str(db),
             "--max-receives", "3")
    try:
        started(w)
        assert w.terminate() == 0, w.output()
    finally:
        w.stop()
    adopted = open_url(url_of(stream), clock=SystemClock(), ids=Ids(1))
    try:
        assert adopted.max_receives == 3
        place_order(adopted, item_id="tea", qty=2, store=conn)
    finally:
        adopted.close()
    relay = Proc(tmp_path / "r.log", "relay", "--broker", url_of(stream), "--store", str(db),
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
    assert "published" in said and "max_receives" not in said, said
    for command in (["status"], ["status", "--json"], ["redrive"]):
        done = cli(*command, "--db", str(db), "--broker", url_of(stream))
        assert done.returncode == 0, done.stderr
    status = cli("status", "--db", str(db), "--broker", url_of(stream))
    assert "queue        1 visible" in status.stdout, status.stdout
    check = JetStreamBroker(SERVER, stream=stream, clock=SystemClock(), ids=Ids(1),
                            max_receives=3, ack_wait=1)
    check.close()  # the worker's own settings still open it: nothing was changed
    conn.close()


@pytest.mark.slow
def test_two_cluster_starts_on_one_directory_at_once_start_one_cluster(tmp_path):
    """Two ``deliverylab cluster start`` on one --dir at the same moment (before: both spawned
    the same ports and both failed). One starts the cluster; the other waits for it and
    finds it running: both exit 0 and three servers run, not six."""
    import subprocess
    import sys

    from support.processes import child_env, servers_of

    from deliverylab.clusters.nats_cluster import NatsCluster, free_base_port

    where = tmp_path / "cluster"
    base = free_base_port()
    args = [sys.executable, "-m", "deliverylab", "cluster", "start", "--dir", str(where),
            "--base-port", str(base)]
    both = [subprocess.Popen(args, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=90) for p in both]
        for p, (out, err) in zip(both, outs, strict=True):
            assert p.returncode == 0, (out, err)
            assert out.count(": answering (pid ") == 3, out
        assert len(servers_of(where)) == 3
    finally:
        for p in both:
            if p.poll() is None:
                p.kill()
        if (where / "cluster.json").exists():
            NatsCluster.open(where).stop()
    assert servers_of(where) == []


@pytest.mark.slow
def test_two_starts_of_one_cluster_object_pair_at_the_same_instant_take_turns(tmp_path):
    """The same race without process start-up times to spread it: two cluster objects on one
    directory released by one barrier. The lock makes the second wait for the first and
    start nothing; without it both spawn three servers on the same ports."""
    import threading

    from support.processes import servers_of

    from deliverylab.clusters.nats_cluster import NatsCluster, free_base_port

    where = tmp_path / "cluster"
    base = free_base_port()
    pair = [NatsCluster(where, base_port=base) for _ in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def start(c: NatsCluster) -> None:
        barrier.wait()
        try:
            c.start(timeout=30)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(c,)) for c in pair]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert errors == []
        assert len(servers_of(where)) == 3
        assert sorted(pair[0]._pids.values()) == sorted(pair[1]._pids.values())
    finally:
        NatsCluster.open(where).stop() if (where / "cluster.json").exists() else None
        for c in pair:
            c.stop()
    assert servers_of(where) == []


@pytest.mark.slow
def test_the_client_reconnects_after_an_outage_longer_than_a_minute(tmp_path):
    """The broker's own server (a nats-server of this test's, never the shared one) is down
    for 75 s, longer than the client used to keep reconnecting (about a minute: then it closed
    for good, and every verb of the worker was BrokerUnavailable for ever). Each verb meanwhile
    is BrokerUnavailable after the broker's timeout; once the server is back on the same
    storage, the next verb goes through on the same broker object."""
    from support.servers import OwnServer

    from deliverylab.engine.errors import BrokerUnavailable

    server = OwnServer(tmp_path / "nats")
    server.directory.mkdir()
    server.start()
    broker = None
    try:
        broker = JetStreamBroker(server.url, stream=f"test-{uuid.uuid4().hex[:12]}",
                                 clock=SystemClock(), ids=Ids(1), ack_wait=1.0, timeout=1.0)
        broker.send("e-1", "OrderPlaced", {"itemId": "tea", "qty": 1})
        server.kill()
        down_until = time.monotonic() + 75
        while time.monotonic() < down_until:
            with pytest.raises(BrokerUnavailable):
                broker.depth()
            time.sleep(5)
        server.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                assert broker.depth()["visible"] + broker.depth()["in_flight"] == 1
                break
            except BrokerUnavailable:
                assert time.monotonic() < deadline, "not reconnected within 30 s"
                time.sleep(0.5)
        assert [d.event_id for d in broker.receive(1.0)] == ["e-1"]
    finally:
        if broker is not None:
            broker.close()
        server.stop()


class SilencingProxy:
    """A TCP proxy in front of the shared NATS server, in a thread of its own. ``silence()``:
    every connection open now goes silent both ways (its bytes dropped, nothing closed, no
    reset), while connections made afterwards pass: a link that died without a word, and a
    route that works again for whoever reconnects."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 4222)) -> None:
        import threading

        self.upstream = upstream
        self.silenced: set[int] = set()
        self.count = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", 0), self.loop).result(5)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _client(self, reader, writer) -> None:  # noqa: ANN001
        self.count += 1
        cid = self.count
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        await asyncio.gather(self._pump(cid, reader, up_writer),
                             self._pump(cid, up_reader, writer), return_exceptions=True)

    async def _pump(self, cid: int, reader, writer) -> None:  # noqa: ANN001
        while data := await reader.read(65536):
            if cid in self.silenced:
                continue
            writer.write(data)
            await writer.drain()

    def silence(self) -> None:
        self.silenced.update(range(1, self.count + 1))

    def stop(self) -> None:
        self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.mark.slow
def test_a_link_that_dies_silently_is_dropped_and_the_client_reconnects(stream):
    """The broker's connection goes silent both ways (no reset). Within the ping bound the
    client calls it stale and connects again, and the verbs go through (before: every verb
    BrokerUnavailable for the six minutes of nats-py's default pings)."""
    from deliverylab.brokers.jetstream import MAX_PINGS, PING_S
    from deliverylab.engine.errors import BrokerUnavailable

    proxy = SilencingProxy()
    broker = JetStreamBroker(f"nats://127.0.0.1:{proxy.port}", stream=stream,
                             clock=SystemClock(), ids=Ids(1), ack_wait=1.0, timeout=1.0)
    try:
        broker.send("e-1", "OrderPlaced", {"itemId": "tea", "qty": 1})
        proxy.silence()
        silenced_at = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            broker.depth()  # no answer on the silent link: unavailable after the timeout
        deadline = silenced_at + (MAX_PINGS + 1) * PING_S + 10
        while True:
            try:
                depth = broker.depth()
                break
            except BrokerUnavailable:
                assert time.monotonic() < deadline, "still unavailable past the ping bound"
                time.sleep(0.5)
        assert depth["visible"] == 1 and proxy.count >= 2  # over a new connection
        assert [d.event_id for d in broker.receive(1.0)] == ["e-1"]
    finally:
        broker.close()
        proxy.stop()
