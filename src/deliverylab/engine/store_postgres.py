"""The PostgreSQL store: a psycopg connection with the part of :class:`sqlite3.Connection`'s
interface the engine uses, so one engine drives both (``engine.store.Store``).

The engine's SQL is written once, in the subset both databases share and mean the same by
(UPSERT ``ON CONFLICT``, ``INSERT … ON CONFLICT DO NOTHING`` and its rowcount, ``RETURNING``,
savepoints). Where the two differ in what a statement does, the SQL is written for each
database: its dialect's (:class:`PostgresDialect` here: a snapshot read, the repair's lock,
the health probe's write check, durability and timeouts) and its queue table's claim
(``brokers/postgres.py``). What is left is spelling, translated here once per statement text
without changing its meaning:

* parameters: sqlite3's ``?``, ``?1`` and ``:name`` become psycopg's ``%s`` / ``%(name)s``;
* ``BEGIN IMMEDIATE`` (a write transaction, which SQLite starts by taking its write lock) is
  a plain ``BEGIN``: PostgreSQL locks rows, not the database, so there is no lock to take
  up front. Every other statement, a plain ``BEGIN`` included, runs as written: a
  transaction at READ COMMITTED, PostgreSQL's default. A reader that needs one snapshot asks
  its dialect (``begin_snapshot``: ``REPEATABLE READ``);
* ``json_each(param)``, the engine's way to pass a list as one parameter, becomes
  ``json_array_elements_text``, whose rows have the same ``value`` column.

:class:`PgConnection` has ``execute``, ``executemany``, ``cursor``, ``in_transaction`` and
rows readable by name and by index, in autocommit mode with explicit ``BEGIN``/``COMMIT``, as
the SQLite connections are opened with ``isolation_level=None``.

Where a store lives: a libpq URL whose ``options`` set the ``search_path`` to the lab's own
schema, e.g. ``postgresql://127.0.0.1/test?options=-csearch_path%3Ddl_demo``. The same URL works
with ``psql``. Every lab gets its own schema, so labs and tests share one server.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import psycopg

from .dialect import Dialect, register
from .errors import InvalidInput, StoreError, StoreUnavailable
from .store import SQLITE, TABLES, Cursor, Store, _statements, transaction

SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
URL_SCHEMES = ("postgresql", "postgres")
CONNECT_TIMEOUT_S = 5


def is_url(value: object) -> bool:
    """Whether ``value`` names a PostgreSQL database (``postgresql://…``) rather than a file."""
    return isinstance(value, str) and value.split("://", 1)[0] in URL_SCHEMES and "://" in value


_SEARCH_PATH = re.compile(r"(?:-c\s*|--)search_path\s*=\s*([^\s,]+)")


def schema_of(url: str, field: str = "db") -> str:
    """The schema a store URL puts first on its ``search_path``; InvalidInput naming ``field``
    when the URL is not a PostgreSQL URL or names no schema (the server is shared: a lab
    without its own schema would write into another's tables), or is ambiguous: two
    ``options`` parameters, or two ``search_path`` settings in them. libpq and the server
    would take one of them, perhaps not the one read here, and the lab would check one schema
    while it writes another's tables. :func:`connect` also asks the server which schema it
    uses (``current_schema()``) and refuses a URL where that is another."""
    if not is_url(url):
        raise InvalidInput(field, url, "a postgresql:// URL")
    try:
        parts = urlsplit(url)
        _ = parts.port  # a non-numeric port raises here
    except ValueError as exc:
        raise InvalidInput(field, url, f"a valid postgresql:// URL ({exc})") from None
    given = parse_qs(parts.query, keep_blank_values=True).get("options", [])
    if len(given) > 1:
        raise InvalidInput(field, url, f"a postgresql:// URL with one options= parameter, not"
                                       f" {len(given)} (which one the server reads is not the"
                                       f" lab's to guess)")
    found = _SEARCH_PATH.findall(unquote(given[0])) if given else []
    if len(found) > 1:
        raise InvalidInput(field, url, f"a postgresql:// URL setting search_path once, not"
                                       f" {len(found)} times ({', '.join(found)})")
    if not found:
        raise InvalidInput(field, url, "a postgresql:// URL naming its schema, e.g."
                           " postgresql://127.0.0.1/test?options=-csearch_path%3Ddl_demo")
    schema: str = found[0]
    if not SCHEMA_RE.fullmatch(schema):
        raise InvalidInput(field, url, "a schema name of lower-case letters, digits and _")
    return schema


def url_for(base: str, schema: str) -> str:
    """``base`` (``postgresql://host/db``) with ``schema`` as its search_path."""
    if not SCHEMA_RE.fullmatch(schema):
        raise InvalidInput("schema", schema, "lower-case letters, digits and _")
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


# -- the dialect ---------------------------------------------------------------------------------
# PostgreSQL's synchronous_commit for each durability: ``on``, a commit waits for its WAL
# flush (as SQLite's FULL); ``off``, it does not, and a crash of the server can lose the last
# commits, never corrupt (closest to SQLite's NORMAL). EXTRA has no counterpart.
PG_SYNCHRONOUS = {"FULL": "on", "NORMAL": "off"}
# SQLSTATEs: a lock not had within lock_timeout; a statement cut off by statement_timeout; a
# unique index another transaction filled first; a deadlock or a serialization failure, which
# PostgreSQL resolves by aborting one transaction; a write refused by a read-only server.
PG_LOCK_NOT_AVAILABLE, PG_QUERY_CANCELED = "55P03", "57014"
PG_UNIQUE, PG_RETRY, PG_READ_ONLY = "23505", ("40P01", "40001"), "25006"


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


class PostgresDialect(Dialect):
    """PostgreSQL: row locks, durability by ``synchronous_commit``, a snapshot by asking for
    ``REPEATABLE READ``, SQLSTATEs for what failed, and a server that can go away."""

    rows_as_json = True  # psycopg parses a statement of more than 50 parameters at every call
    name, title = "postgresql", "PostgreSQL"
    durabilities = tuple(PG_SYNCHRONOUS)

    def connect(self, where: str | Path, *, synchronous: str | None = None,
                busy_timeout: float | None = None, must_exist: bool = True,
                field: str = "db") -> Store:
        conn = connect(str(where), field=field, must_exist=must_exist)
        try:
            # Session settings made with set() are made again when the connection is.
            if synchronous is not None:
                conn.set("synchronous_commit",
                         PG_SYNCHRONOUS[self.check_durability(synchronous)])
            if busy_timeout is not None:
                conn.set("lock_timeout", max(1, int(busy_timeout * 1000)))
        except BaseException:
            conn.close()
            raise
        return conn

    def reconnect(self, where: str | Path, **kw: Any) -> Store:
        try:
            return self.connect(where, **kw)
        except InvalidInput as exc:  # the server was there a moment ago: it is away now
            raise PgUnavailable(f"PostgreSQL cannot be reached ({exc.expected})") from None

    def init_db(self, where: str | Path, *, field: str = "db") -> Store:
        return init_db(str(where), field=field)

    def missing_tables(self, conn: Store, tables: tuple[str, ...]) -> list[str]:
        return missing_tables(_pg(conn), tables)

    def durability(self, conn: Store) -> str:
        level = str(conn.execute("SHOW synchronous_commit").fetchone()[0])
        return {v: k for k, v in PG_SYNCHRONOUS.items()}.get(level, level)

    def wait_at_most(self, conn: Store, seconds: float) -> None:
        # Row locks are waited for statement by statement: each is cut off at the bound.
        _pg(conn).set("statement_timeout", max(1, int(seconds * 1000)))

    def begin_snapshot(self, conn: Store) -> None:
        # Under READ COMMITTED every statement would see a newer snapshot.
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")

    def lock_for_repair(self, conn: Store) -> None:
        # PostgreSQL has no database-wide write lock to order the repair against the
        # workers' effects. Every effect reads the fence table inside its transaction, and
        # holds that read's lock (ACCESS SHARE) until it commits; this lock waits for those
        # transactions to end and makes every later read of the fence wait for the repair.
        # So, as on SQLite, an effect commits wholly before the repair or reads its fence.
        conn.execute("LOCK TABLE reconciled_events IN ACCESS EXCLUSIVE MODE")

    def _probe_write(self, conn: Store, tables: tuple[str, ...]) -> str:
        # Take, in a transaction rolled back at once, the lock a write's INSERTs take on each
        # table they write (ROW EXCLUSIVE), waiting no longer than the connection's
        # lock_timeout: a LOCK TABLE or a schema change elsewhere holds it up as it would
        # hold up the write.
        conn.execute("BEGIN")
        if conn.execute("SHOW transaction_read_only").fetchone()[0] == "on":
            conn.execute("ROLLBACK")
            return "read-only"
        conn.execute(f"LOCK TABLE {', '.join(tables)} IN ROW EXCLUSIVE MODE")
        conn.execute("ROLLBACK")
        return "ok"

    def is_locked(self, exc: BaseException) -> bool:
        return _sqlstate(exc) == PG_LOCK_NOT_AVAILABLE

    def timed_out(self, exc: BaseException) -> bool:
        return _sqlstate(exc) in (PG_LOCK_NOT_AVAILABLE, PG_QUERY_CANCELED)

    def lost_race(self, exc: BaseException) -> bool:
        return _sqlstate(exc) == PG_UNIQUE

    def must_retry(self, exc: BaseException) -> bool:
        return _sqlstate(exc) in PG_RETRY

    def refuses_writes(self, exc: BaseException) -> bool:
        return _sqlstate(exc) == PG_READ_ONLY

    def cut(self, conn: Store) -> bool:
        """Shut the connection's socket down (``shutdown`` acts on the socket itself, under
        the thread waiting on it): the wait ends as a lost connection, and the store opens a
        new one for the next statement. False when there was no socket left."""
        try:
            fd = _pg(conn).raw.pgconn.socket
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, psycopg.Error):
            return False
        return True


