"""The relay: publish the store's outbox rows to a broker outside the store, then mark them.

With the broker outside the store, an order and its event cannot commit together in the
broker, so :func:`~deliverylab.engine.orders.place_order` writes the event to the store's
``outbox`` table in the order's transaction, and this relay (Chris Richardson's "polling
publisher") carries it over. One :meth:`Relay.step`:

1. takes the oldest unsent rows and counts an attempt on each (one statement, committed);
2. publishes each with ``broker.send(…, dedup_id=event_id)``;
3. marks them sent (one transaction).

A step that ends early (an injected crash, a broker that cannot be reached) gives the attempt
back to the rows it never reached, so the logged ``attempt=N`` counts real publishes.

A relay that dies between 2 and 3 has published rows it never marked, and publishes them
again when it restarts: the outbox is at-least-once, like any producer that retries. Two
defences keep the effect once. A broker with producer dedup (``Broker.dedup_window``, e.g.
JetStream's ``Nats-Msg-Id``) drops the second publish, if it comes within its window, since
it carries the same ``dedup_id``. The consumer's inbox (the idempotent worker) skips a
delivered duplicate on every broker, whenever it comes.

The fault point ``crash_after_publish`` fires right after a row's publish, before the mark,
decided like the worker's (:mod:`deliverylab.engine.faults`: a keyed hash of the seed, the
point, the event id and the attempt number), so a seed replays the same schedule. In process
it ends the step there, as if the relay had died and been restarted; with ``crash_exits``
it ends the process (exit 70), for tests of real processes.

A broker that cannot be reached for a while (a leader election, a server restarting) makes
``send`` raise ``BrokerUnavailable``: the step ends there with nothing marked, and
:meth:`Relay.run_forever` backs off (exponential, full jitter, capped; counted in
``broker_waits``) and steps again, so the rows taken are published again with the same
``dedup_id``. The relay process does not exit for it.

One relay per store: a second one reads the same unsent rows and publishes them again (the
defences above absorb that too, at the cost of the work).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .broker import Broker
from .clock import Clock
from .errors import (
    BrokerUnavailable,
    InvalidInput,
    SimulatedCrash,
    StoreUnavailable,
    check_id,
    check_int,
    check_number,
)
from .faults import Faults
from .store import Store, is_store, require_outbox, transaction

CRASH_AFTER_PUBLISH = "crash_after_publish"  # the relay's fault point
CRASH_EXIT_STATUS = 70  # as the worker's --crash-exits: EX_SOFTWARE
MAX_BATCH = 1000

# Take the oldest unsent rows and count this attempt on each, in one statement, before any
# is published: a crash leaves the count behind, so ``attempts`` above 1 on a row says it may
# have been published more than once. RETURNING's order is not guaranteed: sorted by the
# caller.
_TAKE = """
    UPDATE outbox SET attempts = attempts + 1
     WHERE outbox_seq IN (SELECT outbox_seq FROM outbox WHERE sent_at IS NULL
                           ORDER BY outbox_seq LIMIT ?)
    RETURNING outbox_seq, event_id, type, payload, correlation_id, attempts
