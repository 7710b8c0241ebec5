"""Stores and brokers by what a user types: one place turns a store URL and a broker URL into
an open store, an open broker, whether the two are joined, and how to close them
(:func:`open_store_and_broker`).

A store is a database: a SQLite file (or ``":memory:"``) or a ``postgresql://`` URL naming a
schema. A broker is the queue table in the store's own database (no broker URL, or the store
named again: the two are *joined*, so an effect and its ACK can commit in one transaction),
the queue table in another database (a file or a ``postgresql://`` URL), or an engine reached
by a URL whose scheme names it. :data:`ENGINES` is the one place that lists those: the CLI,
chapter 7, the benchmark and the contract tests all read it, so an engine added here runs
everywhere.

Each engine's module provides:

- ``open_url(url, *, field, clock, ids, max_receives, worker, create)``: validate the URL
  (naming the bad part) and connect;
- ``DEFAULT_URL``: where its server is on a development machine (``make services``);
- ``scratch_url(server, name, *, lease, dedup_window)``: the URL of a throwaway queue or
  stream called ``name`` on ``server`` (for tests, chapters and benchmarks, removed with the
  broker's ``destroy()``);
- ``BROKER``: the broker class, whose ``capabilities`` say what the engine can do;
- ``url_lease(url, *, field)``, when ``capabilities.fixed_lease`` is set: the lease a URL
  fixes, as a :class:`UrlLease`, without connecting;
- ``removal_of(url, *, field)``: what the URL names on its server, described, with how to
  remove it (a :class:`Removal`; reads only). The two database modules (``sqlite``,
  ``postgres``) have one too, for a file and a schema.

The modules are imported only when their engine is used, so their client libraries are needed
only by those who use them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..engine.errors import InvalidInput
from .base import Removal, UrlLease

if TYPE_CHECKING:
    from ..engine.broker import Broker, Capabilities
    from ..engine.clock import Clock
    from ..engine.ids import Ids
    from ..engine.store import Store
    from .sqlite import SQLiteBroker


@dataclass(frozen=True)
class Engine:
    """A broker engine reached by URL: the URL scheme that names it, the module that opens
    it, the environment variable that points at another server than ``DEFAULT_URL``, and
    its name in prose."""

    scheme: str
    module: str
    server_env: str
    title: str


# Every engine reached by URL, by name: one line each.
ENGINES: dict[str, Engine] = {
    "rabbitmq": Engine("amqp", "deliverylab.brokers.rabbitmq", "DELIVERYLAB_AMQP_URL",
                       "RabbitMQ"),
    "jetstream": Engine("nats", "deliverylab.brokers.jetstream", "DELIVERYLAB_NATS",
                        "NATS JetStream"),
    "redis": Engine("redis", "deliverylab.brokers.redis", "DELIVERYLAB_REDIS_URL",
                    "Redis Streams"),
}
_BY_SCHEME = {e.scheme: name for name, e in ENGINES.items()}

# The databases: a store is one of them, and so is a broker that is a queue table.
DATABASES: dict[str, str] = {"sqlite": "deliverylab.brokers.sqlite",
                             "postgresql": "deliverylab.brokers.postgres"}
MEMORY = ":memory:"


def scheme_of(text: object) -> str | None:
    """The engine scheme ``text`` starts with (``amqp``, ``nats``, …), None for anything
    else."""
    if not isinstance(text, str) or "://" not in text:
        return None
    scheme = urlsplit(text).scheme.lower()
    return scheme if scheme in _BY_SCHEME else None


def is_broker_url(text: object) -> bool:
    """Whether ``text`` is the URL of a broker that is not a database."""
    return scheme_of(text) is not None


def known_urls() -> str:
    """The URL forms ``--broker`` takes, for help texts and refusals: ``amqp://, nats://, …``."""
    return ", ".join(f"{e.scheme}://" for e in ENGINES.values())


def broker_forms() -> str:
    """Every form a broker takes, in words, for help texts: a file, ``postgresql://…``, then
    each engine of :data:`ENGINES` with its name."""
    return ", ".join(["a SQLite file", "postgresql://… (PostgreSQL)",
                      *(f"{e.scheme}://… ({e.title})" for e in ENGINES.values())])