def _pg(conn: Store) -> PgConnection:
    """``conn`` as the PostgreSQL store's connection it is (``store_postgres.PgConnection``,
    or a wrapper that passes its attributes through)."""
    return cast("PgConnection", conn)


POSTGRESQL = register(PostgresDialect())


def for_store(where: object) -> Dialect:
    """The dialect of the store ``where`` names: PostgreSQL's for a ``postgresql://`` URL,
    else SQLite's (a file)."""
    return POSTGRESQL if is_url(where) else SQLITE


# -- the sqlite3-shaped connection --------------------------------------------------------------
class Row(tuple[Any, ...]):
    """A result row readable by index and by column name, like :class:`sqlite3.Row`."""

    __slots__ = ()
    _names: dict[str, int] = {}

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


@functools.lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"__slots__": (), "_names": {n: i for i, n in enumerate(names)}})


def _row_factory(cursor: Any) -> Any:
    desc = cursor.description
    if desc is None:
        return tuple
    cls = _row_class(tuple(c.name for c in desc))
    return lambda values: cls(values)


_TOKEN = re.compile(r"""('(?:[^']|'')*')|(--[^\n]*)|(\?\d+)|(\?)|(?<![:\w]):(\w+)|(%)""")
_JSON_EACH = re.compile(r"json_each\(\s*(%s|%\(\w+\)s)\s*\)(?!\s+AS\b)", re.IGNORECASE)


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> tuple[str, tuple[int, ...] | None]:
    """SQLite's spelling of ``sql`` in PostgreSQL's, and how to pass its parameters: None for
    positional (``?``) or named (``:name``) ones, else the 1-based numbers of ``?N``
    parameters, which become named ``%(_N)s`` so one value can be used twice."""
    numbered: list[int] = []

    def sub(m: re.Match[str]) -> str:
        quoted, comment, num, qmark, name, percent = m.groups()
        if quoted is not None or comment is not None:
            return m.group(0)
        if num is not None:
            numbered.append(int(num[1:]))
            return f"%(_{num[1:]})s"
        if qmark is not None:
            return "%s"
        if name is not None:
            return f"%({name})s"
        return "%%"

    out = _TOKEN.sub(sub, sql)
    if out.strip().upper() == "BEGIN IMMEDIATE":  # a write transaction: row locks, READ COMMITTED
        out = "BEGIN"
    out = _JSON_EACH.sub(r"json_array_elements_text(CAST(\1 AS json)) AS value", out)
    return out, (tuple(sorted(set(numbered))) if numbered else None)


