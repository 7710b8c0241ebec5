"""What differs between the store's two databases, SQLite and PostgreSQL: one object each.

The engine's SQL is written once, in what both databases run and mean the same by (see
``store_postgres.py`` for the spelling it translates). Everything else is asked of the
connection's dialect (``store.dialect_of(conn)``): how a store is opened, how long a statement
may wait for a lock, how durable a commit is, how a reader gets one snapshot, what the repair
locks, and which errors mean "locked" or "gone". The queue table's claim differs too: each
database has its own broker class, which names its dialect (``brokers.registry.table_broker``
picks it).

* **SQLite** (``store.SQLITE``) has one writer at a time. ``BEGIN IMMEDIATE`` takes the
  database's write lock up front, which orders every write transaction against every other;
  a deferred ``BEGIN`` read transaction sees one snapshot (WAL) until it ends.
* **PostgreSQL** (``store_postgres.POSTGRESQL``) locks rows, not the database. A write
  transaction runs at READ COMMITTED; a reader that wants one snapshot for several
  statements asks for ``REPEATABLE READ`` (:meth:`Dialect.begin_snapshot`); where SQLite's
  write lock ordered two transactions, a lock says so explicitly
  (:meth:`Dialect.lock_for_repair`, the queue's ``FOR UPDATE SKIP LOCKED`` claim).

This module is the interface: the store's connection (:class:`Store`, imported as
``deliverylab.engine.store.Store``), the :class:`Dialect`, and the registry of dialects. Each
database's module defines its own dialect, so nothing here imports a database's driver.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from .errors import STORE_ERRORS, InvalidInput, StoreUnavailable


class Cursor(Protocol):
    """What the engine reads from a statement's result, on either database: rows readable by
    index and by column name (``row_factory = None`` on the cursor: plain tuples)."""

    row_factory: Any

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Store(Protocol):
    """A store's connection, as the engine uses it: a :class:`sqlite3.Connection`
    (``store.connect``) or a PostgreSQL store's (``store_postgres.PgConnection``).

    Autocommit, with explicit transactions (``store.transaction``); the SQL is SQLite's
    spelling, which the PostgreSQL store runs as written or translates without changing its
    meaning. What differs between the two databases is not asked of the connection but of its
    dialect (``store.dialect_of``). Imported as ``deliverylab.engine.store.Store``.
    """

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor: ...

    def cursor(self) -> Cursor: ...

    def close(self) -> None: ...


# What :meth:`Dialect.identity` answers: a file's device and inode.
FileIdentity = tuple[int, int]
# Every dialect defined so far, by name (each database's module registers its own).
DIALECTS: dict[str, Dialect] = {}


def register(dialect: Dialect) -> Dialect:
    DIALECTS[dialect.name] = dialect
    return dialect


class Dialect(ABC):
    """What one database does its own way. Stateless: one instance per database,
    ``store.SQLITE`` and ``store_postgres.POSTGRESQL``."""

    name: str = ""
    title: str = ""  # the database's name in a sentence
    # The commit durabilities a store may be opened with (by SQLite's names).
    durabilities: tuple[str, ...] = ()
    # Whether many rows are inserted faster as one JSON parameter than as a VALUES row each
    # (the trace's batches; ``trace.log_many``): a driver that parses a statement again at
    # every call, past a number of parameters, pays for each row's placeholders.
    rows_as_json: bool = False

    def __repr__(self) -> str:
        return f"<dialect {self.name}>"

    # -- opening ----------------------------------------------------------------------------
    @abstractmethod
    def connect(self, where: str | Path, *, synchronous: str | None = None,
                busy_timeout: float | None = None, must_exist: bool = True,
                field: str = "db") -> Store:
        """Open the store at ``where``. ``synchronous``: the commit durability (None: the
        database's default); ``busy_timeout``: how long a statement waits for a lock (None:
        the store's default)."""
        raise NotImplementedError

    def reconnect(self, where: str | Path, **kw: Any) -> Store:
        """:meth:`connect` for a store that was open a moment ago: a server that went away
        since is :class:`StoreUnavailable` (retry later), not bad input."""
        return self.connect(where, **kw)

    @abstractmethod
    def init_db(self, where: str | Path, *, field: str = "db") -> Store:
        """Create the store's tables if they are not there yet; an open connection."""
        raise NotImplementedError

    @abstractmethod
    def missing_tables(self, conn: Store, tables: tuple[str, ...]) -> list[str]:
        """Which of ``tables`` the store lacks."""
        raise NotImplementedError

    def check_durability(self, synchronous: str) -> str:
        """``synchronous`` (an upper-case level) if this database has it, else InvalidInput."""
        if synchronous in self.durabilities:
            return synchronous
        raise InvalidInput("synchronous", synchronous.lower(),
                           f"{' or '.join(d.lower() for d in self.durabilities)} on {self.title}")

    @abstractmethod
    def durability(self, conn: Store) -> str:
        """The durability ``conn`` commits with, read back from the database."""
        raise NotImplementedError

    @abstractmethod
    def wait_at_most(self, conn: Store, seconds: float) -> None:
        """Bound how long the next statements on ``conn`` wait for a lock."""
        raise NotImplementedError

    # -- transactions -----------------------------------------------------------------------
    @abstractmethod
    def begin_snapshot(self, conn: Store) -> None:
        """Open a read transaction whose every statement sees the same committed state."""
        raise NotImplementedError

    @abstractmethod
    def lock_for_repair(self, conn: Store) -> None:
        """Inside the repair's transaction, before it reads: order it against every worker's
        effect, so an effect commits wholly before the repair or reads its fence."""
        raise NotImplementedError

    def probe_write(self, conn: Store, tables: tuple[str, ...]) -> str:
        """Whether a write to ``tables`` could start now: ``ok``, ``locked`` (a lock held
        elsewhere past ``conn``'s lock wait) or ``read-only``. Writes nothing."""
        try:
            return self._probe_write(conn, tables)
        except STORE_ERRORS as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if not self._probe_locked(exc):
                raise
            return "locked"

    @abstractmethod
    def _probe_write(self, conn: Store, tables: tuple[str, ...]) -> str:
        raise NotImplementedError

    def _probe_locked(self, exc: BaseException) -> bool:
        return self.timed_out(exc)

    # -- errors -----------------------------------------------------------------------------
    def is_locked(self, exc: BaseException) -> bool:
        """Whether ``exc`` is this database giving up on a lock after its lock wait."""
        return False

    def timed_out(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a lock or a time budget given up on: nothing was written."""
        return self.is_locked(exc)

    def is_gone(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the connection to the store is lost (the statement did not
        run; the store opens a new connection)."""
        return isinstance(exc, StoreUnavailable)

    def lost_race(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a unique key another transaction committed first, since this
        one looked (placing again reads it)."""
        return False

    def must_retry(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the database aborting this transaction to let another go on
        (a deadlock, a serialization failure): nothing was written, try it again."""
        return False

    def refuses_writes(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a write refused by a database that takes none (a standby)."""
        return False

    # -- files and sockets ------------------------------------------------------------------
    def identity(self, where: str | Path) -> FileIdentity | None:
        """What the store at ``where`` is now, to notice it replaced: a file's device and
        inode; None when there is nothing there (or nothing that could be replaced)."""
        return None

    def file_state(self, where: str | Path, identity: FileIdentity | None) -> str:
        """``ok``, ``deleted`` or ``replaced``: whether ``where`` still leads to the store
        that was ``identity`` when it was opened."""
        return "ok"

    def cut(self, conn: Store) -> bool:
        """End, under whatever thread waits on it, a wait on a server that does not answer:
        the wait ends as a lost connection. False when there is nothing to cut."""
        return False
