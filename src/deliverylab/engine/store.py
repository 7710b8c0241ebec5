"""The SQLite store: connections, the schema, and explicit transactions.

Every write runs inside :func:`transaction`, which starts with ``BEGIN IMMEDIATE`` so a writer
takes the write lock up front (no lock upgrade, so no deadlock between two readers turning
writer) and waits on the busy timeout instead of failing with "database is locked".
https://www.sqlite.org/lang_transaction.html
"""

from __future__ import annotations

import os
import sqlite3
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, TypeGuard

from .dialect import DIALECTS, Dialect, FileIdentity, register
from .dialect import Cursor as Cursor  # the store's types, named here: store.Store
from .dialect import Store as Store
from .errors import InvalidInput

BUSY_TIMEOUT_S = 30.0
PAGE_SIZE = 1024
WAL_AUTOCHECKPOINT_PAGES = 40_000
# PRAGMA synchronous levels a caller may ask for, by name and by the number SQLite reports.
SYNCHRONOUS_LEVELS = {"NORMAL": 1, "FULL": 2, "EXTRA": 3}
TABLES = (
    "orders",
    "idempotency_keys",
    "queue_messages",
    "inbox_processed",
    "inventory_projection",
    "dead_letters",
    "delivery_log",
    "reconciled_events",
)
# The producer's outbox (schema.sql): written only when the broker is outside the store. Not
# in TABLES: a file made before it still opens and serves a lab; what needs it
# (place_order over an external broker, the relay) asks for it with require_outbox.
OUTBOX_TABLE = "outbox"


# The oldest SQLite the schema and the queries run on. The newest feature they use sets it:
# the ->> operator (Queue.ack_many) came in 3.38.0, which also built the JSON functions in
# (json_each); STRICT tables came in 3.37.0, RETURNING (every claim) in 3.35.0, UPSERT in 3.24.0.
MIN_SQLITE = (3, 38, 0)
SQLITE_FEATURES = "the ->> operator and built-in JSON 3.38.0, STRICT tables 3.37.0, RETURNING 3.35.0"


class SQLiteTooOld(RuntimeError):
    """The SQLite library Python is linked against predates what the schema needs."""

    def __init__(self, found: tuple[int, ...]) -> None:
        self.found = tuple(found)
        need = ".".join(map(str, MIN_SQLITE))
        super().__init__(f"SQLite {'.'.join(map(str, self.found))} is too old: deliverylab needs"
                         f" SQLite {need} or newer ({SQLITE_FEATURES}); this Python's sqlite3"
                         f" module uses the older library, so use a Python built with a newer"
                         f" one")


def check_sqlite_version(found: tuple[int, ...] | None = None) -> None:
    """Raise :class:`SQLiteTooOld` when ``found`` (default: the library in use) is older than
    :data:`MIN_SQLITE`, before anything is opened: otherwise the first STRICT table or ``->>``
    fails as a bare syntax error."""
    version = tuple(sqlite3.sqlite_version_info if found is None else found)
    if version < MIN_SQLITE:
        raise SQLiteTooOld(version)


def is_store(value: object) -> TypeGuard[Store]:
    """Whether ``value`` is a store's connection: sqlite3's, or the PostgreSQL store's
    (``store_postgres.PgConnection``, which has the part of sqlite3's interface the engine
    uses and names its ``dialect``)."""
    return names_dialect(value) is not None and callable(getattr(value, "execute", None))


def schema_sql() -> str:
    """The text of ``schema.sql``, shipped inside the package."""
    return resources.files("deliverylab.engine").joinpath("schema.sql").read_text(encoding="utf-8")


def _is_memory(path: str | Path) -> bool:
    return str(path) == ":memory:" or str(path).startswith("file::memory:")


def check_synchronous(value: object, field: str = "synchronous") -> str:
    """``normal``, ``full`` or ``extra`` (any case), as SQLite's upper-case name."""
    if isinstance(value, str) and value.upper() in SYNCHRONOUS_LEVELS:
        return value.upper()
    raise InvalidInput(field, value, "one of normal, full, extra")


