"""The book's PostgreSQL demonstrations, run for real on a live server: the claim race, and
the race a repair has without its ``LOCK TABLE`` at READ COMMITTED.

Each function makes its own schema on the server, runs, and drops it. When no server answers,
they raise :class:`PostgresUnavailable` saying how to start one: the book page that uses them
is rendered from its saved outputs, and re-executed (by nbval) where PostgreSQL runs.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..brokers.postgres import CLAIM, NAIVE_CLAIM, PostgresBroker
from ..engine import store_postgres
from ..engine.clock import FakeClock
from ..engine.ids import Ids

if TYPE_CHECKING:
    import pandas as pd

SERVER = os.environ.get("DELIVERYLAB_PG", "postgresql://127.0.0.1:5432/test")
CLAIMS = {"sqlite": NAIVE_CLAIM, "skip_locked": CLAIM}


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server answered where the demonstration needs one."""


def new_schema(prefix: str = "dl_book") -> str:
    """A fresh deliverylab schema on the server, as a store URL."""
    url = store_postgres.url_for(SERVER, f"{prefix}_{secrets.token_hex(4)}")
    try:
        store_postgres.init_db(url).close()
    except Exception as exc:
        raise PostgresUnavailable(f"this needs PostgreSQL at {SERVER} ({exc}); start it with"
                                  f" 'make services'") from None
    return url


def with_schema(fn: Callable[[str], Any]) -> Any:
    """``fn(url)`` on a fresh schema, dropped afterwards whatever happens."""
    url = new_schema()
    try:
        return fn(url)
    finally:
        store_postgres.drop_schema(url)


def _claim(conn: store_postgres.PgConnection, sql: str, token: str,
           n: int) -> list[tuple[Any, ...]]:
    cur = conn.cursor()
    cur.row_factory = None
    rows = cur.execute(sql, {"lease_until": 30.0, "token": token, "now": 0.0,
                             "n": n}).fetchall()
    return sorted(rows)


def wait_until_blocked(url: str, pid: int, thread: threading.Thread,
                       timeout: float = 10.0) -> bool:
    """Wait until the backend ``pid`` (driven by ``thread``) waits for a lock: True; or until
    the thread is done without waiting: False. Watched from a connection of its own, because
    ``pg_stat_activity`` is read once per transaction."""
    with store_postgres.connect(url) as watch:
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:
            row = watch.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = ?",
                                (pid,)).fetchone()
            if row is not None and row[0] == "Lock":
                return True
            time.sleep(0.005)
    return False


def race(url: str, sql: str, n: int = 1) -> tuple[list[tuple[Any, ...]],
                                                 list[tuple[Any, ...]], bool]:
    """Force the interleaving: worker A claims with ``sql`` inside an open transaction; worker
    B claims with it on another connection; A commits once B waits for A's row lock (as
    ``pg_stat_activity`` shows) or is done; each claims up to ``n`` messages. Returns A's
    rows, B's rows (by seq) and whether B waited."""
    a, b = store_postgres.connect(url), store_postgres.connect(url)
    try:
        a.raw.execute("BEGIN")  # READ COMMITTED, PostgreSQL's default
        got_a = _claim(a, sql, "rcpt-a", n)
        got_b: list[tuple[Any, ...]] = []
        t = threading.Thread(target=lambda: got_b.extend(_claim(b, sql, "rcpt-b", n)))
        t.start()
        waited = wait_until_blocked(url, b.raw.info.backend_pid, t)
        a.execute("COMMIT")
        t.join(10)
        if t.is_alive():
            raise RuntimeError("worker B's claim never finished")
        return got_a, got_b, waited
    finally:
        a.close()
        b.close()


