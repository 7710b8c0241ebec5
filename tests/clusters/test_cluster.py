"""A three-node JetStream cluster, started and stopped by the tests themselves.

Each test that needs servers starts its own cluster on free ports under ``tmp_path`` and
stops it in its teardown, failure or not; the teardown then checks that no ``nats-server``
of that cluster is left. The runs SIGKILL the real leader of a real replicated stream while
real ``deliverylab worker`` processes consume from it, and assert invariants only: every
order applied exactly once (idempotent) or some applied twice (at-least-once), the checker's
verdict, and a leader that really changed. No timing is asserted beyond the bounds that keep
a run finite.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import env, servers_of

from deliverylab.book.cluster_run import cluster_run, longest_gap, publish_pauses
from deliverylab.brokers.jetstream import JetStreamBroker
from deliverylab.clusters.nats_cluster import (
    ROUTE_OFFSET,
    ClusterError,
    NatsCluster,
    free_base_port,
)
from deliverylab.clusters.rabbitmq_cluster import RabbitCluster
from deliverylab.clusters.rabbitmq_cluster import free_base_port as rabbit_base_port
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.ids import Ids


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for one cluster; whatever the test did, no server of it survives."""
    where = tmp_path / "cluster"
    yield where
    left = servers_of(where)
    if left:  # stop them first, so a failing test leaves nothing running either
        if (where / "cluster.json").exists():
            NatsCluster.open(where).stop()
    assert left == [], f"nats-server processes left running: {left}"


@pytest.fixture
def cluster(cluster_dir: Path) -> Iterator[NatsCluster]:
    c = NatsCluster(cluster_dir, base_port=free_base_port())
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.mark.slow
def test_a_replicated_stream_gets_a_new_leader_when_its_leader_is_killed(cluster):
    nodes = cluster.status()
    assert all(n.running and n.answering for n in nodes)
    assert len({n.meta_leader for n in nodes}) == 1 and nodes[0].meta_leader is not None
    stream = f"T_{uuid.uuid4().hex[:12]}"
    broker = JetStreamBroker(cluster.servers, stream=stream, replicas=3, clock=SystemClock(),
                             ids=Ids(1), ack_wait=1.0, timeout=30.0)
    try:
        before = [broker.send(f"evt-{i}", "OrderPlaced", {"i": i}, dedup_id=f"evt-{i}")
                  for i in range(20)]
        leaders = cluster.stream_leaders(stream)
        assert set(leaders) == {"node1", "node2", "node3"}  # every node holds a replica
        leader = cluster.wait_stream_leader(stream)
        pid = cluster.kill(leader)
        assert cluster.pid(leader) is None and pid not in servers_of(cluster.directory)
        new = cluster.wait_stream_leader(stream, other_than=leader)
        assert new != leader
        # The stream kept what it had confirmed, and takes publishes again on the new leader.
        after = broker.send("evt-after", "OrderPlaced", {"i": -1}, dedup_id="evt-after")
        assert broker.queued_event_ids() == {f"evt-{i}" for i in range(20)} | {"evt-after"}
        assert after not in before
        # A retried publish with a confirmed dedup id is not stored twice, across the change.
        assert broker.send("evt-3", "OrderPlaced", {"i": 3}, dedup_id="evt-3") == before[3]
        assert len(broker.queued_event_ids()) == 21
        cluster.restart(leader)
        assert cluster.pid(leader) is not None
        # Back in the cluster means caught up: every node, the restarted one included, names
        # one leader for the stream. Until then a stream request can wait on the election.
        deadline = time.monotonic() + 60
        while len(set(cluster.stream_leaders(stream).values()) - {None}) != 1 \
                or None in cluster.stream_leaders(stream).values() \
                or leader not in cluster.stream_leaders(stream):
            assert time.monotonic() < deadline, cluster.stream_leaders(stream)
            time.sleep(0.1)
    finally:
        broker.destroy()
    stopped = cluster.stop()
    assert stopped == ["node1", "node2", "node3"]
    assert servers_of(cluster.directory) == []


def test_a_cluster_refuses_ports_in_use_and_writes_nothing(tmp_path, cluster_dir):
    base = free_base_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base + ROUTE_OFFSET + 1))
        busy.listen()
        with pytest.raises(ClusterError, match=rf"node2 cannot start: port\(s\)"
                                               rf" \[{base + ROUTE_OFFSET + 1}\]"):
            NatsCluster(cluster_dir, base_port=base).start()
    assert not cluster_dir.exists()


def test_a_missing_server_binary_is_named_and_nothing_is_left(cluster_dir):
    missing = cluster_dir.parent / "no-such-nats-server"
    with pytest.raises(ClusterError, match=rf"cannot run '{missing}' \(No such file"
                                           rf" or directory\): install nats-server"):
        NatsCluster(cluster_dir, base_port=free_base_port(), binary=str(missing)).start()
    assert not cluster_dir.exists()