"""
_MARK = ("UPDATE outbox SET sent_at = ? WHERE sent_at IS NULL AND outbox_seq IN"
         " (SELECT CAST(value AS INTEGER) FROM json_each(?))")


@dataclass
class RelayStats:
    """What a relay did: ``published`` sends (a republish counts again), ``marked`` rows,
    ``crashed`` injected crashes, ``steps`` that found rows, ``broker_waits`` steps cut short
    because the broker could not be reached."""

    steps: int = 0
    published: int = 0
    marked: int = 0
    crashed: int = 0
    broker_waits: int = 0
    store_waits: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def unsent(conn: Store) -> int:
    """How many outbox rows wait for the relay."""
    n: int = conn.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL").fetchone()[0]
    return n


class Relay:
    """Publishes the outbox of ``store`` to ``broker``, a broker outside the store.

    ``crash_after_publish`` is the rate in [0, 1] of the fault point of that name, decided
    from ``seed``; ``crash_exits`` makes a fired crash end the process (exit 70) instead of
    the step. ``echo`` receives one line per publish, crash and mark (the CLI prints them).
    """

    def __init__(self, store: Store, broker: Broker, *, clock: Clock,
                 crash_after_publish: float = 0.0, seed: int = 0, crash_exits: bool = False,
                 name: str = "relay", echo: Callable[[str], None] | None = None,
                 backoff_base: float = 0.05, backoff_cap: float = 2.0) -> None:
        if not is_store(store):
            raise InvalidInput("store", store, "a store connection (deliverylab.engine.store,"
                                               " or engine.store_postgres)")
        if not isinstance(broker, Broker):
            raise InvalidInput("broker", broker, "a deliverylab.engine.broker.Broker")
        if broker.joins(store):
            raise InvalidInput("broker", type(broker).__name__,
                               "a broker outside the store: with the queue table in the"
                               " store's own database, place_order sends in the order's"
                               " transaction and there is nothing to relay")
        self.rate = check_number(CRASH_AFTER_PUBLISH, crash_after_publish, minimum=0.0,
                                 maximum=1.0)
        self.faults = Faults(seed=seed)  # checks the seed; decides with its keyed hash
        if not isinstance(crash_exits, bool):
            raise InvalidInput("crash_exits", crash_exits, "True or False")
        self.name = check_id("name", name)
        self.backoff_base = check_number("backoff_base", backoff_base, minimum=0)
        self.backoff_cap = check_number("backoff_cap", backoff_cap, minimum=self.backoff_base)
        require_outbox(store)
        self.conn, self.broker, self.clock = store, broker, clock
        self.crash_exits, self.echo = crash_exits, echo
        self.stats = RelayStats()
        self._stopping = False
        self._broker_streak = 0  # broker waits in a row: the exponent of the next backoff
        self._store_streak = 0  # store waits in a row: the same, for a database

    def _say(self, words: str) -> None:
        if self.echo is not None:
            self.echo(f"[{self.name}] t={self.clock.now():.3f} {words}")

    def _crashes(self, event_id: str, attempt: int) -> bool:
        return self.rate > 0 and \
            self.faults.uniform(CRASH_AFTER_PUBLISH, event_id, attempt) < self.rate

    def step(self, batch: int = 100) -> int:
        """Publish up to ``batch`` of the oldest unsent rows, then mark them sent. Returns how
        many rows it took (0: nothing to send). An injected crash ends the step after that
        row's publish, with nothing marked: those rows are published again by a later step.
        ``BrokerUnavailable`` from a publish propagates, with nothing marked, the same way."""
        check_int("batch", batch, minimum=1, maximum=MAX_BATCH)
        with transaction(self.conn):
            rows = sorted(self.conn.execute(_TAKE, (batch,)).fetchall(), key=lambda r: r[0])
        if not rows:
            return 0
        self.stats.steps += 1
        tried = 0  # rows handed to the broker so far (published, or tried and failed)
        try:
            for _seq, event_id, type_, payload, correlation_id, attempt in rows:
                tried += 1
                message_id = self.broker.send(event_id, type_, json.loads(payload),
                                              correlation_id=correlation_id,
                                              dedup_id=event_id)
                self.stats.published += 1
                self._say(f"event={event_id} order={correlation_id} attempt={attempt}"
                          f" published as {message_id}")
                if self._crashes(event_id, attempt):
                    raise SimulatedCrash("after_publish")
        except SimulatedCrash as crash:
            self.stats.crashed += 1
            self._untake(rows[tried:])
            self._say(f"crashed ({crash.point}) before marking {tried} published row(s) sent"
                      f" → they are published again")
            if self.crash_exits:
                os._exit(CRASH_EXIT_STATUS)
            return len(rows)
        except BaseException:
            self._untake(rows[tried:])
            raise
        with transaction(self.conn):
            marked = self.conn.execute(
                _MARK, (self.clock.now(), json.dumps([r[0] for r in rows]))).rowcount
        self.stats.marked += marked
        self._say(f"marked {marked} row(s) sent")
        return len(rows)

    def _untake(self, rows: list[sqlite3.Row]) -> None:
        """Give back the attempt counted on rows taken but never handed to the broker (the
        step ended before them), so that a row's first real publish says ``attempt=1``. A
        relay killed for real mid-step leaves the count on them: it could not say which of
        its rows went out."""
        if rows:
            with transaction(self.conn):
                self.conn.execute(
                    "UPDATE outbox SET attempts = attempts - 1 WHERE sent_at IS NULL AND"
                    " attempts > 0 AND outbox_seq IN (SELECT CAST(value AS INTEGER) FROM"
                    " json_each(?))", (json.dumps([r[0] for r in rows]),))

    def run_until_idle(self, batch: int = 100, max_steps: int = 1_000_000) -> RelayStats:
        """Step until the outbox has no unsent row (or ``max_steps`` steps)."""
        check_int("max_steps", max_steps, minimum=1)
        for _ in range(max_steps):
            if self.step(batch) == 0:
                break
        return self.stats

    def run_forever(self, batch: int = 100, *, poll_interval: float = 0.2) -> RelayStats:
        """Step until :meth:`stop` (the CLI calls it on SIGTERM and Ctrl-C), sleeping
        ``poll_interval`` on the clock whenever the outbox is empty. A step is never cut in
        half: stopping waits for the current one to finish."""
        check_int("batch", batch, minimum=1, maximum=MAX_BATCH)
        check_number("poll_interval", poll_interval, minimum=0.001)
        while not self._stopping:
            try:
                took = self.step(batch)
            except BrokerUnavailable as exc:
                self.wait_for_broker(exc)
                continue
            except StoreUnavailable as exc:
                self.wait_for_store(exc)
                continue
            self._broker_streak = self._store_streak = 0
            if took == 0:
                self.clock.sleep(poll_interval)
        return self.stats

    def wait_for_broker(self, exc: BrokerUnavailable) -> None:
        """A step ended on ``exc``: count it, say it, and sleep (exponential in the waits in a
        row, full jitter, capped at ``backoff_cap``, drawn from the seed and this relay's
        name, so a run replays), in slices so a stop ends the wait early."""
        self.stats.broker_waits += 1
        self._broker_streak += 1
        delay = self.faults.backoff(min(self._broker_streak - 1, 62), base=self.backoff_base,
                                    cap=self.backoff_cap,
                                    event_id=f"broker|{self.name}|{self.stats.broker_waits}")
        self._say(f"{exc} (nothing marked: the rows are published again) → retry in"
                  f" {delay:.3f}s (wait {self._broker_streak} in a row)")
        left = delay
        while left > 0 and not self._stopping:
            self.clock.sleep(min(0.1, left))
            left -= 0.1

    def wait_for_store(self, exc: StoreUnavailable) -> None:
        """A database's connection was lost, or cannot be opened again yet (a PostgreSQL
        server restarting or failing over, a backend terminated): as for the broker, one
        line, a backoff, and another step; the connection reopens itself. The rows taken but
        not marked are published again: the broker's dedup, then the workers' inbox, take
        the duplicate."""
        for conn in {id(c): c for c in (self.conn, getattr(self.broker, "conn", None))
                     if c is not None}.values():
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        self.stats.store_waits += 1
        self._store_streak += 1
        delay = self.faults.backoff(min(self._store_streak - 1, 62), base=self.backoff_base,
                                    cap=self.backoff_cap,
                                    event_id=f"store|{self.name}|{self.stats.store_waits}")
        self._say(f"database unavailable: {exc} (nothing marked: the rows are published"
                  f" again) → retry in {delay:.3f}s (wait {self._store_streak} in a row)")
        left = delay
        while left > 0 and not self._stopping:
            self.clock.sleep(min(0.1, left))
            left -= 0.1

    def stop(self) -> None:
        self._stopping = True

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called: the loop ends after the current pass."""
        return self._stopping
