"""Shared fixtures: a fresh lab (database + FakeClock + seeded ids + queue) per test.

``lab`` is in memory, ``file_lab`` is a WAL file under ``tmp_path``, and ``any_lab`` runs the
test once against each, so a contract holds for both configurations.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deliverylab.brokers import registry
from deliverylab.brokers.base import Broker, Capabilities
from deliverylab.brokers.sqlite import Queue, SQLiteBroker
from deliverylab.engine import store
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import PlacedOrder, place_order
from deliverylab.engine.settings import DEFAULT_MAX_RECEIVES
from deliverylab.engine.worker import Worker


@dataclass
class Lab:
    """Everything a test needs to drive the engine by hand."""

    conn: sqlite3.Connection
    clock: FakeClock
    ids: Ids
    queue: Queue
    path: Path | None = None

    def order(self, item_id: str = "coffee-beans", qty: int = 1, **kw: Any) -> PlacedOrder:
        return place_order(self.queue, item_id=item_id, qty=qty, **kw)

    def worker(self, conn: sqlite3.Connection | None = None, **kw: Any) -> Worker:
        """A worker on this lab's clock and ids and on ``conn`` (default: the lab's own
        connection); override anything by keyword."""
        kw.setdefault("clock", self.clock)
        conn = self.conn if conn is None else conn
        if conn is self.conn and "max_receives" not in kw:
            kw.setdefault("broker", self.queue)
        elif "broker" not in kw:
            kw["broker"] = Queue(conn, clock=kw["clock"], ids=self.ids,
                                 max_receives=kw.pop("max_receives", DEFAULT_MAX_RECEIVES))
        return Worker(store=conn, **kw)

    def drain(self, *workers: Worker, max_rounds: int = 100_000) -> None:
        """Step the workers in turn until the queue is empty, jumping the clock to the next
        visible message whenever none of them got one."""
        for _ in range(max_rounds):
            if sum(w.step() for w in workers) == 0:
                nxt = self.queue.next_visible_at()
                if nxt is None:
                    return
                self.clock.sleep_until(nxt)
        raise AssertionError(f"the queue did not drain in {max_rounds} rounds")

    def connect(self) -> sqlite3.Connection:
        """A second connection to the same file (file labs only)."""
        assert self.path is not None, "an in-memory lab has a single connection"
        return store.connect(self.path)

    def projection(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT item_id, reserved_qty FROM inventory_projection"))

    def truth(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT item_id, sum(qty) FROM orders GROUP BY item_id"))


def make_lab(path: str | Path = ":memory:", *, seed: int = 1,
             max_receives: int = DEFAULT_MAX_RECEIVES) -> Lab:
    conn = store.init_db(path)
    clock = FakeClock()
    ids = Ids(seed)
    queue = Queue(conn, clock=clock, ids=ids, max_receives=max_receives)
    return Lab(conn, clock, ids, queue, None if str(path) == ":memory:" else Path(path))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = make_lab()
    yield lab
    lab.conn.close()


@pytest.fixture
def file_lab(tmp_path: Path) -> Iterator[Lab]:
    lab = make_lab(tmp_path / "lab.db")
    yield lab
    lab.conn.close()


@pytest.fixture(params=["memory", "file"])
def any_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    lab = make_lab(":memory:" if request.param == "memory" else tmp_path / "lab.db")
    yield lab
    lab.conn.close()


# -- brokers ---------------------------------------------------------------------------------
# Every broker engine the contract suite (tests/test_broker_contract.py) and the worker's
# broker tests run against. An engine is a function (directory, clock, ids, max_receives) ->
# (broker, close); add one here and every contract case runs against it.
def _sqlite_memory(where: Path, clock: FakeClock, ids: Ids,
                   max_receives: int) -> tuple[Broker, Callable[[], None]]:
    """The lab's broker: the queue table on the connection it shares with the store."""
    conn = store.init_db()
    return SQLiteBroker(conn, clock=clock, ids=ids, max_receives=max_receives), conn.close


def _sqlite_file(where: Path, clock: FakeClock, ids: Ids,
                 max_receives: int) -> tuple[Broker, Callable[[], None]]:
    """A broker in its own SQLite file, apart from any store; it writes no trace."""
    conn = store.init_db(where / "broker.db")
    return (SQLiteBroker(conn, clock=clock, ids=ids, max_receives=max_receives, trace=False),
            conn.close)


