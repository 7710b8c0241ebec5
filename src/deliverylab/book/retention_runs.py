"""Chapter 6's retention scenarios: pruning the inbox on a seeded lab, with and without a
dead-letter redrive window in its horizon, and the inbox's size over a month."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine.errors import check_int, check_number
from ..engine.faults import Faults
from ..engine.retention import DAY, horizon_of, inbox_rows, prune_inbox
from ..engine.worker import Worker
from .lab import Lab

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True, slots=True)
class LateRedrive:
    orders: int
    dead_letters: int  # parked after their ACKs kept failing: every one already applied
    pruned: int
    redriven: int
    duplicated: int
    verdict: str

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


def late_redrive(*, redrive_window: float, redrive_after: float = DAY, orders: int = 20,
                 seed: int = 0, ack_fail: float = 0.8) -> LateRedrive:
    """Orders consumed while most ACKs are lost (some messages use up their receives and are
    parked in ``dead_letters``, already applied); ``redrive_after`` seconds later the inbox is
    pruned at the horizon of a queue whose dead letters may be redriven for ``redrive_window``,
    the dead letters are redriven, and a healthy worker consumes them."""
    redrive_after = check_number("redrive_after", redrive_after, minimum=0)
    check_int("orders", orders, minimum=0, maximum=100_000)
    lab = Lab(seed=seed, faults=Faults(seed=seed, ack_fail=ack_fail))
    lab.place_orders(orders)
    lab.run_until_idle()
    parked = len(lab.dead_letters())
    horizon = horizon_of(lab.workers[0], redrive_window=redrive_window)
    lab.advance(redrive_after)
    pruned = prune_inbox(lab.store, older_than=horizon.total, horizon=horizon, clock=lab.clock)
    redriven = lab.broker.redrive()
    healthy = Worker(store=lab.store, clock=lab.clock, broker=lab.broker,
                     name="worker-healthy")
    healthy.run_until_idle()
    result = lab.check()
    lab.close()
    return LateRedrive(orders=result.orders, dead_letters=parked, pruned=pruned,
                       redriven=redriven, duplicated=result.duplicated, verdict=result.verdict)


def growth_table(*, days: int = 30, orders_per_day: int = 50, keep_days: float = 7.0,
                 seed: int = 0) -> pd.DataFrame:
    """Inbox rows at the end of each day, kept forever beside pruned every day at a
    ``keep_days`` horizon (a queue whose dead letters may be redriven for a week, say)."""
    import pandas as pd

    check_int("days", days, minimum=1, maximum=3650)
    check_int("orders_per_day", orders_per_day, minimum=1, maximum=100_000)
    keep = check_number("keep_days", keep_days, minimum=0) * DAY
    forever, pruned = Lab(seed=seed), Lab(seed=seed)
    horizon = horizon_of(pruned.workers[0], redrive_window=keep)
    rows = []
    for day in range(1, days + 1):
        for lab in (forever, pruned):
            lab.place_orders(orders_per_day)
            lab.run_until_idle()
        prune_inbox(pruned.store, older_than=horizon.total, horizon=horizon, clock=pruned.clock)
        rows.append({"day": day, "orders so far": day * orders_per_day,
                     "inbox rows, kept forever": inbox_rows(forever.store),
                     f"inbox rows, pruned at {keep_days:g} days": inbox_rows(pruned.store)})
        for lab in (forever, pruned):
            lab.clock.sleep_until(day * DAY)
    forever.close()
    pruned.close()
    return pd.DataFrame(rows)