def connect(path: str | Path, *, must_exist: bool = True,
            busy_timeout: float = BUSY_TIMEOUT_S,
            synchronous: str = "NORMAL") -> sqlite3.Connection:
    """Open the database at ``path`` in WAL mode with a busy timeout.

    With ``must_exist`` (the default) a missing file is an error naming the path, instead of
    SQLite silently creating an empty database that has no tables. ``synchronous`` is
    ``NORMAL`` (durable against a crash of the process) or ``FULL`` (also against a power
    cut: every commit waits for its fsync; the API acknowledges orders this way).
    """
    check_sqlite_version()
    if not isinstance(path, str | Path) or str(path) == "":
        raise InvalidInput("db", path, "a database file path or ':memory:'")
    synchronous = check_synchronous(synchronous)
    if not _is_memory(path):
        p = Path(path)
        if must_exist and not p.is_file():
            raise InvalidInput("db", str(path), "an existing database file (run 'deliverylab init-db')")
        p.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: the module never opens transactions behind our back.
    conn = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    # 1 KiB pages, set before the first table exists (a no-op on an existing file). In WAL mode
    # every commit appends each page it changed, whole; a queue commits constantly, and each
    # commit changes a few small rows on three or four pages. At 4 KiB most of what it writes
    # is bytes nobody changed. Measured in benchmarks/bench_engine.py.
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    if not _is_memory(path):
        conn.execute("PRAGMA journal_mode = WAL")
    # NORMAL is durable against application crashes in WAL mode; only a power loss can roll
    # back the last commits. FULL fsyncs the WAL at every commit, so a power loss cannot.
    # https://www.sqlite.org/pragma.html#pragma_synchronous
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    # Checkpoint every ~40 MB of WAL (40,000 pages of 1 KiB) instead of every 1,000 pages: a
    # queue rewrites the same hot pages (its tail, its index, the log's tail) all the time, and
    # each checkpoint costs two fsyncs. Fewer, larger checkpoints copy each hot page once. The
    # limit caps the file the WAL leaves behind. https://www.sqlite.org/wal.html#ckpt
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    conn.execute("PRAGMA journal_size_limit = 67108864")
    # Up to 64 MiB of page cache (taken only as pages are used; the default is 2 MiB): with a
    # deep queue the claim's index and the inbox insert land on pages all over the file,
    # and a small cache makes every cycle slower the deeper the queue.
    conn.execute("PRAGMA cache_size = -65536")
    # The claim updates rows inside a transaction, so SQLite keeps a statement journal to undo
    # just that statement; on a temp *file* its cost grew with the queue's depth (2x at
    # 100,000 messages). In memory it does not. https://www.sqlite.org/tempfiles.html#stmtjrnl
    conn.execute("PRAGMA temp_store = MEMORY")
    return conn


