"""Chapter 7's grading harness: the reader's code between a store and a broker outside it.

The broker is never the store's own database here, so no transaction holds an effect and
an ACK together (the ``transactional`` mode is impossible): what the reader's code does to
the store commits in one system, what it does to the broker in another. By default the
broker is the queue table of a *second SQLite file*, on a fake clock, and needs no server;
``grade(…, broker=URL)`` runs the same exercise on a real engine instead:

* ``amqp://user:password@host:5672/%2F?queue=NAME`` (RabbitMQ),
* ``nats://host:4222?stream=NAME`` (JetStream),
* ``postgresql://host/db`` (a queue table in a fresh schema of that database).

Each seed opens its own queue, stream or schema under that name and removes it at the end.
On RabbitMQ and JetStream time is the wall clock and a lease is one second, so a run waits
for real.

What the reader's code meets, from the seed:

* :class:`Wire`, the broker as the code sees it: the contract's verbs behind a network that
  loses requests (the broker never hears them) and answers (the broker acted; the caller
  hears nothing). Both halves raise the same :class:`BrokerUnavailable`.
* :class:`Store`, the store's connection with faults at its statements: the worker dies just
  before or just after its ``COMMIT``, the database is locked at a statement (a store failure
  that is not a duplicate), and another consumer runs between any two statements made outside
  a transaction.
"""

from __future__ import annotations

import secrets
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..brokers.base import Broker, Delivery
from ..engine import store as sqlite_store
from ..engine.check import projection_vs_truth
from ..engine.clock import Clock, FakeClock, SystemClock
from ..engine.errors import BrokerUnavailable, InvalidInput, check_text
from ..engine.faults import Faults
from ..engine.ids import Ids

LEASE_FAKE = 2.0   # seconds of lease on the fake clock
LEASE_REAL = 1.0   # on RabbitMQ and JetStream, where the wait is real
MAX_DELIVERIES = 400  # a run's budget of deliveries: past it, the run stops with a verdict
REAL_TIMEOUT = 60.0   # seconds a run on a real engine may take


class Crashed(BaseException):  # noqa: N818 - a fault, not an error
    """The process died at a fault point. A BaseException, so that the submission's own
    ``except Exception`` cannot catch its own death and carry on."""

    def __init__(self, point: str) -> None:
        self.point = point
        super().__init__(f"simulated crash at {point}")


class Locked(sqlite3.OperationalError):
    """The store's "database is locked", injected: another writer held the lock too long."""


# -- the engines ---------------------------------------------------------------------------
def check_broker_url(url: Any) -> str | None:
    """None (the second SQLite file), or a URL this harness can open, else InvalidInput
    naming ``broker``."""
    if url is None:
        return None
    check_text("broker", url, max_length=500)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("amqp", "nats", "postgresql", "postgres"):
        raise InvalidInput("broker", url, "None (a second SQLite file), or an amqp://, nats://"
                                          " or postgresql:// URL")
    query = dict(parse_qsl(urlsplit(url).query))
    if scheme == "amqp" and "queue" not in query:
        raise InvalidInput("broker", url, "an amqp:// URL naming its queue (?queue=NAME)")
    if scheme == "nats" and "stream" not in query:
        raise InvalidInput("broker", url, "a nats:// URL naming its stream (?stream=NAME)")
    return url


def _with(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in params]
    return urlunsplit(parts._replace(query=urlencode([*query, *params.items()])))


@dataclass
class Setup:
    """A store (a SQLite file) and a broker outside it, open for one seed."""

    store: sqlite3.Connection
    broker: Broker
    clock: Clock
    realtime: bool
    engine: str
    lease: float
    _closers: ExitStack = field(default_factory=ExitStack, repr=False)


