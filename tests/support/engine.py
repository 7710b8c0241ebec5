"""EngineRig: everything a test needs to drive the engine by hand (see ``tests/conftest.py``
for the fixtures built on it)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deliverylab.brokers import registry
from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import PlacedOrder, place_order
from deliverylab.engine.settings import DEFAULT_MAX_RECEIVES
from deliverylab.engine.worker import Worker

# The two databases a store can be: the ``db`` fixture of tests/conftest.py runs a test on each.
DATABASES = ("sqlite", "postgresql")


@dataclass
class EngineRig:
    """Everything a test needs to drive the engine by hand."""

    store: sqlite3.Connection
    clock: FakeClock
    ids: Ids
    broker: Queue
    path: Path | None = None

    def order(self, item_id: str = "coffee-beans", qty: int = 1, **kw: Any) -> PlacedOrder:
        return place_order(self.broker, item_id=item_id, qty=qty, **kw)

    def worker(self, conn: sqlite3.Connection | None = None, **kw: Any) -> Worker:
        """A worker on this lab's clock and ids and on ``conn`` (default: the lab's own
        connection); override anything by keyword."""
        kw.setdefault("clock", self.clock)
        conn = self.store if conn is None else conn
        if conn is self.store and "max_receives" not in kw:
            kw.setdefault("broker", self.broker)
        elif "broker" not in kw:
            kw["broker"] = Queue(conn, clock=kw["clock"], ids=self.ids,
                                 max_receives=kw.pop("max_receives", DEFAULT_MAX_RECEIVES))
        return Worker(store=conn, **kw)

    def drain(self, *workers: Worker, max_rounds: int = 100_000) -> None:
        """Step the workers in turn until the queue is empty, jumping the clock to the next
        visible message whenever none of them got one."""
        for _ in range(max_rounds):
            if sum(w.step() for w in workers) == 0:
                nxt = self.broker.next_visible_at()
                if nxt is None:
                    return
                self.clock.sleep_until(nxt)
        raise AssertionError(f"the queue did not drain in {max_rounds} rounds")

    def connect(self) -> sqlite3.Connection:
        """A second connection to the same file (file labs only)."""
        assert self.path is not None, "an in-memory lab has a single connection"
        return store.connect(self.path)

    def projection(self) -> dict[str, int]:
        return dict(self.store.execute("SELECT item_id, reserved_qty FROM inventory_projection"))

    def truth(self) -> dict[str, int]:
        return dict(self.store.execute("SELECT item_id, sum(qty) FROM orders GROUP BY item_id"))


def make_lab(path: str | Path = ":memory:", *, seed: int = 1,
             max_receives: int = DEFAULT_MAX_RECEIVES) -> EngineRig:
    clock = FakeClock()
    ids = Ids(seed)
    opened = registry.open_store_and_broker(path, clock=clock, ids=ids,
                                            max_receives=max_receives, init=True)
    assert opened.joined
    return EngineRig(opened.store, clock, ids, opened.broker,  # type: ignore[arg-type]
                     None if str(path) == ":memory:" else Path(path))
