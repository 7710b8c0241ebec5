"""A three-node NATS JetStream cluster on this machine, started, watched, killed and stopped.

A replicated stream keeps accepting messages when one server dies: its replicas elect a new
leader (Raft) and carry on from what a majority of them had stored. To watch that happen, the
project runs the cluster itself: three ``nats-server`` processes on 127.0.0.1, each with its
own client port, route port, monitoring port and storage directory, all under one directory:

=====================  ==========================================================
``DIR/nodeN.conf``     the node's configuration (read it: it is the whole setup)
``DIR/nodeN/``         its JetStream storage
``DIR/nodeN.log``      its log
``DIR/cluster.json``   the base port and each node's process id, so that another
                       process (``deliverylab cluster stop``) can find and stop them
=====================  ==========================================================

Ports come from one base port (default 14222): clients on ``base + i``, routes on
``base + 2000 + i``, monitoring (HTTP, ``/jsz``) on ``base + 4000 + i``, for node ``i + 1``.
A test picks its own base, so it never meets a cluster a reader left running.

Who leads is read from the servers' monitoring endpoint (``/jsz``): the JetStream *meta*
leader (which places streams) and, per stream, the stream's leader (which orders and stores
every publish). A process id is only ever signalled after checking, in ``/proc``, that it is
still this node's ``nats-server`` (a recycled id is left alone).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.errors import InvalidInput, check_int, check_number, check_text

DEFAULT_BASE_PORT = 14222
ROUTE_OFFSET = 2000
HTTP_OFFSET = 4000
SIZE = 3
CLUSTER_NAME = "deliverylab"
STATE_FILE = "cluster.json"
LOCK_FILE = "cluster.lock"  # held by a start, so two starts on one directory take turns
HOST = "127.0.0.1"
DEBIAN_BINARY = "/usr/sbin/nats-server"
# A test cluster stores little: cap each node well below the machine's defaults (a fraction
# of all memory and disk), so three nodes stay small.
MAX_MEMORY_STORE = "64MB"
MAX_FILE_STORE = "1GB"


class ClusterError(RuntimeError):
    """The cluster could not do what was asked (a node did not start, no leader in time)."""


@dataclass(frozen=True, slots=True)
class Node:
    """One server of the cluster: its name, ports and files."""

    name: str
    client_port: int
    route_port: int
    http_port: int
    directory: Path  # the cluster's directory; the node's files are named after it inside

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.client_port}"

    @property
    def conf(self) -> Path:
        return self.directory / f"{self.name}.conf"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    @property
    def store_dir(self) -> Path:
        return self.directory / self.name


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What one node says about itself: whether its process runs and answers, and who it
    believes leads JetStream (None while an election runs, or when it does not answer)."""

    name: str
    pid: int | None
    running: bool
    answering: bool
    meta_leader: str | None
    streams: int


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """One stream as the cluster places it: its leader (None while an election runs), its
    other replicas as (node, state), the state ``current``, ``catching up`` or ``down``, and
    how many messages it holds."""

    name: str
    leader: str | None
    followers: tuple[tuple[str, str], ...]
    messages: int


def check_base_port(value: Any, field: str = "base_port") -> int:
    """A base port whose client, route and monitoring ports all fit below 65536."""
    return check_int(field, value, minimum=1024, maximum=65535 - HTTP_OFFSET - SIZE + 1)


def port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (a bind succeeds). With SO_REUSEADDR,
    as the server binds: the closed connections of a killed node do not count."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_base_port(rng: random.Random | None = None, *,
                   offsets: tuple[int, ...] = (0, ROUTE_OFFSET, HTTP_OFFSET)) -> int:
    """A base port whose ports (``base + offset + i`` for each offset and node) are all free
    now, below Linux's ephemeral range (32768 up), so that no client connection takes one of
    them between this check and the servers' start: what a test or a chapter passes to run a
    cluster of its own beside any other."""
    rng = rng or random.Random()
    for base in rng.sample(range(20_000, 32_768 - max(offsets) - SIZE, 10), 200):
        if all(port_free(base + off + i) for off in offsets for i in range(SIZE)):
            return base
    raise ClusterError("no free ports for a three-node cluster between 20000 and 32768")


