"""The HTTP API of the lab: ``POST /orders`` writes an order and its event, atomically.

FastAPI served by uvicorn (``deliverylab api``). What matters for correctness:

* **The body is validated by hand**, from the raw JSON, with the engine's validators. A model
  class would quietly turn ``"1"`` or ``1.0`` into ``1``; here they are errors that name the
  field. Ids with control or invisible characters, and lone UTF-16 surrogates anywhere in the
  body, are refused. Nothing is written unless the whole request is valid.
* **A 201 means the order is on disk.** Each write is one ``BEGIN IMMEDIATE`` transaction
  (order row + outbox event) that commits before the answer is sent, on a connection with
  ``synchronous=FULL``: the commit waits for its fsync, so an acknowledged order survives a
  power cut, not only a crash of this process (``--synchronous normal`` trades that for speed).
* **A write gets a bounded time, then a 503.** Writes run one at a time on one thread with
  one connection. A request that cannot commit within :data:`WRITE_BUDGET_S` of its arrival,
  counting the time it queued behind this process's earlier writes, is answered 503 with
  ``Retry-After`` and nothing written; it never waits out SQLite's 30 s busy timeout in
  turn behind the others. Reads use a separate pool, and ``GET /health`` its own thread, so
  neither waits behind a stuck write.
* **The producer is idempotent**: the same ``orderId`` with the same body returns the first
  answer (200) and writes nothing, with a different body it is a 422. An ``Idempotency-Key``
  follows the IETF draft: recorded with every request that carries it; the exact retry gets
  the first status and body again, another request with the key is a 422, and a retry while
  the first request is still being processed is a 409.
* **Only this machine's names are served** (``Host`` 127.0.0.1, localhost or [::1], plus what
  ``--allowed-host`` adds), so a web page cannot reach the API through DNS rebinding.
* **A deleted or replaced database file is noticed**: writes are refused with a 503 rather
  than acknowledged into a file nobody will see again, and ``/health`` says so.
* **The same on PostgreSQL** (``--db postgresql://…``): one write transaction per batch,
  ``synchronous_commit=on`` for ``full``, a statement timeout for the write budget (a row lock
  held elsewhere past it is a 503), the same answers and error codes. A lost connection (a
  restart, a failover) is opened again by the store, with backoff; meanwhile writes and reads
  get a 503 and ``/health`` says ``unreachable``. Two API processes on one schema racing for
  one order id or key answer as one API does (the loser replays the winner's row).
* **A body gets** :data:`BODY_TIMEOUT_S` **to arrive**, then a 408; a shutdown answers bodies
  still on their way with a 503 and waits :data:`SHUTDOWN_WAIT_S` at most (:class:`Server`).
* **With the broker outside the store** (``outbox=True``, ``deliverylab api --broker``), the
  API writes the order and its event to the store's outbox table in one transaction, and
  never talks to the broker: ``deliverylab relay`` publishes the event.
"""


from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..brokers.registry import open_store_and_broker
from ..engine.broker import Broker
from ..engine.clock import SystemClock
from ..engine.display import escape_unprintable
from ..engine.errors import (
    STORE_ERRORS,
    InvalidInput,
    OrderConflict,
    StoreUnavailable,
    check_id,
    check_int,
    check_number,
    first_forbidden,
)
from ..engine.ids import Ids
from ..engine.orders import (
    MAX_ID_LENGTH,
    MAX_KEY_LENGTH,
    PlacedOrder,
    list_orders,
    place_order,
    validate_order,
)
from ..engine.store import Store, check_schema, check_synchronous, require_outbox
from ..engine.store_postgres import for_store
from . import metrics
from .status import collect, order_view, snapshot

MAX_BODY_BYTES = 64 * 1024
# How long a request's body may take to arrive once its headers have: far more than any
# client needs for 64 KiB, far less than the time a slow or stalled client could otherwise
# hold a request open for. A body late past it is a 408.
BODY_TIMEOUT_S = 10.0
# How long ``deliverylab api`` waits, once told to stop, for the requests in progress: a
# write is answered within WRITE_BUDGET_S, a body still on its way gets a 503 at once.
SHUTDOWN_WAIT_S = 5
ORDER_FIELDS = ("orderId", "itemId", "qty")
# How long a write may take from the request's arrival, queueing behind this process's earlier
# writes included, before it is answered 503: long enough for any healthy commit (milliseconds,
# a checkpoint tens of them), short enough that a client retries instead of hanging on.
WRITE_BUDGET_S = 3.0
# A write whose thread has not answered this long after its budget is answered 503 anyway: the
# server went silent (its statement timeout enforces the budget only while it answers).
STUCK_S = 2.0
RETRY_AFTER_S = 1
# At most this many orders share one commit (see ApiDatabase._write_batch).
MAX_BATCH = 64
# /health waits this long for the write lock: longer than a worker's commit, so a busy lab
# reads as writable, and short enough to answer well within 100 ms.
HEALTH_LOCK_WAIT_S = 0.02
HEALTH_TIMEOUT_S = 0.5
DEFAULT_SYNCHRONOUS = "FULL"
SYNCHRONOUS_ENV = "DELIVERYLAB_SYNCHRONOUS"
ALLOWED_HOSTS_ENV = "DELIVERYLAB_ALLOWED_HOSTS"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# Starlette's in-process TestClient sends ``Host: testserver`` from the peer "testclient": no
# socket, so no browser can be behind it. Only that exact pair is let through.
TEST_CLIENT = ("testserver", "testclient")