@contextmanager
def open_setup(url: str | None, *, seed: int, max_receives: int) -> Iterator[Setup]:
    """The store and the broker ``url`` names (None: a second SQLite file), removed after."""
    closers = ExitStack()
    tmp = Path(tempfile.mkdtemp(prefix="deliverylab-grade-"))
    closers.callback(shutil.rmtree, tmp, ignore_errors=True)
    try:
        store = sqlite_store.init_db(tmp / "store.db")
        closers.callback(store.close)
        ids = Ids(seed)
        url = url or ""
        scheme = urlsplit(url).scheme.lower() if url else "sqlite"
        broker: Broker
        if scheme == "sqlite":
            from ..brokers.sqlite import SQLiteBroker

            clock: Clock = FakeClock()
            bconn = sqlite_store.init_db(tmp / "broker.db")
            closers.callback(bconn.close)
            broker = SQLiteBroker(bconn, clock=clock, ids=ids, max_receives=max_receives,
                                  trace=False)
            engine, lease = "a second SQLite file", LEASE_FAKE
        elif scheme in ("postgresql", "postgres"):
            from ..brokers.postgres import PostgresBroker
            from ..engine import store_postgres

            clock = FakeClock()
            where = store_postgres.url_for(url, f"dl_grade_{secrets.token_hex(4)}")
            pconn = store_postgres.init_db(where, field="broker")
            closers.callback(store_postgres.drop_schema, where)
            closers.callback(pconn.close)
            broker = PostgresBroker(pconn, clock=clock, ids=ids, max_receives=max_receives)
            engine, lease = "PostgreSQL (a queue table in a schema of its own)", LEASE_FAKE
        else:
            from ..brokers.registry import open_broker

            clock = SystemClock()
            if scheme == "nats":
                url = _with(url, ack_wait=f"{LEASE_REAL:g}")
            broker = open_broker(url, clock=clock, ids=ids, max_receives=max_receives)
            closers.callback(_remove, broker)
            engine = "RabbitMQ" if scheme == "amqp" else "JetStream"
            lease = LEASE_REAL
        setup = Setup(store, broker, clock, isinstance(clock, SystemClock), engine, lease,
                      closers)
        # The lab's clock in SQL, for rows a submission stamps (an inbox's processed_at).
        store.create_function("clock_now", 0, clock.now, deterministic=False)
    except BaseException:
        closers.close()
        raise
    try:
        yield setup
    finally:
        closers.close()


def _remove(broker: Broker) -> None:
    try:
        broker.destroy()
    finally:
        broker.close()


