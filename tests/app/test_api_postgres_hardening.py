"""The HTTP API on PostgreSQL under attack: its connections terminated, the server gone and
back, two API processes on one schema racing for the same key, a NUL in a path, a lock held
elsewhere, an ambiguous store URL; and the server itself: slow bodies and a quiet shutdown.

Real processes and the real server: the API's backends are ended with
``pg_terminate_backend`` and the server is taken away with a gate in front of it
(``pg_gate``), never by touching the shared server."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.api import post, serve
from support.pg import SERVER, schema
from support.processes import HOST, cli, free_port, request

from deliverylab.app.api import Server, create_app
from deliverylab.engine import store_postgres as pgstore
from deliverylab.engine.errors import InvalidInput

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*starlette.testclient")
    from fastapi.testclient import TestClient


def orders_in(url: str) -> dict[str, str]:
    """Every committed order id, with its event id; and the queue holds one message each."""
    with pgstore.connect(url) as conn:
        orders = dict(conn.execute("SELECT order_id, event_id FROM orders").fetchall())
        events = [r[0] for r in conn.execute("SELECT event_id FROM queue_messages")]
    assert sorted(events) == sorted(orders.values())
    return orders


def timed(method: str, path: str, port: int, body: dict | None = None,
          **headers: str) -> tuple[int, dict, float]:
    t = time.monotonic()
    status, payload = request(method, path, body, port=port, headers=headers or None,
                              timeout=30)
    return status, payload, time.monotonic() - t


# -- §2: connections that die ----------------------------------------------------------------
@pytest.mark.slow
def test_the_api_reconnects_and_answers_503_while_the_database_is_gone(pg_url, gate, tmp_path):
    """Terminated backends: the next POST reconnects and succeeds. The server gone: every
    request is answered within the write budget, writes with a 503 and Retry-After,
    ``/health`` says unreachable; nothing answered 201 is missing. The server back: POSTs
    succeed again, no restart. Then a SIGTERM stops the API at once, without a traceback."""
    api, port = serve(tmp_path, "--db", gate.url(pg_url))
    acked: list[str] = []
    try:
        assert request("POST", "/orders", {"orderId": "o-0", "itemId": "tea", "qty": 1},
                       port=port)[0] == 201
        acked.append("o-0")
        # 1. The server ends the API's backends (a restart or a failover does the same).
        assert gate.terminate() >= 2  # the writer and /health's prober at least
        status, body, _ = timed("POST", "/orders", port, {"orderId": "o-1", "itemId": "tea",
                                                          "qty": 1})
        assert status == 201, body
        acked.append("o-1")
        assert request("GET", "/orders/o-0", port=port)[0] == 200
        assert request("GET", "/health", port=port)[0] == 200
        # 2. The server is gone.
        gate.close()
        for i in range(2, 6):
            status, body, took = timed("POST", "/orders", port,
                                       {"orderId": f"o-{i}", "itemId": "tea", "qty": 1})
            assert status == 503 and took < 3.5, (status, body, took)
            assert "cannot be reached" in body["error"] and "nothing was written" in body["error"]
        conn = socket.create_connection((HOST, port))  # the raw answer, for its headers
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
        conn.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower(), raw
        health = json.loads(payload)
        assert (health["database"], health["writable"]) == ("unreachable", False)
        for path in ("/orders/o-0", "/status", "/orders"):
            status, body, took = timed("GET", path, port)
            assert status == 503 and took < 3.5 and "cannot be reached" in body["error"]
        # 3. The server is back: the API reconnects by itself (its backoff is 2 s at most).
        gate.open()
        deadline, status = time.monotonic() + 15, 0
        while status != 201 and time.monotonic() < deadline:
            status, body, _ = timed("POST", "/orders", port, {"orderId": "o-6", "itemId": "tea",
                                                              "qty": 1})
            if status != 201:
                assert status == 503, body
                time.sleep(0.2)
        assert status == 201, body
        acked.append("o-6")
        assert request("GET", "/health", port=port)[1]["database"] == "ok"
        t = time.monotonic()
        assert api.terminate() in (0, -signal.SIGTERM)
        assert time.monotonic() - t < 5
    finally:
        api.stop()
    assert sorted(orders_in(pg_url)) == sorted(acked)  # nothing acknowledged went missing
    assert "Traceback" not in api.log.read_text(), api.log.read_text()[-3000:]


@pytest.mark.slow
def test_clients_posting_through_an_outage_get_201_only_for_what_committed(pg_url, gate,
                                                                         tmp_path):
    """Four clients post orders without pause while the server's backends are terminated
    three times and the server disappears for two seconds. Every answer is a 201 or a 503,
    within the write budget; every 201 is in the database; and retrying each 503 with the
    same order id after the outage places it exactly once."""
    api, port = serve(tmp_path, "--db", gate.url(pg_url), "--no-access-log")
    answers: dict[str, list[int]] = {}
    slow: list[float] = []
    stop = threading.Event()

    def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            oid = f"c{c}-{i}"
            status, _, took = timed("POST", "/orders", port, {"orderId": oid, "itemId": "tea",
                                                              "qty": 1})
            answers.setdefault(oid, []).append(status)
            if took > 3.5:
                slow.append(took)
            i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    try:
        for t in threads:
            t.start()
        for _ in range(3):
            time.sleep(0.4)
            gate.terminate()
        time.sleep(0.4)
        gate.close()
        time.sleep(2)
        gate.open()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(30)
        statuses = [s for got in answers.values() for s in got]
        assert set(statuses) <= {201, 503} and statuses.count(503) > 0, statuses
        assert not slow, slow
        stored = orders_in(pg_url)
        acked = {oid for oid, got in answers.items() if 201 in got}
        assert acked <= set(stored)
        # A 503 may hide a commit whose answer was lost: the retry finds out, never doubles.
        for oid in sorted(set(answers) - acked):
            status = request("POST", "/orders", {"orderId": oid, "itemId": "tea", "qty": 1},
                             port=port)[0]
            assert status in (200, 201)
        assert set(orders_in(pg_url)) == set(answers)
    finally:
        stop.set()
        api.stop()
    assert "Traceback" not in api.log.read_text(), api.log.read_text()[-3000:]


# -- §5: two APIs on one schema ------------------------------------------------------------
@pytest.mark.slow
def test_two_apis_on_one_schema_answer_a_race_as_one_api_does(pg_url, tmp_path):
    """The same Idempotency-Key, or the same orderId, sent to two API processes at the same
    moment, 20 rounds of each kind: the answers are those one API gives (201 and a replay,
    or a 422 for a different body, or a 409 while the first is in flight), never a 500, and
    one order is written per round."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    api_a, port_a = serve(tmp_path / "a", "--db", pg_url, "--no-access-log")
    api_b, port_b = serve(tmp_path / "b", "--db", pg_url, "--no-access-log")
    try:
        rounds = []
        for r in range(20):
            for kind in ("key", "order", "key-other-body", "order-other-body"):
                same = {"itemId": "tea", "qty": 1}
                bodies = [dict(same), dict(same)]
                headers: list[dict[str, str]] = [{}, {}]
                if kind.startswith("key"):
                    headers = [{"Idempotency-Key": f"k-{r}-{kind}"}] * 2
                else:
                    bodies = [{"orderId": f"o-{r}-{kind}", **b} for b in bodies]
                if kind.endswith("other-body"):
                    bodies[1]["qty"] = 2
                barrier = threading.Barrier(2)
                got: list[tuple[int, dict]] = [(0, {}), (0, {})]

                def send(i: int, port: int, bodies=bodies, headers=headers, barrier=barrier,
                         got=got) -> None:
                    barrier.wait()
                    got[i] = request("POST", "/orders", bodies[i], port=port,
                                     headers=headers[i] or None)

                threads = [threading.Thread(target=send, args=(i, p))
                           for i, p in enumerate((port_a, port_b))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
                rounds.append((kind, sorted(s for s, _ in got), got))
        for kind, statuses, got in rounds:
            assert 500 not in statuses, (kind, got)
            if kind.endswith("other-body"):
                assert statuses in ([201, 409], [201, 422]), (kind, got)
            elif kind == "key":  # a key's replay repeats the first answer: 201
                assert statuses in ([201, 201], [201, 409]), (kind, got)
            else:
                assert statuses in ([200, 201], [201, 409]), (kind, got)
            ids = {b.get("orderId") for s, b in got if s in (200, 201)}
            assert len(ids) == 1, (kind, got)  # one order, the same for both
        assert len(orders_in(pg_url)) == len(rounds)
        for proc in (api_a, api_b):
            assert proc.terminate() in (0, -signal.SIGTERM)
    finally:
        api_a.stop()
        api_b.stop()
    assert "Traceback" not in api_a.log.read_text() + api_b.log.read_text()


@pytest.fixture
def client(pg_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(pg_url, write_budget=0.5)) as c:
        yield c


@pytest.mark.parametrize("path", ["/orders/%00", "/orders/o-1%00", "/orders/%00%00x",
                                  "/orders/a%1Bb", "/orders/" + "x" * 101])
def test_an_id_no_order_can_have_is_a_404_not_a_500(client, path):
    post(client, {"orderId": "o-1", "itemId": "tea", "qty": 1})
    r = client.get(path)
    assert r.status_code == 404 and r.json()["field"] == "orderId", r.text
    assert client.get("/orders/o-1").status_code == 200


def test_health_reports_what_a_write_meets_behind_a_held_lock(client, pg_url):
    assert client.get("/health").json()["writable"] is True
    for lock in ("LOCK TABLE orders IN EXCLUSIVE MODE",
                 "LOCK TABLE queue_messages IN SHARE MODE",
                 "LOCK TABLE idempotency_keys IN ACCESS EXCLUSIVE MODE"):
        holder = pgstore.connect(pg_url)
        holder.execute("BEGIN")
        holder.execute(lock)
        try:
            health = client.get("/health")
            # Every write a client may send: with a key, it writes the key table too.
            write = post(client, {"itemId": "tea", "qty": 1}, **{"Idempotency-Key": lock[11:30]})
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert write.status_code == 503, lock
        assert health.status_code == 503 and health.headers["retry-after"] == "1", lock
        assert (health.json()["database"], health.json()["writable"]) == ("locked", False), lock
        assert client.get("/health").json()["writable"] is True
    assert post(client, {"itemId": "tea", "qty": 1}).status_code == 201


def test_health_says_read_only_when_the_server_takes_no_writes(pg_url):
    url = pg_url.replace("search_path%3D", "default_transaction_read_only%3Don%20-csearch_path%3D")
    with TestClient(create_app(url)) as client:
        health = client.get("/health")
        write = post(client, {"itemId": "tea", "qty": 1})
    assert health.status_code == 503 and health.json()["database"] == "read-only"
    assert write.status_code == 503 and "accepts no writes" in write.json()["error"]
    assert orders_in(pg_url) == {}


# -- §5: ambiguous store URLs ----------------------------------------------------------------
@pytest.fixture
def two_schemas() -> Iterator[tuple[str, str]]:
    with schema() as a, schema() as b:
        yield a, b


def test_an_ambiguous_store_url_is_refused(two_schemas):
    a, b = (pgstore.schema_of(u) for u in two_schemas)
    base = SERVER
    ambiguous = {
        "two -c": f"{base}?options=-csearch_path%3D{a}%20-csearch_path%3D{b}",
        "-c and --": f"{base}?options=-csearch_path%3D{a}%20--search_path%3D{b}",
        "two options": f"{base}?options=-csearch_path%3D{a}&options=-csearch_path%3D{b}",
    }
    for name, url in ambiguous.items():
        with pytest.raises(InvalidInput, match="search_path once|one options=") as bad:
            pgstore.connect(url)
        assert bad.value.field == "db", name
        done = cli("status", "--db", url)
        assert done.returncode == 2 and "--db must be" in done.stderr, (name, done.stderr)
        assert "Traceback" not in done.stderr


def test_the_schema_is_the_one_the_server_uses(two_schemas):
    """A search_path naming a schema that does not exist first: PostgreSQL skips it and
    writes the next one, another lab's. The server's current_schema() decides: refused."""
    a = pgstore.schema_of(two_schemas[0])
    url = f"{SERVER}?options=-csearch_path%3Ddl_nowhere_{a[8:]},{a}"
    with pytest.raises(InvalidInput, match=f"reads and writes schema '{a}'"):
        pgstore.connect(url)
    with pytest.raises(InvalidInput, match="reads and writes schema"):
        create_app(url)
    assert pgstore.connect(two_schemas[0]).schema == a


# -- §6: slow clients -----------------------------------------------------------------------
class Served:
    """``create_app`` served by the API's own Server class, in a thread of this process."""

    def __init__(self, db: str | Path, **kw) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(create_app(db, **kw), host=HOST, port=self.port,
                                log_level="warning", timeout_graceful_shutdown=5)
        self.server = Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started

    def stop(self) -> float:
        t = time.monotonic()
        self.server.should_exit = True
        self.thread.join(30)
        return time.monotonic() - t


def _slow_post(port: int, sent: bytes = b'{"it') -> socket.socket:
    s = socket.create_connection((HOST, port))
    s.sendall(b"POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n" + sent)
    return s


def _answer(s: socket.socket, timeout: float = 10) -> bytes:
    s.settimeout(timeout)
    raw = b""
    try:
        while chunk := s.recv(65536):
            raw += chunk
    except TimeoutError:
        pass
    return raw


def test_a_body_that_does_not_arrive_in_time_is_a_408(pg_url):
    served = Served(pg_url, body_timeout=0.5)
    try:
        s = _slow_post(served.port)
        t = time.monotonic()
        raw = _answer(s)
        took = time.monotonic() - t
        assert raw.startswith(b"HTTP/1.1 408"), raw
        assert b"did not arrive within 0.5 s" in raw and b"connection: close" in raw.lower()
        assert 0.4 < took < 3
        assert orders_in(pg_url) == {}
    finally:
        served.stop()
    with pytest.raises(InvalidInput, match="body_timeout"):
        create_app(pg_url, body_timeout=0)


def test_stopping_with_slow_clients_is_quick_and_quiet(pg_url, capfd):
    """40 clients stuck halfway through their bodies, 10 halfway through their headers: the
    stop takes well under the 5 s wait, each stuck POST gets a 503, nothing is logged as an
    error."""
    served = Served(pg_url)
    posts = [_slow_post(served.port) for _ in range(40)]
    heads = []
    for _ in range(10):
        s = socket.create_connection((HOST, served.port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0")
        heads.append(s)
    time.sleep(0.5)
    took = served.stop()
    assert took < 3, took
    answers = [_answer(s, 2) for s in posts]
    assert all(a.startswith(b"HTTP/1.1 503") and b"shutting down" in a for a in answers)
    for s in posts + heads:
        s.close()
    err = capfd.readouterr().err
    assert "CancelledError" not in err and "Traceback" not in err and "ERROR" not in err, err
    assert orders_in(pg_url) == {}


# -- the API's command line ----------------------------------------------------------------
def test_the_api_process_stops_quietly_with_slow_clients(pg_url, tmp_path):
    api, port = serve(tmp_path, "--db", pg_url, "--no-access-log")
    try:
        posts = [_slow_post(port) for _ in range(30)]
        time.sleep(0.5)
        t = time.monotonic()
        assert api.terminate() in (0, -signal.SIGTERM)
        assert time.monotonic() - t < 4
        for s in posts:
            s.close()
    finally:
        api.stop()
    out = api.log.read_text()
    assert "CancelledError" not in out and "Traceback" not in out and "ERROR" not in out, out


@pytest.mark.slow
def test_a_server_gone_silent_is_a_503_in_bounded_time_and_the_api_recovers(pg_url, gate):
    """The server stops answering, its connections open (a silent network): a write is
    answered 503 at its budget plus STUCK_S, saying it may or may not be written; /health
    does not hang; once the server answers again, writes succeed with no restart."""
    from deliverylab.app.api import STUCK_S

    with TestClient(create_app(gate.url(pg_url), write_budget=0.5)) as client:
        assert post(client, {"orderId": "o-1", "itemId": "tea", "qty": 1}).status_code == 201
        gate.hold()
        t = time.monotonic()
        got: list = []
        sender = threading.Thread(target=lambda: got.append(
            post(client, {"orderId": "o-2", "itemId": "tea", "qty": 1})), daemon=True)
        sender.start()
        sender.join(10)
        assert got, "the POST to a silent server was not answered in 10 s"
        r, took = got[0], time.monotonic() - t
        assert r.status_code == 503 and "did not answer" in r.json()["error"], r.text
        assert "may or may not be written" in r.json()["error"]
        assert took < 0.5 + STUCK_S + 1, took
        t = time.monotonic()
        assert client.get("/health").json()["writable"] is False
        assert time.monotonic() - t < 2
        gate.hold(False)
        deadline, status = time.monotonic() + 30, 0
        while status != 201 and time.monotonic() < deadline:
            status = post(client, {"orderId": "o-3", "itemId": "tea", "qty": 1}).status_code
        assert status == 201
        deadline = time.monotonic() + 30
        while client.get("/health").json()["writable"] is not True:
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.2)
    assert set(orders_in(pg_url)) == {"o-1", "o-3"}  # o-2 never reached the server
