"""The command line under attack: held locks, bad paths and bytes, an old SQLite, read-only
files. Each case exits with a clear sentence naming what was wrong (status 2 for bad input
or a lock, 1 for a failure), never a traceback, and writes nothing.

Read-only files are made with ``chattr +i`` (immutable): the suite runs as root, for whom
permission bits do not stop a write, but the immutable flag does, on the file and on a
directory alike, and ``os.access`` reports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import untimed

from deliverylab.app import cli
from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*cli.RATE_ENVS.values(), cli.DB_ENV, cli.URL_ENV]:
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``deliverylab argv…`` in process: (exit code, stdout, stderr). Any exception other
    than argparse's exit escapes and fails the test: that would be a traceback."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def child_env() -> dict[bytes, bytes]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_RATE") and k not in ("DELIVERYLAB_DB", "DELIVERYLAB_URL")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {os.fsencode(k): os.fsencode(v) for k, v in env.items()}


def deliverylab(*args: str | bytes, env: dict[bytes, bytes] | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "deliverylab", *args], env=env or child_env(),
                          capture_output=True, timeout=60, cwd=cwd)


def lab_file(path: Path, orders: int = 3, *, dead: bool = False) -> Path:
    conn = store.init_db(path)
    queue = Queue(conn, clock=SystemClock(), ids=Ids(3), max_receives=1)
    for i in range(orders):
        place_order(queue, item_id="tea", qty=1, order_id=f"o-{i:03d}")
    if dead:  # one message received, failed and dead-lettered, for redrive to move
        (d,) = queue.receive(30)
        assert queue.dead_letter(d, "boom")
    conn.close()
    return path


def dump(path: Path) -> str:
    conn = store.connect(path)
    try:
        return store.dump(conn)
    finally:
        conn.close()


def digest(*paths: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.exists()}


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """Make files or directories immutable (``chattr +i``): not writable, even by root."""
    done = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    try:
        assert done.returncode == 0, f"chattr +i failed: {done.stderr}"
        for p in paths:
            assert not os.access(p, os.W_OK), f"{p} is still writable"
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True)


# -- 1. a write lock held past the busy timeout --------------------------------------------------
@pytest.mark.parametrize("command", [["reconcile"], ["redrive"], ["drop", "--count", "1"],
                                     ["drop", "o-001"], ["init-db"]])
def test_a_held_write_lock_exits_2_and_writes_nothing(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path, command: list[str]) -> None:
    path = lab_file(tmp_path / "app.db", dead=True)
    before = dump(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        code, _, err = run(capsys, *command, "--db", str(path), "--busy-timeout", "0.1")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 2, err
    assert f"the database {str(path)!r} is locked" in err and "busy timeout (0.1s)" in err
    assert "--busy-timeout" in err and "Traceback" not in err
    assert dump(path) == before


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["trace", "o-001"]])
def test_readers_locked_out_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                   command: list[str]) -> None:
    """In WAL mode readers never wait for a writer, but a connection in exclusive locking
    mode keeps even readers out after its first write."""
    path = lab_file(tmp_path / "app.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("COMMIT")
    try:
        code, out, err = run(capsys, *command, "--db", str(path), "--busy-timeout", "0.1")
    finally:
        holder.close()
    assert code == 2 and out == "", err
    assert "is locked" in err and "busy timeout (0.1s)" in err


@pytest.mark.slow
def test_order_through_an_api_locked_out_of_its_database_exits_2(tmp_path: Path) -> None:
    """The real API waits SQLite's 30 s busy timeout, then answers 503; ``order`` says so."""
    from support.processes import ProcessRig

    lab = ProcessRig(tmp_path)
    try:
        lab.api("--no-access-log")
        holder = sqlite3.connect(lab.db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            done = deliverylab("order", "--item", "tea", "--order-id", "o-1", "--url",
                               f"http://127.0.0.1:{lab.port}")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    finally:
        lab.close()
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert "could not get its database's write lock" in err and "nothing was written" in err
    assert "Traceback" not in err and done.stdout == b""
    assert lab.check().orders == 0


# -- 3. bad paths and bad bytes -------------------------------------------------------------------
def test_init_db_under_a_regular_file_names_it(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    (tmp_path / "somefile").write_text("x")
    for target in ("somefile/x.db", "somefile/deeper/x.db"):
        code, _, err = run(capsys, "init-db", "--db", str(tmp_path / target))
        assert code == 2
        assert "--db cannot be created" in err
        assert f"{str(tmp_path / 'somefile')!r} is a file, not a directory" in err
    assert sorted(os.listdir(tmp_path)) == ["somefile"]


@pytest.mark.parametrize("make, kind", [
    (lambda p: Path("/dev/null"), "a character device"),
    (lambda p: (os.mkfifo(p / "fifo"), p / "fifo")[1], "a named pipe"),
    (lambda p: p, "a directory"),
], ids=["dev-null", "fifo", "directory"])
@pytest.mark.parametrize("command", [["init-db"], ["api"], ["worker"], ["status"],
                                     ["trace", "o-1"], ["reconcile"], ["redrive"], ["drop"]],
                         ids=lambda c: c[0])
def test_a_db_that_is_not_a_regular_file_is_refused(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path, make, kind: str,
                                                   command: list[str]) -> None:
    path = make(tmp_path)
    code, _, err = run(capsys, *command, "--db", str(path))
    assert code == 2 and "--db must be a database file" in err and f"({kind})" in err


def test_init_db_in_a_directory_nobody_may_write(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    with immutable(locked):
        for target in (locked / "x.db", locked / "new" / "x.db"):
            code, _, err = run(capsys, "init-db", "--db", str(target))
            assert code == 2, err
            assert f"--db cannot be created at {str(target)!r}: Operation not permitted" in err
        assert os.listdir(locked) == []
    for target in ("/proc/deliverylab.db", "/proc/deliverylab/x.db"):  # no new files there
        code, _, err = run(capsys, "init-db", "--db", target)
        assert code == 2 and f"--db cannot be created at {target!r}" in err


@pytest.mark.parametrize("key", ["k\nInjected: yes", "ключ", " padded", "x" * 201, "tab\there"])
def test_a_bad_idempotency_key_is_refused_before_sending(capsys: pytest.CaptureFixture[str],
                                                         key: str) -> None:
    code, out, err = run(capsys, "order", "--item", "tea", "--idempotency-key", key,
                         "--url", "http://127.0.0.1:9")
    assert code == 2 and out == ""
    assert "argument --idempotency-key: must be 1 to 200 visible ASCII characters" in err
    assert repr(key) in err


@pytest.mark.parametrize("argv, flag", [
    (["worker", "--name", "w\n1"], "--name"),
    (["order", "--item", "tea\x1b[2J"], "--item"),
    (["order", "--item", "tea", "--order-id", "o\n1"], "--order-id"),
    (["order", "--item", "tea", "--url", "http://bücher:3000"], "--url"),
])
def test_control_characters_in_names_are_refused(capsys: pytest.CaptureFixture[str],
                                                 lab_in_env: None, argv: list[str],
                                                 flag: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and flag in err


@pytest.fixture
def lab_in_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.DB_ENV, str(lab_file(tmp_path / "app.db")))


@pytest.mark.parametrize("argv, named", [
    ([b"init-db", b"--db", b"caf\xe9.db"], b"argument --db"),
    ([b"status", b"--db", b"\xff/x.db"], b"argument --db"),
    ([b"trace", b"o-\xff"], b"argument ORDER_ID"),
    ([b"drop", b"msg-\xff"], b"argument ID"),
    ([b"redrive", b"msg-\xff"], b"argument MESSAGE_ID"),
    ([b"worker", b"--name", b"w-\xff"], b"argument --name"),
    ([b"order", b"--item", b"\xfftea"], b"argument --item"),
    ([b"order", b"--item", b"tea", b"--idempotency-key", b"k\xff"], b"argument --idempotency-key"),
], ids=["init-db", "status", "trace", "drop", "redrive", "worker", "order", "key"])
def test_bytes_that_are_not_utf8_are_named_not_a_traceback(tmp_path: Path, argv: list[bytes],
                                                         named: bytes) -> None:
    path = lab_file(tmp_path / "app.db")
    before = dump(path)
    env = {**child_env(), b"DELIVERYLAB_DB": os.fsencode(path)}
    done = deliverylab(*argv, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert named + b": must be valid UTF-8, got b'" in done.stderr
    assert b"Traceback" not in done.stderr and done.stdout == b""
    assert dump(path) == before
    assert sorted(os.listdir(tmp_path)) == ["app.db"]


def test_a_database_variable_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    env = {**child_env(), b"DELIVERYLAB_DB": b"caf\xe9.db"}
    done = deliverylab("status", env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert b"DELIVERYLAB_DB must be valid UTF-8, got b'caf\\xe9.db'" in done.stderr
    assert b"Traceback" not in done.stderr


# -- 4. an SQLite older than the schema needs -------------------------------------------------------
def test_the_version_check_names_found_and_needed() -> None:
    with pytest.raises(store.SQLiteTooOld) as info:
        store.check_sqlite_version((3, 37, 2))
    assert "SQLite 3.37.2 is too old" in str(info.value)
    assert "needs SQLite 3.38.0 or newer" in str(info.value)
    store.check_sqlite_version((3, 38, 0))
    store.check_sqlite_version()  # the library here is new enough


@pytest.mark.parametrize("command", ["status", "init-db", "reconcile"])
def test_an_old_sqlite_is_named_not_called_a_bad_database(capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          command: str) -> None:
    existing = lab_file(tmp_path / "app.db")
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    for path in (existing, tmp_path / "new.db"):
        code, out, err = run(capsys, command, "--db", str(path))
        if path.name == "new.db" and command != "init-db":
            assert code == 2 and "init-db" in err  # missing: said before anything is opened
            continue
        assert code == 1 and out == "", err
        assert "SQLite 3.31.1 is too old" in err and "3.38.0" in err
        assert "not a deliverylab database" not in err
    assert not (tmp_path / "new.db").exists()


# -- 5. a read-only database --------------------------------------------------------------------------
WRITERS = [["reconcile"], ["redrive"], ["drop", "--count", "1"], ["init-db"], ["worker"]]


def test_status_reads_an_immutable_file_and_writers_say_read_only(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = lab_file(tmp_path / "app.db", dead=True)
    code, expected, _ = run(capsys, "status", "--json", "--db", str(path))
    assert code == 0
    _, expected_trace, _ = run(capsys, "trace", "o-001", "--json", "--db", str(path))
    with immutable(path):
        files = digest(path)
        code, out, err = run(capsys, "status", "--json", "--db", str(path))
        assert code == 0, err
        assert untimed(json.loads(out)) == untimed(json.loads(expected))
        assert run(capsys, "trace", "o-001", "--json", "--db", str(path))[1] == expected_trace
        assert run(capsys, "status", "--db", str(path))[0] == 0
        code, out, err = run(capsys, "reconcile", "--dry-run", "--db", str(path))
        assert code == 0 and "dry run: nothing written" in out, err
        for command in WRITERS:
            code, out, err = run(capsys, *command, "--db", str(path))
            assert code == 2, (command, err)
            assert f"{str(path)!r} is read-only (the file is not writable)" in err
            assert "not a deliverylab database" not in err
        assert digest(path) == files


def test_status_reads_a_database_in_a_read_only_directory(capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    """No -wal and no -shm, and none can be made: every commit is in the file, so it is read
    as immutable, and nothing is created beside it."""
    folder = tmp_path / "ro"
    folder.mkdir()
    path = lab_file(folder / "app.db")
    assert os.listdir(folder) == ["app.db"]
    _, expected, _ = run(capsys, "status", "--json", "--db", str(path))
    with immutable(path, folder):
        code, out, err = run(capsys, "status", "--json", "--db", str(path))
        assert code == 0, err
        assert untimed(json.loads(out)) == untimed(json.loads(expected))
        code, _, err = run(capsys, "drop", "--count", "1", "--db", str(path))
        assert code == 2 and "is read-only" in err
        assert os.listdir(folder) == ["app.db"]


def test_status_sees_commits_still_in_the_wal_of_a_read_only_database(tmp_path: Path) -> None:
    """A writer still open, its commits in the -wal, everything made immutable: status (its
    own process) reads them through the existing -shm, as the writer sees them."""
    folder = tmp_path / "ro"
    folder.mkdir()
    path = lab_file(folder / "app.db", orders=0)
    writer = store.connect(path)
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    place_order(Queue(writer, clock=SystemClock(), ids=Ids(1)), item_id="tea", qty=3,
                order_id="o-wal")
    sides = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    try:
        with immutable(path, *sides, folder):
            done = deliverylab("status", "--json", "--db", str(path))
    finally:
        writer.close()
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["orders"] == 1 and report["queue"]["total"] == 1


def test_a_wal_without_its_index_in_a_read_only_directory_is_explained(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = lab_file(tmp_path / "live.db", orders=0)
    writer = store.connect(source)
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    place_order(Queue(writer, clock=SystemClock(), ids=Ids(1)), item_id="tea", qty=1)
    folder = tmp_path / "copy"
    folder.mkdir()
    shutil.copy(source, folder / "app.db")  # a copy of a live database: file and -wal only
    shutil.copy(f"{source}-wal", folder / "app.db-wal")
    writer.close()
    path = folder / "app.db"
    with immutable(path, folder / "app.db-wal", folder):
        code, out, err = run(capsys, "status", "--db", str(path))
    assert code == 2 and out == ""
    assert "its -wal file holds commits, its -shm index is missing" in err


def test_order_to_an_api_that_never_answers_says_what_may_have_happened(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A server that accepts the connection and never answers (a real socket, never read):
    the order may or may not have been written, and the same request again finds out."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        code, out, err = run(capsys, "order", "--item", "tea", "--order-id", "o-1",
                             "--timeout", "0.3", "--url", f"http://127.0.0.1:{port}")
    assert code == 1 and out == ""
    assert "did not answer within 0.3s" in err and "send the same request again" in err


RUN_ALL = """
import json, subprocess, sys
runs = []
for command in json.loads(sys.argv[1]):
    done = subprocess.run([sys.executable, "-m", "deliverylab", *command], capture_output=True,
                          text=True, timeout=60)
    runs.append([command, done.returncode, done.stdout, done.stderr])
print(json.dumps(runs))
"""


def test_a_database_on_a_read_only_mount(tmp_path: Path) -> None:
    """The directory bind-mounted read-only in a private mount namespace (gone when the
    process ends): SQLite gets EROFS, for root too. Readers read; writers say read-only."""
    folder = tmp_path / "ro"
    folder.mkdir()
    path = lab_file(folder / "app.db", dead=True)
    files = digest(path)
    expected = deliverylab("status", "--json", "--db", str(path)).stdout
    commands = [["status", "--json"], ["trace", "o-001"], ["reconcile", "--dry-run"],
                *WRITERS]
    mount = (f"mount --bind '{folder}' '{folder}' && mount -o remount,ro,bind '{folder}'"
             f" && exec \"$0\" -c \"$1\" \"$2\"")
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, sys.executable,
         RUN_ALL, json.dumps([[*c, "--db", str(path)] for c in commands])],
        env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = {" ".join(c[:-2]): (code, out, err) for c, code, out, err in json.loads(done.stdout)}
    assert runs["status --json"][0] == 0, runs["status --json"]
    assert untimed(json.loads(runs["status --json"][1])) == untimed(json.loads(expected))
    assert runs["trace o-001"][0] == 0 and runs["reconcile --dry-run"][0] == 0
    for command in WRITERS:
        code, _, err = runs[" ".join(command)]
        assert code == 2 and f"{str(path)!r} is read-only" in err, (command, err)
    assert digest(path) == files and os.listdir(folder) == ["app.db"]