def _is_postgresql(text: str) -> bool:
    from ..engine.store_postgres import is_url

    return is_url(text)


def kind_of(value: object, *, field: str = "store", database: bool = False) -> str:
    """What ``value`` names: ``"sqlite"`` (a file path or ``":memory:"``), ``"postgresql"``
    (a ``postgresql://`` URL) or, unless ``database``, the name of an engine of
    :data:`ENGINES`. Anything else is InvalidInput naming ``field``; nothing is opened."""
    forms = ("a SQLite file path or a postgresql:// URL" if database else
             f"a SQLite file path, or a postgresql:// or {known_urls()} URL")
    if not isinstance(value, str | Path) or not str(value).strip() or "\0" in str(value):
        raise InvalidInput(field, value, forms)
    text = str(value)
    if _is_postgresql(text):
        return "postgresql"
    scheme = scheme_of(text)
    if scheme is not None:
        if database:
            raise InvalidInput(field, text, f"{forms} (a {scheme}:// broker holds no store)")
        return _BY_SCHEME[scheme]
    if "://" in text:
        raise InvalidInput(field, text, forms)
    return "sqlite"


def same_database(store_url: str | Path, broker_url: str | Path | None) -> bool:
    """Whether ``broker_url`` names the store's own database (or is None): then the broker
    is the store's queue table, on the store's own connection. Two spellings of one file
    (``lab.db``, ``./lab.db``) are one database."""
    if broker_url is None or str(broker_url) == str(store_url):
        return True
    a, b = str(store_url), str(broker_url)
    if MEMORY in (a, b) or "://" in a or "://" in b:
        return False
    return Path(a).resolve() == Path(b).resolve()


def _module(name: str) -> ModuleType:
    if name not in ENGINES:
        raise InvalidInput("engine", name, "one of " + ", ".join(ENGINES))
    return importlib.import_module(ENGINES[name].module)


def _module_of(kind: str) -> ModuleType:
    return importlib.import_module(DATABASES[kind]) if kind in DATABASES else _module(kind)


def capabilities(name: str) -> Capabilities:
    """What engine ``name`` can do, without connecting (its broker class's capabilities; an
    open broker may refine them, e.g. JetStream's lease is its stream's AckWait)."""
    caps: Capabilities = _module(name).BROKER.capabilities
    return caps


def server_url(name: str) -> str:
    """Where engine ``name``'s server is: its environment variable, else ``DEFAULT_URL``."""
    default: str = _module(name).DEFAULT_URL
    return os.environ.get(ENGINES[name].server_env) or default


def open_broker(url: str, *, field: str = "broker", **kw: Any) -> Broker:
    """Connect to the broker ``url`` names. ``kw`` (clock, ids, max_receives, …) goes to the
    engine's ``open_url``. A URL of no known engine is ``InvalidInput`` naming ``field``."""
    scheme = scheme_of(url)
    if scheme is None:
        raise InvalidInput(field, url, f"a broker URL ({known_urls()})")
    broker: Broker = _module(_BY_SCHEME[scheme]).open_url(url, field=field, **kw)
    return broker


def table_broker(conn: Store, **kw: Any) -> SQLiteBroker:
    """The queue table in the store ``conn`` opens, with the broker written for its database:
    each names its dialect, and a claim is safe only on its own (SQLite's would hand one
    message to two workers on PostgreSQL). ``kw``: clock, ids, max_receives, trace."""
    from ..engine.store import dialect_of
    from .postgres import PostgresBroker
    from .sqlite import SQLiteBroker

    dialect = dialect_of(conn)
    brokers: tuple[type[SQLiteBroker], ...] = (SQLiteBroker, PostgresBroker)
    return next(b for b in brokers if b.dialect is dialect)(conn, **kw)