@pytest.mark.parametrize("bad", [80, 65000, "14222", True, None])
def test_a_bad_base_port_is_named(tmp_path, bad):
    with pytest.raises(InvalidInput, match="base_port must be an integer"):
        NatsCluster(tmp_path / "c", base_port=bad)
    assert not (tmp_path / "c").exists()


def deliverylab(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deliverylab", *map(str, args)],
                          capture_output=True, text=True, env=env(), timeout=timeout)


@pytest.mark.slow
def test_the_cli_starts_a_cluster_that_another_process_stops(cluster_dir):
    base = free_base_port()
    started = deliverylab("cluster", "start", "--dir", cluster_dir, "--base-port", base)
    try:
        assert started.returncode == 0, started.stderr
        assert len(servers_of(cluster_dir)) == 3  # they outlive the command that started them
        assert f"nats://127.0.0.1:{base},127.0.0.1:{base + 1},127.0.0.1:{base + 2}" \
            in started.stdout
        status = deliverylab("cluster", "status", "--dir", cluster_dir)
        assert status.returncode == 0, status.stderr
        assert status.stdout.count(": answering (pid ") == 3
        other = deliverylab("cluster", "status", "--dir", cluster_dir, "--base-port", base + 10)
        assert other.returncode == 2
        assert f"--base-port: the cluster in '{cluster_dir}' uses base port {base}" \
            in other.stderr
    finally:
        stopped = deliverylab("cluster", "stop", "--dir", cluster_dir)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped node1, node2, node3" in stopped.stdout
    assert servers_of(cluster_dir) == []
    status = deliverylab("cluster", "status", "--dir", cluster_dir)
    assert status.returncode == 1 and status.stdout.count(": down (pid -") == 3


@pytest.mark.parametrize(("args", "message"), [
    (["start", "--base-port", "80"], "argument --base-port: must be an integer >= 1024"),
    (["start", "--base-port", "x"], "argument --base-port: must be an integer"),
    (["stop", "--dir", ""], "argument --dir: must be a file path"),
    (["reboot"], "argument action: invalid choice: 'reboot'"),
])
def test_the_cli_names_a_bad_flag(tmp_path, args, message):
    done = deliverylab("cluster", *args)
    assert done.returncode == 2
    assert message in done.stderr


def test_the_cli_refuses_a_file_as_the_cluster_directory(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    done = deliverylab("cluster", "start", "--dir", path)
    assert done.returncode == 2
    assert f"--dir must be a directory, got '{path}' (a file)" in done.stderr
    assert path.read_text() == "x"


@pytest.mark.parametrize("state", ['{"base_port": 24900, "pids": {"node1": "../x"}}', "[1]",
                                   "not json", '{"base_port": 80, "pids": {}}'])
def test_a_state_file_that_is_not_a_clusters_is_refused_and_left_alone(tmp_path, state):
    (tmp_path / "cluster.json").write_text(state)
    for action in ("status", "stop", "start"):
        done = deliverylab("cluster", action, "--dir", tmp_path)
        assert done.returncode == 2
        assert "--dir must be a cluster directory with a readable cluster.json" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.json"]
    assert (tmp_path / "cluster.json").read_text() == state


def test_status_and_stop_of_no_cluster_say_so(tmp_path):
    status = deliverylab("cluster", "status", "--dir", tmp_path / "none")
    assert status.returncode == 1 and "no cluster in" in status.stdout
    stop = deliverylab("cluster", "stop", "--dir", tmp_path / "none")
    assert stop.returncode == 0 and "nothing to stop" in stop.stdout
    assert not (tmp_path / "none").exists()


def test_the_longest_gap_counts_from_the_last_confirmation_before_the_kill():
    acks = [0.0, 1.0, 2.0, 2.5, 7.5, 8.0, 20.0]
    # The gap that spans the kill at 3.0 is 2.5 -> 7.5; 8.0 -> 20.0 starts after ``until``
    # (7.9), so it is not counted; with a later ``until`` it is, and it is longer.
    assert longest_gap(acks, 3.0, 7.9) == acks[4] - acks[3]
    assert longest_gap(acks, 3.0, 10.0) == acks[6] - acks[5]
    # Gaps before the last confirmation before the kill never count.
    assert longest_gap(acks, 7.6, 7.9) == acks[5] - acks[4]
    assert longest_gap([], 3.0, 10.0) == 0.0


def test_a_run_refuses_bad_input_before_starting_anything(tmp_path):
    with pytest.raises(InvalidInput, match="mode must be a mode for an external broker"):
        cluster_run(tmp_path / "a", mode="transactional")
    with pytest.raises(InvalidInput, match="orders must be an integer >= 1"):
        cluster_run(tmp_path / "a", orders=0)
    with pytest.raises(InvalidInput, match="base_port must be an integer"):
        cluster_run(tmp_path / "a", base_port=22)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "lab.db").write_bytes(b"")
    with pytest.raises(InvalidInput, match="directory must be a directory without a lab.db"):
        cluster_run(tmp_path / "b")
    assert not (tmp_path / "a").exists()
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["lab.db"]
    with pytest.raises(InvalidInput, match="events must be an integer >= 1"):
        publish_pauses(tmp_path / "c", events=0)
    with pytest.raises(InvalidInput, match="repetitions must be an integer >= 1"):
        publish_pauses(tmp_path / "c", repetitions=0)
    assert not (tmp_path / "c").exists()