def claim_race(claim: str, *, messages: int = 2) -> pd.DataFrame:
    """Two workers claim at once from a queue of ``messages`` with ``claim`` ("sqlite": the
    SQLite broker's statement; "skip_locked": the PostgreSQL broker's). One row per message
    handed out: who got it, its receipt and delivery count, and whether that worker first
    waited for the other's row lock."""
    import pandas as pd

    sql = CLAIMS[claim]

    def run(url: str) -> pd.DataFrame:
        with store_postgres.connect(url) as conn:
            q = PostgresBroker(conn, clock=FakeClock(), ids=Ids(1))
            for i in range(messages):
                q.send(f"evt-{i + 1}", "OrderPlaced", {"n": i + 1})
        got_a, got_b, waited = race(url, sql)
        rows = [("A", r[0], r[6], r[7], False) for r in got_a]
        rows += [("B", r[0], r[6], r[7], waited) for r in got_b]
        return pd.DataFrame(rows, columns=["worker", "message", "receipt", "delivery_count",
                                           "waited_for_lock"])

    return with_schema(run)


def _lab(url: str, seed: int) -> tuple[store_postgres.PgConnection, FakeClock, Ids,
                                        PostgresBroker]:
    conn = store_postgres.connect(url)
    clock, ids = FakeClock(), Ids(seed)
    return conn, clock, ids, PostgresBroker(conn, clock=clock, ids=ids, max_receives=50)


def poison_run(*, max_receives: int = 3) -> pd.DataFrame:
    """One order whose every delivery crashes the worker before it acks: the trace, one row
    per thing that happened. The lease (and the delivery count) committed at each claim, so
    the crashes count, and the message is dead-lettered at ``max_receives``."""
    import pandas as pd

    from ..engine.faults import Faults
    from ..engine.orders import place_order
    from ..engine.worker import Worker

    def run(url: str) -> pd.DataFrame:
        conn, clock, ids, _ = _lab(url, 3)
        try:
            broker = PostgresBroker(conn, clock=clock, ids=ids, max_receives=max_receives)
            place_order(broker, item_id="coffee-beans", qty=1, order_id="o-poison")
            worker = Worker(store=conn, clock=clock, broker=broker, name="worker-1",
                            faults=Faults(seed=1, crash_after_receive=1.0))
            worker.run_until_idle()
            rows = conn.execute("SELECT at, worker, delivery_count, outcome, detail"
                                " FROM delivery_log ORDER BY seq").fetchall()
            return pd.DataFrame([tuple(r) for r in rows],
                                columns=["at", "worker", "delivery_count", "outcome", "detail"])
        finally:
            conn.close()

    return with_schema(run)


def modes_table(*, orders: int = 60, workers: int = 3, seed: int = 7) -> pd.DataFrame:
    """Each worker mode on PostgreSQL: ``workers`` workers, each on its own connection, drain
    ``orders`` orders under lost ACKs (30%) and crashes before and after the effect's commit
    (10% each), on a FakeClock; then the checker's counts, one row per mode."""
    import pandas as pd

    from ..engine import store
    from ..engine.check import check
    from ..engine.faults import Faults
    from ..engine.orders import place_order
    from ..engine.worker import Worker

    faults = Faults(seed=seed, ack_fail=0.3, crash_after_receive=0.1, crash_after_commit=0.1)
    rows = []
    for mode in ("at-most-once", "at-least-once", "idempotent", "transactional"):
        def run(url: str, mode: str = mode) -> tuple[Any, ...]:
            conn, clock, ids, broker = _lab(url, seed)
            team = []
            try:
                with store.transaction(conn):
                    for i in range(orders):
                        place_order(broker, item_id=f"item-{i % 5}", qty=1 + i % 3,
                                    order_id=f"o-{i:03d}")
                for k in range(workers):
                    c = store_postgres.connect(url)
                    team.append(Worker(store=c, clock=clock, mode=mode, faults=faults,
                                       name=f"w{k}", max_messages=1 + 2 * (k % 2),
                                       broker=PostgresBroker(c, clock=clock, ids=ids,
                                                            max_receives=50)))
                for _ in range(100_000):
                    if sum(w.step() for w in team) == 0:
                        nxt = broker.next_visible_at()
                        if nxt is None:
                            break
                        clock.sleep_until(nxt)
                r = check(conn)
                return (mode, r.orders, r.correct, r.duplicated, r.lost,
                        r.projection_equals_truth)
            finally:
                for w in team:
                    if w.conn is not None:
                        w.conn.close()
                conn.close()

        rows.append(with_schema(run))
    return pd.DataFrame(rows, columns=["mode", "orders", "exactly once", "duplicated", "lost",
                                       "projection = truth"])