def scratch_url(name: str, *, lease: float = 1.0, dedup_window: float | None = None,
                prefix: str = "dl") -> str:
    """The URL of a fresh, uniquely named queue or stream of engine ``name`` on its server,
    with ``lease`` seconds where the engine fixes the lease per queue (JetStream's AckWait,
    Redis's idle time) and ``dedup_window`` where it has producer dedup."""
    unique = f"{prefix}-{uuid.uuid4().hex[:12]}"
    scratch: str = _module(name).scratch_url(server_url(name), unique, lease=lease,
                                             dedup_window=dedup_window)
    return scratch


def open_scratch(name: str, *, lease: float = 1.0, dedup_window: float | None = None,
                 prefix: str = "dl", **kw: Any) -> Broker:
    """A broker of engine ``name`` on a fresh queue or stream (:func:`scratch_url`),
    connected; ``kw`` as for :func:`open_broker`. Its ``destroy()`` removes it."""
    return open_broker(scratch_url(name, lease=lease, dedup_window=dedup_window,
                                   prefix=prefix), **kw)


# -- the lease a URL fixes ----------------------------------------------------------------------
def fixed_lease(url: object, *, field: str = "broker") -> UrlLease | None:
    """The lease the broker ``url`` fixes, read from the URL without connecting; None for a
    database (its queue table leases for what each receive asks) and for an engine whose
    receives set their own lease. A bad lease in the URL is InvalidInput naming ``field``."""
    scheme = scheme_of(url)
    if scheme is None:
        return None
    name = _BY_SCHEME[scheme]
    if capabilities(name).fixed_lease is None:
        return None
    lease: UrlLease = _module(name).url_lease(url, field=field)
    return lease


# -- what cleanup removes --------------------------------------------------------------------------
def removal_of(value: str, *, field: str = "store") -> Removal:
    """What ``value`` (a file, a ``postgresql://`` URL or an engine's URL) names, described,
    with how to remove it: its module's ``removal_of``. Reads only; a bad value is
    InvalidInput naming ``field``."""
    kind = kind_of(value, field=field)
    finder = getattr(_module_of(kind), "removal_of", None)
    if finder is None:
        raise InvalidInput(field, value, f"a store or broker whose data can be removed (the"
                                         f" {kind} engine does not say how)")
    found: Removal = finder(str(value), field=field)
    return found


# -- opening a store and a broker -------------------------------------------------------------------
def open_store(url: str | Path, *, field: str = "store", init: bool = False,
               read_only: bool = False, busy_timeout: float | None = None) -> Any:
    """The store ``url`` names, open and checked: a SQLite connection (a file, or
    ``":memory:"``) or a PostgreSQL one (a ``postgresql://`` URL naming a schema).

    Without ``init`` the file or schema must be there with every table of a lab; a missing
    file, a file that is not a lab's database, a bad URL or a server that does not answer is
    InvalidInput naming ``field``, and nothing is created. With ``init`` the database and its
    tables are created when missing (idempotent). ``read_only`` opens a SQLite file for
    reading only. ``busy_timeout`` (seconds) bounds the wait for another connection's lock
    (SQLite's busy timeout, PostgreSQL's ``lock_timeout``)."""
    return _open_database(url, field=field, init=init, read_only=read_only,
                          busy_timeout=busy_timeout)[0]


def _open_database(url: str | Path, *, field: str, init: bool, read_only: bool = False,
                   busy_timeout: float | None = None) -> tuple[Any, Callable[[], None] | None]:
    """(connection, how to undo what opening it created, or None when it created nothing)."""
    if kind_of(url, field=field, database=True) == "postgresql":
        return _open_postgresql(str(url), field=field, init=init, busy_timeout=busy_timeout)
    return _open_sqlite(str(url), field=field, init=init, read_only=read_only,
                        busy_timeout=busy_timeout)


def _open_postgresql(url: str, *, field: str, init: bool,
                     busy_timeout: float | None) -> tuple[Any, Callable[[], None] | None]:
    from ..engine import store_postgres

    undo = None
    if init:
        probe = store_postgres.connect(url, field=field, must_exist=False)
        try:
            from ..engine.store import TABLES

            new = len(store_postgres.missing_tables(probe)) == len(TABLES)
        finally:
            probe.close()
        conn = store_postgres.init_db(url, field=field)
        if new:
            def undo() -> None:
                store_postgres.drop_schema(url)
    else:
        conn = store_postgres.connect(url, field=field)
    if busy_timeout is not None:
        conn.set("lock_timeout", max(1, int(busy_timeout * 1000)))
    return conn, undo


