"""The lab as a reader runs it: real ``deliverylab`` processes on one SQLite file.

Every process is started as ``python -m deliverylab …`` (the console script's code path) on a
free loopback port and a database under ``tmp_path``; every wait is bounded; every child is
killed in a ``finally``.
"""

from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.api import BAD_REQUESTS
from support.processes import HOST, Proc, ProcessRig, child_env, cli, no_failures, request, untimed

from deliverylab.engine import store
from deliverylab.engine.faults import Faults


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[ProcessRig]:
    lab = ProcessRig(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


# -- the seed chapter's scenario ----------------------------------------------------------------
def ack_fails_then_succeeds(event_id: str) -> int:
    """A fault seed under which delivery 1's ACK is lost and delivery 2's gets through, so the
    run shows the seed chapter's whole story (ACK_FAIL_RATE=0.8 decides the rest)."""
    for seed in range(10_000):
        faults = Faults(seed=seed, ack_fail=0.8)
        if faults.fires("ack_fail", event_id, 1) and not faults.fires("ack_fail", event_id, 2):
            return seed
    raise AssertionError("no such seed")


@pytest.mark.slow
def test_seed_scenario_ack_failures_are_skipped_as_duplicates(lab: ProcessRig) -> None:
    lab.api()
    placed = cli("order", "--item", "coffee-beans", "--qty", "1", "--order-id", "o-001",
                 "--url", f"http://{HOST}:{lab.port}")
    assert placed.returncode == 0, placed.stderr
    assert placed.stdout.startswith("201 Created ")
    event_id = json.loads(placed.stdout.split(" ", 2)[2])["eventId"]

    seed = ack_fails_then_succeeds(event_id)
    worker = lab.worker("worker-1", "--seed", str(seed), env=child_env(ACK_FAIL_RATE="0.8"))
    lab.wait_drained(timeout=30)
    assert worker.terminate() == 0
    out = worker.output()

    assert "faults: ack_fail=0.8" in out
    lines = [line for line in out.splitlines() if f"event={event_id}" in line]
    assert all("order=o-001" in line for line in lines)
    assert sum("applied projection (first time)" in line for line in lines) == 1
    assert sum("duplicate skipped" in line for line in lines) >= 1
    assert any("delivery=1 ack failed → expect redelivery" in line for line in lines)
    assert any("delivery=2 acked" in line for line in lines)
    assert "stopped:" in out and "applied=1" in out

    status = json.loads(cli("status", "--json", "--db", str(lab.db)).stdout)
    assert status["items"] == [{"itemId": "coffee-beans", "truth": 1, "projection": 1,
                                "delta": 0}]
    assert status["check"]["lost"] == 0 and status["check"]["duplicated"] == 0
    assert status["ok"] is True and status["verdict"].startswith("OK")
    text = cli("status", "--db", str(lab.db)).stdout
    assert "coffee-beans" in text and "verdict      OK" in text

    traced = cli("trace", "o-001", "--db", str(lab.db))
    assert traced.returncode == 0
    outcomes = [line.split()[4] for line in traced.stdout.splitlines()[4:]]
    assert outcomes[:3] == ["received", "applied", "ack_failed"]
    assert outcomes[-3:] == ["received", "duplicate_skipped", "acked"]


# -- load: 16 clients, 2,000 orders, 2 workers losing 30% of their ACKs ----------------------
ITEMS = [f"item-{i:02d}" for i in range(12)]


def send_orders(port: int, orders: list[dict[str, Any]], results: dict[str, Any]) -> None:
    """Send ``orders`` one after another on one keep-alive connection; record each answer
    (or the exception) under its order id."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        for order in orders:
            try:
                results[order["orderId"]] = request("POST", "/orders", order, port=port,
                                                    conn=conn)
            except (OSError, http.client.HTTPException) as exc:
                results[order["orderId"]] = exc
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=30)
    finally:
        conn.close()


def make_orders(n: int, prefix: str, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"orderId": f"{prefix}-{i:05d}", "itemId": rng.choice(ITEMS),
             "qty": rng.randint(1, 5)} for i in range(n)]


def run_clients(port: int, orders: list[dict[str, Any]], clients: int = 16,
                results: dict[str, Any] | None = None) -> dict[str, Any]:
    """``clients`` threads share ``orders`` and send them concurrently."""
    results = {} if results is None else results
    threads = [threading.Thread(target=send_orders, args=(port, orders[i::clients], results))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.mark.slow
def test_load_16_clients_2000_orders_2_workers(lab: ProcessRig) -> None:
    api = lab.api("--no-access-log")
    workers = [lab.worker(f"worker-{i}", "--ack-fail-rate", "0.3", "--seed", str(i))
               for i in (1, 2)]
    orders = make_orders(2000, "load")
    results = run_clients(lab.port, orders)

    statuses = [r[0] if isinstance(r, tuple) else repr(r) for r in results.values()]
    assert len(results) == 2000
    assert statuses.count(201) == 2000, sorted(set(map(str, statuses)))
    result = lab.wait_drained(timeout=120)
    assert result.orders == 2000
    assert result.correct == 2000 and result.duplicated == 0 and result.lost == 0
    assert result.projection_equals_truth, result.verdict

    for w in workers:
        assert w.terminate() == 0
    no_failures(api, *workers)
    outs = [w.output() for w in workers]
    assert all("applied projection (first time)" in o for o in outs)  # both did work
    assert sum(o.count("applied projection (first time)") for o in outs) == 2000
    assert any("ack failed → expect redelivery" in o for o in outs)
    assert sum(o.count("duplicate skipped") for o in outs) > 0


# -- crashes ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_of_the_api_under_load_loses_no_acknowledged_order(lab: ProcessRig) -> None:
    api = lab.api("--no-access-log")
    worker = lab.worker("worker-1")
    orders = make_orders(2000, "crash", seed=1)
    results: dict[str, Any] = {}
    killer_done = threading.Event()

    def kill_when_busy() -> None:
        deadline = time.monotonic() + 60
        while sum(isinstance(r, tuple) for r in list(results.values())) < 300:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        api.p.kill()  # SIGKILL: no shutdown handler runs
        killer_done.set()

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    run_clients(lab.port, orders, results=results)
    killer.join(timeout=90)
    assert killer_done.is_set()
    api.p.wait(timeout=10)
    assert api.p.returncode == -signal.SIGKILL

    acked = {oid: r[1] for oid, r in results.items() if isinstance(r, tuple) and r[0] == 201}
    assert not [r for r in results.values() if isinstance(r, tuple) and r[0] != 201]
    assert 300 <= len(acked) < 2000
    conn = lab.connect()
    try:
        rows = {r["order_id"]: r["event_id"] for r in conn.execute("SELECT * FROM orders")}
        queued = {r[0] for r in conn.execute("SELECT event_id FROM queue_messages")}
        done = {r[0] for r in conn.execute("SELECT event_id FROM inbox_processed")}
    finally:
        conn.close()
    for order_id, answer in acked.items():  # every 201 is in the file, with its event
        assert rows.get(order_id) == answer["eventId"]
        assert answer["eventId"] in queued | done

    # Restart and resend everything that had no answer: committed ones replay (200).
    lab.api("--no-access-log")
    unanswered = [o for o in orders if o["orderId"] not in acked]
    again = run_clients(lab.port, unanswered)
    codes = {r[0] for r in again.values()}
    assert codes <= {200, 201}, codes
    result = lab.wait_drained(timeout=120)
    assert result.orders == 2000 and result.correct == 2000
    assert result.projection_equals_truth, result.verdict
    no_failures(worker)


@pytest.mark.slow
def test_sigkill_of_workers_repeatedly_then_drain(lab: ProcessRig) -> None:
    lab.api("--no-access-log")
    env = child_env(ACK_FAIL_RATE="0.3")
    args = ("--visibility-timeout", "1")
    workers = [lab.worker(f"worker-{i}", *args, env=env) for i in (1, 2)]
    stop = threading.Event()
    answers: dict[str, Any] = {}

    def trickle(prefix: str) -> None:  # orders keep arriving while workers die
        conn = http.client.HTTPConnection(HOST, lab.port, timeout=30)
        for i in range(100_000):
            if stop.is_set():
                break
            order = {"orderId": f"{prefix}-{i:05d}", "itemId": ITEMS[i % len(ITEMS)],
                     "qty": 1 + i % 3}
            answers[order["orderId"]] = request("POST", "/orders", order, port=lab.port,
                                                conn=conn)[0]
            time.sleep(0.01)
        conn.close()

    senders = [threading.Thread(target=trickle, args=(f"wk{n}",)) for n in range(2)]
    for t in senders:
        t.start()

    def busy(w: Proc) -> bool:
        """Wait until ``w`` has leased a message, so the kill lands mid-work."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and w.alive():
            if " received" in w.output():
                return True
            time.sleep(0.02)
        return False

    rng = random.Random(3)
    kills = hits = 0
    try:
        while kills < 12:
            i = rng.randrange(len(workers))
            hits += busy(workers[i])
            time.sleep(rng.uniform(0.0, 0.3))
            workers[i].p.kill()  # SIGKILL: wherever it is, mid-transaction or not
            workers[i].p.wait(timeout=10)
            kills += 1
            workers[i] = lab.worker(f"worker-{i + 1}", *args, env=env)
    finally:
        stop.set()
        for t in senders:
            t.join(timeout=60)
    assert kills == 12 and hits >= 10
    for w in workers:
        w.kill()
    assert set(answers.values()) == {201}

    drain = lab.worker("drain")
    result = lab.wait_drained(timeout=120)
    assert drain.terminate() == 0
    assert result.orders == len(answers) and result.correct == len(answers)
    assert result.duplicated == 0 and result.lost == 0
    assert result.projection_equals_truth, result.verdict
    no_failures(drain)


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.slow
def test_malformed_requests_get_a_clear_4xx_and_write_nothing(lab: ProcessRig) -> None:
    api = lab.api()
    for name, method, path, headers, body, status, phrase in BAD_REQUESTS:
        got, answer = request(method, path, body, port=lab.port, headers=headers)
        assert got == status, (name, answer)
        assert answer["ok"] is False and phrase in answer["error"], (name, answer)

    # What a test client cannot send: a lying Content-Length, and a chunked body over 64 KiB.
    with socket.create_connection((HOST, lab.port), timeout=10) as s:
        s.sendall(b"POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000000\r\n\r\n{}")
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413"), head
    chunk = b"p" * 8192
    with socket.create_connection((HOST, lab.port), timeout=10) as s:
        s.sendall(b"POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(10):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may answer and close before the whole body is sent
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413"), head

    conn = lab.connect()
    try:
        assert sum(store.table_counts(conn).values()) == 0
    finally:
        conn.close()
    status, body = request("GET", "/health", port=lab.port)
    assert status == 200 and body["ok"] is True
    assert request("POST", "/orders", {"itemId": "x", "qty": 1}, port=lab.port)[0] == 201
    no_failures(api)


# -- lost messages and reconcile ----------------------------------------------------------------
@pytest.mark.slow
def test_lost_messages_are_reconciled_and_leftovers_do_not_double_count(lab: ProcessRig) -> None:
    def status() -> dict[str, Any]:
        return json.loads(cli("status", "--json", "--db", str(lab.db)).stdout)

    lab.api("--no-access-log")
    first = run_clients(lab.port, make_orders(10, "a", seed=4), clients=2)
    assert {r[0] for r in first.values()} == {201}
    worker = lab.worker("worker-1")
    lab.wait_drained(timeout=30)
    assert worker.terminate() == 0

    second = run_clients(lab.port, make_orders(10, "b", seed=5), clients=2)
    assert {r[0] for r in second.values()} == {201}
    dropped = cli("drop", "--count", "3", "--db", str(lab.db))
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.count("logged as lost") == 3

    before = status()
    assert before["check"]["lost"] == 3 and before["check"]["pending"] == 7
    assert before["ok"] is False and not before["check"]["projection_equals_truth"]
    assert any(i["delta"] < 0 for i in before["items"])
    assert "lost" in cli("status", "--db", str(lab.db)).stdout

    dry = cli("reconcile", "--dry-run", "--db", str(lab.db))
    assert dry.returncode == 0 and "dry run: nothing written" in dry.stdout
    assert untimed(status()) == untimed(before)

    repaired = cli("reconcile", "--db", str(lab.db))
    assert repaired.returncode == 0, repaired.stderr
    assert "3 lost, 7 pending" in repaired.stdout
    assert "10 order(s) recounted); fenced 20 event(s)" in repaired.stdout
    after = status()
    assert after["check"]["projection_equals_truth"] and after["ok"]
    projection = {i["itemId"]: i["projection"] for i in after["items"]}

    again = cli("reconcile", "--db", str(lab.db))
    assert again.returncode == 0 and again.stdout.startswith("nothing to repair")

    leftovers = lab.worker("worker-2")  # the 7 events still queued arrive now
    lab.wait_drained(timeout=30)
    assert leftovers.terminate() == 0
    out = leftovers.output()
    assert out.count("fenced: a repair already counted it") == 7
    assert "applied projection" not in out
    final = status()
    assert final["ok"] and {i["itemId"]: i["projection"] for i in final["items"]} == projection
    assert final["check"]["correct"] == 20
    assert final["verdict"] == ("OK (repaired): projection equals truth; 10 orders were never"
                                " applied (lost or in flight) and counted by the repair")


# -- clean shutdown -----------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_stops_api_and_worker_cleanly(lab: ProcessRig) -> None:
    api = lab.api()
    worker = lab.worker("worker-1")
    assert request("POST", "/orders", {"orderId": "o-1", "itemId": "x", "qty": 2},
                   port=lab.port)[0] == 201
    lab.wait_drained(timeout=30)
    assert worker.terminate() == 0
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells
    # what ended it.
    assert api.terminate() in (0, -signal.SIGTERM)
    assert "SIGTERM: stopping after the current step" in worker.output()
    assert "stopped: received=1 applied=1" in worker.output()
    assert "Shutting down" in api.output() and "Finished server process" in api.output()
    no_failures(api, worker)