# -- the runs: 2,000 orders, three worker processes, lost ACKs, two leader SIGKILLs ----------
ORDERS = 2000


@pytest.mark.slow
def test_idempotent_workers_apply_every_order_once_through_two_leader_kills(tmp_path):
    run = cluster_run(tmp_path, mode="idempotent", orders=ORDERS, seed=1, ack_fail=0.2,
                      base_port=free_base_port(), timeout=150)
    assert servers_of(tmp_path) == []  # no server, no worker left
    assert len(run.kills) == 2
    for kill in run.kills:
        assert kill.new_leader != kill.node  # the leader really changed
    assert run.kills[0].node != run.kills[1].node  # the second kill hit another node
    assert run.check.ok, run.verdict
    assert run.verdict == f"OK: all {ORDERS} orders applied exactly once; projection equals truth"
    assert run.applied == ORDERS and run.double_applied == 0
    # Every worker rode out both elections by itself: none exited to be started again.
    assert run.worker_restarts == 0
    # Lost ACKs did come back, and the inbox skipped them: every delivery beyond the first
    # of each order (a step cut short by the broker left its deliveries with no outcome).
    assert run.redeliveries > 0 and run.duplicates_skipped > 0
    assert run.duplicates_skipped <= run.deliveries - ORDERS
    assert run.kills[0].pause > 0 and run.kills[1].pause > 0


@pytest.mark.slow
def test_at_least_once_workers_apply_orders_twice_through_the_same_run(tmp_path):
    run = cluster_run(tmp_path, mode="at-least-once", orders=ORDERS, seed=1, ack_fail=0.2,
                      base_port=free_base_port(), timeout=150)
    assert servers_of(tmp_path) == []  # no server, no worker left
    assert all(k.new_leader != k.node for k in run.kills) and len(run.kills) == 2
    assert run.double_applied > 0
    assert run.worker_restarts == 0
    assert run.check.lost == 0 and run.check.pending == 0  # nothing lost: duplicated only
    assert run.applied == ORDERS + run.extra_applications
    assert run.duplicates_skipped == 0
    assert run.verdict.startswith(f"BROKEN: {run.double_applied} duplicated")


# -- RabbitMQ: the same cluster, three nodes of its own ----------------------------------------
@pytest.mark.slow
def test_a_quorum_queue_on_three_rabbitmq_nodes_survives_a_leader_sigkill(tmp_path):
    import pika

    cluster = RabbitCluster(tmp_path / "rabbit", base_port=rabbit_base_port())
    queue = f"dl-test-{uuid.uuid4().hex[:12]}"
    try:
        cluster.start()
        assert all(cluster.pid(i) is not None for i in range(3))
        conn = pika.BlockingConnection(pika.URLParameters(cluster.url(0)))
        channel = conn.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        conn.close()
        leader = cluster.queue_leader(queue)
        assert leader is not None
        via = next(i for i in range(3) if i != leader)
        conn = pika.BlockingConnection(pika.URLParameters(cluster.url(via)))
        channel = conn.channel()
        channel.confirm_delivery()  # each publish returns once the queue's quorum has it
        for i in range(50):
            channel.basic_publish("", queue, str(i).encode(),
                                  pika.BasicProperties(delivery_mode=2))
        cluster.kill(leader)
        for i in range(50, 100):  # confirmed by the new leader
            channel.basic_publish("", queue, str(i).encode(),
                                  pika.BasicProperties(delivery_mode=2))
        new = cluster.queue_leader(queue)
        assert new is not None and new != leader
        # Everything confirmed is there, once, in order, read from a surviving node.
        got = []
        while (msg := channel.basic_get(queue, auto_ack=True))[0] is not None:
            got.append(int(msg[2]))
        assert got == list(range(100))
        channel.queue_delete(queue)
        conn.close()
        cluster.restart(leader)
        assert cluster.pid(leader) is not None
    finally:
        cluster.stop()
    assert all(cluster.pid(i) is None for i in range(3))
    assert servers_of(tmp_path) == []  # no Erlang VM of these nodes is left