# -- what the submission touches -----------------------------------------------------------
class Wire:
    """The broker as the reader's code sees it: ``send``, ``ack``, ``nack``, ``extend``,
    ``dead_letter``, each of which may lose its request (nothing happened) or its answer (it
    happened): both raise :class:`BrokerUnavailable`, with the same words. ``rates`` gives
    each verb's chance of losing its request and its answer."""

    def __init__(self, broker: Broker, faults: Faults, *, request_lost: dict[str, float],
                 answer_lost: dict[str, float], crash_after: dict[str, float] | None = None,
                 worker: str = "worker-1") -> None:
        self._broker, self._faults, self._worker = broker, faults, worker
        self._request, self._answer = request_lost, answer_lost
        self._crash = crash_after or {}
        self._tries: dict[tuple[str, str], int] = {}
        # (event id, dedup id) of each send, and the correlation id each send gave its event
        self.sends: list[tuple[str, str | None]] = []
        self.correlations: dict[str, set[str | None]] = {}
        self.settled: list[tuple[str, str, str]] = []   # (verb, event id, message id)
        self.history = History()  # what each verb met, per event, for the verdict's trace
        self.clock = getattr(broker, "clock", None)

    def _roll(self, what: str, rates: dict[str, float], verb: str, key: str, n: int) -> bool:
        rate = rates.get(verb, 0.0)
        return rate > 0 and self._faults.uniform(what, verb, key, n) < rate

    def _call(self, verb: str, key: str, act: Callable[[], Any], event_id: str = "") -> Any:
        n = self._tries[(verb, key)] = self._tries.get((verb, key), 0) + 1
        say = self.history.say
        if self._roll("request_lost", self._request, verb, key, n):
            say(event_id, self._worker, f"{verb}: request lost (the broker never heard it)")
            raise BrokerUnavailable(verb, "no answer before the timeout")
        out = act()
        if self._roll("answer_lost", self._answer, verb, key, n):
            say(event_id, self._worker, f"{verb}: done, answer lost (the caller cannot tell)")
            raise BrokerUnavailable(verb, "no answer before the timeout")
        say(event_id, self._worker, f"{verb}: {out if isinstance(out, bool) else 'done'}")
        if self._roll("crash_after", self._crash, verb, key, n):
            say(event_id, self._worker, f"died right after the {verb}")
            raise Crashed(f"after_{verb}")
        return out

    @staticmethod
    def _delivery(d: Any) -> Delivery:
        if not isinstance(d, Delivery):
            raise TypeError(f"expected the delivery your function was given, got {d!r}")
        return d

    def ack(self, delivery: Delivery) -> bool:
        d = self._delivery(delivery)
        out = self._call("ack", d.receipt, lambda: self._broker.ack(d, worker=self._worker),
                         d.event_id)
        self.settled.append(("ack", d.event_id, d.message_id))
        return out

    def nack(self, delivery: Delivery, delay: float = 0.0) -> bool:
        d = self._delivery(delivery)
        return self._call("nack", d.receipt,
                          lambda: self._broker.nack(d, min(float(delay), 30.0),
                                                    worker=self._worker), d.event_id)

    def extend(self, delivery: Delivery, seconds: float) -> bool:
        d = self._delivery(delivery)
        return self._call("extend", d.receipt,
                          lambda: self._broker.extend(d, seconds, worker=self._worker),
                          d.event_id)

    def dead_letter(self, delivery: Delivery, error: str) -> bool:
        d = self._delivery(delivery)
        out = self._call("dead_letter", d.receipt,
                         lambda: self._broker.dead_letter(d, str(error), worker=self._worker),
                         d.event_id)
        self.settled.append(("dead_letter", d.event_id, d.message_id))
        return out

    def send(self, event_id: str, type: str, payload: dict[str, Any], *,
             correlation_id: str | None = None, dedup_id: str | None = None) -> str:
        def act() -> str:
            self.sends.append((event_id, dedup_id))
            self.correlations.setdefault(str(event_id), set()).add(correlation_id)
            return self._broker.send(event_id, type, payload, correlation_id=correlation_id,
                                     dedup_id=dedup_id)

        return self._call("send", str(event_id), act, str(event_id))


class History:
    """Per event, what happened to it, in order: the lines of a verdict's trace."""

    def __init__(self) -> None:
        self.clock: Any = None
        self.lines: dict[str, list[str]] = {}

    def say(self, event_id: str, who: str, text: str) -> None:
        at = self.clock.now() if self.clock is not None else 0.0
        self.lines.setdefault(event_id, []).append(f"  {at:10.3f}  {who:<9} {text}")

    def text(self, event_id: str, title: str, limit: int = 30) -> str:
        lines = self.lines.get(event_id, [])
        out = [title, *lines[:limit]]
        if len(lines) > limit:
            out.append(f"  … {len(lines) - limit} more")
        if not lines:
            out.append("  (nothing: never sent, never received)")
        return "\n".join(out)


