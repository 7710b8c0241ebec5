"""The engine on PostgreSQL, in one process on a FakeClock: the same modes, faults, checker and
repair as on SQLite, with broker and store in one PostgreSQL schema."""

from __future__ import annotations

import sqlite3

import pytest

from deliverylab.brokers.postgres import PostgresBroker
from deliverylab.engine import store as db
from deliverylab.engine import store_postgres as pgstore
from deliverylab.engine.check import check
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import StoreError
from deliverylab.engine.faults import Faults
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.reconcile import repair
from deliverylab.engine.worker import Worker

ORDERS = 60


class PgEngineRig:
    def __init__(self, url: str, seed: int = 1) -> None:
        self.url, self.clock, self.ids = url, FakeClock(), Ids(seed)
        self.store = pgstore.connect(url)
        self.broker = PostgresBroker(self.store, clock=self.clock, ids=self.ids)

    def place(self, n: int) -> None:
        with db.transaction(self.store):
            for i in range(n):
                place_order(self.broker, item_id=f"item-{i % 5}", qty=1 + i % 3,
                            order_id=f"o-{i:04d}")

    def worker(self, name: str, **kw) -> Worker:
        conn = pgstore.connect(self.url)  # each worker its own connection, as processes have
        queue = PostgresBroker(conn, clock=self.clock, ids=self.ids,
                              max_receives=kw.pop("max_receives", 50))
        return Worker(store=conn, clock=self.clock, broker=queue, name=name, **kw)

    def drain(self, *workers: Worker) -> None:
        for _ in range(100_000):
            if sum(w.step() for w in workers) == 0:
                nxt = self.broker.next_visible_at()
                if nxt is None:
                    return
                self.clock.sleep_until(nxt)
        raise AssertionError("the queue did not drain")

    def projection(self) -> dict[str, int]:
        return dict(self.store.execute("SELECT item_id, reserved_qty FROM inventory_projection"))

    def truth(self) -> dict[str, int]:
        return dict(self.store.execute("SELECT item_id, sum(qty) FROM orders GROUP BY item_id"))


FAULTS = Faults(seed=7, ack_fail=0.3, crash_after_commit=0.1, crash_after_receive=0.1)


@pytest.mark.parametrize("mode", ["idempotent", "transactional"])
@pytest.mark.parametrize("batch", [1, 7])
def test_lost_acks_and_crashes_neither_lose_nor_double_apply(pg_url, mode, batch):
    lab = PgEngineRig(pg_url)
    lab.place(ORDERS)
    workers = [lab.worker(f"w{k}", mode=mode, faults=FAULTS, max_messages=batch)
               for k in range(3)]
    lab.drain(*workers)
    result = check(lab.store)
    assert (result.orders, result.correct, result.lost, result.duplicated) == (ORDERS, ORDERS,
                                                                               0, 0)
    assert lab.projection() == lab.truth()
    stats = [w.stats for w in workers]
    assert sum(s.crashed for s in stats) > 0  # the faults did strike
    if mode == "idempotent":  # the ACK is a separate write: some were lost, and redelivered
        assert sum(s.ack_failed for s in stats) > 0
        assert sum(s.duplicates_skipped for s in stats) > 0


def test_at_least_once_double_applies_a_lost_ack_on_postgres_too(pg_url):
    lab = PgEngineRig(pg_url)
    lab.place(ORDERS)
    lab.drain(lab.worker("w0", mode="at-least-once", faults=Faults(seed=7, ack_fail=0.3)))
    result = check(lab.store)
    assert result.duplicated > 0 and result.lost == 0
    assert lab.projection() != lab.truth()


def test_at_most_once_loses_a_crash_after_the_ack_on_postgres_too(pg_url):
    lab = PgEngineRig(pg_url)
    lab.place(ORDERS)
    lab.drain(lab.worker("w0", mode="at-most-once",
                         faults=Faults(seed=7, crash_after_receive=0.2)))
    result = check(lab.store)
    assert result.lost > 0 and result.duplicated == 0


