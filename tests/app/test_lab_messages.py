"""What the lab's commands say, where a first run was misled: each message names what is
really in force, or the reason, and never prints a password.

The commands run as a user runs them (``python -m deliverylab``, real servers: NATS on 4222,
RabbitMQ on 5672, PostgreSQL on 5432), each on a stream, queue or schema of its own, removed
after.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path

import pytest
from support.brokers import AMQP_URL
from support.pg import SERVER as PG_SERVER
from support.processes import Proc, cli, free_port, request, started

from deliverylab.brokers.jetstream import JetStreamBroker
from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine import store_postgres as pgstore
from deliverylab.engine.clock import FakeClock, SystemClock
from deliverylab.engine.faults import Faults
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.relay import CRASH_AFTER_PUBLISH, Relay
from deliverylab.engine.worker import Worker

NATS = "nats://127.0.0.1:4222"
AMQP = AMQP_URL


def name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


def init(path: Path) -> Path:
    done = cli("init-db", "--db", str(path))
    assert done.returncode == 0, done.stderr
    return path


def stop(proc: Proc) -> str:
    """SIGTERM (as Ctrl-C would), then the whole output."""
    try:
        proc.terminate()
        return proc.output()
    finally:
        proc.stop()


# -- JetStream: a stream kept with other settings ----------------------------------------------
def test_a_stream_made_with_another_ack_wait_is_named_with_both_values_and_the_way_on(
        tmp_path: Path) -> None:
    stream = name("msg_ackwait")
    db = init(tmp_path / "lab.db")
    # A worker made the stream with ack_wait=2; another comes with the URL's default.
    JetStreamBroker(NATS, stream=stream, clock=SystemClock(), ids=Ids(), ack_wait=2.0).close()
    try:
        again = cli("worker", "--store", str(db), "--broker", f"{NATS}?stream={stream}")
        assert again.returncode == 2
        err = again.stderr
        assert "ack_wait=2 there, 30 here" in err, err
        assert "use ack_wait=2" in err, err
        assert "max_receives" not in err, err  # the setting that differs, not another
        # The way out it names is a command that exists and works.
        way = re.search(r"deliverylab cleanup --broker '([^']+)' --yes", err)
        assert way, err
        removed = cli("cleanup", "--broker", way[1], "--yes")
        assert removed.returncode == 0, removed.stderr
        assert f"removed JetStream stream {stream}" in removed.stdout
        fresh = cli("status", "--store", str(db), "--broker", f"{NATS}?stream={stream}")
        assert fresh.returncode == 2 and "no such stream" in fresh.stderr, fresh.stderr
    finally:
        cli("cleanup", "--broker", f"{NATS}?stream={stream}", "--yes")


def test_a_stream_made_with_another_max_receives_names_it_to_a_worker_only(tmp_path: Path) -> None:
    stream = name("msg_maxrecv")
    broker = JetStreamBroker(NATS, stream=stream, clock=SystemClock(), ids=Ids(),
                             max_receives=3)
    try:
        db = init(tmp_path / "lab.db")
        worker = cli("worker", "--store", str(db), "--broker", f"{NATS}?stream={stream}",
                     "--max-receives", "5")
        assert worker.returncode == 2
        assert "max_receives=3 there, 5 here" in worker.stderr, worker.stderr
        assert "ack_wait" not in worker.stderr.split("(", 2)[1].split(")")[0]
        # A command that never dead-letters does not care: it takes the stream's.
        status = cli("status", "--store", str(db), "--broker", f"{NATS}?stream={stream}")
        assert status.returncode == 0, status.stderr
    finally:
        broker.destroy()
        broker.close()


# -- JetStream: the lease in force -------------------------------------------------------------
def test_the_jetstream_worker_states_its_ackwait_and_refuses_another_visibility_timeout(
        tmp_path: Path) -> None:
    stream = name("msg_lease")
    db = init(tmp_path / "lab.db")
    url = f"{NATS}?stream={stream}&ack_wait=3"
    try:
        refused = cli("worker", "--store", str(db), "--broker", url,
                      "--visibility-timeout", "2")
        assert refused.returncode == 2
        assert "--visibility-timeout" in refused.stderr and "ack_wait=" in refused.stderr
        assert "here 3s" in refused.stderr, refused.stderr
        proc = Proc(tmp_path / "worker.log", "worker", "--store", str(db), "--broker", url)
        try:
            started(proc)
        finally:
            out = stop(proc)
        line = next(x for x in out.splitlines() if "started:" in x)
        assert "lease=AckWait 3s" in line, line
        assert "visibility_timeout" not in line, line
        # The same lease said twice is the same lease: accepted.
        same = Proc(tmp_path / "same.log", "worker", "--store", str(db), "--broker", url,
                    "--visibility-timeout", "3")
        try:
            started(same)
        finally:
            stop(same)
    finally:
        cli("cleanup", "--broker", url, "--yes")


def test_the_redis_worker_states_its_lease_and_refuses_another_visibility_timeout(
        tmp_path: Path) -> None:
    stream = name("msg_redis_lease")
    db = init(tmp_path / "lab.db")
    url = f"redis://127.0.0.1:6379/0?stream={stream}&lease=4"
    try:
        refused = cli("worker", "--store", str(db), "--broker", url,
                      "--visibility-timeout", "2")
        assert refused.returncode == 2
        assert "--visibility-timeout" in refused.stderr and "here 4s" in refused.stderr, \
            refused.stderr
        proc = Proc(tmp_path / "worker.log", "worker", "--store", str(db), "--broker", url)
        try:
            started(proc)
        finally:
            out = stop(proc)
        line = next(x for x in out.splitlines() if "started:" in x)
        assert "lease=4s" in line and "visibility_timeout" not in line, line
    finally:
        cli("cleanup", "--broker", url, "--yes")


# -- passwords ---------------------------------------------------------------------------------
def test_no_start_line_log_line_or_status_prints_a_password(tmp_path: Path) -> None:
    queue = name("msg_secret")
    url = f"{AMQP}?queue={queue}"
    store_path = init(tmp_path / "lab.db")
    port = free_port()
    procs = [Proc(tmp_path / "api.log", "api", "--db", str(store_path), "--broker", url,
                  "--port", str(port)),
             Proc(tmp_path / "relay.log", "relay", "--store", str(store_path), "--broker", url),
             Proc(tmp_path / "worker.log", "worker", "--store", str(store_path), "--broker", url)]
    outputs = []
    try:
        for proc in procs[1:]:
            started(proc)
        deadline = time.monotonic() + 60
        while "Ctrl-C to stop" not in procs[0].output():
            assert procs[0].alive() and time.monotonic() < deadline, procs[0].output()
            time.sleep(0.05)
        status = cli("status", "--store", str(store_path), "--broker", url)
        assert status.returncode == 0, status.stderr
        outputs.append(status.stdout + status.stderr)
        # A PostgreSQL URL with a password, printed by init-db and status.
        pg = pgstore.url_for(PG_SERVER.replace("://", "://deliverylab:s3cret-pw@", 1),
                             name("msg_pg"))
        for args in (["init-db", "--db", pg], ["status", "--db", pg]):
            done = cli(*args)
            outputs.append(done.stdout + done.stderr)
        cli("cleanup", "--store", pg, "--yes")
    finally:
        outputs += [stop(p) for p in procs]
        cli("cleanup", "--broker", url, "--yes")
    text = "\n".join(outputs)
    assert "guest:***@" in text, text  # the user is shown, the password hidden
    assert "guest:guest" not in text and "s3cret-pw" not in text, text


# -- status: the reason, never a contradiction -------------------------------------------------
def test_status_names_effects_whose_orders_are_in_another_database(tmp_path: Path) -> None:
    """A worker whose --store is not the store the orders went to: the projection moves, the
    truth stays 0. Status neither says 'no orders yet' nor 'BROKEN: no event problems'."""
    orders_db, lab_db = init(tmp_path / "orders.db"), init(tmp_path / "lab.db")
    clock, ids = FakeClock(), Ids(7)
    other = store.connect(orders_db)
    conn = store.connect(lab_db)
    try:
        place_order(Queue(other, clock=clock, ids=ids), item_id="coffee-beans", qty=1,
                    order_id="o-001")
        broker = Queue(other, clock=clock, ids=ids, trace=False)
        Worker(store=conn, broker=broker, clock=clock, name="worker-1").step()
    finally:
        other.close()
        conn.close()
    done = cli("status", "--db", str(lab_db))
    assert done.returncode == 0, done.stderr
    verdict = next(x for x in done.stdout.splitlines() if x.startswith("verdict"))
    assert "no orders yet" not in verdict and "no event problems" not in verdict, verdict
    assert verdict.split()[1].startswith("BROKEN"), verdict
    assert "1 event applied here is no order of this store" in verdict, verdict
    as_json = json.loads(cli("status", "--json", "--db", str(lab_db)).stdout)
    assert as_json["verdict"].startswith("BROKEN: 1 event applied here"), as_json["verdict"]


def test_status_of_a_lab_where_nothing_happened_says_no_orders_yet(tmp_path: Path) -> None:
    done = cli("status", "--db", str(init(tmp_path / "lab.db")))
    assert "verdict      no orders yet" in done.stdout


# -- the smaller ones --------------------------------------------------------------------------
def test_init_db_lists_every_table_it_makes_outbox_included(tmp_path: Path) -> None:
    path = tmp_path / "lab.db"
    done = cli("init-db", "--db", str(path))
    listed = set(done.stdout.split("tables: ")[1].rstrip(")\n").split(", "))
    conn = store.connect(path)
    try:
        made = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"
                                           " AND name NOT LIKE 'sqlite_%'")}
    finally:
        conn.close()
    assert "outbox" in listed
    assert listed == made


def test_the_relays_first_real_publish_of_each_row_says_attempt_1(tmp_path: Path) -> None:
    """A crash after the first row of a batch: the rows after it were taken but never
    published, and their first publish, in the next step, is attempt 1."""
    rows = 4
    conn = store.init_db(tmp_path / "store.db")
    broker_conn = store.init_db(tmp_path / "broker.db")
    clock, ids = FakeClock(), Ids(3)
    broker = Queue(broker_conn, clock=clock, ids=ids, trace=False)
    events = [place_order(broker, item_id="tea", qty=1, store=conn, ids=ids).event_id
              for _ in range(rows)]

    def crashes(seed: int, event: str, attempt: int) -> bool:
        return Faults(seed=seed).uniform(CRASH_AFTER_PUBLISH, event, attempt) < 0.5
    # A seed under which the first row crashes once, and nothing else ever does.
    seed = next(s for s in range(10_000) if crashes(s, events[0], 1)
                and not any(crashes(s, e, a) for e in events for a in (1, 2)
                            if (e, a) != (events[0], 1)))
    lines: list[str] = []
    relay = Relay(conn, broker, clock=clock, crash_after_publish=0.5, seed=seed,
                  echo=lines.append)
    relay.run_until_idle(batch=rows)
    first = {}
    for line in lines:
        m = re.search(r"event=(\S+) .* attempt=(\d+) published", line)
        if m:
            first.setdefault(m[1], int(m[2]))
    assert relay.stats.crashed == 1
    assert first == {e: 1 for e in events}, lines
    attempts = dict(conn.execute("SELECT event_id, attempts FROM outbox"))
    assert attempts == {events[0]: 2, **{e: 1 for e in events[1:]}}
    conn.close()
    broker_conn.close()


def test_worker_lines_carry_the_message_id(tmp_path: Path) -> None:
    conn = store.init_db(tmp_path / "lab.db")
    clock, ids = FakeClock(), Ids(5)
    queue = Queue(conn, clock=clock, ids=ids)
    place_order(queue, item_id="tea", qty=1, order_id="o-1")
    message_id = conn.execute("SELECT message_id FROM queue_messages").fetchone()[0]
    lines: list[str] = []
    Worker(store=conn, broker=queue, clock=clock, echo=lines.append).step()
    conn.close()
    assert lines and all(f"message={message_id} " in line for line in lines), lines


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_lease_on_the_wall_clock_reads_as_a_time_not_a_rounded_float(
        tmp_path: Path, engine: str) -> None:
    """The raw trace row (what psql or sqlite3 shows) of a receive on a real clock."""
    url = pgstore.url_for(PG_SERVER, name("msg_lease_pg"))
    db = str(tmp_path / "lab.db") if engine == "sqlite" else url
    init(Path(db)) if engine == "sqlite" else cli("init-db", "--db", url)
    try:
        worker = Proc(tmp_path / "worker.log", "worker", "--db", db, "--name", "w",
                      "--visibility-timeout", "7", "--work-time", "0.5")
        try:
            started(worker)
            port = free_port()
            api = Proc(tmp_path / "api.log", "api", "--db", db, "--port", str(port))
            try:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        status, _ = request("POST", "/orders", {"itemId": "tea", "qty": 1},
                                            port=port, timeout=5)
                        break
                    except OSError:
                        assert time.monotonic() < deadline, api.output()
                        time.sleep(0.1)
                assert status == 201
                deadline = time.monotonic() + 30
                while "acked" not in worker.output():
                    assert time.monotonic() < deadline, worker.output()
                    time.sleep(0.05)
            finally:
                stop(api)
        finally:
            stop(worker)
        traced = json.loads(cli("trace", "--json", "--db", db,
                                _first_order(db)).stdout)
        received = next(r for r in traced["deliveries"] if r["outcome"] == "received")
        m = re.fullmatch(r"lease until (\d{10}\.\d{3}) \((\d\d):(\d\d):(\d\d)\.(\d{3})\)",
                         received["detail"])
        assert m, received["detail"]
        assert abs(float(m[1]) - (received["at"] + 7)) < 0.002
        at = time.localtime(float(m[1]))
        assert (int(m[2]), int(m[3]), int(m[4])) == (at.tm_hour, at.tm_min, at.tm_sec)
    finally:
        if engine == "postgresql":
            cli("cleanup", "--store", url, "--yes")


def _first_order(db: str) -> str:
    out = json.loads(cli("status", "--json", "--db", db).stdout)
    assert out["orders"] == 1
    conn = pgstore.connect(db) if pgstore.is_url(db) else store.connect(db)
    try:
        return conn.execute("SELECT order_id FROM orders").fetchone()[0]
    finally:
        conn.close()


def test_the_book_still_reads_the_lease_end_of_a_wall_clock_row() -> None:
    import pandas as pd

    from deliverylab.book.traceviews import leases
    from deliverylab.engine.trace import lease_detail

    at = 1_796_630_187.118
    frame = pd.DataFrame([
        {"at": at, "delivery_count": 1, "outcome": "received", "detail": lease_detail(at + 2)},
        {"at": at + 2.5, "delivery_count": 2, "outcome": "received",
         "detail": lease_detail(at + 4.5)}])
    (n, start, end, expired), _ = leases(frame)
    assert (n, start, expired) == (1, at, True) and end == pytest.approx(at + 2, abs=1e-3)