class NotALabDatabase(InvalidInput):
    """A database file that is not a lab's: ``missing``, the lab's tables it lacks (some,
    with ``orders`` there: made by an older deliverylab, whose ``init-db`` adds them and keeps
    the data; empty when SQLite could not read it as a lab's at all); ``reason``, why, in
    words."""

    def __init__(self, field: str, value: str, reason: str, missing: list[str]) -> None:
        self.reason, self.missing = reason, missing
        older = bool(missing) and "orders" not in missing
        super().__init__(field, value, f"a deliverylab database ({reason}"
                         + ("; 'deliverylab init-db' adds them, keeping the data)" if older
                            else ")"))


def _open_sqlite(path: str, *, field: str, init: bool, read_only: bool,
                 busy_timeout: float | None) -> tuple[Any, Callable[[], None] | None]:
    import sqlite3

    from ..engine import store

    wait: dict[str, Any] = {} if busy_timeout is None else {"busy_timeout": busy_timeout}
    if path == MEMORY:
        if not init:
            raise InvalidInput(field, path, "a database file (an in-memory database is new and"
                                            " empty: open it with init)")
        return store.init_db(path, **wait), None
    p = Path(path)
    if p.exists() and not p.is_file():
        raise InvalidInput(field, path, "a database file path (that path is not a regular"
                                        " file)")
    undo = None
    if not p.exists():
        if not init:
            raise InvalidInput(field, path, "an existing deliverylab database file (there is"
                                            " none: create it first, e.g. with 'deliverylab"
                                            " init-db')")
        made = [d for d in [p.parent, *p.parent.parents] if not d.exists()]

        def undo() -> None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(OSError):
                    os.unlink(f"{p}{suffix}")
            for d in made:
                with contextlib.suppress(OSError):
                    d.rmdir()
    try:
        if init:
            conn = store.init_db(p, **wait)
        elif read_only:
            conn = store.connect_read_only(p, **wait)
        else:
            conn = store.connect(p, **wait)
        try:
            missing = store.missing_tables(conn)
        except BaseException:
            conn.close()
            raise
    except sqlite3.OperationalError as exc:
        if undo is not None:
            undo()
        if store.is_busy(exc):
            raise
        raise InvalidInput(field, path, f"a database file SQLite can open ({exc})") from None
    except sqlite3.DatabaseError as exc:
        if undo is not None:
            undo()
        raise NotALabDatabase(field, path, str(exc), []) from None
    except BaseException:
        if undo is not None:
            undo()
        raise
    if missing:
        conn.close()
        raise NotALabDatabase(field, path, f"missing tables {', '.join(missing)}", missing)
    return conn, undo


@dataclass
class Opened:
    """A store and a broker, open (:func:`open_store_and_broker`).

    ``store``: the store's connection. ``broker``: the broker. ``joined``: the broker's queue
    lives in the store's own database, on the store's connection, so an effect and its ACK
    can share one transaction. ``broker_store``: the broker's own database connection when
    it is a queue table in another database, else None. ``store_kind`` is ``sqlite`` or
    ``postgresql``; ``broker_kind`` is one of those or an engine of :data:`ENGINES`.
    :meth:`close` closes the broker, its database and the store, once; ``with`` closes them
    on the way out."""

    store: Any
    broker: Broker
    joined: bool
    store_kind: str
    broker_kind: str
    store_url: str
    broker_url: str | None
    broker_store: Any = None
    _closers: list[Callable[[], None]] = _field(default_factory=list, repr=False)

    def close(self) -> None:
        """Close the broker, then the broker's own database, then the store: each once, every
        one of them even when an earlier one fails (the first failure is raised after)."""
        closers, self._closers = self._closers, []
        failure: BaseException | None = None
        for close in closers:
            try:
                close()
            except BaseException as exc:  # noqa: BLE001 - the others still close
                failure = failure or exc
        if failure is not None:
            raise failure

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# (url, field) -> an open, checked database connection.
DatabaseOpener = Callable[[str, str], Any]