log = logging.getLogger("deliverylab.api")


class ApiError(Exception):
    """An error answer: ``status`` and a message naming what was wrong."""

    def __init__(self, status: int, error: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.field, self.headers = status, error, field, headers


def _escape(text: str) -> str:
    """``text`` with every non-printable character (controls, format characters, line
    separators, lone surrogates) written as ``\\uXXXX``: an error message quotes what the
    client sent, and whoever reads it (a log, a terminal) must not be driven by it."""
    return escape_unprintable(text)


def _show(value: Any, limit: int = 40) -> str:
    """A value as JSON for an error message, shortened when long, escaped where unsafe."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > limit:
        size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters"
        text = f"{text[:limit]}… ({size})"
    return _escape(text)


class SafeJSONResponse(JSONResponse):
    """JSON whose rendering cannot fail: a lone surrogate that got this far is sent as its
    ``\\uXXXX`` escape instead of raising while the answer is encoded."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8", "backslashreplace")


def invalid(exc: InvalidInput, status: int = 422) -> ApiError:
    return ApiError(status, f"{exc.field} must be {exc.expected}, got {_show(exc.value)}",
                    exc.field)


def _lone_surrogate(body: Any) -> tuple[str, str | None] | None:
    """Where the parsed body holds a lone UTF-16 surrogate: (what, top-level field or None).

    JSON's ``\\ud800`` escape can spell one, and Python's parser accepts it, but it is not
    Unicode text (RFC 8259 section 8.2; I-JSON, RFC 7493, forbids it): it cannot be stored or
    printed as UTF-8. Iterative, so a deep body cannot exhaust the stack here."""
    def bad(text: str) -> bool:
        return any("\ud800" <= c <= "\udfff" for c in text)

    if isinstance(body, str):
        return ("the body", None) if bad(body) else None
    stack: list[tuple[Any, str | None]] = [(body, None)]
    while stack:
        node, top = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                field = key if top is None else top
                if bad(key):
                    return ("a field name", None)
                if isinstance(value, str) and bad(value):
                    return (f"the value of {_show(field)}", field if field in ORDER_FIELDS
                            else None)
                stack.append((value, field))
        elif isinstance(node, list):
            for value in node:
                if isinstance(value, str) and bad(value):
                    return ("an array", top if top in ORDER_FIELDS else None)
                stack.append((value, top))
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_order_body(raw: bytes) -> dict[str, Any]:
    """The JSON body of ``POST /orders`` checked field by field: {itemId, qty, orderId?}."""
    if not raw.strip():
        raise ApiError(400, "body is empty; send a JSON object with itemId and qty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"body is not UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant,
                          object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ApiError(400, "body is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc.msg} at line {exc.lineno}"
                            f" column {exc.colno}") from None
    except ValueError as exc:  # NaN, Infinity, a duplicate key
        raise ApiError(400, f"body is not valid JSON: {exc}") from None
    where = _lone_surrogate(body)
    if where is not None:
        raise ApiError(400, f"body is not valid text: {where[0]} holds a lone UTF-16 surrogate"
                            " (a \\uD800-\\uDFFF escape without its pair)", where[1])
    if not isinstance(body, dict):
        raise ApiError(422, f"body must be a JSON object with itemId and qty, got {_show(body)}")
    unknown = [k for k in body if k not in ORDER_FIELDS]
    if unknown:
        # repr escapes every non-printable character; the name is cut to a sane length.
        name = unknown[0] if len(unknown[0]) <= 100 else unknown[0][:100] + "…"
        raise ApiError(422, f"unknown field {name!r} (the fields are orderId, itemId, qty)",
                       _escape(name))
    for name in ("itemId", "qty"):
        if name not in body:
            raise ApiError(422, f"{name} is required", name)
    order_id = body.get("orderId")  # null means "not given": the server makes one
    try:
        validate_order(body["itemId"], body["qty"], order_id)
    except InvalidInput as exc:
        raise invalid(exc) from None
    return {"item_id": body["itemId"], "qty": body["qty"], "order_id": order_id}


def _query_int(request: Request, name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value: Any = int(raw) if re.fullmatch(r"[+-]?[0-9]{1,15}", raw) else raw
    try:
        return check_int(name, value, minimum=minimum, maximum=maximum)
    except InvalidInput as exc:
        raise invalid(exc, 400) from None


def parse_idempotency_key(raw: str | None) -> str | None:
    """The ``Idempotency-Key`` header's key, or None when absent.

    The draft defines the value as a Structured Field string (``"…"``, RFC 8941); a bare
    value, as most clients send, is taken as it is. ``"k-1"`` and ``k-1`` are the same key.
    """
    if raw is None:
        return None
    key = raw
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        key, i, inner = "", 0, raw[1:-1]
        while i < len(inner):
            c = inner[i]
            if c == "\\" and i + 1 < len(inner) and inner[i + 1] in '"\\':
                c, i = inner[i + 1], i + 1
            elif c in '"\\' or not " " <= c <= "~":
                raise ApiError(400, "Idempotency-Key must be a string of printable ASCII"
                                    f" (RFC 8941), got {_show(raw)}", "Idempotency-Key")
            key += c
            i += 1
    try:
        return check_id("Idempotency-Key", key, max_length=MAX_KEY_LENGTH)
    except InvalidInput as exc:
        raise invalid(exc, 400) from None


class WriteRefused(Exception):
    """A write was not attempted or rolled back: answered 503, with nothing written."""


@dataclass(slots=True)
class _Write:
    """One order waiting for the write thread, and where its answer goes."""

    deadline: float  # time.monotonic() by which it must have committed
    order: dict[str, Any]
    done: Future[PlacedOrder]


MAX_RETRIES = 3


class ApiDatabase:
    """The database side of the API: a SQLite file, or a PostgreSQL schema (a
    ``postgresql://`` URL, see ``engine/store_postgres.py``).

    Writes: one connection, used by one thread (a single-thread executor, so requests queue
    in order and never tie up the pool that serves reads). Reads: a pool of connections, one
    per concurrent read, reused. ``/health``: its own connection on its own thread.

    ``outbox``: the broker is outside the store, so each order's event goes to the store's
    outbox table in the order's transaction and ``deliverylab relay`` publishes it; otherwise
    the queue table in the store's own database takes it in that transaction.
    """

    def __init__(self, path: str | Path, *, synchronous: str = DEFAULT_SYNCHRONOUS,
                 write_budget: float = WRITE_BUDGET_S, outbox: bool = False) -> None:
        self.path = str(path)
        self.dialect = for_store(self.path)
        self.dialect.check_durability(synchronous)
        self.clock, self.ids = SystemClock(), Ids()
        self.write_budget = write_budget
        # The writer and the queue table in its own database, opened together; with the
        # broker outside the store (outbox), the relay opens that broker, not the API.
        self._opened = open_store_and_broker(
            self.path, clock=self.clock, ids=self.ids, store_field="db",
            open_database=lambda url, field: self._connect(synchronous=synchronous))
        self._writer = self._opened.store
        check_schema(self._writer)
        # The file this process writes to, to notice when the path stops leading to it.
        self._identity = self.dialect.identity(self.path)
        # Read back, not assumed: what the connection that acknowledges orders really runs.
        self.synchronous = self.dialect.durability(self._writer)
        self.outbox = outbox
        self.queue: Broker | None = None
        if outbox:
            require_outbox(self._writer, "db")
        self.queue = None if outbox else self._opened.broker
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="deliverylab-write")
        self._jobs: deque[_Write] = deque()
        self.accepted = 0  # orders handed to the write thread
        self.commits = 0  # transactions committed by the write thread (orders share them)
        self._jobs_lock = threading.Lock()
        self._idle: list[Store] = []
        self._pool_lock = threading.Lock()
        self._prober = self._connect(busy_timeout=HEALTH_LOCK_WAIT_S)
        self._probes = ThreadPoolExecutor(1, thread_name_prefix="deliverylab-health")
        self._probe: Future[dict[str, Any]] | None = None
        self._probe_started = 0.0
        self._inflight: set[str] = set()
        self._inflight_lock = threading.Lock()

    # -- the database -----------------------------------------------------------------------
    def _connect(self, *, synchronous: str = DEFAULT_SYNCHRONOUS,
                 busy_timeout: float | None = None, again: bool = False) -> Store:
        """A connection to the store, with the commit durability asked for. ``again``: the
        store was open a moment ago, so a server away now is :class:`StoreUnavailable`."""
        open_ = self.dialect.reconnect if again else self.dialect.connect
        return open_(self.path, synchronous=synchronous, busy_timeout=busy_timeout)

    def file_state(self) -> str:
        """``ok``, ``deleted`` (nothing at the path: writes would go to a file that vanishes
        with this process) or ``replaced`` (another file at the path). A PostgreSQL store is
        no file: ``ok``."""
        return self.dialect.file_state(self.path, self._identity)

    def _file_gone(self) -> WriteRefused:
        return WriteRefused(f"the database file was {self.file_state()} while the API runs:"
                            " writes would go to a file no one else sees; nothing was written,"
                            " restart the API")

    # -- writes -----------------------------------------------------------------------------
    @contextmanager
    def key_in_flight(self, key: str | None) -> Iterator[None]:
        """Mark ``key`` as being processed; a second request with it meanwhile is a 409."""
        if key is None:
            yield
            return
        with self._inflight_lock:
            if key in self._inflight:
                raise ApiError(409, f"Idempotency-Key {_show(key)} is still being processed by"
                                    " an earlier request; retry once it is answered",
                               "Idempotency-Key", {"Retry-After": str(RETRY_AFTER_S)})
            self._inflight.add(key)
        try:
            yield
        finally:
            with self._inflight_lock:
                self._inflight.discard(key)

    async def place_async(self, **order: Any) -> PlacedOrder:
        """Place one order: queued for the write thread, which commits it with whatever else
        is waiting by then. Raises :class:`WriteRefused` if it could not commit in time."""
        job = _Write(time.monotonic() + self.write_budget, order, Future())
        with self._jobs_lock:
            self._jobs.append(job)
            self.accepted += 1
        self._writes.submit(self._write_batch)
        answer = asyncio.wrap_future(job.done)
        try:  # shielded: the write thread still settles the job when it can
            return await asyncio.wait_for(asyncio.shield(answer), self.write_budget + STUCK_S)
        except TimeoutError:
            self._unstick()
            raise WriteRefused(
                f"the database did not answer within {self.write_budget + STUCK_S:g} s (a"
                " server or a network that went silent): the order may or may not be"
                " written; send the same request again (with its orderId or"
                " Idempotency-Key) to learn which") from None

    def _unstick(self) -> None:
        """The write thread waits on a server that does not answer, past every timeout the
        server itself would enforce: shut its connection's socket down (``shutdown`` acts on
        the socket the thread waits on), so the wait ends as a lost connection, and the next
        write opens a new one. SQLite's waits are bounded by its busy timeout: nothing to do."""
        if self.dialect.cut(self._writer):
            log.warning("the database did not answer a write in time: its connection was"
                        " shut down, the next write opens a new one")

    def _refuse(self, jobs: list[_Write], exc: BaseException) -> None:
        for job in jobs:
            job.done.set_exception(exc)

    def _write_batch(self) -> None:
        """On the write thread: commit every waiting order in one transaction.

        Group commit, as PostgreSQL does: with ``synchronous=FULL`` each commit waits for an
        fsync, so the orders that queued up during one fsync share the next one. Each order
        runs inside a savepoint, so a conflict or a bad order rolls back that order alone;
        each gets its own answer only after the commit that made it durable. Whatever
        happens, every order taken here gets an answer: a request never waits forever."""
        with self._jobs_lock:
            batch = [self._jobs.popleft() for _ in range(min(len(self._jobs), MAX_BATCH))]
        try:
            self._commit(list(batch))
        except BaseException as exc:  # noqa: BLE001 - handed to each order's request
            refusal = self._refusal(exc)
            for job in batch:
                if not job.done.done():
                    job.done.set_exception(refusal)

    def _busy(self) -> WriteRefused:
        return WriteRefused(f"the database stayed busy for {self.write_budget:g} s (another"
                            " process holds the write lock, or this request queued behind"
                            " earlier ones); nothing was written, retry the same request")

    def _refusal(self, exc: BaseException) -> BaseException:
        """What a request whose write failed with ``exc`` is told: a :class:`WriteRefused`
        (503) when the database could not take it, else ``exc`` itself."""
        if isinstance(exc, StoreUnavailable):
            return WriteRefused(f"the database cannot be reached ({exc}); nothing was written,"
                                " retry the same request: the API reconnects by itself")
        if self.dialect.timed_out(exc):  # a lock held past the budget: nothing written, retry
            return WriteRefused(f"the database stayed busy for {self.write_budget:g} s (a"
                                " lock held by another connection); nothing was written,"
                                " retry the same request")
        if self.dialect.refuses_writes(exc):
            return WriteRefused("the database accepts no writes (a read-only server, such as"
                                " a standby); nothing was written, retry the same request")
        return exc

    def _commit(self, batch: list[_Write]) -> None:
        conn = self._writer
        retries = 0
        while batch:
            now = time.monotonic()
            late = [j for j in batch if j.deadline <= now]
            self._refuse(late, self._busy())
            batch = [j for j in batch if j.deadline > now]
            if not batch:
                return
            if self.file_state() != "ok":
                self._refuse(batch, self._file_gone())
                return
            # SQLite may wait for the lock until the earliest deadline in the batch; on a
            # timeout the orders past theirs are refused and the rest try again.
            try:
                self.dialect.wait_at_most(conn, min(j.deadline for j in batch) - now)
                conn.execute("BEGIN IMMEDIATE")
            except STORE_ERRORS as exc:
                if self.dialect.timed_out(exc):
                    continue
                if isinstance(exc, StoreUnavailable) and retries < MAX_RETRIES:
                    retries += 1  # a connection found dead: the next try opens a new one
                    continue
                raise
            committing = False
            try:
                outcomes = [(job, self._place_one(conn, job)) for job in batch]
                if self.file_state() != "ok":  # deleted while we wrote: acknowledge nothing
                    raise self._file_gone()
                committing = True
                conn.execute("COMMIT")
                self.commits += 1
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if retries < MAX_RETRIES and (
                        self.dialect.must_retry(exc)  # deadlocked with another
                        or isinstance(exc, StoreUnavailable) and not committing):  # rolled back
                    retries += 1  # nothing was written: the whole batch again
                    continue
                if committing and isinstance(exc, StoreUnavailable):
                    # The COMMIT was sent and its answer lost: it may have committed.
                    raise WriteRefused(
                        f"the connection to the database was lost while committing ({exc}):"
                        " the order may or may not be written; send the same request again"
                        " (with its orderId or Idempotency-Key) to learn which") from None
                raise
            for job, outcome in outcomes:
                if isinstance(outcome, BaseException):
                    job.done.set_exception(outcome)
                else:
                    job.done.set_result(outcome)
            return

    def _place_one(self, conn: Any, job: _Write) -> PlacedOrder | BaseException:
        """One order of the batch, under its own savepoint: what it placed, or the error that
        is its answer alone (a conflict, a bad order). What the whole batch must give up on
        (a lock past the budget, a lost connection, a deadlock) is raised."""
        for attempt in range(MAX_RETRIES + 1):
            conn.execute("SAVEPOINT one_order")
            try:
                placed = place_order(self.queue, store=conn, clock=self.clock, ids=self.ids,
                                     **job.order)
            except Exception as exc:  # noqa: BLE001 - this order's answer, not the batch's
                d = self.dialect
                if d.timed_out(exc) or isinstance(exc, StoreUnavailable) or \
                        d.must_retry(exc) or d.refuses_writes(exc):
                    raise
                conn.execute("ROLLBACK TO one_order")
                conn.execute("RELEASE one_order")
                if d.lost_race(exc) and attempt < MAX_RETRIES:
                    # Another API process on the same schema committed this order id or key
                    # after this one looked: it is committed now, so placing again reads it
                    # and answers as one API would (a replay, or a 422).
                    continue
                return exc
            conn.execute("RELEASE one_order")
            return placed
        raise AssertionError("unreachable")

    # -- reads ------------------------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[Store]:
        with self._pool_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect(again=True)
        try:
            yield conn
        except StoreUnavailable:
            # A restart or a failover ends every connection: those waiting in the pool went
            # with this one. Closed now, so the next read opens a new one at once.
            with self._pool_lock:
                idle, self._idle = self._idle, []
            for other in idle:
                other.close()
            raise
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            with self._pool_lock:
                self._idle.append(conn)

    def read(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, which reads through :meth:`reading`, and once more if the
        connection it had was found lost: a read changes nothing, so it is safe to repeat, and
        a server that restarted since the last read answers the second at once."""
        try:
            return fn(*args)
        except StoreUnavailable:
            return fn(*args)

    # -- health -----------------------------------------------------------------------------
    def _check_health(self) -> dict[str, Any]:
        state = self._probe_once()
        if state["database"] == "unreachable":  # found lost: a second probe reconnects
            state = self._probe_once()
        return state

    def _probe_once(self) -> dict[str, Any]:
        conn = self._prober
        try:
            check_schema(conn)
            orders = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
            state = self.file_state()
            if state == "ok":
                state = self._can_write(conn)
        except StoreUnavailable:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return {"database": "unreachable", "writable": False,
                    "synchronous": self.synchronous}
        except STORE_ERRORS as exc:  # even a read waited past the probe's lock timeout
            if not self.dialect.timed_out(exc):
                raise
            return {"database": "locked", "writable": False, "synchronous": self.synchronous}
        return {"database": state, "writable": state == "ok", "orders": orders,
                "synchronous": self.synchronous,
                "events": "outbox" if self.outbox else "queue table"}

    def _can_write(self, conn: Store) -> str:
        """What a write would meet now: ``ok``, ``locked`` or (PostgreSQL) ``read-only``,
        asked of the database without writing (:meth:`Dialect.probe_write`), waiting no
        longer than the probe's lock wait."""
        events = "outbox" if self.outbox else "queue_messages"
        return self.dialect.probe_write(conn, ("orders", "idempotency_keys", events))

    async def health(self) -> dict[str, Any]:
        """The database's state, from one probe shared by every caller that arrives while it
        runs, on a thread of its own: never queued behind reads or writes."""
        with self._pool_lock:
            if self._probe is None or self._probe.done():
                self._probe = self._probes.submit(self._check_health)
                self._probe_started = time.monotonic()
            elif time.monotonic() - self._probe_started > STUCK_S:
                self.dialect.cut(self._prober)  # a silent server: end the wait, probe anew
            probe = self._probe
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(probe)),
                                          HEALTH_TIMEOUT_S)
        except TimeoutError:
            return {"database": "unresponsive", "writable": False,
                    "synchronous": self.synchronous}

    def close(self) -> None:
        for conn in (self._writer, self._prober):  # a thread waiting on a silent server
            self.dialect.cut(conn)  # would hold the exit up
        self._writes.shutdown(wait=True)
        self._probes.shutdown(wait=True)
        with self._pool_lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()
        self._opened.close()  # the queue table, then the writer
        self._prober.close()


