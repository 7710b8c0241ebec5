"""``deliverylab cleanup``: a lab's data removed on every engine, said, and only when asked.

Real files, a real PostgreSQL schema, a real RabbitMQ queue and a real JetStream stream, each
made by the commands a walkthrough runs, then removed by ``cleanup`` as a user runs it.
"""

from __future__ import annotations

import os
import pty
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from support.brokers import AMQP_URL
from support.pg import SERVER as PG_SERVER
from support.processes import child_env, cli

from deliverylab.engine import store
from deliverylab.engine import store_postgres as pgstore

NATS = "nats://127.0.0.1:4222"
AMQP = AMQP_URL


def name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


def made(path: Path) -> Path:
    done = cli("init-db", "--db", str(path))
    assert done.returncode == 0, done.stderr
    return path


def declare(url: str) -> None:
    """Make the queue or stream ``url`` names, as a worker does on its start (the operator's
    commands create nothing)."""
    from deliverylab.brokers.registry import open_broker
    from deliverylab.engine.clock import SystemClock
    from deliverylab.engine.ids import Ids

    open_broker(url, clock=SystemClock(), ids=Ids(1), max_receives=5).close()


def family(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.glob(path.name + "*"))


def test_a_sqlite_file_goes_with_its_wal_and_shm_and_the_removal_is_said(tmp_path: Path) -> None:
    db = made(tmp_path / "lab.db")
    # An open connection keeps the -wal and -shm beside the file, as a running lab does.
    conn = store.connect(db)
    try:
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty) VALUES ('x', 1)")
        assert family(db) == ["lab.db", "lab.db-shm", "lab.db-wal"]
        done = cli("cleanup", "--store", str(db), "--yes")
    finally:
        conn.close()
    assert done.returncode == 0, done.stderr
    assert "lab.db, lab.db-wal, lab.db-shm" in done.stdout
    assert family(db) == []
    assert f"removed file {db} (0 orders)" in done.stdout
    again = cli("cleanup", "--store", str(db), "--yes")
    assert again.returncode == 0 and "not there: nothing to remove" in again.stdout


def test_without_yes_and_no_terminal_it_refuses_and_removes_nothing(tmp_path: Path) -> None:
    db = made(tmp_path / "lab.db")
    done = subprocess.run([sys.executable, "-m", "deliverylab", "cleanup", "--store", str(db)],
                          env=child_env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "pass --yes" in done.stderr and "nothing was removed" in done.stderr
    assert f"--store: file {db}" in done.stderr  # what it would have removed
    assert db.exists()


@pytest.mark.parametrize(("answer", "removed"), [("n", False), ("y", True)])
def test_on_a_terminal_it_asks_first(tmp_path: Path, answer: str, removed: bool) -> None:
    db = made(tmp_path / "lab.db")
    main, secondary = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "deliverylab", "cleanup", "--store",
                                 str(db)], env=child_env(), stdin=secondary,
                                stdout=secondary, stderr=secondary)
        os.close(secondary)
        seen = b""
        while b"[y/N]" not in seen:
            chunk = os.read(main, 4096)
            assert chunk, seen
            seen += chunk
        os.write(main, answer.encode() + b"\n")
        assert proc.wait(timeout=60) == (0 if removed else 1)
        with_rest = seen
        try:
            while chunk := os.read(main, 4096):
                with_rest += chunk
        except OSError:  # the other side closed
            pass
    finally:
        os.close(main)
    assert b"this removes, for good:" in seen
    assert db.exists() is not removed
    assert (b"removed file" in with_rest) is removed


@pytest.mark.parametrize(("flags", "field", "shown"), [
    (["--broker", f"{NATS}?strem=x"], "--broker", "?strem=x"),
    (["--broker", "nats://127.0.0.1:1?stream=x"], "--broker", "127.0.0.1:1"),
    (["--broker", "amqp://guest:wrong@127.0.0.1:5672/%2F?queue=x"], "--broker", "guest:***@"),
    (["--broker", "postgresql://127.0.0.1/test"], "--broker", "postgresql://127.0.0.1/test"),
    (["--broker", "redis-or-else://x"], "--broker", "redis-or-else://x"),
])
def test_a_bad_value_names_its_flag_and_removes_nothing(tmp_path: Path, flags: list[str],
                                                        field: str, shown: str) -> None:
    db = made(tmp_path / "lab.db")
    done = cli("cleanup", "--store", str(db), *flags, "--yes")
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith(f"deliverylab cleanup: error: {field} must be"), done.stderr
    assert shown in done.stderr and "nothing was removed" in done.stderr
    assert "guest:wrong" not in done.stderr and "Traceback" not in done.stderr
    assert db.exists()  # the good --store stays: everything is checked before anything goes