def _args(numbers: tuple[int, ...] | None, params: Any) -> Any:
    if numbers is None:
        return params
    return {f"_{n}": params[n - 1] for n in numbers}


class PgError(StoreError):
    """A PostgreSQL error, raised where the engine expects its database's errors (it catches
    :data:`~deliverylab.engine.errors.STORE_ERRORS`). ``sqlstate`` is PostgreSQL's code; the
    psycopg error is the ``__cause__``."""

    def __init__(self, exc: Exception | str) -> None:
        self.sqlstate = getattr(exc, "sqlstate", None)
        super().__init__(str(exc).strip())


class PgUnavailable(PgError, StoreUnavailable):
    """The connection to PostgreSQL is gone (terminated, the server restarting or failing
    over) or could not be opened again yet: the statement did not run. See
    :class:`~deliverylab.engine.errors.StoreUnavailable`."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].removeprefix("connection failed: ") if text else \
        type(exc).__name__


class PgCursor:
    """The part of :class:`sqlite3.Cursor` the engine uses. ``row_factory = None`` gives
    plain tuples, as on a sqlite3 cursor."""

    def __init__(self, cur: Any, conn: PgConnection | None = None) -> None:
        self._cur = cur
        self._conn = conn
        self.row_factory: Any = Row

    def _failed(self, exc: psycopg.Error) -> PgError:
        if self._conn is not None:
            return self._conn._failed(exc)
        return PgError(exc)

    def execute(self, sql: str, params: Any = ()) -> PgCursor:
        text, numbers = translate(sql)
        self._cur.row_factory = _row_factory if self.row_factory is not None else _tuples
        try:
            self._cur.execute(text, _args(numbers, params))
        except psycopg.Error as exc:
            raise self._failed(exc) from exc
        return self

    def executemany(self, sql: str, seq: Iterable[Any]) -> PgCursor:
        rows = list(seq)
        if len(rows) == 1:  # one statement: psycopg's executemany pipelines, three round trips
            return self.execute(sql, rows[0])
        text, numbers = translate(sql)
        try:
            self._cur.executemany(text, [_args(numbers, p) for p in rows])
        except psycopg.Error as exc:
            raise self._failed(exc) from exc
        return self

    def fetchone(self) -> Any:
        return self._cur.fetchone() if self._cur.description is not None else None

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall() if self._cur.description is not None else []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())

    @property
    def rowcount(self) -> int:
        count: int = self._cur.rowcount
        return count

    @property
    def description(self) -> Any:
        return self._cur.description


class _NoRows:
    """What a statement that did not need the server returns (the ROLLBACK of a transaction
    its lost connection already ended)."""

    rowcount = 0
    description = None
    row_factory: Any = None

    def execute(self, sql: str, parameters: Any = (), /) -> _NoRows:
        return self

    def fetchone(self) -> None:
        return None

    def fetchall(self) -> list[Any]:
        return []

    def __iter__(self) -> Iterator[Any]:
        return iter(())


def _tuples(cursor: Any) -> Any:
    return tuple


_IN_TRANSACTION = (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR)
# After a lost connection, a new one is tried no sooner than this, doubling up to the cap
# while the server stays away: a restart takes seconds, and every caller (the API's writer,
# its readers, a worker's steps) would otherwise hammer it with connection attempts.
RECONNECT_BASE_S = 0.05
RECONNECT_CAP_S = 2.0


class PgConnection:
    """A psycopg connection with the interface of the engine's sqlite3 connections.

    **A lost connection is opened again**, on the next statement after it was lost, with the
    same URL and the session settings made with :meth:`set`; while the server stays away the
    attempts back off (:data:`RECONNECT_BASE_S` doubling to :data:`RECONNECT_CAP_S`) and each
    statement in between raises :class:`PgUnavailable` at once. Never inside a transaction:
    when the connection goes while one is open, the server has rolled it back, and every
    statement but ``ROLLBACK`` raises :class:`PgUnavailable` until the caller rolls back
    (:attr:`in_transaction` stays true until then). So a transaction's later statements never
    run, in autocommit, on a new connection that knows nothing of its beginning."""

    dialect = POSTGRESQL

    def __init__(self, raw: Any, *, url: str, schema: str) -> None:
        self.raw, self.url, self.schema = raw, url, schema
        self.row_factory: Any = Row
        self.settings: dict[str, str] = {}
        self.reconnects = 0  # connections opened again after one was lost
        self._doomed = False  # lost inside a transaction the caller has not rolled back
        self._retry_at = 0.0
        self._retry_delay = RECONNECT_BASE_S
        self._closed = False

    # -- statements ------------------------------------------------------------------------
    def execute(self, sql: str, params: Any = ()) -> Cursor:
        if self._doomed and sql.strip().upper() == "ROLLBACK":
            self._doomed = False  # the server rolled it back when the connection went
            return _NoRows()
        return self.cursor().execute(sql, params)

    def executemany(self, sql: str, seq: Iterable[Any]) -> PgCursor:
        return self.cursor().executemany(sql, seq)

    def cursor(self) -> PgCursor:
        self._live()
        return PgCursor(self.raw.cursor(), self)

    def set(self, name: str, value: str | int) -> None:
        """``SET name = value`` for this session, made again on every reconnection."""
        if not re.fullmatch(r"[a-z_]+", name) or not re.fullmatch(r"[A-Za-z0-9_]+", str(value)):
            raise InvalidInput("setting", f"{name}={value}", "a PostgreSQL setting name and value")
        self.settings[name] = str(value)
        self.cursor()  # reconnect first if need be: the new session gets every setting
        try:
            self.raw.execute(f"SET {name} = {value}")
        except psycopg.Error as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: psycopg.Error) -> PgError:
        """The engine's error for ``exc``; a :class:`PgUnavailable` when the connection is
        gone with it."""
        if not (self.raw.closed or self.raw.broken):
            return PgError(exc)
        if self._was_in_transaction:
            self._doomed = True
        self._retry_at, self._retry_delay = 0.0, RECONNECT_BASE_S  # try again at once
        return PgUnavailable(f"the connection to PostgreSQL was lost ({_first_line(exc)})")

    def _live(self) -> None:
        """Make sure there is an open connection (see the class): reconnect if it was lost."""
        if self._doomed:
            raise PgUnavailable("the connection to PostgreSQL was lost inside a transaction;"
                                " it was rolled back: roll back and start again")
        raw = self.raw
        if not raw.closed and not raw.broken:
            self._was_in_transaction = raw.info.transaction_status in _IN_TRANSACTION
            return
        if self._closed:
            raise PgError("the connection is closed")
        now = time.monotonic()
        if now < self._retry_at:
            raise PgUnavailable(f"PostgreSQL cannot be reached; the next connection attempt"
                                f" is in {self._retry_at - now:.1f}s")
        try:
            new = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
            try:
                for name, value in self.settings.items():
                    new.execute(f"SET {name} = {value}")
                schema = _current_schema(new)
            except BaseException:
                new.close()
                raise
        except psycopg.Error as exc:
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, RECONNECT_CAP_S)
            raise PgUnavailable(f"PostgreSQL cannot be reached ({_first_line(exc)})") from None
        if schema != self.schema:
            new.close()
            raise PgUnavailable(f"PostgreSQL answers again, but its search_path now leads to"
                                f" schema {schema!r}, not {self.schema!r}")
        self.raw = new
        self.reconnects += 1
        self._retry_delay = RECONNECT_BASE_S
        self._was_in_transaction = False

    _was_in_transaction = False

    @property
    def in_transaction(self) -> bool:
        return self._doomed or self.raw.info.transaction_status in _IN_TRANSACTION

    def close(self) -> None:
        self._closed = True
        self.raw.close()

    def __enter__(self) -> PgConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _current_schema(raw: psycopg.Connection[Any]) -> str | None:
    """The schema the server reads and writes for the session (None: no schema on its
    search_path exists)."""
    row = raw.execute("SELECT current_schema()").fetchone()
    return None if row is None else row[0]  # one row, always


def connect(url: str, *, field: str = "db", must_exist: bool = True) -> PgConnection:
    """Open the store at ``url``. InvalidInput naming ``field`` for a bad URL, an unreachable
    server, a URL whose schema is not the one the server uses (``current_schema()``), or
    (with ``must_exist``) a schema that ``init-db`` has not created."""
    schema = schema_of(url, field)
    try:
        raw = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        # The first line says what failed ("connection to server at … failed: Connection
        # refused"); libpq's hint on the next line adds nothing the argument's name does not.
        raise InvalidInput(field, url, f"a reachable PostgreSQL server ({_first_line(exc)})"
                           ) from None
    try:
        current = _current_schema(raw)
    except psycopg.Error as exc:
        raw.close()
        raise InvalidInput(field, url, f"a usable PostgreSQL server ({_first_line(exc)})"
                           ) from None
    # NULL: no schema on the search_path exists yet (init-db creates it). Another: the server
    # reads and writes elsewhere than the URL seems to say (a search_path from the role, the
    # database or PGOPTIONS, or an options string read differently): refuse, never guess.
    if current is not None and current != schema:
        raw.close()
        raise InvalidInput(field, url, f"a URL whose schema is the one PostgreSQL uses: the"
                                       f" server reads and writes schema {current!r}, the URL"
                                       f" names {schema!r}")
    conn = PgConnection(raw, url=url, schema=schema)
    if must_exist and missing_tables(conn):
        conn.close()
        raise InvalidInput(field, url, f"a deliverylab schema {schema!r} (run 'deliverylab"
                           f" init-db --db URL')")
    return conn


def schema_sql() -> str:
    return resources.files("deliverylab.engine").joinpath("schema_postgres.sql").read_text("utf-8")


def init_db(url: str, *, field: str = "db") -> PgConnection:
    """Create the URL's schema and its tables if they are not there yet. Idempotent."""
    conn = connect(url, field=field, must_exist=False)
    with transaction(conn):
        conn.raw.execute(f'CREATE SCHEMA IF NOT EXISTS "{conn.schema}"')
        for statement in _statements(schema_sql()):
            conn.raw.execute(statement)
    return conn


def drop_schema(url: str) -> None:
    """Remove the URL's schema and everything in it (tests clean up with this)."""
    schema = schema_of(url)
    with psycopg.connect(url, autocommit=True) as raw:
        raw.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def missing_tables(conn: PgConnection, tables: tuple[str, ...] | None = None) -> list[str]:
    """Which of ``tables`` (default: every table a lab needs) the URL's schema lacks."""
    rows = conn.execute("SELECT table_name FROM information_schema.tables"
                        " WHERE table_schema = ?", (conn.schema,)).fetchall()
    have = {r[0] for r in rows}
    return [t for t in (TABLES if tables is None else tables) if t not in have]