def _postgres(where: Path, clock: FakeClock, ids: Ids,
              max_receives: int) -> tuple[Broker, Callable[[], None]]:
    """The PostgreSQL queue table, in a schema of its own on the shared server (see
    tests/pg.py), dropped on close; it writes its trace in its own schema, as the lab's does."""
    from contextlib import ExitStack

    from pg import schema

    from deliverylab.brokers.postgres import PostgresBroker
    from deliverylab.engine import store_postgres

    stack = ExitStack()
    conn = store_postgres.connect(stack.enter_context(schema()))
    stack.callback(conn.close)
    return PostgresBroker(conn, clock=clock, ids=ids, max_receives=max_receives), stack.close


def _by_url(name: str) -> Callable[..., tuple[Broker, Callable[[], None]]]:
    """Engine ``name`` of the registry (``deliverylab.brokers.registry``) on its shared server
    (``make services`` starts it; its environment variable points elsewhere): a queue or
    stream of its own, deleted on close, with a 1-second lease where the engine fixes the
    lease per queue. Fails, never skips, when the server does not answer."""
    def open_it(where: Path, clock: FakeClock, ids: Ids,
                max_receives: int) -> tuple[Broker, Callable[[], None]]:
        broker = registry.open_scratch(name, lease=1.0, clock=clock, ids=ids,
                                       max_receives=max_receives, worker="pytest")
        return broker, broker.destroy
    return open_it


BROKER_ENGINES: dict[str, Callable[..., tuple[Broker, Callable[[], None]]]] = {
    "sqlite-memory": _sqlite_memory,
    "sqlite-file": _sqlite_file,
    "postgres": _postgres,
    **{name: _by_url(name) for name in registry.ENGINES},
}


def capabilities_of(engine: str) -> Capabilities:
    """What engine ``engine`` (a key of :data:`BROKER_ENGINES`) can do, before opening one:
    for choosing the engines of a test that needs a capability."""
    if engine in registry.ENGINES:
        return registry.capabilities(engine)
    return SQLiteBroker.capabilities  # the queue table, on SQLite or PostgreSQL


@pytest.fixture(params=list(BROKER_ENGINES))
def make_broker(request: pytest.FixtureRequest,
                tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """``make_broker(clock=…, seed=…, max_receives=…)``: a fresh broker of this param's engine
    (each call its own queue), closed after the test."""
    closers: list[Callable[[], None]] = []

    def make(*, clock: FakeClock | None = None, seed: int = 1, max_receives: int = 3) -> Broker:
        where = tmp_path / f"broker-{len(closers)}"
        where.mkdir()
        broker, close = BROKER_ENGINES[request.param](where, clock or FakeClock(), Ids(seed),
                                                      max_receives)
        closers.append(close)
        return broker

    yield make
    for close in closers:
        close()


@pytest.fixture
def broker(make_broker: Callable[..., Broker]) -> Broker:
    """A fresh broker of each engine, on its own FakeClock (``broker.clock``), with
    ``max_receives=3``."""
    return make_broker()


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    """A fresh lab database file, for the API tests."""
    path = tmp_path / "app.db"
    store.init_db(path).close()
    return path


@pytest.fixture
def client(db_file: Path) -> Iterator[Any]:
    """The API on ``db_file``, in process (FastAPI's TestClient)."""
    import warnings

    from deliverylab.app.api import create_app

    with warnings.catch_warnings():  # Starlette's notice about a future HTTP client
        warnings.filterwarnings("ignore", message=".*starlette.testclient")
        from fastapi.testclient import TestClient
    with TestClient(create_app(db_file)) as c:
        yield c


# -- PostgreSQL ---------------------------------------------------------------------------------
@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema on the test server (tests/pg.py), as a store URL; dropped afterwards."""
    from pg import schema

    with schema() as url:
        yield url


@pytest.fixture
def gate() -> Iterator[Any]:
    """A TCP proxy in front of the test server that can end, refuse or black-hole its own
    connections (tests/pg_gate.py); stopped afterwards."""
    from pg_gate import Gate

    g = Gate()
    try:
        yield g
    finally:
        g.stop()