async def read_body(request: Request, limit: int = MAX_BODY_BYTES,
                    timeout: float = BODY_TIMEOUT_S,
                    stopping: asyncio.Event | None = None) -> bytes:
    """The request body, refusing more than ``limit`` bytes whatever Content-Length claims.

    The whole body must arrive within ``timeout`` seconds of the handler asking for it: a
    client that sends its headers, then the body a byte at a time or not at all, gets a 408
    and the connection is closed, instead of holding a request open for as long as it
    likes. When the server starts shutting down (``stopping`` is set), a body still on its
    way gets a 503 at once: nothing was written, the client retries elsewhere or later."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body is {int(declared)} bytes; the limit is {limit} bytes")

    async def pull() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    reader = asyncio.ensure_future(pull())
    waiters: set[asyncio.Future[Any]] = {reader}
    stop = None if stopping is None else asyncio.ensure_future(stopping.wait())
    if stop is not None:
        waiters.add(stop)
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if reader in done:
        return reader.result()
    close = {"Connection": "close"}
    if stop is not None and stop in done:
        raise ApiError(503, "the server is shutting down and this request's body had not"
                            " arrived; nothing was written, retry the same request",
                       headers={**close, "Retry-After": str(RETRY_AFTER_S)})
    raise ApiError(408, f"the body did not arrive within {timeout:g} s of the request's"
                        f" headers; nothing was written", headers=close)


def _require_json(request: Request) -> None:
    ctype = request.headers.get("content-type")
    media = (ctype or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, "content-type must be application/json, got "
                            + (_show(ctype) if ctype else "none"), "content-type")


def host_name(header: str) -> str | None:
    """The host part of a ``Host`` header, lower case, without the port; None if malformed."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[:end + 1], value[end + 1:]
    else:
        host, _, port = value.partition(":")
        rest = ":" + port if _ else ""
    if rest and not re.fullmatch(r":[0-9]{0,5}", rest):
        return None
    return host or None


