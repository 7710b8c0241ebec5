"""The README's first run and each walkthrough of "Running the lab", run as a reader runs them.

Every shell line of the page runs in ``bash``, in page order, in a directory of its own (the
repository root of a new clone, as far as the page can tell): the long-running commands (the
API, the relay, the workers) in the background, as in their own terminals, the others in the
foreground, where each must succeed. The only changes to the text: a free port for the API
instead of 3000, free ports for the cluster instead of 14222, and the page's queue, stream and
schema names with a suffix of this run (tests share the servers). What the page does not run
here: the set-up lines (``make``, ``source``), ``psql``, and the cluster page's long run in
one command.

Each page starts from nothing and ends with its own clean-up: before it, the processes are
stopped with SIGINT (the Ctrl-C the page asks for) and must exit cleanly, and the page's last
``status`` must reach an OK verdict; after it, nothing of the page is left: no file, and a
second clean-up finds nothing to remove.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.pages import LAB, README, bash_blocks, shell_lines
from support.processes import child_env, free_port

from deliverylab.clusters.nats_cluster import free_base_port

LONG_RUNNING = re.compile(r"\bdeliverylab (api|worker|relay)\b")
SKIPPED = re.compile(r"^(make |source |bash scripts/|psql |python -m deliverylab\.book)")
NAMES = re.compile(r"\b(lab_(?:postgres_broker|postgres|rabbitmq|jetstream|redis|cluster))\b")
ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(\S+)$")
BIN = str(Path(sys.executable).parent)


def page_text(name: str) -> str:
    """The part of a page a reader runs from start to clean-up: the README's first run, the
    four-terminal page without its further experiments, the cluster page without its long
    run in one command."""
    if name == "README":
        text = README.read_text(encoding="utf-8")
        start = text.index("## A first run")
        return text[start:text.index("\n## ", start + 1)]
    text = (LAB / f"{name}.md").read_text(encoding="utf-8")
    if name == "four_terminals":
        cut = text.index("## More experiments")
        text = text[:cut]
    if name == "cluster":
        cut = text.index("## The whole run in one command")
        text = text[:cut]
    return text


class Reader:
    """One reader at one page: a working directory, the shell variables the page set, and
    the processes running in the other terminals."""

    def __init__(self, work: Path, suffix: str) -> None:
        self.work, self.suffix = work, suffix
        self.port = free_port()
        self.base = free_base_port()
        self.variables: list[str] = []  # `NAME='value'` lines, in page order
        self.background: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.env = child_env(DELIVERYLAB_URL=f"http://127.0.0.1:{self.port}")
        self.env["PATH"] = BIN + os.pathsep + self.env.get("PATH", "")
        self.log: list[str] = []
        self.last_status: str | None = None
        self.killed: str | None = None
        self.cleanups: list[str] = []
        self.stopped_all = False

    # -- the page's text, made to run here -----------------------------------------------
    def adapt(self, line: str) -> str:
        line = NAMES.sub(lambda m: f"{m[1]}_{self.suffix}", line)
        line = line.replace("deliverylab api ", f"deliverylab api --port {self.port} ")
        line = line.replace("localhost:3000", f"127.0.0.1:{self.port}")
        for i in range(3):
            line = line.replace(f"127.0.0.1:{14222 + i}", f"127.0.0.1:{self.base + i}")
        line = re.sub(r"(deliverylab cluster start --dir \S+)",
                      rf"\1 --base-port {self.base}", line)
        if self.killed is not None:  # the page's example node is whichever was killed here
            line = re.sub(r"(cluster restart )node\d", rf"\g<1>{self.killed}", line)
        return line

    def script(self, line: str) -> str:
        return "\n".join([*self.variables, line])

    # -- running -----------------------------------------------------------------------------
    def run(self, raw: str) -> None:
        line = raw.strip()
        if not line or line.startswith("#") or SKIPPED.match(line):
            return
        line = self.adapt(line)
        if ASSIGNMENT.match(line):
            self.variables.append(line)
            return
        if LONG_RUNNING.search(line) and "deliverylab cleanup" not in line:
            self.start(line)
            return
        if line.startswith("deliverylab cleanup"):
            self.before_cleanup()
            self.cleanups.append(line)
        self.tend()
        done = subprocess.run(["bash", "-c", self.script(line)], cwd=self.work, env=self.env,
                              capture_output=True, text=True, timeout=300)
        self.log.append(f"$ {line}\n{done.stdout}{done.stderr}")
        allowed = {0, 1} if re.search(r"cluster status", line) else {0}
        assert done.returncode in allowed, "\n".join(self.log[-6:]) + self.outputs()
        assert "Traceback" not in done.stderr, done.stderr
        if "deliverylab status" in line:
            self.last_status = line
        m = re.search(r"^killed (node\d) ", done.stdout, re.M)
        if m:
            self.killed = m[1]

    def start(self, line: str) -> None:
        command = line.rstrip(" &")
        kind = LONG_RUNNING.search(command)[1]  # type: ignore[index]
        if kind == "api":  # one API at a time holds the port: the page stops the last one
            for name, proc, _ in self.background:
                if name == "api" and proc.poll() is None:
                    self.interrupt(proc)
        log = self.work / f"{kind}-{len(self.background)}.log"
        # `exec env`: the process the signals reach is the command itself, its variables too.
        exec_line = "exec env " + command
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", self.script(exec_line)], cwd=self.work,
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.background.append((kind, proc, log))
        deadline = time.monotonic() + 90
        ready = "Ctrl-C to stop" if kind == "api" else "started:"
        while ready not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"`{command}` exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"`{command}` never started:\n{log.read_text()}"
            time.sleep(0.05)
        if kind == "api":
            time.sleep(0.5)  # the line is printed just before the server accepts

    def tend(self) -> None:
        """A relay started with --crash-exits that exited 70 is started again, as the page
        asks; any other exit of a background process is a failure."""
        for i, (kind, proc, log) in enumerate(self.background):
            code = proc.poll()
            if code is None or code == -signal.SIGINT or getattr(proc, "stopped", False):
                continue
            if kind == "relay" and code == 70:
                with open(log, "ab") as out:
                    again = subprocess.Popen(proc.args, cwd=self.work, env=self.env,
                                             stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True)
                self.background[i] = (kind, again, log)
                continue
            raise AssertionError(f"{kind} exited with {code}:\n{log.read_text()}")

    def interrupt(self, proc: subprocess.Popen[bytes]) -> int:
        proc.stopped = True  # type: ignore[attr-defined]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise

    def wait_ok(self, timeout: float = 120) -> str:
        """The page's last status, until its verdict is OK (the workers catch up)."""
        assert self.last_status is not None, "the page never shows its status"
        deadline = time.monotonic() + timeout
        while True:
            self.tend()
            done = subprocess.run(["bash", "-c", self.script(self.last_status)], cwd=self.work,
                                  env=self.env, capture_output=True, text=True, timeout=120)
            verdict = next((x for x in done.stdout.splitlines() if x.startswith("verdict")), "")
            if verdict.startswith("verdict      OK"):
                return verdict
            assert time.monotonic() < deadline, done.stdout + done.stderr + self.outputs()
            time.sleep(1)

    def before_cleanup(self) -> None:
        """Once, before the first clean-up: the workers have caught up (the page's last status
        says OK), then Ctrl-C in every other terminal, and each process stops cleanly."""
        if self.stopped_all:
            return
        self.stopped_all = True
        if self.running() and self.last_status is not None:
            self.wait_ok()
        for kind, proc, log in self.background:
            if getattr(proc, "stopped", False):
                continue
            code = self.interrupt(proc)
            text = log.read_text(errors="replace")
            # 130: the conventional status of a program stopped by Ctrl-C (the API's)
            assert code in (0, 130) or (kind == "relay" and code == 70), \
                f"{kind} exited {code}: {text}"
            assert "Traceback" not in text, text

    def running(self) -> list[subprocess.Popen[bytes]]:
        return [p for _, p, _ in self.background if p.poll() is None]

    def outputs(self) -> str:
        return "".join(f"\n--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                       for _, _, log in self.background)

    def close(self) -> None:
        for _, proc, _ in self.background:
            if proc.poll() is None:
                with_suppress_kill(proc)


def with_suppress_kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["README", "four_terminals", "relay", "postgres", "rabbitmq",
                                  "jetstream", "redis", "cluster"])