class Store:
    """The store's connection as the reader's code sees it, with faults at its statements:

    * ``between``: run between two statements, before the second when it is made outside a
      transaction (another consumer, another relay: they could commit there);
    * ``lock``: a predicate of (sql, statement number) for which the statement fails with
      "database is locked" instead of running;
    * ``crash_before_commit`` / ``crash_after_commit``: the process dies at its next COMMIT,
      before it (rolled back) or after it (committed);
    * ``crash_at``: the process dies just before that statement (counted from 0): what it
      committed so far stays, an open transaction is rolled back;
    * ``crash_after``: a predicate of the commit's number (1, 2, …) for which the process
      dies right after that commit: a ``COMMIT``, or a write made outside a transaction,
      which commits alone. Two writes that must go together die between them."""

    def __init__(self, conn: sqlite3.Connection, *,
                 between: Callable[[], Any] | None = None,
                 lock: Callable[[str, int], bool] | None = None,
                 crash_before_commit: bool = False, crash_after_commit: bool = False,
                 crash_at: int | None = None,
                 crash_after: Callable[[int], bool] | None = None) -> None:
        self._conn, self._between, self._lock = conn, between, lock
        self.crash_at = crash_at
        self._crash_after = crash_after
        self.commits = 0
        self.crash_before_commit, self.crash_after_commit = crash_before_commit, \
            crash_after_commit
        self.statements = 0
        self.locked = 0

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        n, self.statements = self.statements, self.statements + 1
        if not isinstance(sql, str):
            raise TypeError(f"a SQL statement is a str, got {sql!r}")
        head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
        if self.crash_at is not None and n == self.crash_at and head not in ("BEGIN",):
            self.crash_at = None  # the process dies here, before this statement runs
            if self._conn.in_transaction:
                self._conn.rollback()
            raise Crashed(f"before statement {n + 1}")
        if head in ("COMMIT", "END"):
            return self._commit(lambda: self._conn.execute(sql, params))
        if self._lock is not None and self._lock(sql, n):
            self.locked += 1
            raise Locked("database is locked")
        if self._between is not None and n > 0 and not self._conn.in_transaction:
            self._between()  # between two statements: not before the first
        alone = not self._conn.in_transaction
        cur = self._conn.execute(sql, params)
        if alone and head in ("INSERT", "UPDATE", "DELETE", "REPLACE"):
            self._committed()  # a write outside a transaction commits by itself
        return cur

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        self.statements += 1
        if self._between is not None and self.statements > 1 \
                and not self._conn.in_transaction:
            self._between()
        return self._conn.executemany(sql, rows)

    def _commit(self, act: Callable[[], Any]) -> Any:
        if self.crash_before_commit and self._conn.in_transaction:
            self.crash_before_commit = False
            self._conn.rollback()
            raise Crashed("before_commit")
        out = act()
        if self.crash_after_commit:
            self.crash_after_commit = False
            raise Crashed("after_commit_before_ack")
        self._committed()
        return out

    def _committed(self) -> None:
        self.commits += 1
        if self._crash_after is not None and self._crash_after(self.commits):
            raise Crashed(f"after commit {self.commits}")

    def commit(self) -> None:
        self._commit(self._conn.commit)

    def rollback(self) -> None:
        self._conn.rollback()

    def cursor(self) -> Store:
        return self

    def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)


# -- running and judging -------------------------------------------------------------------
def wait_for_next(setup: Setup) -> bool:
    """Sleep until a message may be visible; False when nothing is queued any more."""
    nxt = setup.broker.next_visible_at()
    if nxt is None:
        return False
    clock = setup.clock
    if setup.realtime:
        clock.sleep(min(0.05, max(0.0, nxt - clock.now())) or 0.01)
    elif nxt > clock.now():
        clock.sleep_until(nxt)
    else:
        assert isinstance(clock, FakeClock)  # not realtime: the lab's fake clock
        clock.advance(0.01)
    return True


def budget_spent(setup: Setup, started: float, deliveries: int) -> str | None:
    if deliveries >= MAX_DELIVERIES:
        return (f"the run stopped after {MAX_DELIVERIES} deliveries: messages keep coming back"
                " (is every delivery acknowledged or parked in the end?)")
    if setup.realtime and setup.clock.now() - started > REAL_TIMEOUT:
        return f"the run stopped after {REAL_TIMEOUT:g} s on {setup.engine}"
    return None


def drift(store: sqlite3.Connection) -> list[str]:
    """``"espresso-cups truth 7, projection 9 (over by 2: …)"`` for each item that is off."""
    out = []
    for item, truth, proj, delta in projection_vs_truth(store):
        if delta:
            why = (f"over by {delta}: an order applied twice" if delta > 0
                   else f"{-delta} missing: an order never applied")
            out.append(f"{item} truth {truth}, projection {proj} ({why})")
    return out


def note(errors: list[str], exc: BaseException, d: Delivery | None) -> None:
    where = f" (delivery {d.delivery_count} of order {d.correlation_id})" if d else ""
    text = f"{type(exc).__name__}: {exc}{where}"
    if text not in errors and len(errors) < 3:
        errors.append(text)


__all__ = ["BrokerUnavailable", "Crashed", "Locked", "Setup", "Store", "Wire",
           "budget_spent", "check_broker_url", "drift", "note", "open_setup", "wait_for_next"]
