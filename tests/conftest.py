"""Shared fixtures: a fresh lab (database + FakeClock + seeded ids + queue) per test.

The helpers behind them, and everything else the tests share, are in ``tests/support/``.

``lab`` is in memory, ``file_lab`` is a WAL file under ``tmp_path``, and ``any_lab`` runs the
test once against each, so a contract holds for both configurations. Every store and broker
here is opened as the CLI, the API and the book open theirs, by
:func:`deliverylab.brokers.registry.open_store_and_broker`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.brokers import BROKER_ENGINES
from support.engine import DATABASES, EngineRig, make_lab

from deliverylab.brokers.base import Broker
from deliverylab.engine import store
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.ids import Ids

# Fixtures that live beside the helpers they use: ``browser`` (Chromium, for the built book)
# and ``jupyterlab`` (a JupyterLab server on a copy of the chapters).
pytest_plugins = ["support.built_book", "support.jupyterlab"]

@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def lab() -> Iterator[EngineRig]:
    lab = make_lab()
    yield lab
    lab.store.close()


@pytest.fixture
def file_lab(tmp_path: Path) -> Iterator[EngineRig]:
    lab = make_lab(tmp_path / "lab.db")
    yield lab
    lab.store.close()


@pytest.fixture(params=["memory", "file"])
def any_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EngineRig]:
    lab = make_lab(":memory:" if request.param == "memory" else tmp_path / "lab.db")
    yield lab
    lab.store.close()


# -- brokers ---------------------------------------------------------------------------------
# One param per engine of BROKER_ENGINES (tests/support/brokers.py).
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


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh lab store on each database, named as ``--db`` takes it: a SQLite file under
    ``tmp_path``, or a schema of its own on the test server (tests/support/pg.py), dropped
    after the test. The API's and the dialects' tests run once on each, as the broker tests
    run on every engine."""
    if request.param == "sqlite":
        path = tmp_path / "app.db"
        store.init_db(path).close()
        yield str(path)
        return
    from support.pg import schema

    with schema() as url:
        yield url


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
    """A fresh schema on the test server (tests/support/pg.py), as a store URL; dropped
    afterwards."""
    from support.pg import schema

    with schema() as url:
        yield url


@pytest.fixture
def gate() -> Iterator[Any]:
    """A TCP proxy in front of the test server that can end, refuse or black-hole its own
    connections (tests/support/pg_gate.py); stopped afterwards."""
    from support.pg_gate import Gate

    g = Gate()
    try:
        yield g
    finally:
        g.stop()