def test_the_walkthrough_runs_from_nothing_to_its_clean_up(tmp_path: Path, name: str) -> None:
    reader = Reader(tmp_path, secrets.token_hex(3))
    try:
        for block in bash_blocks(page_text(name)):
            for line in shell_lines(block):
                reader.run(line)
        assert reader.cleanups, f"{name}: no clean-up"
        assert not reader.running(), "processes still running after the clean-up"
        # Nothing of the page is left: no file, and a second clean-up finds nothing.
        left = [p for p in (tmp_path / "data").rglob("*") if p.is_file()] \
            if (tmp_path / "data").exists() else []
        assert not left, left
        # (The cluster page's servers are stopped and removed by then: its stream went with
        # them, and its files are checked above.)
        for line in reader.cleanups if name != "cluster" else []:
            again = subprocess.run(["bash", "-c", reader.script(line)], cwd=tmp_path,
                                   env=reader.env, capture_output=True, text=True, timeout=120)
            assert again.returncode == 0 and "removed" not in again.stdout, again.stdout
    finally:
        reader.close()
        if name == "cluster":  # never leave servers behind, failure or not
            subprocess.run(["bash", "-c", "deliverylab cluster stop --dir data/lab-cluster"],
                           cwd=tmp_path, env=reader.env, capture_output=True, timeout=60)
