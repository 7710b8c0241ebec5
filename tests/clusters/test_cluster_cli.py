"""``deliverylab cluster`` driven as the guide drives it: status shows who leads each stream,
``kill --leader-of`` kills that node in one command, ``restart`` brings it back.

A cluster of its own (free ports, a directory under ``tmp_path``), stopped in the teardown,
failure or not.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import cli

from deliverylab.brokers.jetstream import JetStreamBroker
from deliverylab.clusters.nats_cluster import NatsCluster, free_base_port
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.ids import Ids


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    directory, base = tmp_path_factory.mktemp("nats") / "cluster", free_base_port()
    started = cli("cluster", "start", "--dir", str(directory), "--base-port", str(base),
                  timeout=90)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield directory, base
    finally:
        cli("cluster", "stop", "--dir", str(directory), timeout=60)


def stream_lines(text: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"^stream (\S+): (.*)$", text, re.M)}


@pytest.mark.slow
def test_status_kill_leader_of_and_restart(cluster: tuple[Path, int]) -> None:
    directory, base = cluster
    d = str(directory)
    servers = ",".join(f"127.0.0.1:{base + i}" for i in range(3))
    url = f"nats://{servers}?stream=lab_cli&replicas=3&ack_wait=2"
    # The stream, replicated on the three nodes, as a worker makes it.
    JetStreamBroker([f"nats://127.0.0.1:{base + i}" for i in range(3)], stream="lab_cli",
                    clock=SystemClock(), ids=Ids(), replicas=3, ack_wait=2.0).close()

    status = cli("cluster", "status", "--dir", d)
    assert status.returncode == 0, status.stdout
    streams = stream_lines(status.stdout)
    assert set(streams) == {"lab_cli", "lab_cli_DEAD", "lab_cli_ADVISORIES"}
    leader = NatsCluster.open(directory).stream_leader("lab_cli")
    others = sorted({"node1", "node2", "node3"} - {leader})
    assert streams["lab_cli"].startswith(f"leader {leader}, followers "), streams
    for node in others:
        assert f"{node} (" in streams["lab_cli"]

    killed = cli("cluster", "kill", "--leader-of", "lab_cli", "--dir", d, timeout=90)
    assert killed.returncode == 0, killed.stderr
    assert f"killed {leader} (pid " in killed.stdout and "the leader of stream lab_cli" in killed.stdout
    new = re.search(r"stream lab_cli is now led by (node\d)", killed.stdout)
    assert new and new[1] != leader, killed.stdout
    assert f"deliverylab cluster restart {leader} --dir {d}" in killed.stdout

    down = cli("cluster", "status", "--dir", d)
    assert down.returncode == 1  # a node is down
    assert re.search(rf"^{leader}: down", down.stdout, re.M)
    assert stream_lines(down.stdout)["lab_cli"].startswith(f"leader {new[1]}, ")
    assert f"{leader} (down)" in stream_lines(down.stdout)["lab_cli"]

    again = cli("cluster", "kill", leader, "--dir", d)
    assert again.returncode == 2 and f"NODE must be a running node, got '{leader}'" in again.stderr

    back = cli("cluster", "restart", leader, "--dir", d, timeout=90)
    assert back.returncode == 0, back.stderr
    assert f"restarted {leader} (pid " in back.stdout
    assert re.search(rf"^{leader}: answering", back.stdout, re.M)
    assert cli("cluster", "status", "--dir", d).returncode == 0
    cli("cleanup", "--broker", url, "--yes", timeout=60)


@pytest.mark.parametrize(("args", "says"), [
    (["kill"], "takes a NODE or --leader-of STREAM"),
    (["kill", "node1", "--leader-of", "s"], "takes a NODE or --leader-of STREAM"),
    (["kill", "node7"], "NODE must be one of node1, node2, node3, got 'node7'"),
    (["restart"], "needs a NODE"),
    (["status", "node1"], "NODE is for 'cluster kill' and 'cluster restart'"),
    (["start", "--leader-of", "s"], "--leader-of is for 'cluster kill'"),
])
def test_bad_cluster_arguments_are_named(cluster: tuple[Path, int], args: list[str],
                                         says: str) -> None:
    directory, _ = cluster
    done = cli("cluster", *args, "--dir", str(directory))
    assert done.returncode == 2 and says in done.stderr, done.stderr
