"""Inbox retention: how long an inbox row must live, and pruning that refuses to cut it short.

Every event a consumer processes leaves a row in ``inbox_processed``. Kept forever, the inbox
grows with every order ever placed: a disk leak. Pruned too early, it forgets an event that
can still come back, and the consumer applies it again. A row is safe to delete once its event
can no longer be delivered, which is a property of the queue, not of the consumer:

* **redelivery**: up to ``max_receives`` deliveries, each holding a lease of
  ``visibility_timeout`` and maybe waiting ``max_wait`` for a free worker, with a backoff of at
  most ``backoff_cap`` between them;
* **redrive**: a dead letter kept for up to ``redrive_window``, then redriven with a fresh
  receive count (a second round of redeliveries);
* **replay**: events re-sent from a retained log up to ``replay_window`` old (an offset reset
  in Kafka, a replay from an archive), again with their redeliveries.

:func:`dedup_horizon` adds these up (an upper bound: the windows are counted one after the
other), and :func:`prune_inbox` refuses an ``older_than`` shorter than that horizon unless
told ``force=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .clock import Clock
from .errors import InvalidInput, check_number, check_text
from .store import Store, transaction
from .worker import Worker

DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class Horizon:
    """How long after its first application an event can still arrive, in seconds."""

    visibility_timeout: float
    max_receives: int
    backoff_cap: float
    max_wait: float
    redrive_window: float
    replay_window: float

    @property
    def redelivery(self) -> float:
        """One round of redeliveries: every lease runs out, every retry waits its longest."""
        return (self.max_receives * (self.visibility_timeout + self.max_wait)
                + (self.max_receives - 1) * self.backoff_cap)

    @property
    def total(self) -> float:
        """Redelivery, plus for each way back (redrive, replay) its window and one more
        round of redeliveries."""
        total = self.redelivery
        for window in (self.redrive_window, self.replay_window):
            if window > 0:
                total += window + self.redelivery
        return total

    def explain(self) -> str:
        parts = [f"{self.max_receives} receives x ({self.visibility_timeout:g} s lease"
                 f" + {self.max_wait:g} s wait) + {self.max_receives - 1} x"
                 f" {self.backoff_cap:g} s backoff = {self.redelivery:g} s"]
        if self.redrive_window > 0:
            parts.append(f"redrive window {self.redrive_window:g} s + {self.redelivery:g} s")
        if self.replay_window > 0:
            parts.append(f"replay window {self.replay_window:g} s + {self.redelivery:g} s")
        return "; ".join(parts)


def dedup_horizon(*, visibility_timeout: float, max_receives: int, backoff_cap: float,
                  max_wait: float = 0.0, redrive_window: float = 0.0,
                  replay_window: float = 0.0) -> Horizon:
    """The :class:`Horizon` of a queue configured like this. Every argument is in seconds,
    except ``max_receives`` (the redrive policy's ``maxReceiveCount``)."""
    if not isinstance(max_receives, int) or isinstance(max_receives, bool) or max_receives < 1:
        raise InvalidInput("max_receives", max_receives, "an integer >= 1")
    return Horizon(
        visibility_timeout=check_number("visibility_timeout", visibility_timeout, minimum=0),
        max_receives=max_receives,
        backoff_cap=check_number("backoff_cap", backoff_cap, minimum=0),
        max_wait=check_number("max_wait", max_wait, minimum=0),
        redrive_window=check_number("redrive_window", redrive_window, minimum=0),
        replay_window=check_number("replay_window", replay_window, minimum=0))


def horizon_of(worker: Worker, *, max_wait: float = 0.0, redrive_window: float = 0.0,
               replay_window: float = 0.0) -> Horizon:
    """The horizon of the queue ``worker`` consumes, read from the worker's own settings
    (its lease, its queue's ``max_receives``, its backoff cap). The windows are policies the
    engine cannot know: how long dead letters are kept for a redrive, how far back a replay
    may go."""
    if not isinstance(worker, Worker):
        raise InvalidInput("worker", worker, "a deliverylab.engine.worker.Worker")
    return dedup_horizon(visibility_timeout=worker.visibility_timeout,
                         max_receives=worker.broker.max_receives,
                         backoff_cap=worker.backoff_cap, max_wait=max_wait,
                         redrive_window=redrive_window, replay_window=replay_window)


def prune_inbox(conn: Store, *, older_than: float, horizon: Horizon,
                clock: Clock, consumer: str | None = None, force: bool = False) -> int:
    """Delete inbox rows processed more than ``older_than`` seconds ago (of ``consumer``, or
    of every consumer); returns how many.

    Refuses, writing nothing, an ``older_than`` shorter than ``horizon.total``: such a row's
    event may still be redelivered, redriven or replayed, and would then be applied again.
    ``force=True`` prunes anyway (for a consumer whose effect is idempotent by itself).
    """
    if not isinstance(horizon, Horizon):
        raise InvalidInput("horizon", horizon, "a Horizon (see dedup_horizon)")
    if not isinstance(force, bool):
        raise InvalidInput("force", force, "True or False")
    older_than = check_number("older_than", older_than, minimum=0)
    if consumer is not None:
        check_text("consumer", consumer)
    if older_than < horizon.total and not force:
        raise InvalidInput(
            "older_than", older_than,
            f"at least the dedup horizon of {horizon.total:g} s [{horizon.explain()}]"
            " unless force=True")
    cutoff = clock.now() - older_than
    with transaction(conn):
        if consumer is None:
            cur = conn.execute("DELETE FROM inbox_processed WHERE processed_at < ?", (cutoff,))
        else:
            cur = conn.execute("DELETE FROM inbox_processed WHERE consumer = ?"
                               " AND processed_at < ?", (consumer, cutoff))
        return cur.rowcount


def expire_dead_letters(conn: Store, *, older_than: float, clock: Clock) -> int:
    """Delete dead letters parked more than ``older_than`` seconds ago; returns how many.

    This is what makes a redrive window a promise rather than a hope: a dead letter older than
    the window can no longer be redriven, so no inbox row has to outlive it (an SQS dead-letter
    queue does the same with its message retention period)."""
    older_than = check_number("older_than", older_than, minimum=0)
    with transaction(conn):
        return conn.execute("DELETE FROM dead_letters WHERE dead_at < ?",
                            (clock.now() - older_than,)).rowcount


def inbox_rows(conn: Store) -> int:
    n: int = conn.execute("SELECT count(*) FROM inbox_processed").fetchone()[0]
    return n