def test_a_file_that_is_not_a_lab_database_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "notes.db"
    other.write_text("not a database\n")
    done = cli("cleanup", "--store", str(other), "--yes")
    assert done.returncode == 2 and "--store must be a deliverylab database" in done.stderr
    assert other.read_text() == "not a database\n"


def test_a_postgresql_schema_is_dropped_and_public_never(tmp_path: Path) -> None:
    url = pgstore.url_for(PG_SERVER, name("cleanup_pg"))
    assert cli("init-db", "--db", url).returncode == 0
    done = cli("cleanup", "--store", url, "--yes")
    assert done.returncode == 0, done.stderr
    assert "removed PostgreSQL schema cleanup_pg_" in done.stdout
    assert "not there" in cli("cleanup", "--store", url, "--yes").stdout
    public = cli("cleanup", "--store", pgstore.url_for(PG_SERVER, "public"), "--yes")
    assert public.returncode == 2 and "never drops the schema 'public'" in public.stderr


def test_a_rabbitmq_queue_goes_with_its_dead_letters_and_exchange(tmp_path: Path) -> None:
    queue = name("cleanup_q")
    url = f"{AMQP}?queue={queue}"
    db = made(tmp_path / "lab.db")
    declare(url)
    done = cli("cleanup", "--store", str(db), "--broker", url, "--yes")
    assert done.returncode == 0, done.stderr
    assert (f"removed RabbitMQ queue {queue}: queue {queue} (0 messages), queue {queue}.dlq"
            f" (0 messages), exchange {queue}.dlx") in done.stdout
    assert "guest:guest" not in done.stdout
    assert "not there" in cli("cleanup", "--broker", url, "--yes").stdout


def test_a_jetstream_stream_goes_with_its_dead_letters_and_advisories(tmp_path: Path) -> None:
    stream = name("cleanup_js")
    url = f"{NATS}?stream={stream}&ack_wait=2"
    declare(url)
    # Removed whatever settings the URL asks for: a clean-up is the way out of a mismatch.
    done = cli("cleanup", "--broker", f"{NATS}?stream={stream}&ack_wait=9", "--yes")
    assert done.returncode == 0, done.stderr
    for part in (stream, f"{stream}_DEAD", f"{stream}_ADVISORIES"):
        assert f"stream {part} (0 messages)" in done.stdout
    assert "not there" in cli("cleanup", "--broker", url, "--yes").stdout


def test_cleanup_needs_something_to_remove() -> None:
    done = cli("cleanup", "--yes")
    assert done.returncode == 2 and "--store" in done.stderr and "--broker" in done.stderr


def test_a_redis_stream_goes_with_its_dead_letters_and_delayed_set(tmp_path: Path) -> None:
    from deliverylab.brokers.redis import open_url
    from deliverylab.engine.clock import SystemClock
    from deliverylab.engine.ids import Ids

    stream = name("cleanup_redis")
    url = f"redis://127.0.0.1:6379/0?stream={stream}"
    broker = open_url(url, clock=SystemClock(), ids=Ids(1), max_receives=1)
    try:  # a message, and a dead letter (its one receive ended in a nack)
        broker.send("e-1", "OrderPlaced", {"qty": 1})
        broker.send("e-2", "OrderPlaced", {"qty": 1})
        [d] = broker.receive(30)
        broker.dead_letter(d, "poison")
    finally:
        broker.close()
    done = cli("cleanup", "--broker", url, "--yes")
    assert done.returncode == 0, done.stderr
    assert (f"removed Redis stream {stream}: {stream} (1 entries), {stream}:dead (1 entries)"
            in done.stdout), done.stdout
    assert "not there" in cli("cleanup", "--broker", url, "--yes").stdout
    refused = cli("cleanup", "--broker", "redis://127.0.0.1:1/0?stream=x", "--yes")
    assert refused.returncode == 2 and "--broker" in refused.stderr