def test_the_delivery_count_survives_a_crash_and_a_poison_message_is_dead_lettered(pg_url):
    """The lease commits at claim time: every crash keeps its count, so a message that always
    crashes its worker reaches max_receives instead of looping."""
    lab = PgEngineRig(pg_url)
    lab.place(1)
    w = lab.worker("w0", mode="idempotent", max_receives=3,
                   faults=Faults(seed=1, crash_after_receive=1.0))
    lab.drain(w)
    assert w.stats.crashed == 3 and w.stats.dead_lettered == 1
    (count,) = lab.store.execute("SELECT delivery_count FROM dead_letters").fetchone()
    assert count == 3


def test_repair_then_late_deliveries_are_fenced(pg_url):
    lab = PgEngineRig(pg_url)
    lab.place(ORDERS)
    w = lab.worker("w0", mode="at-least-once", max_messages=5)
    w.step()
    result = repair(lab.store, clock=lab.clock)
    assert result.orders == ORDERS and result.events_fenced == ORDERS
    lab.drain(w)
    assert lab.projection() == lab.truth()
    assert w.stats.fenced == ORDERS - 5
    assert check(lab.store).ok


def test_the_sqlite_broker_refuses_a_postgres_connection_and_back(pg_url, tmp_path):
    """SQLite's claim would double-deliver on PostgreSQL: the SQLite broker (and a worker
    left to build it) refuses a PostgreSQL connection, naming why; and the other way round."""
    from deliverylab.brokers.sqlite import Queue
    from deliverylab.engine.errors import InvalidInput

    with pgstore.connect(pg_url) as conn:
        with pytest.raises(InvalidInput, match="a sqlite connection for SQLiteBroker"):
            Queue(conn, clock=FakeClock(), ids=Ids(1))
        with pytest.raises(InvalidInput, match="the engine opens none"):
            Worker(store=conn, clock=FakeClock())
        assert type(Worker(store=conn, clock=FakeClock(), broker=PostgresBroker(
            conn, clock=FakeClock(), ids=Ids(1))).broker) is PostgresBroker
    sqlite_conn = db.init_db(tmp_path / "lab.db")
    with pytest.raises(InvalidInput, match="a postgresql connection for PostgresBroker"):
        PostgresBroker(sqlite_conn, clock=FakeClock(), ids=Ids(1))
    sqlite_conn.close()


def test_a_database_error_is_raised_not_retried_as_the_handlers_failure(pg_url):
    """A handler failure is nacked for a retry; an error of the database itself is not the
    message's fault and must surface (as on SQLite, where it is a sqlite3.Error)."""
    lab = PgEngineRig(pg_url)
    lab.place(1)

    def broken(conn, delivery):
        conn.execute("SELECT no_such_column FROM orders")

    w = lab.worker("w0", mode="at-least-once", handler=broken)
    with pytest.raises(pgstore.PgError, match="no_such_column") as raised:
        w.step()
    assert w.stats.nacked == 0
    # The engine's store error, not one of sqlite3's: callers catch STORE_ERRORS.
    assert isinstance(raised.value, StoreError)
    assert not isinstance(raised.value, sqlite3.Error)


def test_a_repair_waits_for_an_effect_that_read_the_fence_before_it(pg_url):
    """The interleaving SQLite's write lock rules out, forced on PostgreSQL: a worker's effect
    transaction reads the fence (its inbox insert), then a repair starts, then the effect
    writes the projection and commits. The repair must wait for that commit (it locks the
    fence table): otherwise it rebuilds first and the effect lands on top, counted twice."""
    import threading

    from deliverylab.book.pgdemo import wait_until_blocked
    from deliverylab.engine.worker import _INBOX_ONE, _RESERVE

    lab = PgEngineRig(pg_url)
    lab.place(1)
    (event_id,) = lab.store.execute("SELECT event_id FROM orders").fetchone()
    effect = pgstore.connect(pg_url)
    repairer = pgstore.connect(pg_url)
    try:
        with db.transaction(effect):
            assert effect.execute(_INBOX_ONE, ("inventory", event_id, 0.0)).rowcount == 1
            t = threading.Thread(target=repair, args=(repairer,), kwargs={"clock": lab.clock})
            t.start()
            assert wait_until_blocked(pg_url, repairer.raw.info.backend_pid, t)
            effect.execute(_RESERVE, ("item-0", 1))
        t.join(10)
        assert not t.is_alive()
    finally:
        effect.close()
        repairer.close()
    assert lab.projection() == lab.truth() == {"item-0": 1}