class _WithoutLock:
    """A connection that drops the repair's ``LOCK TABLE`` and passes everything else through:
    the engine's own repair, minus that one statement, to show what the statement is for."""

    def __init__(self, conn: store_postgres.PgConnection) -> None:
        self._conn = conn
        self.dropped: list[str] = []

    def execute(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        if sql.lstrip().upper().startswith("LOCK TABLE"):
            self.dropped.append(sql)
            return None
        return self._conn.execute(sql, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


REPAIR_RACE_COLUMNS = ["repair", "LOCK TABLE", "the repair waited for the worker",
                       "worker's outcome", "truth", "projection", "verdict"]


def repair_race(*, lock: bool) -> dict[str, Any]:
    """One worker's effect and one repair, interleaved on PostgreSQL at READ COMMITTED.

    Two orders; the message of ``o-001`` is lost, so the projection lags the truth and a
    repair is due. An at-least-once worker (its own connection) receives ``o-002``, opens its
    effect's transaction and reads the repair fence (``reconciled_events``): nothing there.
    Then, before the worker writes, the repair runs on another connection: the engine's
    ``reconcile.repair`` (``lock=True``), or the same repair without its
    ``LOCK TABLE reconciled_events IN ACCESS EXCLUSIVE MODE`` (``lock=False``). The worker
    goes on once the repair has committed or is waiting for a lock, applies ``o-002`` and
    commits. Returns the run's row for :func:`repair_race_table`."""
    from ..engine import reconcile
    from ..engine.check import check, projection_vs_truth
    from ..engine.orders import place_order
    from ..engine.worker import Mode, Worker, apply_order_placed

    def run(url: str) -> dict[str, Any]:
        conn, clock, ids, broker = _lab(url, 11)
        other = store_postgres.connect(url)
        waited: list[bool] = []
        waiting: list[threading.Thread] = []
        try:
            for order_id in ("o-001", "o-002"):
                place_order(broker, item_id="green-tea", qty=2, order_id=order_id)
            broker.drop(_message_of(conn, "o-001"), reason="lost before any worker saw it")
            repairer = other if lock else _WithoutLock(other)

            def handler(c: Any, delivery: Any) -> None:
                # Inside the worker's transaction, after its read of the repair fence.
                t = threading.Thread(target=reconcile.repair, args=(repairer,),
                                     kwargs={"clock": clock})
                t.start()
                waited.append(wait_until_blocked(url, other.raw.info.backend_pid, t))
                apply_order_placed(c, delivery)
                waiting.append(t)

            worker = Worker(store=conn, clock=clock, broker=broker, mode=Mode.AT_LEAST_ONCE,
                            name="worker-1", handler=handler)
            worker.step()
            for t in waiting:
                t.join(10)
                if t.is_alive():
                    raise RuntimeError("the repair never finished")
            outcome = conn.execute("SELECT outcome FROM delivery_log WHERE correlation_id ="
                                   " 'o-002' AND outcome IN ('applied', 'fenced')"
                                   " ORDER BY seq").fetchone()[0]
            (_, truth, projection, _), = projection_vs_truth(conn)
            verdict = check(conn).verdict
        finally:
            other.close()
            conn.close()
        return {"repair": "reconcile.repair" if lock else "the same, without the lock",
                "LOCK TABLE": "yes" if lock else "no",
                "the repair waited for the worker": bool(waited and waited[0]),
                "worker's outcome": outcome, "truth": truth, "projection": projection,
                "verdict": verdict}

    return with_schema(run)


def _message_of(conn: store_postgres.PgConnection, order_id: str) -> str:
    return conn.execute("SELECT message_id FROM queue_messages WHERE correlation_id = ?",
                        (order_id,)).fetchone()[0]


def repair_race_table() -> pd.DataFrame:
    """:func:`repair_race` with the engine's repair and without its lock, one row each."""
    import pandas as pd

    return pd.DataFrame([repair_race(lock=True), repair_race(lock=False)],
                        columns=REPAIR_RACE_COLUMNS)