def check_allowed_hosts(hosts: Iterable[str], field: str = "allowed_hosts") -> tuple[str, ...]:
    """Host names as ``Host`` carries them: ``shop.test``, ``10.0.0.5``, ``[fe80::1]`` (a bare
    IPv6 address gets its brackets), or ``*`` for any host (behind a proxy that checks it)."""
    out = []
    for host in hosts:
        check_id(field, host, max_length=255)
        name = host.strip().lower()
        try:
            name = f"[{ipaddress.IPv6Address(name)}]"
        except ValueError:
            pass
        if name != "*" and (host_name(name) != name or re.search(r"[\s/@?#]", name)):
            raise InvalidInput(field, host, "a host name or address without port, or *")
        out.append(name)
    return tuple(out)


class HostCheck:
    """Refuse a request whose ``Host`` is not one this server answers to.

    A page on any web site can have the browser resolve its own name to 127.0.0.1 (DNS
    rebinding) and then call this API as "same origin"; its requests still carry that site's
    name in ``Host``. Jupyter's server refuses them the same way."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = frozenset(allowed)
        self.any = "*" in self.allowed
        self.names = ", ".join(sorted(self.allowed, key=lambda h: (h not in LOCAL_HOSTS, h)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.any:
            raw = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            host = host_name(raw) if raw is not None else None
            client = (scope.get("client") or ("",))[0]
            if host not in self.allowed and (host, client) != TEST_CLIENT:
                error = (f"Host must be one this server answers to ({self.names}, with any"
                         " port; add names with --allowed-host), got "
                         + (_show(raw) if raw is not None else "none"))
                response = SafeJSONResponse({"ok": False, "error": error, "field": "Host"},
                                            status_code=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _from_env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def create_app(db_path: str | Path, *, synchronous: str | None = None,
               allowed_hosts: Iterable[str] | None = None,
               write_budget: float = WRITE_BUDGET_S, outbox: bool = False,
               body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
    """The API over the database at ``db_path`` (a SQLite file, or a PostgreSQL schema as a
    ``postgresql://`` URL), which must exist (``deliverylab init-db``).

    ``outbox``: the workers' broker is outside the store (``deliverylab api --broker``): each
    order's event goes to the store's outbox table, and ``deliverylab relay`` publishes it.
    Otherwise it goes to the queue table of the store's own database, in the same transaction.

    ``synchronous``: ``full`` (the default: a 201 survives a power cut) or ``normal``
    (faster; survives a crash of the process only); default from ``$DELIVERYLAB_SYNCHRONOUS``.
    ``allowed_hosts``: names accepted in ``Host`` besides 127.0.0.1, localhost and [::1],
    and those in ``$DELIVERYLAB_ALLOWED_HOSTS`` (comma-separated).
    ``write_budget``: seconds a write may take from the request's arrival before a 503.
    ``body_timeout``: seconds a request's body may take to arrive before a 408.
    """
    if synchronous is None:
        env = _from_env(SYNCHRONOUS_ENV)
        synchronous = DEFAULT_SYNCHRONOUS if env is None else check_synchronous(
            env, SYNCHRONOUS_ENV)
    synchronous = check_synchronous(synchronous)
    env = _from_env(ALLOWED_HOSTS_ENV)
    extra = check_allowed_hosts([h for h in (env or "").split(",") if h.strip()],
                                ALLOWED_HOSTS_ENV)
    extra += check_allowed_hosts(allowed_hosts or ())
    write_budget = check_number("write_budget", write_budget, minimum=0.001, maximum=60)
    body_timeout = check_number("body_timeout", body_timeout, minimum=0.001, maximum=3600)
    if not isinstance(outbox, bool):
        raise InvalidInput("outbox", outbox, "True or False")
    store = ApiDatabase(db_path, synchronous=synchronous, write_budget=write_budget, outbox=outbox)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(title="deliverylab", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=SafeJSONResponse)
    app.state.store = store
    # Set by Server when a shutdown begins: bodies still on their way are answered at once.
    app.state.stopping = asyncio.Event()
    app.add_middleware(HostCheck, allowed=tuple(dict.fromkeys(LOCAL_HOSTS + extra)))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        body: dict[str, Any] = {"ok": False, "error": exc.error}
        if exc.field is not None:
            body["field"] = exc.field
        return SafeJSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = _escape(request.url.path)
        if exc.status_code == 404:
            error = f"no route {request.method} {path}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error = f"method {request.method} is not allowed on {path}" + (
                f" (allowed: {allowed})" if allowed else "")
        else:
            error = _escape(str(exc.detail))
        return SafeJSONResponse({"ok": False, "error": error}, status_code=exc.status_code,
                                headers=exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def unreachable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return SafeJSONResponse({"ok": False, "error": f"the database cannot be reached"
                                 f" ({_escape(str(exc))}); retry later: the API reconnects by"
                                 f" itself"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # The client learns only that it failed: an exception's text can hold a server path,
        # a query or another client's data. The server (uvicorn) logs the traceback, since
        # Starlette re-raises the exception after this answer is sent.
        return SafeJSONResponse({"ok": False, "error": "internal error; the server's log has"
                                                       " the details"}, status_code=500)

    @app.post("/orders")
    async def post_order(request: Request) -> JSONResponse:
        _require_json(request)
        raw = await read_body(request, timeout=body_timeout, stopping=app.state.stopping)
        order = parse_order_body(raw)
        key = parse_idempotency_key(request.headers.get("idempotency-key"))
        with store.key_in_flight(key):
            try:
                placed = await store.place_async(idempotency_key=key, **order)
            except OrderConflict as exc:
                # The draft: a key reused with another request is 422. An order id is this
                # API's natural idempotency key (its retry is replayed like a key's), so an
                # order id reused with another body is a 422 too; 409 is kept for a key whose
                # first request is still in flight.
                raise ApiError(422, str(exc), exc.key_name) from None
            except WriteRefused as exc:
                raise ApiError(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) \
                    from None
            except InvalidInput as exc:
                raise invalid(exc) from None
        headers = None
        created = placed.created
        if placed.key_first_created is not None:  # a retry gets the first answer again
            created = placed.key_first_created
            # The draft defines no header marking a replay; this one is Stripe's convention.
            headers = {"Idempotent-Replayed": "true"}
        return SafeJSONResponse({"ok": True, "orderId": placed.order_id,
                                 "eventId": placed.event_id, "replayed": not created},
                                status_code=201 if created else 200, headers=headers)

    def _list(limit: int, offset: int) -> dict[str, Any]:
        with store.reading() as conn, snapshot(conn):
            total = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
            orders = [{"orderId": o.order_id, "itemId": o.item_id, "qty": o.qty,
                       "eventId": o.event_id, "createdAt": o.created_at}
                      for o in list_orders(conn, limit=limit, offset=offset)]
        return {"ok": True, "total": total, "limit": limit, "offset": offset, "orders": orders}

    @app.get("/orders")
    async def get_orders(request: Request) -> dict[str, Any]:
        limit = _query_int(request, "limit", 100, 1, 1000)
        offset = _query_int(request, "offset", 0, 0, 10**12)
        return await run_in_threadpool(store.read, _list, limit, offset)

    def _one(order_id: str) -> dict[str, Any] | None:
        with store.reading() as conn, snapshot(conn):
            row = conn.execute("SELECT * FROM orders WHERE order_id = ?",
                               (order_id,)).fetchone()
            return None if row is None else order_view(conn, row)

    @app.get("/orders/{order_id:path}")
    async def get_order(order_id: str) -> dict[str, Any]:
        # An id no order can have (POST refuses control and invisible characters, lone
        # surrogates, and long ids) is not looked up: PostgreSQL's text cannot even hold a
        # NUL. The answer is the one any unknown id gets, on every store.
        possible = len(order_id) <= MAX_ID_LENGTH and first_forbidden(order_id) is None
        order = await run_in_threadpool(store.read, _one, order_id) if possible else None
        if order is None:
            raise ApiError(404, f"no order {_show(order_id)}", "orderId")
        return {"ok": True, "order": order}

    def _projection() -> dict[str, Any]:
        with store.reading() as conn:
            report = collect(conn)
        return {"ok": True, "items": [
            {"itemId": i["itemId"], "reservedQty": i["projection"], "truth": i["truth"],
             "delta": i["delta"]} for i in report["items"]],
            "projectionEqualsTruth": report["check"]["projection_equals_truth"]}

    @app.get("/projection")
    async def get_projection() -> dict[str, Any]:
        return await run_in_threadpool(store.read, _projection)

    def _collect() -> dict[str, Any]:
        with store.reading() as conn:
            return collect(conn)

    @app.get("/status")
    async def get_status() -> dict[str, Any]:
        report = await run_in_threadpool(store.read, _collect)
        return {**report, "ok": True, "guaranteeHeld": report["ok"]}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(await run_in_threadpool(store.read, _metrics), media_type=metrics.CONTENT_TYPE)

    def _metrics() -> bytes:
        with store.reading() as conn:
            return metrics.exposition(metrics.signals(conn, now=time.time()))

    @app.get("/health")
    async def health() -> JSONResponse:
        state = await store.health()
        if state["writable"]:
            return SafeJSONResponse({"ok": True, "version": __version__, **state})
        problem = {"locked": "another process holds the write lock: writes get a 503",
                   "deleted": "the database file was deleted: writes are refused, restart"
                              " the API",
                   "replaced": "the database file was replaced: writes are refused, restart"
                               " the API",
                   "unresponsive": "the database did not answer in time",
                   "unreachable": "the database cannot be reached: writes get a 503 until it"
                                  " is back; the API reconnects by itself",
                   "read-only": "the database accepts no writes (a read-only server, such as"
                                " a standby): writes get a 503"}[state["database"]]
        return SafeJSONResponse({"ok": False, "version": __version__, "error": problem,
                                 **state}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})

    return app


class _QuietOnCancel:
    """The outermost layer of the served app: a request still running when the shutdown wait
    ran out is cancelled by uvicorn, which says so in one line ("Cancel N running task(s)");
    its cancellation ends here, instead of one "Exception in ASGI application" traceback per
    request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if scope["type"] != "http":
                raise
            log.debug("request %s %s cut off by the shutdown", scope.get("method"),
                      scope.get("path"))


class Server(uvicorn.Server):
    """uvicorn's server, shutting down quietly and within a bound: once told to stop, it
    stops accepting, answers every request whose body is still on its way with a 503
    (nothing written), lets the others finish (a write is answered within its budget), and
    after ``timeout_graceful_shutdown`` cuts off what is left with one line, not a traceback
    per request."""

    def __init__(self, config: uvicorn.Config) -> None:
        self.app = config.app
        if not config.loaded:
            # This module's app (ASGI 3); uvicorn's Config would also take an import string.
            config.app = _QuietOnCancel(cast(ASGIApp, config.app))
        super().__init__(config)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        stopping = getattr(getattr(self.app, "state", None), "stopping", None)
        if stopping is not None:
            stopping.set()
        await super().shutdown(sockets)