def open_store_and_broker(store_url: str | Path, broker_url: str | Path | None = None, *,
                          clock: Clock, ids: Ids, max_receives: int | None = None,
                          worker: str = "deliverylab", create: bool = True, init: bool = False,
                          read_only: bool = False, busy_timeout: float | None = None,
                          store_field: str = "store", broker_field: str = "broker",
                          open_database: DatabaseOpener | None = None) -> Opened:
    """Open the store ``store_url`` names and the broker ``broker_url`` names, and say
    whether they are joined.

    ``store_url``: a SQLite file (or ``":memory:"``) or a ``postgresql://`` URL. ``broker_url``:
    None or the store again (the queue table in the store's own database, on the store's
    connection: joined), another file or ``postgresql://`` URL (the queue table there, on a
    connection of its own; it writes no trace, the consumer writes it into the store), or an
    ``amqp://``, ``nats://`` or ``redis://`` URL (an engine of :data:`ENGINES`).

    ``clock``, ``ids`` and ``max_receives`` go to the broker (None: the engine's default, or
    the queue or stream as the workers made it); ``worker`` names the consumer on an engine
    that names them; ``create=False`` creates no queue or stream on an engine (a missing one
    is refused). ``init`` creates the store's database (and a broker's database) when missing;
    ``read_only`` opens the store for reading only; ``busy_timeout`` as for
    :func:`open_store`. ``open_database(url, field)``, when given, opens each database instead
    of :func:`open_store` (the CLI's, with its own checks and words).

    A bad value is InvalidInput naming ``store_field`` or ``broker_field`` and the value: both
    are classified, and a missing broker database is found, before anything is opened; when
    the broker fails after the store opened, the store is closed, and a database ``init``
    created for it is removed, so a refusal writes nothing."""
    store_kind = kind_of(store_url, field=store_field, database=True)
    store_text = str(store_url)
    joined = same_database(store_url, broker_url)
    broker_text = None if broker_url is None else str(broker_url)
    broker_kind = store_kind if joined else kind_of(broker_url, field=broker_field)
    if not joined and broker_kind == "sqlite" and not init and open_database is None:
        if broker_text == MEMORY or not Path(str(broker_url)).is_file():
            raise InvalidInput(broker_field, broker_text,
                               "an existing deliverylab database file (there is none: create"
                               " it first, e.g. with 'deliverylab init-db')")
    on_broker = {} if max_receives is None else {"max_receives": max_receives}

    def database(url: str, where: str, only_read: bool) -> tuple[Any, Callable[[], None] | None]:
        if open_database is not None:
            return open_database(url, where), None
        return _open_database(url, field=where, init=init, read_only=only_read,
                              busy_timeout=busy_timeout)

    undo: list[Callable[[], None]] = []
    closers: list[Callable[[], None]] = []

    def unwind() -> None:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                close()
        for remove in reversed(undo):
            with contextlib.suppress(Exception):
                remove()

    try:
        store, made = database(store_text, store_field, read_only)
        closers.append(store.close)
        if made is not None:
            undo.append(made)
        broker_store = None
        broker: Broker
        if joined:
            broker = table_broker(store, clock=clock, ids=ids, **on_broker)
        elif broker_kind in DATABASES:
            broker_store, made = database(str(broker_url), broker_field, False)
            closers.append(broker_store.close)
            if made is not None:
                undo.append(made)
            broker = table_broker(broker_store, clock=clock, ids=ids, trace=False, **on_broker)
        else:
            broker = open_broker(str(broker_url), field=broker_field, clock=clock, ids=ids,
                                 max_receives=max_receives, worker=worker, create=create)
        closers.append(broker.close)
    except BaseException:
        unwind()
        raise
    return Opened(store=store, broker=broker, joined=broker.joins(store), store_kind=store_kind,
                  broker_kind=broker_kind, store_url=store_text,
                  broker_url=None if joined else broker_text, broker_store=broker_store,
                  _closers=list(reversed(closers)))
