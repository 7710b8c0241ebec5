"""Chapter 8, "Partial batch failure and prefetch": one poison message among a hundred.

Two ways to consume a batch:

* **all or nothing**: apply the whole batch in one transaction, ACK it all or nack it all.
  One message that can never succeed fails the transaction every time, so the ninety-nine
  good ones are redelivered with it until all hundred reach the dead letters;
* **per message** (what the engine's worker does): apply under one savepoint per message, ACK
  the ones that took effect, nack only the one that failed. That is the design of Lambda's
  partial batch response for SQS (``ReportBatchItemFailures``: the function returns the
  ``batchItemFailures`` ids, and only those messages become visible again).

Then a message that does not fail but *kills* the process (a crash in a native library, the
kernel's OOM killer). The worker holds every message of its batch, its *prefetch*, leased and
unsettled when it dies, so each death counts a receive against all of them: after
``max_receives`` deaths the whole prefetch is dead-lettered with the poison.
:func:`crash_run` does that with real worker processes and real SIGKILLs (``python -m
deliverylab.book.batches`` is the worker).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..brokers.base import Broker, Delivery
from ..engine.check import check
from ..engine.clock import Clock
from ..engine.errors import check_int, check_number
from ..engine.store import Store, transaction
from ..engine.trace import Outcome, log_delivery
from ..engine.worker import CONSUMER, Worker, apply_order_placed
from .lab import Lab

if TYPE_CHECKING:
    import pandas as pd

_INBOX = ("INSERT INTO inbox_processed (consumer, event_id, processed_at) VALUES (?, ?, ?)"
          " ON CONFLICT (consumer, event_id) DO NOTHING")
POISON_ORDER = "o-poison"


def place_batch(lab: Lab, n: int = 100, *, poison_at: int = 37) -> None:
    """``n`` orders, the one at position ``poison_at`` (0-based) a poison message: an
    ``OrderPlaced`` whose ``qty`` is not a number, which no handler can apply."""
    check_int("n", n, minimum=1, maximum=10_000)
    check_int("poison_at", poison_at, minimum=0, maximum=n - 1)
    for i in range(n):
        if i == poison_at:
            lab.broker.send(f"evt-{POISON_ORDER}", "OrderPlaced",
                           {"orderId": POISON_ORDER, "itemId": "coffee-beans", "qty": "three"},
                           correlation_id=POISON_ORDER)
        else:
            lab.place_order("coffee-beans", 1, order_id=f"o-{i:03d}")


def all_or_nothing_step(store: Store, broker: Broker, clock: Clock, *,
                        batch: int = 100, lease: float = 2.0) -> int:
    """One step of the all-or-nothing consumer: receive up to ``batch``, apply them all in one
    transaction (inbox row and reservation each), then ACK all, or nack all if any failed."""
    got = broker.receive(lease, batch, worker="all-or-nothing")
    if not got:
        return 0
    try:
        with transaction(store):
            for d in got:
                if store.execute(_INBOX, (CONSUMER, d.event_id, clock.now())).rowcount:
                    apply_order_placed(store, d)
                    log_delivery(store, d, at=clock.now(), worker="all-or-nothing",
                                 outcome=Outcome.APPLIED, detail="all-or-nothing")
    except ValueError as exc:  # the handler's refusal (PoisonMessage): the whole batch fails
        for d in got:
            if d.delivery_count >= broker.max_receives:
                broker.dead_letter(d, f"batch failed: {exc}", worker="all-or-nothing")
            else:
                broker.nack(d, 0.1, error=f"batch failed: {exc}", worker="all-or-nothing")
        return len(got)
    broker.ack_many(got, worker="all-or-nothing")
    return len(got)


@dataclass(frozen=True)
class BatchRun:
    consumer: str
    orders: int
    applied: int
    dead_lettered: int
    good_orders_dead_lettered: int
    deliveries: int

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _summary(lab: Lab, consumer: str, deliveries: int) -> BatchRun:
    result = check(lab.store)
    dead = {r[0] for r in lab.store.execute("SELECT correlation_id FROM dead_letters")}
    return BatchRun(consumer, result.orders + 1, result.correct, len(dead),
                    len(dead - {POISON_ORDER}), deliveries)


def poison_batch(consumer: str, *, n: int = 100, poison_at: int = 37, seed: int = 0,
                 max_receives: int = 3) -> BatchRun:
    """``n`` messages with one poison among them, consumed in batches of ``n`` by
    ``consumer``: ``"all or nothing"`` or ``"per message"`` (the engine's worker)."""
    lab = Lab(seed=seed, max_receives=max_receives)
    place_batch(lab, n, poison_at=poison_at)
    if consumer == "all or nothing":
        deliveries = 0
        while (due := lab.broker.next_visible_at()) is not None:
            got = all_or_nothing_step(lab.store, lab.broker, lab.clock, batch=n)
            deliveries += got
            if not got:  # nothing received: the queue is as it was, due as it said
                lab.clock.sleep_until(due)
    elif consumer == "per message":
        worker = Worker(store=lab.store, clock=lab.clock, broker=lab.broker,
                        max_messages=n)
        deliveries = worker.run_until_idle().received
    else:
        from ..engine.errors import InvalidInput

        raise InvalidInput("consumer", consumer, "'all or nothing' or 'per message'")
    return _summary(lab, consumer, deliveries)


def batch_table(*, n: int = 100, seed: int = 0) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame([poison_batch(c, n=n, seed=seed).as_dict()
                         for c in ("all or nothing", "per message")]).set_index("consumer")


# -- a poison that kills the process ---------------------------------------------------------
def _killing_handler(conn: Store, delivery: Delivery) -> None:
    """Reserve the order; on the poison, die as the OOM killer would have it: SIGKILL."""
    if delivery.correlation_id == POISON_ORDER:
        os.kill(os.getpid(), signal.SIGKILL)
    apply_order_placed(conn, delivery)


def worker_main(db: str, batch: int, lease: float) -> None:
    """A worker process on the SQLite file ``db``: batches of ``batch`` leased for ``lease``
    real seconds, the killing handler, until the queue is empty."""
    from ..brokers.sqlite import SQLiteBroker
    from ..engine.clock import SystemClock
    from ..engine.ids import Ids
    from ..engine.store import connect

    conn = connect(db)
    clock = SystemClock()
    broker = SQLiteBroker(conn, clock=clock, ids=Ids(), max_receives=3)
    Worker(store=conn, broker=broker, clock=clock, max_messages=batch,
           visibility_timeout=lease, handler=_killing_handler,
           name=f"worker-pid{os.getpid()}").run_until_idle()


@dataclass(frozen=True)
class CrashRun:
    prefetch: int
    sigkills: int
    applied: int
    dead_lettered: int
    good_orders_dead_lettered: int

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def crash_run(prefetch: int, directory: Path, *, n: int = 100, poison_at: int = 0,
              lease: float = 0.5, max_processes: int = 10) -> CrashRun:
    """``n`` orders (the poison first) in a SQLite file in ``directory``, consumed by worker
    processes taking ``prefetch`` messages at a time; each one the poison SIGKILLs is started
    again, as a service manager would, until one drains the queue."""
    check_int("prefetch", prefetch, minimum=1, maximum=1000)
    check_number("lease", lease, minimum=0.05, maximum=30)
    db = Path(directory) / f"prefetch-{prefetch}.db"
    lab = Lab(db, seed=1, max_receives=3)
    place_batch(lab, n, poison_at=poison_at)
    lab.close()
    kills = 0
    for _ in range(max_processes):
        proc = subprocess.run([sys.executable, "-m", "deliverylab.book.batches", str(db),
                               str(prefetch), str(lease)], timeout=120, check=False,
                              capture_output=True)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"worker exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
        break
    else:
        raise RuntimeError(f"the queue did not drain in {max_processes} worker processes")
    lab = Lab(db)
    try:
        s = _summary(lab, "", 0)
        return CrashRun(prefetch, kills, s.applied, s.dead_lettered, s.good_orders_dead_lettered)
    finally:
        lab.close()


def crash_table(directory: Path, *, prefetches: tuple[int, ...] = (1, 10, 100)) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame([crash_run(p, directory).as_dict() for p in prefetches]
                        ).set_index("prefetch")


if __name__ == "__main__":  # the worker process of crash_run
    worker_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
