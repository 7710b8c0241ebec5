"""The ``deliverylab`` command in process: arguments, exit codes, messages, and what it prints.

Bad input exits with 2 and names the flag (or environment variable) and the value, and writes
nothing; the real-process runs are in ``test_lab_processes.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from support.cli import run

from deliverylab.app import cli
from deliverylab.app.status import collect, event_state, render, render_trace, trace
from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.check import check, event_states
from deliverylab.engine.clock import FakeClock, SystemClock
from deliverylab.engine.faults import Faults
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.worker import Worker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*cli.RATE_ENVS.values(), cli.DB_ENV, cli.URL_ENV]:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def dbfile(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    store.init_db(path).close()
    return path


def seed_orders(path: Path, n: int = 4, *, process: bool = True) -> list[Any]:
    conn = store.connect(path)
    queue = Queue(conn, clock=SystemClock(), ids=Ids())
    placed = [place_order(queue, item_id=("coffee-beans", "tea")[i % 2], qty=i + 1,
                          order_id=f"o-{i + 1:03d}") for i in range(n)]
    if process:
        Worker(store=conn, clock=SystemClock(),
               broker=Queue(conn, clock=SystemClock(), ids=Ids()),
               faults=Faults(seed=3, ack_fail=0.5), visibility_timeout=0.0).run_until_idle()
    conn.close()
    return placed


def dump(path: Path) -> str:
    conn = store.connect(path)
    try:
        return store.dump(conn)
    finally:
        conn.close()


# -- the command itself -------------------------------------------------------------------------
def test_console_script_points_at_main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["deliverylab"] == "deliverylab.app.cli:main"


def test_python_dash_m_runs_the_same_command(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "deliverylab", "--version"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("deliverylab ")
    missing = subprocess.run([sys.executable, "-m", "deliverylab", "status", "--db",
                              str(tmp_path / "nope.db")], env=env, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "init-db" in missing.stderr


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("init-db", "api", "worker", "order", "status", "trace", "reconcile",
                    "redrive", "drop"):
        assert command in out


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert code == 2 and "COMMAND" in err


# -- init-db and where the database is --------------------------------------------------------
def test_init_db_defaults_to_data_app_db(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "init-db")
    assert code == 0 and out.startswith("created data/app.db")
    assert (tmp_path / "data" / "app.db").is_file()
    code, out, _ = run(capsys, "init-db")
    assert code == 0 and "is ready" in out and "0 orders kept" in out


def test_db_from_the_environment_and_flag_wins(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.DB_ENV, str(tmp_path / "env.db"))
    assert run(capsys, "init-db")[0] == 0
    assert (tmp_path / "env.db").is_file()
    assert run(capsys, "init-db", "--db", str(tmp_path / "flag.db"))[0] == 0
    assert (tmp_path / "flag.db").is_file()


def test_init_db_keeps_existing_orders(capsys: pytest.CaptureFixture[str], dbfile: Path) -> None:
    seed_orders(dbfile, 2, process=False)
    before = dump(dbfile)
    code, out, _ = run(capsys, "init-db", "--db", str(dbfile))
    assert code == 0 and "2 orders kept" in out
    assert dump(dbfile) == before


@pytest.mark.parametrize("command", [["status"], ["trace", "o-1"], ["reconcile"], ["redrive"],
                                     ["drop"], ["worker"], ["api"]])
def test_missing_database_says_run_init_db(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           command: list[str]) -> None:
    path = tmp_path / "missing.db"
    code, _, err = run(capsys, *command, "--db", str(path))
    assert code == 2
    assert f"no database at {str(path)!r}" in err and "deliverylab init-db --db" in err
    assert not path.exists()


def test_a_file_that_is_not_a_lab_database_is_refused(capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a database at all, just some words " * 100)
    code, _, err = run(capsys, "status", "--db", str(junk))
    assert code == 2 and "is not a deliverylab database" in err
    assert run(capsys, "init-db", "--db", str(junk))[0] == 2
    empty = tmp_path / "empty.db"
    store.connect(empty, must_exist=False).close()
    code, _, err = run(capsys, "status", "--db", str(empty))
    assert code == 2 and "missing tables" in err


def test_init_db_on_a_directory_is_refused(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    code, _, err = run(capsys, "init-db", "--db", str(tmp_path))
    assert code == 2 and "a directory" in err


# -- bad input: exit 2, the flag and the value named, nothing written ---------------------------
@pytest.mark.parametrize("argv, phrase", [
    (["--ack-fail-rate", "1.5"], "argument --ack-fail-rate: must be a number in [0, 1], got '1.5'"),
    (["--ack-fail-rate", "abc"], "argument --ack-fail-rate: must be a number in [0, 1], got 'abc'"),
    (["--ack-fail-rate", "nan"], "got 'nan'"),
    (["--crash-after-commit-rate", "-0.1"], "argument --crash-after-commit-rate"),
    (["--mode", "exactly-once"], "argument --mode: invalid choice: 'exactly-once'"),
    (["--visibility-timeout", "-1"], "argument --visibility-timeout: must be a number"),
    (["--visibility-timeout", "2s"], "got '2s'"),
    (["--max-receives", "0"], "argument --max-receives: must be an integer >= 1"),
    (["--max-receives", "2.5"], "got '2.5'"),
    (["--max-messages", "5000"], "argument --max-messages"),
    (["--seed", "-4"], "argument --seed"),
    (["--name", ""], "argument --name"),
    (["--poll-interval", "0"], "argument --poll-interval"),
    (["--backoff-cap", "1", "--backoff-base", "2"], "--backoff-cap must be >= --backoff-base"),
])
def test_worker_flags_are_validated(capsys: pytest.CaptureFixture[str], dbfile: Path,
                                    argv: list[str], phrase: str) -> None:
    before = dump(dbfile)
    code, _, err = run(capsys, "worker", "--db", str(dbfile), *argv)
    assert code == 2
    assert phrase in err
    assert dump(dbfile) == before


@pytest.mark.parametrize("name, value", [("ACK_FAIL_RATE", "0.8x"), ("ACK_FAIL_RATE", "1.01"),
                                         ("ACK_FAIL_RATE", "-1"), ("ACK_FAIL_RATE", "inf"),
                                         ("PROCESS_ERROR_RATE", "half"),
                                         ("LOSE_MESSAGE_RATE", "2")])
def test_rates_from_the_environment_are_validated(capsys: pytest.CaptureFixture[str],
                                                  dbfile: Path, monkeypatch: pytest.MonkeyPatch,
                                                  name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    before = dump(dbfile)
    code, _, err = run(capsys, "worker", "--db", str(dbfile))
    assert code == 2
    assert f"{name} must be a number in [0, 1], got {value!r}" in err
    assert dump(dbfile) == before


def test_every_fault_point_has_a_flag_and_a_variable() -> None:
    assert cli.RATE_FLAGS["ack_fail"] == "--ack-fail-rate"
    assert cli.RATE_ENVS["ack_fail"] == "ACK_FAIL_RATE"
    parser = cli.build_parser()
    worker = parser._subparsers._group_actions[0].choices["worker"]  # type: ignore[union-attr]
    flags = {opt for action in worker._actions for opt in action.option_strings}
    assert set(cli.RATE_FLAGS.values()) <= flags


@pytest.mark.parametrize("argv, phrase", [
    (["--item", "x", "--qty", "0"], "argument --qty: must be an integer >= 1 and <= 10000, got '0'"),
    (["--item", "x", "--qty", "-2"], "got '-2'"),
    (["--item", "x", "--qty", "1.5"], "got '1.5'"),
    (["--item", "x", "--qty", "one"], "got 'one'"),
    (["--item", "x", "--qty", "10001"], "got '10001'"),
    (["--item", "", "--qty", "1"], "argument --item: must be a non-empty string"),
    (["--item", "x" * 101], "argument --item"),
    (["--item", "x", "--order-id", "o" * 101], "argument --order-id"),
    (["--item", "x", "--idempotency-key", ""], "argument --idempotency-key"),
    (["--qty", "1"], "the following arguments are required: --item"),
    (["--item", "x", "--url", "localhost:3000"], "--url must look like http://HOST:PORT"),
])
def test_order_flags_are_validated_before_anything_is_sent(
        capsys: pytest.CaptureFixture[str], argv: list[str], phrase: str) -> None:
    code, out, err = run(capsys, "order", *argv, "--url", "http://127.0.0.1:9") \
        if "--url" not in argv else run(capsys, "order", *argv)
    assert code == 2
    assert phrase in err
    assert "cannot reach" not in err


def test_order_without_a_server_fails_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "order", "--item", "coffee-beans", "--url", "http://127.0.0.1:9")
    assert code == 1
    assert "cannot reach the API at http://127.0.0.1:9/orders" in err
    assert "deliverylab api" in err


@pytest.mark.parametrize("argv, phrase", [(["--port", "70000"], "argument --port"),
                                          (["--port", "http"], "got 'http'"),
                                          (["--host", ""], "argument --host")])
def test_api_flags_are_validated(capsys: pytest.CaptureFixture[str], dbfile: Path,
                                 argv: list[str], phrase: str) -> None:
    code, _, err = run(capsys, "api", "--db", str(dbfile), *argv)
    assert code == 2 and phrase in err


# -- status, trace, reconcile, redrive, drop ----------------------------------------------------
def test_status_text_and_json(capsys: pytest.CaptureFixture[str], dbfile: Path) -> None:
    seed_orders(dbfile, 4)
    code, out, _ = run(capsys, "status", "--db", str(dbfile))
    assert code == 0
    assert "orders       4" in out and "coffee-beans" in out and "tea" in out
    assert "verdict      OK: all 4 orders applied exactly once" in out
    code, out, _ = run(capsys, "status", "--json", "--db", str(dbfile))
    report = json.loads(out)
    assert report["ok"] is True and report["orders"] == 4
    assert report["items"] == [
        {"itemId": "coffee-beans", "truth": 4, "projection": 4, "delta": 0},
        {"itemId": "tea", "truth": 6, "projection": 6, "delta": 0}]
    assert report["queue"] == {"visible": 0, "inFlight": 0, "total": 0}


def test_status_shows_pending_work(capsys: pytest.CaptureFixture[str], dbfile: Path) -> None:
    seed_orders(dbfile, 3, process=False)
    code, out, _ = run(capsys, "status", "--db", str(dbfile))
    assert code == 0
    assert "queue        3 visible" in out
    assert "verdict      PENDING: 3 pending" in out
    assert "-4" in out  # coffee-beans: truth 4, projection 0


def test_trace_by_order_id_and_by_event_id(capsys: pytest.CaptureFixture[str],
                                          dbfile: Path) -> None:
    placed = seed_orders(dbfile, 2)
    code, out, _ = run(capsys, "trace", "o-001", "--db", str(dbfile))
    assert code == 0
    assert out.startswith("order o-001  item=coffee-beans qty=1")
    assert "state correct (applied 1×)" in out
    assert "received" in out and "applied" in out
    code, by_event, _ = run(capsys, "trace", placed[0].event_id, "--db", str(dbfile))
    assert code == 0 and by_event == out
    code, raw, _ = run(capsys, "trace", "o-001", "--json", "--db", str(dbfile))
    story = json.loads(raw)
    assert story["order"]["eventId"] == placed[0].event_id
    assert story["deliveries"][0]["outcome"] == "received"


def test_trace_of_an_unknown_order_fails(capsys: pytest.CaptureFixture[str], dbfile: Path) -> None:
    code, _, err = run(capsys, "trace", "o-nope", "--db", str(dbfile))
    assert code == 1 and "no order or event 'o-nope'" in err


def test_trace_of_an_order_not_delivered_yet(capsys: pytest.CaptureFixture[str],
                                             dbfile: Path) -> None:
    seed_orders(dbfile, 1, process=False)
    code, out, _ = run(capsys, "trace", "o-001", "--db", str(dbfile))
    assert code == 0 and "waiting in the queue for a worker" in out


def test_drop_then_reconcile(capsys: pytest.CaptureFixture[str], dbfile: Path) -> None:
    seed_orders(dbfile, 4, process=False)
    code, out, _ = run(capsys, "drop", "o-002", "--db", str(dbfile))
    assert code == 0 and "order=o-002 (logged as lost)" in out

    before = dump(dbfile)
    code, out, _ = run(capsys, "reconcile", "--dry-run", "--db", str(dbfile))
    assert code == 0
    assert "events not applied: 1 lost, 3 pending" in out
    assert out.rstrip().endswith("dry run: nothing written")
    assert dump(dbfile) == before

    code, out, _ = run(capsys, "reconcile", "--db", str(dbfile))
    assert code == 0
    assert "(2 item(s) changed, 4 order(s) recounted); fenced 4 event(s)" in out
    assert ("verdict: OK (repaired): projection equals truth; 4 orders were never applied"
            " (lost or in flight) and counted by the repair") in out
    code, out, _ = run(capsys, "reconcile", "--db", str(dbfile))
    assert code == 0 and out.startswith("nothing to repair")


def test_drop_by_count_and_unknown_ids(capsys: pytest.CaptureFixture[str], dbfile: Path) -> None:
    seed_orders(dbfile, 3, process=False)
    code, out, _ = run(capsys, "drop", "--count", "2", "--db", str(dbfile))
    assert code == 0 and "2 message(s) dropped" in out
    before = dump(dbfile)
    code, _, err = run(capsys, "drop", "msg-nope", "--db", str(dbfile))
    assert code == 2 and "no queued message for 'msg-nope'" in err
    assert dump(dbfile) == before
    assert run(capsys, "drop", "--count", "0", "--db", str(dbfile))[0] == 2


def test_redrive(capsys: pytest.CaptureFixture[str], dbfile: Path) -> None:
    seed_orders(dbfile, 1, process=False)
    conn = store.connect(dbfile)
    clock = FakeClock(start=SystemClock().now())
    queue = Queue(conn, clock=clock, ids=Ids(), max_receives=1)
    queue.receive(1.0)
    clock.advance(2)
    assert queue.receive(1.0) == []  # the second receive parks it
    dead = conn.execute("SELECT message_id FROM dead_letters").fetchone()[0]
    conn.close()

    before = dump(dbfile)
    code, _, err = run(capsys, "redrive", "msg-nope", "--db", str(dbfile))
    assert code == 2 and "'msg-nope' is not a dead letter's message id" in err
    assert dump(dbfile) == before
    code, out, _ = run(capsys, "redrive", dead, "--db", str(dbfile))
    assert code == 0 and out.startswith("redrove 1 dead letter(s)")
    code, out, _ = run(capsys, "redrive", "--db", str(dbfile))
    assert code == 0 and out.startswith("redrove 0 dead letter(s)")


# -- the worker's output ----------------------------------------------------------------------
def test_wall_clock_stamps() -> None:
    line = "[worker-1] t=1700000000.250 event=evt-1 order=o-001 delivery=1 received"
    shown = cli._wall(line)
    assert shown.startswith("[worker-1] ") and shown.endswith(
        " event=evt-1 order=o-001 delivery=1 received")
    assert " t=" not in shown and ".250 " in shown
    fake = "[worker-1] t=2.000 event=evt-1 order=o-001 delivery=2 received"
    assert cli._wall(fake) == fake


def test_dead_letter_on_receive_is_announced(dbfile: Path) -> None:
    seed_orders(dbfile, 1, process=False)
    said: list[str] = []
    conn = store.connect(dbfile)
    clock = FakeClock(start=SystemClock().now())
    worker = Worker(store=conn, clock=clock,
                    broker=Queue(conn, clock=clock, ids=Ids(), max_receives=1),
                    visibility_timeout=1.0,
                    faults=Faults(seed=1, ack_fail=1.0), echo=said.append)
    assert worker.step() == 1
    assert not any("dead-lettered" in line for line in said)
    clock.advance(2)
    assert worker.step() == 0  # the second receive parks it instead of handing it over
    conn.close()
    parked = [line for line in said if "dead-lettered" in line]
    assert len(parked) == 1 and "order=o-001 delivery=1 dead-lettered" in parked[0]
    assert "deliverylab redrive" in parked[0] and worker.stats.dead_lettered == 1


# -- the status module --------------------------------------------------------------------------
def test_event_state_agrees_with_the_checker(tmp_path: Path) -> None:
    conn = store.init_db(tmp_path / "s.db")
    clock = FakeClock()
    queue = Queue(conn, clock=clock, ids=Ids(5), max_receives=3)
    for i in range(40):
        place_order(queue, item_id=f"item-{i % 3}", qty=1 + i % 4)
    faults = Faults(seed=9, ack_fail=0.5, process_error=0.3, lose_message=0.1)
    for mode in ("at-least-once", "idempotent"):
        Worker(store=conn, clock=clock, mode=mode, faults=faults, broker=queue,
               visibility_timeout=1.0, max_messages=3).run_until_idle(max_steps=40)
    states = {e: (n, s) for _, _, _, e, n, s in event_states(conn)}
    assert len({s for _, s in states.values()}) >= 3  # a mix of outcomes
    for event_id, expected in states.items():
        assert event_state(conn, event_id) == expected
    report = collect(conn, now=clock.now())
    assert report["check"] == check(conn).as_dict()
    text = render(report)
    assert text.splitlines()[-1] == f"verdict      {check(conn).verdict}"
    story = trace(conn, "o-nope")
    assert story is None
    first = conn.execute("SELECT order_id FROM orders LIMIT 1").fetchone()[0]
    shown = render_trace(trace(conn, first))
    assert shown.startswith(f"order {first}") and "t=" in shown
    conn.close()


def test_status_lists_only_drifted_items_when_there_are_many(tmp_path: Path) -> None:
    conn = store.init_db(tmp_path / "many.db")
    queue = Queue(conn, clock=FakeClock(), ids=Ids(1))
    for i in range(30):
        place_order(queue, item_id=f"item-{i:02d}", qty=1)
    Worker(store=conn, clock=queue.clock, broker=queue).run_until_idle()
    conn.execute("UPDATE inventory_projection SET reserved_qty = 5 WHERE item_id = 'item-07'")
    text = render(collect(conn, now=0))
    conn.close()
    assert "item-07" in text and "item-08" not in text
    assert "… 29 more items, all equal to the truth" in text


def test_api_on_a_busy_port_says_so(capsys: pytest.CaptureFixture[str], dbfile: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, _, err = run(capsys, "api", "--db", str(dbfile), "--port", str(port))
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pick another --port" in err


def test_api_on_an_unknown_host_is_refused(capsys: pytest.CaptureFixture[str],
                                           dbfile: Path) -> None:
    code, _, err = run(capsys, "api", "--db", str(dbfile), "--host", "no-such-host.invalid")
    assert code == 2 and "--host must be an address of this machine" in err
