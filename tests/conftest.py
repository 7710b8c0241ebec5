"""Shared fixtures: a fresh lab (database + FakeClock + seeded ids + queue) per test.

``lab`` is in memory, ``file_lab`` is a WAL file under ``tmp_path``, and ``any_lab`` runs the
test once against each, so a contract holds for both configurations.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import PlacedOrder, place_order
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
        kw.setdefault("ids", self.ids)
        if conn is None and "max_receives" not in kw:
            kw.setdefault("queue", self.queue)
        return Worker(self.conn if conn is None else conn, **kw)

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


def make_lab(path: str | Path = ":memory:", *, seed: int = 1, max_receives: int = 5) -> Lab:
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