def init_db(path: str | Path = ":memory:", *,
            busy_timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Create the schema if it is not there yet and return an open connection. Idempotent."""
    conn = connect(path, must_exist=False, busy_timeout=busy_timeout)
    with transaction(conn):
        for statement in _statements(schema_sql()):
            conn.execute(statement)
    return conn


def _statements(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def missing_tables(conn: Store, tables: tuple[str, ...] = TABLES) -> list[str]:
    """The deliverylab tables the store does not have (all of them: not a lab database; some,
    with ``orders`` present: made by an older version, and ``init_db`` adds them)."""
    return dialect_of(conn).missing_tables(conn, tables)


def require_outbox(conn: Store, field: str = "store") -> None:
    """:class:`InvalidInput` naming ``field`` when the store has no outbox table (a database
    made before it), instead of "no such table" from inside a transaction."""
    if missing_tables(conn, (OUTBOX_TABLE,)):
        raise InvalidInput(field, "a database without the outbox table",
                           "a deliverylab database with the outbox table (made by an older"
                           " deliverylab: run 'deliverylab init-db' on it to add the table;"
                           " the data is kept)")


def check_schema(conn: Store) -> None:
    """Fail with a clear message when the file is not a deliverylab database."""
    missing = missing_tables(conn)
    if missing:
        raise InvalidInput("db", f"missing tables {missing}",
                           "a deliverylab database (run 'deliverylab init-db')")


class transaction:  # noqa: N801 - used like a function: ``with transaction(conn):``
    """``BEGIN IMMEDIATE`` … ``COMMIT``; roll back on any exception, then re-raise.

    Inside a transaction that is already open (the caller's), join it instead: the caller
    commits or rolls back the whole unit. This is how an order and its event commit together.

    A class rather than a ``@contextmanager`` generator: the worker opens three of these per
    message, and the generator's machinery cost more than the ``BEGIN`` itself.
    """

    __slots__ = ("conn", "owner")

    def __init__(self, conn: Store) -> None:
        self.conn = conn
        self.owner = False

    def __enter__(self) -> Store:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.owner = True
        return self.conn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.owner:
            return
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def table_counts(conn: Store) -> dict[str, int]:
    return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def dump(conn: Store) -> str:
    """Every row of every table as text in a fixed order, to compare two runs byte for byte."""
    out = []
    for t in TABLES:
        out.append(f"-- {t}")
        for row in conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2"):
            out.append(repr(tuple(row)))
    return "\n".join(out)


# -- the dialect ---------------------------------------------------------------------------------
class SQLiteDialect(Dialect):
    """SQLite: one writer at a time, durability by ``PRAGMA synchronous``, a WAL snapshot
    per read transaction, and a file that can be deleted or replaced under a process."""

    name, title = "sqlite", "SQLite"
    durabilities = ("NORMAL", "FULL", "EXTRA")
    _BUSY_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (primary codes; extended add high bits)

    def connect(self, where: str | Path, *, synchronous: str | None = None,
                busy_timeout: float | None = None, must_exist: bool = True,
                field: str = "db") -> Store:
        kw: dict[str, Any] = {"must_exist": must_exist}
        if synchronous is not None:
            kw["synchronous"] = synchronous
        if busy_timeout is not None:
            kw["busy_timeout"] = busy_timeout
        return connect(where, **kw)

    def init_db(self, where: str | Path, *, field: str = "db") -> Store:
        return init_db(where)

    def missing_tables(self, conn: Store, tables: tuple[str, ...]) -> list[str]:
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return [t for t in tables if t not in have]

    def durability(self, conn: Store) -> str:
        level = conn.execute("PRAGMA synchronous").fetchone()[0]
        return {v: k for k, v in SYNCHRONOUS_LEVELS.items()}.get(level, str(level))

    def wait_at_most(self, conn: Store, seconds: float) -> None:
        conn.execute(f"PRAGMA busy_timeout = {max(1, int(seconds * 1000))}")

    def begin_snapshot(self, conn: Store) -> None:
        # A deferred transaction: its first read fixes the WAL snapshot the rest see.
        conn.execute("BEGIN")

    def lock_for_repair(self, conn: Store) -> None:
        pass  # the repair's BEGIN IMMEDIATE holds the database's only write lock

    def _probe_write(self, conn: Store, tables: tuple[str, ...]) -> str:
        conn.execute("BEGIN IMMEDIATE")  # the write lock, given back at once
        conn.execute("ROLLBACK")
        return "ok"

    def _probe_locked(self, exc: BaseException) -> bool:
        return self.timed_out(exc) or isinstance(exc, sqlite3.OperationalError) and (
            "locked" in str(exc) or "busy" in str(exc))

    def is_locked(self, exc: BaseException) -> bool:
        if not isinstance(exc, sqlite3.OperationalError):
            return False
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in self._BUSY_CODES
        return "locked" in str(exc) or "busy" in str(exc)

    def identity(self, where: str | Path) -> FileIdentity | None:
        try:
            st = os.stat(where)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def file_state(self, where: str | Path, identity: FileIdentity | None) -> str:
        now = self.identity(where)
        if now is None:
            return "deleted"
        return "ok" if now == identity else "replaced"


SQLITE = register(SQLiteDialect())


def dialect_of(conn: object) -> Dialect:
    """The dialect of a store's connection: the one it names (``dialect``), else SQLite's
    (a :class:`sqlite3.Connection`, or a wrapper of one that names none)."""
    found = getattr(conn, "dialect", None)
    return found if isinstance(found, Dialect) else SQLITE


def names_dialect(conn: object) -> Dialect | None:
    """The dialect ``conn`` is a connection of, or None when it is no store's connection."""
    if isinstance(conn, sqlite3.Connection):
        return SQLITE
    found = getattr(conn, "dialect", None)
    return found if isinstance(found, Dialect) else None


def is_busy(exc: BaseException) -> bool:
    """Whether ``exc`` is a store giving up on a lock, on any database: SQLite's busy timeout
    ("database is locked"), PostgreSQL's ``lock_timeout`` (SQLSTATE 55P03)."""
    return any(d.is_locked(exc) for d in DIALECTS.values())


# -- errors worth a sentence, and files that cannot be written ---------------------------------


def is_read_only_error(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite refusing a write to a file it could only open for reading."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and (
        code & 0xFF == 8 if code is not None else "readonly" in str(exc))  # SQLITE_READONLY


def why_read_only(path: str | Path) -> str | None:
    """Why SQLite could not write the database at ``path``, or None when it can.

    A WAL database is written through three files: the database, its ``-wal`` and its
    ``-shm``, which SQLite creates beside it when they are missing. ``os.access`` answers for
    the caller's real rights, and, even for root, says no to an immutable file
    (``chattr +i``) and to a read-only mount.
    """
    p = Path(path)
    if not os.access(p, os.W_OK):
        return "the file is not writable"
    for suffix in ("-wal", "-shm"):
        side = Path(f"{p}{suffix}")
        # The last connection to close deletes both files: one seen a moment ago may be gone
        # when its rights are asked for, which says nothing about whether it can be written.
        if os.access(side, os.W_OK):
            continue
        if side.exists():
            return f"its {suffix} file is not writable"
        if not os.access(p.parent, os.W_OK | os.X_OK):
            return (f"its directory is not writable, and SQLite needs to create the {suffix}"
                    f" file there")
    return None


def connect_read_only(path: str | Path, *,
                      busy_timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open the database at ``path`` for reading only, for a file nobody here may write.

    ``mode=ro`` reads a WAL database correctly, commits still in its ``-wal`` included, but
    SQLite needs the ``-shm`` index for that, and creates it when missing: in a read-only
    directory it cannot. Then, if there is no ``-wal`` (or an empty one), every commit is in
    the database file and nobody can be writing (a writer would need those files too), so
    ``immutable=1``, which reads the file alone and takes no lock, sees exactly the data.
    With a non-empty ``-wal`` and no ``-shm`` SQLite cannot read the file without writing,
    and this says so. https://www.sqlite.org/uri.html https://www.sqlite.org/wal.html#readonly
    """
    check_sqlite_version()
    p = Path(path)
    if not p.is_file():
        raise InvalidInput("db", str(path), "an existing database file (run 'deliverylab init-db')")
    uri = p.absolute().as_uri()  # percent-encoded, so '?' or '#' in a name stay in the name

    def open_uri(query: str) -> sqlite3.Connection:
        conn = sqlite3.connect(f"{uri}?{query}", uri=True, timeout=busy_timeout,
                               isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opening is lazy
        except BaseException:
            conn.close()
            raise
        return conn

    try:
        return open_uri("mode=ro")
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", 14) & 0xFF != 14:  # not SQLITE_CANTOPEN
            raise
        wal = Path(f"{p}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise sqlite3.OperationalError(
                f"cannot read {str(p)!r} without writing: its -wal file holds commits, its"
                f" -shm index is missing and the directory is read-only; copy the database"
                f" and its -wal file to a writable directory") from None
        return open_uri("immutable=1")