class NatsCluster:
    """Three ``nats-server`` processes forming one JetStream cluster under ``directory``.

    ``NatsCluster(dir)`` names the cluster; :meth:`start` makes it run. A second process gets
    the running cluster with :meth:`open` (which reads ``cluster.json``). Processes started by
    this object are reaped by it; the others are watched through ``/proc``."""

    def __init__(self, directory: str | Path, *, base_port: int = DEFAULT_BASE_PORT,
                 binary: str | None = None) -> None:
        if not isinstance(directory, str | Path) or not str(directory).strip():
            raise InvalidInput("directory", directory, "a directory path")
        self.directory = Path(directory).absolute()
        self.base_port = check_base_port(base_port)
        # Debian installs the server in /usr/sbin, which is not on a user's PATH.
        self.binary = (check_text("binary", binary, max_length=4096) if binary is not None
                       else shutil.which("nats-server") or DEBIAN_BINARY)
        self.nodes = [Node(f"node{i + 1}", self.base_port + i,
                           self.base_port + ROUTE_OFFSET + i, self.base_port + HTTP_OFFSET + i,
                           self.directory) for i in range(SIZE)]
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pids: dict[str, int | None] = {n.name: None for n in self.nodes}

    @classmethod
    def open(cls, directory: str | Path) -> NatsCluster:
        """The cluster whose state file is in ``directory`` (started by any process)."""
        path = Path(directory) / STATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            cluster = cls(directory, base_port=state["base_port"])
            pids = {k: v for k, v in state["pids"].items() if k in cluster._pids}
            if not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0)
                       for v in pids.values()):
                raise ValueError(f"process ids must be positive integers, got {pids}")
            cluster._pids.update(pids)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput("directory", str(directory),
                               f"a cluster directory with a readable {STATE_FILE} ({exc})"
                               ) from None
        return cluster

    # -- addresses ---------------------------------------------------------------------------
    @property
    def servers(self) -> list[str]:
        return [n.url for n in self.nodes]

    def url(self, **query: Any) -> str:
        """``nats://h:p1,h:p2,h:p3`` (every node: a client fails over among them), with
        ``query`` appended (``stream=…``, ``replicas=3``, …) as the broker URL expects."""
        text = "nats://" + ",".join(f"{HOST}:{n.client_port}" for n in self.nodes)
        if query:
            text += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return text

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise InvalidInput("node", name, "one of " + ", ".join(n.name for n in self.nodes))

    # -- processes ---------------------------------------------------------------------------
    def _config(self, node: Node) -> str:
        routes = ", ".join(f"nats-route://{HOST}:{n.route_port}" for n in self.nodes)
        return (f"server_name: {node.name}\n"
                f"listen: {HOST}:{node.client_port}\n"
                f"http: {HOST}:{node.http_port}\n"
                f"log_file: {json.dumps(str(node.log))}\n"
                f"jetstream {{\n  store_dir: {json.dumps(str(node.store_dir))}\n"
                f"  max_memory_store: {MAX_MEMORY_STORE}\n  max_file_store: {MAX_FILE_STORE}\n}}\n"
                f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: {HOST}:{node.route_port}\n"
                f"  routes: [{routes}]\n}}\n")

    def _is_ours(self, name: str, pid: int | None) -> bool:
        """Whether ``pid`` is still node ``name``'s server: alive, not a zombie, and running
        its configuration file (so a recycled process id is never signalled)."""
        if pid is None:
            return False
        proc = self._procs.get(name)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return False
        return state != "Z" and os.fsencode(str(self.node(name).conf)) in cmdline

    def pid(self, name: str) -> int | None:
        """The process id of node ``name`` while it runs, else None."""
        pid = self._pids[self.node(name).name]
        return pid if self._is_ours(name, pid) else None

    def _save(self) -> None:
        state = {"base_port": self.base_port, "servers": self.servers,
                 "pids": {n: (p if self._is_ours(n, p) else None) for n, p in self._pids.items()}}
        tmp = self.directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.directory / STATE_FILE)

    def _check_ports(self, nodes: list[Node]) -> None:
        for node in nodes:
            busy = [p for p in (node.client_port, node.route_port, node.http_port)
                    if not port_free(p)]
            if busy:
                raise ClusterError(f"{node.name} cannot start: port(s) {busy} on {HOST} are in"
                                   f" use (another cluster? pick another base port)")

    def _spawn(self, node: Node) -> None:
        node.store_dir.mkdir(parents=True, exist_ok=True)
        node.conf.write_text(self._config(node), encoding="utf-8")
        try:
            # Its own session: a Ctrl-C meant for the caller does not reach the servers, and
            # they outlive a `deliverylab cluster start` that has returned.
            proc = subprocess.Popen([self.binary, "-c", str(node.conf)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise ClusterError(f"cannot run {self.binary!r} ({exc.strerror}): install"
                               f" nats-server ('make services' does, or apt-get install"
                               f" nats-server)") from None
        self._procs[node.name] = proc
        self._pids[node.name] = proc.pid
        self._save()

    def start(self, *, timeout: float = 30.0) -> None:
        """Start every node that is not running and wait until JetStream has a meta leader
        that every node agrees on. Starting a running cluster changes nothing."""
        check_number("timeout", timeout, minimum=0.1, maximum=600)
        created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        # One start at a time per directory: a second `cluster start` on the same --dir waits
        # here for the first, then finds its nodes running (the state file it wrote) and
        # starts nothing. Without the lock both spawn the same ports, and both fail.
        with open(self.directory / LOCK_FILE, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (self.directory / STATE_FILE).exists():  # written meanwhile by another start
                with contextlib.suppress(InvalidInput):
                    other = NatsCluster.open(self.directory)
                    if other.base_port == self.base_port:
                        self._pids.update(other._pids)
            missing = [n for n in self.nodes if self.pid(n.name) is None]
            try:
                self._check_ports(missing)  # before anything is written
                for node in missing:
                    self._spawn(node)
                self.wait_ready(timeout=timeout)
            except BaseException:
                self.stop()  # leave nothing half-started behind (the error quotes the log)
                if created:
                    shutil.rmtree(self.directory, ignore_errors=True)
                raise

    def wait_ready(self, *, timeout: float = 30.0) -> str:
        """Wait until every running node answers and all name the same meta leader (a node
        that is down, having been killed, is not waited for); return the leader's name."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                proc = self._procs.get(node.name)
                if proc is not None and proc.poll() is not None:
                    raise ClusterError(f"{node.name} exited with status {proc.returncode}:"
                                       f" {self._log_tail(node)}")
            leaders = {s.meta_leader for s in self.status() if s.running}
            leader = next(iter(leaders)) if len(leaders) == 1 else None
            if leader is not None:
                return leader
            if time.monotonic() > deadline:
                raise ClusterError(f"no JetStream meta leader after {timeout:g}s:"
                                   f" {self.status()}")
            time.sleep(0.1)

    def _log_tail(self, node: Node, lines: int = 3) -> str:
        try:
            text = node.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def kill(self, name: str, sig: int = signal.SIGKILL, *, timeout: float = 10.0) -> int:
        """Send ``sig`` (default SIGKILL: no goodbye to its peers) to node ``name`` and wait
        until the process is gone; return its process id."""
        node = self.node(name)
        pid = self.pid(node.name)
        if pid is None:
            raise ClusterError(f"{node.name} is not running")
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while self._is_ours(node.name, pid):
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.name} (pid {pid}) still runs {timeout:g}s after"
                                   f" signal {signal.Signals(sig).name}")
            time.sleep(0.02)
        proc = self._procs.pop(node.name, None)
        if proc is not None:
            proc.wait()
        self._pids[node.name] = None
        self._save()
        return pid

    def restart(self, name: str, *, timeout: float = 30.0) -> None:
        """Start node ``name`` again on its own storage and wait until it answers with the
        cluster's meta leader (it then catches up on its streams from the others)."""
        node = self.node(name)
        if self.pid(node.name) is not None:
            raise ClusterError(f"{node.name} is already running")
        self._check_ports([node])
        self._spawn(node)
        self.wait_ready(timeout=timeout)

    def stop(self, *, timeout: float = 10.0) -> list[str]:
        """Stop every running node (SIGTERM, then SIGKILL after ``timeout``) and return the
        names of those that were running. Leaves no server of this cluster behind."""
        running = [n.name for n in self.nodes if self.pid(n.name) is not None]
        for name in running:
            term = self._pids[name]
            if term is not None:  # running: it has a process
                with contextlib.suppress(ProcessLookupError):
                    os.kill(term, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in running:
            pid = self._pids[name]
            while self._is_ours(name, pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if pid is not None and self._is_ours(name, pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc = self._procs.pop(name, None)
            if proc is not None:
                proc.wait()
            while self._is_ours(name, pid):
                time.sleep(0.02)
            self._pids[name] = None
        if self.directory.exists():
            self._save()
        return running

    # -- what the servers say ----------------------------------------------------------------
    def _jsz(self, node: Node, **params: str) -> dict[str, Any] | None:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        try:
            with urllib.request.urlopen(f"http://{HOST}:{node.http_port}/jsz?{query}",
                                        timeout=2) as resp:
                doc: dict[str, Any] = json.load(resp)
                return doc
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def status(self) -> list[NodeStatus]:
        """Each node as it answers now (a node that is down answers nothing)."""
        out = []
        for node in self.nodes:
            pid = self.pid(node.name)
            jsz = self._jsz(node) if pid is not None else None
            meta = (jsz or {}).get("meta_cluster") or {}
            out.append(NodeStatus(node.name, pid, pid is not None, jsz is not None,
                                  meta.get("leader") or None, (jsz or {}).get("streams", 0)))
        return out

    def stream_leaders(self, stream: str) -> dict[str, str | None]:
        """Who each answering node says leads ``stream`` (None: no leader it knows of)."""
        check_text("stream", stream, max_length=255)
        seen: dict[str, str | None] = {}
        for node in self.nodes:
            if self.pid(node.name) is None:
                continue
            jsz = self._jsz(node, accounts="true", streams="true")
            if jsz is None:
                continue
            leader = None
            for account in jsz.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream:
                        leader = (detail.get("cluster") or {}).get("leader") or None
            seen[node.name] = leader
        return seen

    def streams(self) -> list[StreamStatus]:
        """Every stream of the cluster, by name, as its leader describes it (or, while it has
        none, as any node that holds a replica does)."""
        views: dict[str, list[dict[str, Any]]] = {}
        for node in self.nodes:
            if self.pid(node.name) is None:
                continue
            jsz = self._jsz(node, accounts="true", streams="true")
            for account in (jsz or {}).get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name"):
                        views.setdefault(detail["name"], []).append({**detail, "_by": node.name})
        out = []
        for name in sorted(views):
            seen = views[name]
            cluster = [v.get("cluster") or {} for v in seen]
            # The leader's own view knows its replicas' state; a follower's does not.
            best = next((v for v, c in zip(seen, cluster, strict=True)
                         if c.get("leader") and c.get("leader") == v["_by"]), seen[0])
            info = best.get("cluster") or {}
            leader = info.get("leader") or None
            if leader is not None and self.pid(leader) is None:
                leader = None  # named by a stale view: that node is down
            followers = tuple(
                (r.get("name", "?"), "down" if r.get("name") in self._pids
                 and self.pid(r["name"]) is None else
                 "current" if r.get("current") else "catching up")
                for r in info.get("replicas") or [])
            out.append(StreamStatus(name, leader, followers,
                                    int((best.get("state") or {}).get("messages", 0))))
        return out

    def stream_leader(self, stream: str) -> str | None:
        """The leader of ``stream``: a running node that a majority of the cluster names as
        leader (itself included), or None (an election is under way, or no such stream)."""
        votes: dict[str, int] = {}
        for leader in self.stream_leaders(stream).values():
            if leader is not None:
                votes[leader] = votes.get(leader, 0) + 1
        for leader, n in votes.items():
            if n > SIZE // 2 and leader in self._pids and self.pid(leader) is not None:
                return leader
        return None

    def wait_stream_leader(self, stream: str, *, other_than: str | None = None,
                           timeout: float = 30.0) -> str:
        """Wait until ``stream`` has a leader (not ``other_than``) and return its name."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.stream_leader(stream)
            if leader is not None and leader != other_than:
                return leader
            if time.monotonic() > deadline:
                raise ClusterError(f"stream {stream!r} has no leader"
                                   f"{'' if other_than is None else ' other than ' + other_than}"
                                   f" after {timeout:g}s: {self.stream_leaders(stream)}")
            time.sleep(0.05)

    def memory_kib(self) -> dict[str, int]:
        """Resident memory (KiB) of each running node, from ``/proc``."""
        out = {}
        for node in self.nodes:
            pid = self.pid(node.name)
            if pid is None:
                continue
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[node.name] = int(line.split()[1])
        return out
