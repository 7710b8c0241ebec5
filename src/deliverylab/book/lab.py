"""The lab: one reproducible scenario on the engine, as plain functions returning DataFrames.

Chapters, the widget panel and the tests all drive the engine through :class:`Lab`, so what a
reader sees in a table is what a test asserts. Time is a :class:`~deliverylab.engine.clock.FakeClock`
and every id and fault comes from the seed: the same arguments give the same tables.

>>> lab = Lab(seed=7, mode="idempotent", faults=Faults(seed=7, ack_fail=0.8))
>>> _ = lab.place_order("coffee-beans", 1, order_id="o-001")
>>> lab.run_until_idle().verdict
'OK: all 1 orders applied exactly once; projection equals truth'
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..brokers.registry import open_store_and_broker
from ..brokers.sqlite import Queue
from ..engine import reconcile
from ..engine.check import CheckResult, check, drift_frame, events_frame
from ..engine.clock import FakeClock
from ..engine.errors import InvalidInput, check_int, check_number
from ..engine.faults import NO_FAULTS, Faults
from ..engine.ids import Ids
from ..engine.orders import PlacedOrder, place_order
from ..engine.settings import DEFAULT_MAX_RECEIVES
from ..engine.store import Store
from ..engine.worker import Mode, Worker, WorkerStats
from .traceviews import log_frame

if TYPE_CHECKING:
    import pandas as pd

ITEMS = ("coffee-beans", "green-tea", "oat-milk", "croissant", "espresso-cups")


class Lab:
    """A store, a broker, ``workers`` workers in one mode, one fake clock, one seed.

    ``path`` is the store: a SQLite file or ``":memory:"`` (the default), or a PostgreSQL URL
    naming a schema (``postgresql://HOST/DB?options=-csearch_path%3DNAME``), created if
    missing: the same scenario then runs on PostgreSQL, its queue table claiming with
    ``FOR UPDATE SKIP LOCKED``. Give each lab a schema of its own: a lab adds to what the
    schema already holds. Both are opened by
    :func:`deliverylab.brokers.registry.open_store_and_broker`: ``store`` is the store's
    connection and ``broker`` the queue table in its own database, joined to it (an effect
    and its ACK can commit in one transaction).
    """

    def __init__(self, path: str | Path = ":memory:", *, seed: int = 0,
                 mode: Mode | str = Mode.IDEMPOTENT, faults: Faults = NO_FAULTS,
                 workers: int = 1, visibility_timeout: float = 2.0,
                 max_receives: int = DEFAULT_MAX_RECEIVES,
                 max_messages: int = 1, tick: float = 0.1,
                 echo: Callable[[str], None] | None = None,
                 handler: Callable | None = None) -> None:
        check_int("seed", seed)
        self.mode = Mode.parse(mode)
        n_workers = check_int("workers", workers, minimum=1, maximum=16)
        self.tick = check_number("tick", tick, minimum=0)
        self.seed = seed
        self.faults = faults
        self.clock = FakeClock()
        self.ids = Ids(seed)
        self.rng = random.Random(seed)
        check_int("max_receives", max_receives, minimum=1)
        self.opened = open_store_and_broker(path, clock=self.clock, ids=self.ids,
                                            max_receives=max_receives, init=True,
                                            store_field="path")
        self.engine = self.opened.store_kind  # "sqlite" or "postgresql"
        self.store: Store = self.opened.store
        self.broker: Queue = self.opened.broker  # type: ignore[assignment]
        extra: dict[str, Any] = {"handler": handler} if handler is not None else {}
        self.workers = [
            Worker(store=self.store, clock=self.clock, mode=self.mode, faults=faults,
                   visibility_timeout=visibility_timeout, max_messages=max_messages,
                   name=f"worker-{i + 1}", echo=echo, broker=self.broker,
                   work_time=self.tick / 2, **extra)
            for i in range(n_workers)
        ]
        self._turn = 0

    def close(self) -> None:
        """Close the broker and the store."""
        self.opened.close()

    # -- producing -------------------------------------------------------------------------
    def place_order(self, item_id: str, qty: int, *, order_id: str | None = None,
                    idempotency_key: str | None = None) -> PlacedOrder:
        return place_order(self.broker, item_id=item_id, qty=qty, order_id=order_id,
                           idempotency_key=idempotency_key)

    def place_orders(self, n: int, *, items: Sequence[str] = ITEMS,
                     max_qty: int = 3) -> list[PlacedOrder]:
        """``n`` orders for items drawn from ``items`` with qty 1..``max_qty``, from the seed."""
        check_int("n", n, minimum=0, maximum=100_000)
        check_int("max_qty", max_qty, minimum=1, maximum=10_000)
        return [self.place_order(self.rng.choice(list(items)), self.rng.randint(1, max_qty))
                for _ in range(n)]

    # -- consuming -------------------------------------------------------------------------
    def step(self) -> int:
        """One step of the next worker (round robin). A step takes one tick on the clock: half
        of it processing (between receive and commit), half after. When nothing is visible,
        the clock jumps to the next lease expiry instead."""
        worker = self.workers[self._turn % len(self.workers)]
        self._turn += 1
        n = worker.step()
        if n:
            self.clock.advance(self.tick / 2)
        else:
            nxt = self.broker.next_visible_at()
            if nxt is not None and nxt > self.clock.now():
                self.clock.sleep_until(nxt)
        return n

    def run_until_idle(self, max_steps: int = 1_000_000) -> CheckResult:
        """Step until the queue is empty; returns the checker's result."""
        check_int("max_steps", max_steps, minimum=1)
        for _ in range(max_steps):
            if self.broker.next_visible_at() is None:
                break
            self.step()
        return self.check()

    def advance(self, seconds: float) -> float:
        return self.clock.advance(seconds)

    # -- faults and repair -----------------------------------------------------------------
    def lose_messages(self, n: int = 1) -> list[str]:
        """Delete ``n`` queued messages behind the workers' backs (chosen from the seed)."""
        check_int("n", n, minimum=0)
        ids = [r[0] for r in self.store.execute(
            "SELECT message_id FROM queue_messages ORDER BY seq")]
        chosen = sorted(self.rng.sample(ids, min(n, len(ids))))
        for mid in chosen:
            self.broker.drop(mid, reason="deleted behind the worker's back")
        return chosen

    def diff(self) -> reconcile.Drift:
        return reconcile.diff(self.store)

    def reconcile(self) -> reconcile.RepairResult:
        return reconcile.repair(self.store, clock=self.clock)

    # -- looking ---------------------------------------------------------------------------
    def check(self) -> CheckResult:
        return check(self.store)

    def stats(self) -> WorkerStats:
        """All workers' counters added up."""
        total = WorkerStats()
        for w in self.workers:
            for k, v in w.stats.as_dict().items():
                setattr(total, k, getattr(total, k) + v)
        return total

    def _frame(self, sql: str) -> pd.DataFrame:
        import pandas as pd

        cur = self.store.execute(sql)
        return pd.DataFrame([tuple(r) for r in cur], columns=[c[0] for c in cur.description])

    def orders(self) -> pd.DataFrame:
        return self._frame("SELECT order_id, item_id, qty, event_id, created_at FROM orders"
                           " ORDER BY created_at, order_id")

    def queue_table(self) -> pd.DataFrame:
        return self._frame("SELECT message_id, event_id, correlation_id AS order_id,"
                           " delivery_count, visible_at, lease_until, receipt, last_error"
                           " FROM queue_messages ORDER BY seq")

    def inbox(self) -> pd.DataFrame:
        return self._frame("SELECT consumer, event_id, processed_at FROM inbox_processed"
                           " ORDER BY processed_at, event_id")

    def projection(self) -> pd.DataFrame:
        """The projection beside the truth, per item, with the difference."""
        return drift_frame(self.store)

    def dead_letters(self) -> pd.DataFrame:
        return self._frame("SELECT message_id, event_id, correlation_id AS order_id,"
                           " delivery_count, last_error, dead_at FROM dead_letters"
                           " ORDER BY dead_at, message_id")

    def events(self) -> pd.DataFrame:
        return events_frame(self.store)

    def log(self, correlation_id: str | None = None) -> pd.DataFrame:
        return log_frame(self.store, correlation_id=correlation_id)


def run_scenario(*, mode: Mode | str, orders: int, faults: Faults = NO_FAULTS, seed: int = 0,
                 workers: int = 1, visibility_timeout: float = 2.0,
                 max_receives: int = DEFAULT_MAX_RECEIVES) -> Lab:
    """A fresh lab: place ``orders`` orders, run until idle, return the lab to inspect."""
    lab = Lab(seed=seed, mode=mode, faults=faults, workers=workers,
              visibility_timeout=visibility_timeout, max_receives=max_receives)
    lab.place_orders(orders)
    lab.run_until_idle()
    return lab


def guarantee_matrix(*, orders: int = 200, faults: Faults, seed: int = 0,
                     modes: Sequence[Mode | str] = ("at-most-once", "at-least-once",
                                                    "idempotent")) -> pd.DataFrame:
    """The same orders and the same fault schedule under each mode: one row per mode with
    the checker's counts (correct, lost, duplicated, …) and its verdict."""
    import pandas as pd

    rows = []
    for mode in modes:
        lab = run_scenario(mode=mode, orders=orders, faults=faults, seed=seed)
        result = lab.check()
        stats = lab.stats()
        rows.append({"mode": str(Mode.parse(mode)), "orders": result.orders,
                     "correct": result.correct, "lost": result.lost,
                     "duplicated": result.duplicated,
                     "extra_applications": result.extra_applications,
                     "dead_lettered": result.dead_lettered,
                     "deliveries": stats.received,
                     "projection_equals_truth": result.projection_equals_truth})
    return pd.DataFrame(rows)


def why_lost(lab: Lab) -> pd.DataFrame:
    """Why each lost order was lost, counted: the last row the trace holds for its event (a
    crash, or an ACK whose answer never came back), one row per distinct outcome and detail.
    The trace is the fault injector's record: the worker itself saw an ACK with no answer."""
    import pandas as pd

    if not isinstance(lab, Lab):
        raise InvalidInput("lab", lab, "a deliverylab.book.lab.Lab")
    events = lab.events()
    lost = set(events.loc[events["state"] == "lost", "event_id"])
    log = lab.log()
    last = log[log["event_id"].isin(lost)].groupby("event_id").tail(1)
    counts = last.groupby(["outcome", "detail"]).size()
    return pd.DataFrame({"lost orders": counts}).reset_index()


def fault_sweep(*, rates: Sequence[float], point: str = "ack_fail", orders: int = 200,
                seed: int = 0, modes: Sequence[Mode | str] = ("at-most-once", "at-least-once",
                                                              "idempotent"),
                **other_rates: float) -> pd.DataFrame:
    """Lost and duplicated effects per mode as one fault rate varies: tidy, for plotting."""
    import pandas as pd

    frames = []
    for rate in rates:
        faults = Faults.from_rates(seed=seed, **{point: rate, **other_rates})
        frame = guarantee_matrix(orders=orders, faults=faults, seed=seed, modes=modes)
        frame.insert(0, point, rate)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
