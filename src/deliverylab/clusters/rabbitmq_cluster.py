"""A three-node RabbitMQ cluster on this machine, started, watched, killed and stopped.

The RabbitMQ counterpart of :mod:`deliverylab.clusters.nats_cluster`: three RabbitMQ nodes
beside any RabbitMQ already running, each with its own node name, AMQP port, Erlang
distribution port, data and logs under one directory, and no plugins; nodes two and three
join node one. A quorum queue declared on it is a Raft group over the three nodes: it keeps
taking messages when its leader dies, on a new leader.

=====================  ==========================================================
``DIR/home/``          the Erlang cookie the three nodes and ``rabbitmqctl`` share
``DIR/nN/``            node N's data (``mnesia``), logs and process id file
``DIR/nN.out``         what its start script printed
``DIR/cluster.json``   the base port and the nodes' names
=====================  ==========================================================

Ports from one base port (default 25700): AMQP on ``base + i``, distribution on
``base + 100 + i``. Node names carry the base port (``dl25700n1@localhost``), so two clusters
on different base ports never meet in ``epmd``. Commands go through ``rabbitmqctl`` (each
call starts an Erlang VM: a second or two). A process id is only signalled after checking
in ``/proc`` that it still runs this node.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ..engine.errors import InvalidInput, check_int
from . import nats_cluster
from .nats_cluster import ClusterError, port_free

DEFAULT_BASE_PORT = 25700
DIST_OFFSET = 100
SIZE = 3
SBIN = "/usr/lib/rabbitmq/bin"  # Debian's rabbitmq-server and rabbitmqctl, usable as root
STATE_FILE = "cluster.json"


def check_base_port(value: object, field: str = "base_port") -> int:
    return check_int(field, value, minimum=1024, maximum=65535 - DIST_OFFSET - SIZE + 1)


def free_base_port(rng: random.Random | None = None) -> int:
    """A base port whose AMQP and distribution ports are all free (see
    :func:`deliverylab.clusters.nats_cluster.free_base_port`)."""
    return nats_cluster.free_base_port(rng, offsets=(0, DIST_OFFSET))


class RabbitCluster:
    """Three RabbitMQ nodes joined into one cluster under ``directory``."""

    def __init__(self, directory: str | Path, *, base_port: int = DEFAULT_BASE_PORT,
                 sbin: str = SBIN) -> None:
        if not isinstance(directory, str | Path) or not str(directory).strip():
            raise InvalidInput("directory", directory, "a directory path")
        self.directory = Path(directory).absolute()
        self.base_port = check_base_port(base_port)
        self.sbin = sbin
        self.names = [f"dl{self.base_port}n{i + 1}@localhost" for i in range(SIZE)]
        self.home = self.directory / "home"
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    def port(self, i: int) -> int:
        """Node ``i``'s AMQP port (``i`` from 0)."""
        return self.base_port + i

    def url(self, i: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port(i)}/"

    def _env(self, i: int) -> dict[str, str]:
        node = self.directory / f"n{i + 1}"
        return {**os.environ, "HOME": str(self.home),
                "RABBITMQ_NODENAME": self.names[i], "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port(i)),
                "RABBITMQ_DIST_PORT": str(self.base_port + DIST_OFFSET + i),
                "RABBITMQ_MNESIA_BASE": str(node / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node / "log"),
                "RABBITMQ_PID_FILE": str(node / "pid"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "plugins"),
                # No configuration of the machine's own broker applies to these nodes.
                "RABBITMQ_CONFIG_FILE": str(node / "rabbitmq"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(node / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(node / "rabbitmq-env.conf")}

    def ctl(self, i: int, *args: str, timeout: float = 120.0) -> str:
        """``rabbitmqctl -n NODE ARGS`` on node ``i``; its output, or ClusterError."""
        try:
            done = subprocess.run([f"{self.sbin}/rabbitmqctl", "-n", self.names[i], *args],
                                  env=self._env(i), capture_output=True, text=True,
                                  timeout=timeout)
        except OSError as exc:
            raise ClusterError(f"cannot run rabbitmqctl in {self.sbin} ({exc.strerror}):"
                               f" install rabbitmq-server") from None
        if done.returncode != 0:
            first = (done.stderr.strip() or done.stdout.strip()).splitlines()[:1]
            raise ClusterError(f"rabbitmqctl {' '.join(args)} on {self.names[i]}:"
                               f" {first[0] if first else done.returncode}")
        return done.stdout

    # -- processes ---------------------------------------------------------------------------
    def pid(self, i: int) -> int | None:
        """The Erlang VM's process id of node ``i`` while it runs, else None."""
        try:
            pid = int((self.directory / f"n{i + 1}" / "pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, ValueError):
            return None
        # The VM's command line does not name the node (the environment does); it does name
        # this cluster's home directory, and the pid file is the node's own.
        return pid if state != "Z" and os.fsencode(str(self.home)) in cmdline else None

    def _spawn(self, i: int) -> None:
        (self.directory / f"n{i + 1}").mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"n{i + 1}" / "pid").unlink()  # the last run's, if any
        try:
            with open(self.directory / f"n{i + 1}.out", "ab") as out:
                self._procs[i] = subprocess.Popen(
                    [f"{self.sbin}/rabbitmq-server"], env=self._env(i), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise ClusterError(f"cannot run rabbitmq-server in {self.sbin} ({exc.strerror}):"
                               f" install rabbitmq-server") from None

    def _await(self, i: int, timeout: float) -> None:
        """Until node ``i`` has booted: ``rabbitmqctl await_startup`` cannot wait for a node
        that epmd does not list yet, so ask again until it does."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctl(i, "await_startup", "--timeout", str(int(max(1, timeout))))
                return
            except ClusterError:
                proc = self._procs.get(i)
                if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                    raise
                time.sleep(0.5)

    def start(self, *, timeout: float = 120.0) -> None:
        """Start the three nodes, join two and three to one, and wait until the cluster lists
        all three running. On any failure, stop what started and remove what was written."""
        ports = [p for i in range(SIZE) for p in (self.port(i), self.base_port + DIST_OFFSET + i)]
        busy = [p for p in ports if not port_free(p)]
        if busy:
            raise ClusterError(f"port(s) {busy} on 127.0.0.1 are in use (pick another base"
                               f" port)")
        created = not self.directory.exists()
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            cookie = self.home / ".erlang.cookie"
            if not cookie.exists():
                cookie.write_text(os.urandom(16).hex())
                cookie.chmod(0o400)
            (self.directory / "plugins").write_text("[].\n")
            (self.directory / STATE_FILE).write_text(json.dumps(
                {"base_port": self.base_port, "nodes": self.names}, indent=1) + "\n")
            for i in range(SIZE):
                self._spawn(i)
            for i in range(SIZE):
                self._await(i, timeout)
            for i in range(1, SIZE):
                self.ctl(i, "stop_app")
                self.ctl(i, "join_cluster", self.names[0])
                self.ctl(i, "start_app")
            running = json.loads(self.ctl(0, "cluster_status", "--formatter", "json"))
            if sorted(running.get("running_nodes", [])) != sorted(self.names):
                raise ClusterError(f"the cluster runs {running.get('running_nodes')}, not"
                                   f" {self.names}")
        except BaseException:
            self.stop()
            if created:
                shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def queue_leader(self, queue: str) -> int | None:
        """The index of the node leading quorum queue ``queue`` (asked of a running node),
        or None while it has none."""
        for i in range(SIZE):
            if self.pid(i) is None:
                continue
            rows = json.loads(self.ctl(i, "list_queues", "name", "leader", "--formatter",
                                       "json") or "[]")
            for row in rows:
                if row.get("name") == queue and row.get("leader") in self.names:
                    leader = self.names.index(row["leader"])
                    return leader if self.pid(leader) is not None else None
            return None
        return None

    def kill(self, i: int, *, timeout: float = 10.0) -> int:
        """SIGKILL node ``i``'s Erlang VM and wait until it is gone; return its pid."""
        pid = self.pid(i)
        if pid is None:
            raise ClusterError(f"{self.names[i]} is not running")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.pid(i) is not None:
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.names[i]} still runs {timeout:g}s after SIGKILL")
            time.sleep(0.05)
        proc = self._procs.pop(i, None)
        if proc is not None:  # its start script ends with the VM
            proc.wait(timeout)
        return pid

    def restart(self, i: int, *, timeout: float = 120.0) -> None:
        """Start node ``i`` again on its own data; it rejoins the cluster by itself."""
        if self.pid(i) is not None:
            raise ClusterError(f"{self.names[i]} is already running")
        self._spawn(i)
        self._await(i, timeout)

    def stop(self, *, timeout: float = 30.0) -> None:
        """SIGTERM every node (RabbitMQ stops cleanly on it), SIGKILL after ``timeout``."""
        pids = {i: self.pid(i) for i in range(SIZE)}
        for pid in pids.values():
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for i, pid in pids.items():
            while pid is not None and self.pid(i) == pid and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid is not None and self.pid(i) == pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for i, proc in list(self._procs.items()):
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # a script whose VM never started
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            del self._procs[i]

    def memory_kib(self) -> list[int]:
        """Resident memory (KiB) of each running node's Erlang VM, from ``/proc``."""
        out = []
        for i in range(SIZE):
            pid = self.pid(i)
            if pid is None:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]))
        return out
