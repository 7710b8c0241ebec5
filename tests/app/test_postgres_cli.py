"""The command line on a PostgreSQL schema: init-db, worker, status, trace, reconcile; and a
bad URL or an unreachable server is exit 2 naming --db, with nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support.pg import new_url, schema
from support.processes import env

from deliverylab.app import cli
from deliverylab.brokers.postgres import PostgresBroker
from deliverylab.engine import store_postgres as pgstore
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.relay import Relay


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DELIVERYLAB_DB", raising=False)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_db_creates_the_schema_once_and_keeps_its_data(capsys):
    url = new_url()
    try:
        code, out, _ = run(capsys, "init-db", "--db", url)
        assert code == 0 and f"schema {pgstore.schema_of(url)!r} is ready" in out
        with pgstore.connect(url) as conn:
            place_order(PostgresBroker(conn, clock=SystemClock(), ids=Ids(1)), item_id="beans", qty=2)
        code, out, _ = run(capsys, "init-db", "--db", url)
        assert code == 0 and "(1 orders;" in out
    finally:
        pgstore.drop_schema(url)


@pytest.mark.parametrize(("url", "says"), [
    ("postgresql://127.0.0.1:1/test?options=-csearch_path%3Ddl_x",
     "a reachable PostgreSQL server (connection to server at"),
    ("postgresql://127.0.0.1/test", "a postgresql:// URL naming its schema"),
    ("postgresql://127.0.0.1:port/test?options=-csearch_path%3Ddl_x", "a valid postgresql:// URL"),
    ("postgresql://127.0.0.1/test?options=-csearch_path%3DDrop-Me", "a schema name of lower-case"),
    ("postgresql://127.0.0.1/no_such_db?options=-csearch_path%3Ddl_x",
     'database "no_such_db" does not exist'),
])
@pytest.mark.parametrize("command", ["init-db", "status", "worker", "reconcile", "api", "relay"])
def test_a_bad_url_or_an_unreachable_server_is_exit_2_naming_the_flag(capsys, command, url, says):
    broker = ["--broker", "postgresql://127.0.0.1/test?options=-csearch_path%3Ddl_b"]
    code, out, err = run(capsys, command, "--db", url, *(broker if command == "relay" else []))
    assert code == 2, (out, err)
    assert err.startswith(f"deliverylab {command}: error: --db must be") and says in err


def test_a_schema_init_db_never_made_is_named(capsys):
    url = new_url()
    code, _, err = run(capsys, "status", "--db", url)
    assert code == 2 and f"a deliverylab schema {pgstore.schema_of(url)!r}" in err
    with pgstore.connect(url, must_exist=False) as conn:  # and nothing was created
        assert conn.execute("SELECT count(*) FROM information_schema.schemata"
                            " WHERE schema_name = ?", (conn.schema,)).fetchone()[0] == 0


@pytest.mark.slow
def test_a_worker_process_with_lost_acks_then_status_trace_and_reconcile(capsys):
    with schema() as url:
        with pgstore.connect(url) as conn:
            q = PostgresBroker(conn, clock=SystemClock(), ids=Ids(5))
            orders = [place_order(q, item_id=f"item-{i % 3}", qty=1).order_id for i in range(12)]
        worker = subprocess.Popen(
            [sys.executable, "-m", "deliverylab", "worker", "--db", url, "--ack-fail-rate", "0.5",
             "--seed", "3", "--visibility-timeout", "0.2", "--poll-interval", "0.01"],
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            with pgstore.connect(url) as conn:
                for _ in range(400):
                    if conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0] == 0:
                        break
                    subprocess.run(["sleep", "0.05"], check=True)
        finally:
            worker.terminate()
            out, err = worker.communicate(timeout=30)
        assert worker.returncode == 0, err
        assert "duplicate skipped" in out and f"db={url}" in out
        code, out, _ = run(capsys, "status", "--db", url)
        assert code == 0 and "12 applied exactly once, 0 duplicated, 0 lost" in out
        assert f"database     {url}" in out
        code, out, _ = run(capsys, "trace", "--db", url, orders[0])
        assert code == 0 and "received" in out and "acked" in out
        code, out, _ = run(capsys, "reconcile", "--db", url)
        assert code == 0 and "nothing to repair" in out


def test_transactional_is_refused_for_a_broker_that_is_not_the_store(capsys, tmp_path):
    store_file = tmp_path / "store.db"
    assert run(capsys, "init-db", "--db", str(store_file))[0] == 0
    with schema() as url:
        code, _, err = run(capsys, "worker", "--broker", url, "--store", str(store_file),
                           "--mode", "transactional")
    assert code == 2 and "deliverylab worker: error: mode must be a mode other than" \
        " transactional when the broker is not the store's own database" in err


@pytest.mark.parametrize("flag", ["--broker", "--store"])
def test_a_bad_broker_or_store_url_is_exit_2_naming_it(capsys, tmp_path, flag):
    store_file = tmp_path / "store.db"
    run(capsys, "init-db", "--db", str(store_file))
    other = {"--broker": "--store", "--store": "--broker"}[flag]
    code, _, err = run(capsys, "worker", flag, "postgresql://127.0.0.1:1/test?options="
                       "-csearch_path%3Ddl_x", other, str(store_file))
    assert code == 2 and f"error: {flag} must be a reachable PostgreSQL server" in err


@pytest.mark.slow
def test_a_worker_on_a_postgres_broker_and_a_sqlite_store(capsys, tmp_path):
    """The broker in PostgreSQL, the store in a SQLite file: idempotent under lost ACKs
    applies every order once; the worker writes the broker's verbs into the store's trace."""
    from deliverylab.engine import store

    store_file = tmp_path / "store.db"
    with schema() as url:
        conn = store.init_db(store_file)
        with pgstore.connect(url) as bconn:
            broker = PostgresBroker(bconn, clock=SystemClock(), ids=Ids(9))
            for i in range(10):
                place_order(broker, item_id=f"item-{i % 3}", qty=1, store=conn)
            Relay(conn, broker, clock=broker.clock).run_until_idle()
        conn.close()
        worker = subprocess.Popen(
            [sys.executable, "-m", "deliverylab", "worker", "--broker", url, "--store",
             str(store_file), "--ack-fail-rate", "0.5", "--seed", "4",
             "--visibility-timeout", "0.2", "--poll-interval", "0.01"],
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            with pgstore.connect(url) as bconn:
                for _ in range(400):
                    if bconn.execute("SELECT count(*) FROM queue_messages").fetchone()[0] == 0:
                        break
                    subprocess.run(["sleep", "0.05"], check=True)
        finally:
            worker.terminate()
            out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert f"broker={url}" in out and "duplicate skipped" in out
    code, out, _ = run(capsys, "status", "--db", str(store_file))
    assert code == 0 and "10 applied exactly once, 0 duplicated, 0 lost" in out
    conn = store.connect(store_file)
    outcomes = {r[0] for r in conn.execute("SELECT outcome FROM delivery_log")}
    conn.close()
    assert {"received", "applied", "duplicate_skipped", "acked", "ack_failed"} <= outcomes
