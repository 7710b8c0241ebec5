"""Real processes for the tests: ``deliverylab`` processes started, read, waited for and
killed, and the environment a child process needs.

Every ``deliverylab`` process is started as ``python -m deliverylab …`` (the console script's
code path) on a free loopback port; every wait is bounded; every child is killed in a
``finally``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from deliverylab.engine import store
from deliverylab.engine.check import check

SRC = Path(__file__).resolve().parents[2] / "src"
HOST = "127.0.0.1"

# The signals of `status --json` that are read off the wall clock when status runs: two runs a
# moment apart differ there and nowhere else.
TIMED_SIGNALS = ("now", "oldest_message_age_seconds", "relay_oldest_unsent_age_seconds")


def untimed(status: dict) -> dict:
    """``status --json`` without the signals measured against the wall clock at reading time."""
    signals = {k: v for k, v in status.get("signals", {}).items() if k not in TIMED_SIGNALS}
    return {**status, "signals": signals}


def env() -> dict[str, str]:
    """The environment for a child process: the package importable from ``src``."""
    src = str(SRC)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else "")}


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_RATE") and k not in ("DELIVERYLAB_DB", "DELIVERYLAB_URL")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deliverylab", *args], env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)


class Proc:
    """A background ``deliverylab`` process whose output goes to a file (never a full pipe)."""

    def __init__(self, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen([sys.executable, "-m", "deliverylab", *args],
                                  env=env or child_env(), stdout=self._out,
                                  stderr=subprocess.STDOUT)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text()

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.p.kill()
        self.p.wait(timeout=10)

    def terminate(self, timeout: float = 15) -> int:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(timeout=10)
            raise

    def stop(self) -> None:
        try:
            self.kill()
        finally:
            self._out.close()


class ProcessRig:
    """One database file and the processes running on it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.db = tmp / "app.db"
        self.procs: list[Proc] = []
        self.port = 0
        done = cli("init-db", "--db", str(self.db))
        assert done.returncode == 0, done.stderr

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(self.tmp / f"{name}-{len(self.procs)}.log", *args, "--db", str(self.db),
                    env=env)
        self.procs.append(proc)
        return proc

    def api(self, *extra: str) -> Proc:
        self.port = free_port()
        proc = self.start("api", "api", "--port", str(self.port), *extra)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.alive(), f"the API exited:\n{proc.output()}"
            try:
                status, body = request("GET", "/health", port=self.port, timeout=2)
                if status == 200 and body["ok"]:
                    return proc
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the API never answered /health:\n{proc.output()}")

    def worker(self, name: str, *extra: str, env: dict[str, str] | None = None) -> Proc:
        return self.start(name, "worker", "--name", name, "--poll-interval", "0.05", *extra,
                          env=env)

    def connect(self) -> Any:
        """A new connection to the lab's database."""
        return store.connect(self.db)

    def check(self) -> Any:
        conn = self.connect()
        try:
            return check(conn)
        finally:
            conn.close()

    def wait_drained(self, timeout: float = 90) -> Any:
        """Until no message is left in the queue and nothing is pending."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conn = self.connect()
            try:
                left = conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
                result = check(conn)
            finally:
                conn.close()
            if left == 0 and result.pending == 0:
                return result
            time.sleep(0.2)
        raise AssertionError(f"not drained after {timeout}s: {left} queued, {result.verdict}")

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


def request(method: str, path: str, body: bytes | dict | None = None, *, port: int,
            headers: dict[str, str] | None = None, timeout: float = 30,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, Any]:
    own = conn is None
    conn = conn or http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers = {"content-type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        if own:
            conn.close()


def started(proc: Proc, timeout: float = 30) -> None:
    """Wait until ``proc`` printed its ``started:`` line (it failed if it died first)."""
    deadline = time.monotonic() + timeout
    while "started:" not in proc.output() and time.monotonic() < deadline:
        assert proc.alive(), proc.output()
        time.sleep(0.02)
    assert "started:" in proc.output(), proc.output()


def no_failures(*procs: Proc) -> None:
    for proc in procs:
        text = proc.output()
        assert "database is locked" not in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]


def servers_of(directory: Path) -> list[int]:
    """Process ids of every process with an argument under ``directory``: the nats-servers of
    a cluster there (their configuration) and the workers of a run there (their store)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and any(os.fsencode(str(directory)) in arg for arg in cmdline[1:]):
            found.append(int(entry.name))
    return found
