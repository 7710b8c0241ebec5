"""The submission runs in a process of its own; the grader keeps everything it judges.

:func:`~deliverylab.course.grader.grade` forks one child process per grade (and a new one
whenever a child dies). The child runs the reader's function; the parent keeps the
database, the clock, the queue, the delivery log and the verdict. Every object the reader's
function receives that is not plain data (``ops``, a connection, a service, ``send``) is a
proxy in the child: using it sends a request down a pipe, the parent carries it out on the
real object and sends the answer back. So:

* a proxy offers only the public verbs of its object: no ``_w``, no worker, no clock, no log
  behind it (``Ops`` offers exactly its documented verbs);
* patching the grader in the child patches the child's copy: the parent judges;
* the SQL a handler or a repair runs goes through :mod:`deliverylab.course.sql`, which
  refuses writes to the grader's own tables and, inside the worker's transaction, any
  COMMIT or ROLLBACK;
* whatever the child does ends in a verdict: an exception is re-raised in the parent under
  the same type name with the submission's line; ``SystemExit``, ``KeyboardInterrupt``,
  ``os._exit``, a segfault or a budget running out end the trial as a FAIL (:class:`Ended`).

The budgets (per seed, stated in the README): :data:`SILENCE_S` seconds in which the
submission sends no request at all, :data:`RUN_S` seconds of the submission's own running
time, :data:`REQUESTS` requests to the grader's objects.

What the child sends is read with an unpickler that builds only plain data, the engine's own
data classes and proxies of the parent's objects: a child cannot make the parent run code.
"""

from __future__ import annotations

import enum
import faulthandler
import functools
import io
import linecache
import os
import pickle
import re
import select
import signal
import sqlite3
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, NoReturn

from .sql import Gate, Guard, guarded

SILENCE_S = 3.0     # the submission sends no request for this long: stopped
RUN_S = 10.0        # the submission's own running time per seed
REQUESTS = 2_000    # requests to the grader's objects per seed
BUDGETS = (f"{SILENCE_S:g} s without a request, {RUN_S:g} s of running time and"
           f" {REQUESTS:,} requests per seed")

_HEADER = struct.Struct("!I")
_DUMP_WAIT_S = 2.0  # how long the parent waits for the child's traceback dump before SIGKILL


# -- what the parent raises ------------------------------------------------------------------
class Ended(BaseException):  # noqa: N818 - ends a trial, not an error of the grader
    """The trial ends here as a FAIL with ``reason``: a budget ran out (``budget``), or the
    submission's process raised SystemExit / KeyboardInterrupt or died."""

    def __init__(self, reason: str, *, budget: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.budget = budget


class Refused(Exception):  # noqa: N818 - the grader's answer, not a bug
    """The grader refused what the submission asked (a write to its own tables, a COMMIT
    inside the worker's transaction, a private attribute)."""


class Rollback(Exception):  # noqa: N818 - raised on purpose, not an error
    """Raise inside ``ops.transaction()`` to undo it (the effect and a local ACK together)."""


class Raised(Exception):
    """An exception the submission raised in its process, raised again in the grader's
    under the same type name (so ``f"{type(e).__name__}: {e}"`` reads as the original)."""


_RAISED: dict[str, type[Raised]] = {}


def raised_type(name: str) -> type[Raised]:
    if not name.isidentifier():
        name = "Exception"
    cls = _RAISED.get(name)
    if cls is None:
        cls = _RAISED[name] = type(name, (Raised,), {"__module__": __name__})
    return cls


_AS_HANDED: dict[type[Exception], type[Raised]] = {}


def _handed(call: _Call, name: str, text: str) -> Exception | None:
    """The grader's own exception the child let through, if the one it raised is that one
    (same type name and text): a store's lock or a lost ACK the submission did not catch."""
    return next((e for e in reversed(call.handed)
                 if type(e).__name__ == name and str(e) == text), None)


def _raised(name: str, text: str, original: Exception | None) -> Raised:
    """The submission's exception, raised again in the grader: under the same type name,
    with the submission's line in its text; and, when it is one the grader raised into the
    child, also an instance of that class (with its fields), so the exercise's run catches a
    let-through ``Locked`` or ``BrokerUnavailable`` as it would without the sandbox."""
    if original is None:
        return raised_type(name)(text)
    cls = _AS_HANDED.get(type(original))
    if cls is None:
        try:
            cls = type(name, (Raised, type(original)), {"__module__": __name__})
        except TypeError:  # a layout the two cannot share: the name alone
            return raised_type(name)(text)
        _AS_HANDED[type(original)] = cls
    exc = cls.__new__(cls)
    Exception.__init__(exc, text)
    exc.__dict__.update(getattr(original, "__dict__", {}))
    return exc


class _Abort(BaseException):  # noqa: N818 - unwinds the child's call, never seen by a reader
    """In the child: the grader has ended this call (its worker crashed, the run is over)."""


# -- data that crosses the pipe --------------------------------------------------------------
class Row(tuple):  # noqa: SLOT001 - a row of a query result, in the child
    """A result row: a tuple that can also be read by column name, like ``sqlite3.Row``."""

    _keys: tuple[str, ...] = ()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._keys.index(key))
            except ValueError:
                raise IndexError(f"No item with that key: {key!r}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._keys)


class Rows:
    """What ``conn.execute`` answers in the child: the rows, fetched in the parent, read
    like a cursor (``fetchone``, ``fetchall``, iteration, ``rowcount``, ``lastrowid``)."""

    def __init__(self, rows: list[tuple[Any, ...]], names: tuple[str, ...], rowcount: int,
                 lastrowid: int | None) -> None:
        self._rows, self._names = rows, names
        self.rowcount, self.lastrowid = rowcount, lastrowid
        self.description = tuple((n, None, None, None, None, None, None) for n in names) \
            if names else None
        self._at = 0

    def _row(self, values: tuple[Any, ...]) -> Row:
        r = Row(values)
        r._keys = self._names
        return r

    def fetchone(self) -> Row | None:
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._row(self._rows[self._at - 1])

    def fetchmany(self, size: int = 1) -> list[Row]:
        out = [self._row(r) for r in self._rows[self._at:self._at + size]]
        self._at += len(out)
        return out

    def fetchall(self) -> list[Row]:
        out = [self._row(r) for r in self._rows[self._at:]]
        self._at = len(self._rows)
        return out

    def __iter__(self) -> Any:
        while (r := self.fetchone()) is not None:
            yield r

    def close(self) -> None:
        self._at = len(self._rows)


_PLAIN = (type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset,
          range, slice)


def _by_value(obj: Any) -> bool:
    """Whether ``obj`` crosses the pipe as a copy (data) rather than as a proxy."""
    if isinstance(obj, _PLAIN) and (type(obj) in _PLAIN or _is_data_type(type(obj))):
        return True
    if isinstance(obj, type | Rows | BaseException):
        return True
    return _is_data_type(type(obj))


def _is_data_type(cls: type) -> bool:
    if issubclass(cls, enum.Enum):
        return True
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):  # a NamedTuple (Delivery)
        return True
    params = getattr(cls, "__dataclass_params__", None)
    return bool(params is not None and params.frozen)


class _SafeUnpickler(pickle.Unpickler):
    """Builds plain data, the engine's own data classes, and the parent's objects the child
    refers to; nothing else (a child cannot make the parent run code)."""

    _BUILTINS = {"set": set, "frozenset": frozenset, "complex": complex, "range": range,
                 "slice": slice}

    def __init__(self, data: bytes, load: Callable[[Any], Any]) -> None:
        super().__init__(io.BytesIO(data))
        self._load = load

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in self._BUILTINS:
            return self._BUILTINS[name]
        if module.startswith("deliverylab.") and "." not in name:
            cls = getattr(sys.modules.get(module), name, None)
            if isinstance(cls, type) and (_is_data_type(cls) or cls is Row):
                return cls
        raise pickle.UnpicklingError(f"{module}.{name} is not data the grader reads")

    def persistent_load(self, pid: Any) -> Any:
        return self._load(pid)


def _frame(data: bytes) -> bytes:
    return _HEADER.pack(len(data)) + data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# -- the submission's line -------------------------------------------------------------------
def _files_of(fn: Any) -> set[str]:
    files: set[str] = set()
    for f in (fn, getattr(fn, "__wrapped__", None), getattr(fn, "func", None)):
        code = getattr(f, "__code__", None)
        if code is not None:
            files.add(code.co_filename)
    return files


def _line_text(filename: str, lineno: int) -> str:
    text = linecache.getline(filename, lineno).strip()
    return f"your line {lineno}: {text}" if text else f"your line {lineno}"


def _where_tb(tb: Any, files: set[str]) -> str:
    mine = [f for f in traceback.extract_tb(tb) if f.filename in files]
    if not mine:
        return ""
    return _line_text(mine[-1].filename, mine[-1].lineno or 0)


_DUMP_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+) in ')


def _where_dump(dump: str, files: set[str], *, current_first: bool = True) -> str:
    """The submission's line in a faulthandler dump: the first (most recent) frame in the
    submission's file of the current thread (a crash: the thread that crashed), or of the
    other threads (a dump on request: the current thread is the child's main one, which only
    reads the pipe), else of any thread."""
    current: list[tuple[str, int]] = []
    others: list[tuple[str, int]] = []
    into = others
    for line in dump.splitlines():
        if line.startswith("Current thread"):
            into = current
        elif line.startswith("Thread "):
            into = others
        elif (m := _DUMP_FRAME.match(line)) and m["file"] in files:
            into.append((m["file"], int(m["line"])))
    found = (current[:1] or others[:1]) if current_first else (others[:1] or current[:1])
    return _line_text(*found[0]) if found else ""


def describe_call(args: tuple[Any, ...], kwargs: dict[str, Any],
                  params: tuple[str, ...] = (), name: str = "function") -> str:
    """``"working on delivery 2 of order o-0003 (message m-…)"``, or ``"running your
    repair(now=3.0)"``: what the submission was doing."""
    values = list(args) + list(kwargs.values())
    names = list(params[:len(args)]) + list(kwargs)
    for v in values:
        if hasattr(v, "correlation_id") and hasattr(v, "delivery_count"):
            return (f"working on delivery {v.delivery_count} of order {v.correlation_id}"
                    f" (message {getattr(v, 'message_id', '?')})")
    shown = [f"{n}={v!r}" for n, v in zip(names, values, strict=False)
             if isinstance(v, str | int | float) and not isinstance(v, bool)
             and len(repr(v)) < 60]
    return f"running your {name}({', '.join(shown)})"


# -- the parent ------------------------------------------------------------------------------
class _Conn:
    """The parent's side of a connection handed to the submission: its SQL runs under the
    :class:`~deliverylab.course.sql.Guard`; COMMIT and ROLLBACK only if the submission was
    not called inside a transaction (a handler is: the worker owns it)."""

    def __init__(self, conn: sqlite3.Connection, call: _Call, created: set[str],
                 gate: Gate, tag: int, *, view: Any = None) -> None:
        self.conn, self.call, self.gate = conn, call, gate
        self.view = view  # a connection view: its before_statement runs outside the guard
        self.handed = conn if view is None else view
        self.inside = conn.in_transaction
        self.guard = Guard(inside=self.inside, created=created)
        # Every statement of this call gets a text of its own: SQLite checks a statement
        # when it prepares it, so the submission never runs a statement prepared for the
        # grader (or for another call) without its own check.
        self.tag = f"\n-- submission call {tag}"

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    @property
    def total_changes(self) -> int:
        return self.conn.total_changes

    def _run(self, what: Callable[[], sqlite3.Cursor], sql: str = "") -> Rows:
        if self.view is not None:
            self.view.before_statement(sql)  # the grader's own work: no guard
        self.guard.refused = ""
        self.gate.guard = self.guard
        try:
            cur = what()
            rows = [tuple(r) for r in cur.fetchall()]
        except sqlite3.DatabaseError:
            if self.guard.refused:
                self.call.refuse(f"the grader refused {self.guard.refused}")
            raise
        finally:
            self.gate.guard = None
        names = tuple(d[0] for d in cur.description) if cur.description else ()
        return Rows(rows, names, cur.rowcount, cur.lastrowid)

    def execute(self, sql: str, parameters: Any = ()) -> Rows:
        if not isinstance(sql, str):
            raise TypeError(f"execute() argument 1 must be str, not {type(sql).__name__}")
        return self._run(lambda: self.conn.execute(sql + self.tag, parameters), sql)

    def executemany(self, sql: str, seq_of_parameters: Any) -> Rows:
        if not isinstance(sql, str):
            raise TypeError(f"executemany() argument 1 must be str, not {type(sql).__name__}")
        return self._run(lambda: self.conn.executemany(sql + self.tag, seq_of_parameters),
                         sql)

    def executescript(self, script: str) -> Rows:
        if self.inside:
            self.call.refuse("the grader refused executescript() inside the worker's"
                             " transaction (it would commit it)")
        def run() -> sqlite3.Cursor:
            with guarded(self.conn, self.guard):
                return self.conn.executescript(script)
        try:
            return self._run(run)
        finally:
            self.conn.set_authorizer(self.gate)

    def _end(self, verb: str) -> None:
        if self.inside:
            self.call.refuse(
                f"the grader refused conn.{verb}() inside a handler: your handler runs inside"
                " the worker's transaction, and the worker commits it (with the ACK or the"
                " inbox row) once your handler returns; raise an exception to undo your"
                " effect")
        self.gate.guard = self.guard
        try:
            getattr(self.conn, verb)()
        finally:
            self.gate.guard = None

    def commit(self) -> None:
        self._end("commit")

    def cursor(self) -> _Cursor:
        return _Cursor(self)

    def rollback(self) -> None:
        self._end("rollback")


class _Cursor:
    """``conn.cursor()`` for the submission: its statements run through the same
    :class:`_Conn`; what they return is read from the parent (one request per fetch)."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.rows: Rows | None = None

    def _result(self) -> Rows:
        if self.rows is None:
            raise sqlite3.ProgrammingError("no statement executed on this cursor yet")
        return self.rows

    def execute(self, sql: str, parameters: Any = ()) -> _Cursor:
        self.rows = self.conn.execute(sql, parameters)
        return self

    def executemany(self, sql: str, seq_of_parameters: Any) -> _Cursor:
        self.rows = self.conn.executemany(sql, seq_of_parameters)
        return self

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._result().fetchone()
        return None if row is None else tuple(row)

    def fetchmany(self, size: int = 1) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._result().fetchmany(size)]

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._result().fetchall()]

    def close(self) -> None:
        self.rows = None

    @property
    def rowcount(self) -> int:
        return self._result().rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._result().lastrowid


_CONN_VERBS = ("execute", "executemany", "executescript", "commit", "rollback", "cursor")
_CONN_VALUES = ("in_transaction", "total_changes")
_CURSOR_VERBS = ("execute", "executemany", "fetchone", "fetchmany", "fetchall", "close")
_CURSOR_VALUES = ("rowcount", "lastrowid")
# type name -> the public names a proxy of it offers (others: every public name)
EXPOSED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Ops": (("apply", "ack", "extend", "nack", "work", "transaction", "now"),
            ("visibility_timeout", "work_left", "Rollback")),
    # The payment service behind its lossy network: its verbs (a charge, the provider's
    # ledger), not the service.
    "FlakyPayments": (("charge", "find_charges"), ()),
    # The lab's clock, handed to a nightly job: it reads the time, it does not move it.
    "FakeClock": (("now",), ()),
}


def _methods_of(obj: Any) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """(methods, readable values or None for any public one) a proxy of ``obj`` offers."""
    if isinstance(obj, _Conn):
        return _CONN_VERBS, _CONN_VALUES
    if isinstance(obj, _Cursor):
        return _CURSOR_VERBS, _CURSOR_VALUES
    exposed = EXPOSED.get(type(obj).__name__)
    if exposed is not None:
        return exposed
    cls = type(obj)
    methods = tuple(n for n in dir(cls) if not n.startswith("_")
                    and callable(getattr(cls, n, None))
                    and not isinstance(getattr(cls, n, None), type)
                    and not isinstance(obj, type))
    return methods, None


class _Call:
    def __init__(self, cid: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.cid, self.args, self.kwargs = cid, args, kwargs
        self.refused = ""
        self.handed: list[Exception] = []  # the grader's exceptions raised in the child

    def refuse(self, text: str) -> None:
        if not self.refused:
            self.refused = text
        raise Refused(text)


class Sandbox:
    """Runs ``submission`` in a child process for one grade; :meth:`function` is what the
    exercise's run calls in its place. Use as a context manager (the child ends with it)."""

    def __init__(self, submission: Callable[..., Any], params: tuple[str, ...] = (), *,
                 requests: int = REQUESTS) -> None:
        self.submission = submission
        self.params = params
        self.files = _files_of(submission)
        self.max_requests = requests
        self.child: _Child | None = None
        self.requests = 0
        self.running = 0.0
        self.budget_ended = ""
        self.output: Any = None  # where the child's prints go (sys.stdout at call time)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child = None

    def new_trial(self) -> None:
        self.requests = 0
        self.running = 0.0
        if self.child is not None:
            self.child.handles.clear()
            self.child.ids.clear()
            self.child.created.clear()
            self.child.ungate()

    def function(self) -> Callable[..., Any]:
        @functools.wraps(self.submission)
        def sandboxed(*args: Any, **kwargs: Any) -> Any:
            return self.call(args, kwargs)
        return sandboxed

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.child is None or self.child.dead:
            if self.child is not None:
                self.child.kill()
            self.child = _Child(self)
        return self.child.call(args, kwargs)


class _Child:
    def __init__(self, box: Sandbox) -> None:
        self.box = box
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child (measured by the tests' verdicts)
            try:
                os.close(down_w)
                os.close(up_r)
                os.close(err_r)
                _child_main(box.submission, down_r, up_w, err_w)
            finally:
                os._exit(70)
        os.close(down_r)
        os.close(up_w)
        os.close(err_w)
        os.set_blocking(err_r, False)
        self.pid, self.down, self.up, self.err = pid, down_w, up_r, err_r
        self.handles: dict[int, Any] = {}
        self.ids: dict[int, int] = {}
        self.created: set[str] = set()
        self.gates: dict[int, tuple[sqlite3.Connection, Gate]] = {}
        self.next_id = 0
        self.next_cid = 0
        self.parked: dict[int, deque[tuple[Any, ...]]] = {}
        self.exiting = ""   # what os._exit said before it ended the child
        self.caught = ""    # where the child caught its worker's crash and went on
        self.dead = ""      # why the child is gone
        self.dump = ""
        self.buffer = bytearray()

    # -- the pipe --
    def _pickle(self, msg: Any, call: _Call | None) -> bytes:
        buf = io.BytesIO()
        p = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
        # pickle looks persistent_id up on the instance: set there, it needs no subclass.
        p.persistent_id = lambda obj: self._ref(obj, call)  # type: ignore[method-assign]
        p.dump(msg)
        return buf.getvalue()

    def _ref(self, obj: Any, call: _Call | None) -> Any:
        if _by_value(obj):
            return None
        if isinstance(obj, sqlite3.Row):
            return ("row", tuple(obj), tuple(obj.keys()))
        if isinstance(obj, sqlite3.Connection) or getattr(type(obj), "connection_view", False):
            if call is None:
                raise Refused("a connection outside a call")
            # A view (the nemesis's connection) runs its own step before each statement, in
            # the parent and outside the guard; the statement itself runs on the real one.
            view = None if isinstance(obj, sqlite3.Connection) else obj
            real = obj if view is None else view.connection
            gate = self.gates.get(id(real))
            if gate is None or gate[0] is not real:
                gate = self.gates[id(real)] = (real, Gate())
                real.set_authorizer(gate[1])  # once per connection and trial
            self.next_id += 1
            obj = _Conn(real, call, self.created, gate[1], self.next_id, view=view)
        hid = self.ids.get(id(obj))
        if hid is None:
            self.next_id += 1
            hid = self.next_id
            self.handles[hid] = obj
            self.ids[id(obj)] = hid
        methods, values = _methods_of(obj)
        name = {_Conn: "Connection", _Cursor: "Cursor"}.get(type(obj), type(obj).__name__)
        return ("ref", hid, name, methods, values, callable(obj), hasattr(obj, "__enter__"))

    def _load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "ref":
            obj = self.handles.get(pid[1])
            if obj is None:
                raise pickle.UnpicklingError("an object from an earlier run")
            return obj.handed if isinstance(obj, _Conn) else obj
        if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "row":
            return tuple(pid[1])
        raise pickle.UnpicklingError("not a reference")

    def send(self, msg: Any, call: _Call | None = None) -> None:
        _write_all(self.down, _frame(self._pickle(msg, call)))

    def _send_quiet(self, msg: Any) -> None:
        try:
            self.send(msg)
        except OSError:
            pass

    def _read(self, n: int, call: _Call) -> bytes | None:
        """``n`` bytes from the child (None: it died), reading ahead what is there."""
        while len(self.buffer) < n:
            wait = min(SILENCE_S, max(0.0, RUN_S - self.box.running))
            t0 = time.perf_counter()
            ready = select.select([self.up], [], [], wait)[0]
            self.box.running += time.perf_counter() - t0
            if not ready:
                if self.box.running >= RUN_S - 1e-6:
                    self._budget(call, f"{RUN_S:g} s of running time on this seed")
                self._budget(call, f"{SILENCE_S:g} s without a single request to the grader"
                                   " (a loop that never returns, a busy loop or a sleep)")
            chunk = os.read(self.up, max(65536, n - len(self.buffer)))
            if not chunk:
                return None
            self.buffer += chunk
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def _next(self, call: _Call) -> tuple[Any, ...]:
        """The next message for ``call`` (others' are parked for them)."""
        parked = self.parked.get(call.cid)
        if parked:
            return parked.popleft()
        while True:
            head = self._read(_HEADER.size, call)
            body = None if head is None else self._read(_HEADER.unpack(head)[0], call)
            if body is None:
                self._died(call)
            try:
                msg = _SafeUnpickler(body, self._load).load()
            except Exception as exc:  # noqa: BLE001 - whatever the child sent, a verdict
                self.kill()
                raise Ended(f"your code sent the grader something it does not read ({exc})"
                            f" while {self._what(call)}") from None
            if not isinstance(msg, tuple) or len(msg) < 2:
                continue
            if msg[0] == "out":
                self._print(msg[1])
                continue
            if msg[0] == "exit":
                self.exiting = str(msg[1])
                continue
            if msg[0] == "caught":
                self.caught = str(msg[1])
                continue
            if msg[1] == call.cid:
                return msg
            self.parked.setdefault(msg[1], deque()).append(msg)

    def _print(self, text: Any) -> None:
        if isinstance(text, str):
            sys.stdout.write(text)

    def _what(self, call: _Call) -> str:
        return describe_call(call.args, call.kwargs, self.box.params,
                             getattr(self.box.submission, "__name__", "function"))

    def _budget(self, call: _Call, what: str) -> None:
        where = self._stop_with_dump()
        self.box.budget_ended = what
        raise Ended(f"your code ran past the grader's budget: {what}{_paren(where)}, while"
                    f" {self._what(call)} (the budgets: {BUDGETS})", budget=True)

    def _stop_with_dump(self) -> str:
        try:
            os.kill(self.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + _DUMP_WAIT_S
        while time.monotonic() < deadline:
            self._drain_err()
            if self.box.files and any(f in self.dump for f in self.box.files):
                break
            time.sleep(0.02)
        self.kill()
        return _where_dump(self.dump, self.box.files, current_first=False)

    def _drain_err(self) -> None:
        try:
            while chunk := os.read(self.err, 65536):
                self.dump += chunk.decode(errors="replace")
        except (BlockingIOError, OSError):
            pass

    def _died(self, call: _Call) -> NoReturn:
        status = self._reap()
        self._drain_err()
        where = _where_dump(self.dump, self.box.files)
        if self.caught or (not self.exiting and self._caught_later()):
            what = ("your code went on calling the grader after its worker's simulated crash"
                    " (it caught the crash, or called from a finally block): a crash ends the"
                    " worker, nothing after it runs")
            where = self.caught or where
        elif self.exiting:
            what = f"your code called os._exit({self.exiting.split(' ', 1)[0]})"
            where = self.exiting.split(" ", 1)[1] if " " in self.exiting else where
        elif status is not None and os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            what = f"your code's process died of {name}"
        elif status is not None and os.WIFEXITED(status):
            what = f"your code's process ended with exit code {os.WEXITSTATUS(status)}"
        else:
            what = "your code's process ended"
        self.dead = what
        raise Ended(f"{what}{_paren(where)}, while {self._what(call)}")

    def _caught_later(self) -> bool:
        """Read what the child sent before it died (its last words may be unread)."""
        try:
            while select.select([self.up], [], [], 0)[0]:
                chunk = os.read(self.up, 65536)
                if not chunk:
                    break
                self.buffer += chunk
        except OSError:
            return False
        while len(self.buffer) >= _HEADER.size:
            n = _HEADER.unpack(self.buffer[:_HEADER.size])[0]
            if len(self.buffer) < _HEADER.size + n:
                break
            body = bytes(self.buffer[_HEADER.size:_HEADER.size + n])
            del self.buffer[:_HEADER.size + n]
            try:
                msg = _SafeUnpickler(body, self._load).load()
            except Exception:  # noqa: BLE001 - garbage from a dying child: ignore it
                continue
            if isinstance(msg, tuple) and msg and msg[0] == "caught":
                self.caught = str(msg[1])
        return bool(self.caught)

    def _reap(self) -> int | None:
        try:
            for _ in range(100):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    return status
                time.sleep(0.01)
            os.kill(self.pid, signal.SIGKILL)
            return os.waitpid(self.pid, 0)[1]
        except ChildProcessError:
            return None

    def ungate(self) -> None:
        """Take the authorizers off the trial's connections (a lab may outlive its trial)."""
        for conn, _ in self.gates.values():
            try:
                conn.set_authorizer(None)
            except sqlite3.ProgrammingError:  # closed already
                pass
        self.gates.clear()

    def kill(self) -> None:
        self.ungate()
        if not self.dead:
            self.dead = "ended by the grader"
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for fd in (self.down, self.up, self.err):
            try:
                os.close(fd)
            except OSError:
                pass
        self.down = self.up = self.err = -1

    # -- one call --
    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.next_cid += 1
        call = _Call(self.next_cid, args, kwargs)
        try:
            self.send(("call", call.cid, args, kwargs), call)
        except OSError:
            self._died(call)
        while True:
            msg = self._next(call)
            kind = msg[0]
            if kind == "req":
                self._serve(call, msg)
            elif kind == "done":
                if call.refused:
                    raise raised_type("Refused")(call.refused)
                return msg[2]
            elif kind == "raised":
                _, _, name, text, where, is_error = msg
                if call.refused:
                    raise raised_type("Refused")(call.refused)
                if not is_error:
                    self.kill()
                    raise Ended(f"your code raised {name}{'(' + text + ')' if text else ''}"
                                f"{_paren(where)}, while {self._what(call)}")
                what = self._what(call)
                if not what.startswith("working on delivery"):  # a handler's is named by its run
                    where = f"{where}, while {what}" if where else f"while {what}"
                raise _raised(name, f"{text}{_paren(where)}", _handed(call, name, text))

    def _serve(self, call: _Call, msg: tuple[Any, ...]) -> None:
        _, cid, op, hid, name, args, kwargs = msg
        self.box.requests += 1
        if self.box.requests > self.box.max_requests:
            self._budget(call, f"more than {self.box.max_requests:,} requests to the grader on"
                               " this seed (a retry without end?)")
        try:
            result = self._do(op, hid, name, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - the submission's mistake: raised in the child
            call.handed.append(exc)
            self._answer(("error", cid, _portable(exc)), call)
            return
        except BaseException as exc:  # the worker crashed, the run is over, ...
            self._send_quiet(("abort", cid, type(exc).__name__ == "Crashed"))
            raise
        self._answer(("reply", cid, result), call)

    def _answer(self, msg: tuple[Any, ...], call: _Call) -> None:
        try:
            data = _frame(self._pickle(msg, call))
        except Exception as exc:  # noqa: BLE001 - a value that cannot cross the pipe
            data = _frame(self._pickle(("error", msg[1], ("TypeError", "the grader cannot"
                                        f" hand this value to your code: {exc}")), call))
        try:
            _write_all(self.down, data)
        except OSError:  # the child is gone: say how
            self._died(call)

    def _do(self, op: str, hid: int, name: Any, args: Any, kwargs: Any) -> Any:
        obj = self.handles.get(hid)
        if obj is None:
            raise Refused("this object belongs to an earlier run: the grader hands out new"
                          " ones on every call")
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise Refused("a malformed request")
        methods, values = _methods_of(obj)
        if op == "call":
            if name is None:
                if not callable(obj):
                    raise TypeError(f"a {type(obj).__name__} is not callable")
                return obj(*args, **kwargs)
            if name not in methods:
                raise AttributeError(f"{type(obj).__name__} offers no {name}()")
            return getattr(obj, name)(*args, **kwargs)
        if op == "get":
            if not isinstance(name, str) or name.startswith("_") or (
                    values is not None and name not in values):
                raise AttributeError(f"{type(obj).__name__} offers no {name!r}")
            return getattr(obj, name)
        if op == "enter":
            return obj.__enter__()
        if op == "exit":
            exc = _rebuild(args[0]) if args else None
            return bool(obj.__exit__(type(exc) if exc else None, exc, None))
        raise Refused(f"no such request {op!r}")


def _paren(where: str) -> str:
    return f" ({where})" if where else ""


def _portable(exc: Exception) -> Any:
    """``exc`` as the child can raise it: itself if it pickles, else its type name, its text
    and the nearest built-in exception it is (``InvalidInput`` is a ``ValueError``), so that
    an ``except ValueError`` in the submission catches it as it would without the sandbox."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception type may come from the grader's objects
        return (type(exc).__name__, str(exc), _builtin_base(type(exc)))


def _builtin_base(cls: type[BaseException]) -> str:
    """The name of the first built-in ``Exception`` subclass in ``cls``'s MRO."""
    import builtins

    return next((c.__name__ for c in cls.__mro__ if getattr(builtins, c.__name__, None) is c
                 and issubclass(c, Exception)), "Exception")


def _child_error(err: tuple[Any, ...]) -> Exception:
    """In the child: an exception from its type name, text and built-in base (if named)."""
    import builtins

    name = str(err[0]) if str(err[0]).isidentifier() else "Exception"
    base = getattr(builtins, str(err[2]), Exception) if len(err) > 2 else Exception
    if not (isinstance(base, type) and issubclass(base, Exception)):
        base = Exception
    return type(name, (base,), {})(err[1])


def _rebuild(info: Any) -> BaseException | None:
    """The exception leaving a ``with`` block in the child, for the parent's ``__exit__``."""
    if info is None:
        return None
    name, text, rollback = info
    if rollback:
        return Rollback(str(text))
    return raised_type(str(name))(str(text))


# -- the child -------------------------------------------------------------------------------
class _Link:
    """The child's end of the pipes."""

    def __init__(self, down: int, up: int) -> None:
        self.down, self.up = down, up
        self.lock = threading.Lock()
        self.queues: dict[int, SimpleQueue[tuple[Any, ...]]] = {}
        self.local = threading.local()
        self.aborted: dict[int, bool] = {}  # cid -> ended by its worker's crash
        self.idle: list[SimpleQueue[tuple[Any, ...]]] = []
        self.files: set[str] = set()

    def send(self, msg: Any) -> None:
        buf = io.BytesIO()
        p = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
        p.persistent_id = _child_ref  # type: ignore[method-assign]  # as in _pickle
        p.dump(msg)
        data = _frame(buf.getvalue())
        with self.lock:
            _write_all(self.up, data)

    def recv(self) -> Any:
        head = self._exact(_HEADER.size)
        if head is None:
            return None
        body = self._exact(_HEADER.unpack(head)[0])
        if body is None:
            return None
        u = pickle.Unpickler(io.BytesIO(body))
        u.persistent_load = _child_load  # type: ignore[method-assign]  # as in _pickle
        return u.load()

    def _exact(self, n: int) -> bytes | None:
        out = b""
        while len(out) < n:
            chunk = os.read(self.down, n - len(out))
            if not chunk:
                return None
            out += chunk
        return out

    def request(self, op: str, hid: int, name: Any, args: tuple[Any, ...] = (),
                kwargs: dict[str, Any] | None = None) -> Any:
        cid = getattr(self.local, "cid", None)
        if cid is None:
            raise Refused("the grader's objects answer only the thread your function was"
                          " called in")
        if cid in self.aborted:
            if self.aborted[cid] and isinstance(sys.exc_info()[1], _Abort):
                # A ``with`` block's exit or a ``finally`` on the crash's way out (such as
                # ``with transaction(store):`` rolling back): a dead process runs none of
                # them, so the request does nothing and the crash goes on unwinding.
                raise _Abort()
            if self.aborted[cid]:  # it goes on after its own worker's crash: the end
                self.send(("caught", _where_tb_stack(self.files)))
                _REAL_EXIT(0)
            raise _Abort()
        self.send(("req", cid, op, hid, name, args, kwargs or {}))
        msg = self.queues[cid].get()
        if msg[0] == "reply":
            return msg[2]
        if msg[0] == "error":
            err = msg[2]
            if isinstance(err, BaseException):
                raise err
            raise _child_error(err)
        self.aborted[cid] = bool(msg[2]) if len(msg) > 2 else False
        raise _Abort()


_LINK: _Link | None = None
_REAL_EXIT = os._exit


class Remote:
    """In the child: one of the grader's objects. Its public verbs are requests to the
    parent; nothing private is behind it."""

    __slots__ = ("_hid", "_type", "_methods", "_values", "_callable", "_context")

    def __init__(self, hid: int, type_name: str, methods: tuple[str, ...],
                 values: tuple[str, ...] | None, is_callable: bool, context: bool) -> None:
        object.__setattr__(self, "_hid", hid)
        object.__setattr__(self, "_type", type_name)
        object.__setattr__(self, "_methods", methods)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_callable", is_callable)
        object.__setattr__(self, "_context", context)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(f"{self._type} offers only its public verbs, not {name!r}:"
                                 " the grader's internals stay in the grader's process")
        if name in self._methods:
            hid = self._hid

            def verb(*args: Any, **kwargs: Any) -> Any:
                return _link().request("call", hid, name, args, kwargs)

            verb.__name__ = name
            return verb
        if self._values is not None and name not in self._values:
            raise AttributeError(f"{self._type} offers no {name!r} (it offers "
                                 + ", ".join([*self._methods, *self._values]) + ")")
        return _link().request("get", self._hid, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self._type} is the grader's: your code cannot set {name!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._callable:
            raise TypeError(f"'{self._type}' object is not callable")
        return _link().request("call", self._hid, None, args, kwargs)

    def __enter__(self) -> Any:
        if not self._context:
            raise TypeError(f"'{self._type}' object is not a context manager")
        return _link().request("enter", self._hid, None)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if isinstance(exc, _Abort):
            return False
        info = None if exc is None else (type(exc).__name__, str(exc), isinstance(exc, Rollback))
        return bool(_link().request("exit", self._hid, None, (info,)))

    def __repr__(self) -> str:
        return f"<{self._type} of the grader>"


def _link() -> _Link:
    if _LINK is None:
        raise Refused("this object belongs to the grader's process")
    return _LINK


def _child_ref(obj: Any) -> Any:
    if isinstance(obj, Remote):
        return ("ref", object.__getattribute__(obj, "_hid"))
    if isinstance(obj, Row):
        return ("row", tuple(obj))
    return None


def _child_load(pid: Any) -> Any:
    if pid[0] == "ref":
        return Remote(*pid[1:])
    row = Row(pid[1])
    row._keys = pid[2]
    return row


class _Out(io.TextIOBase):
    """The child's stdout and stderr: what the submission prints shows in the parent."""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if _LINK is not None and s:
            _LINK.send(("out", str(s)))
        return len(s)


def _child_main(submission: Callable[..., Any], down: int, up: int, err: int) -> None:
    global _LINK
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    errfile = os.fdopen(err, "w")
    faulthandler.enable(file=errfile, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=errfile, all_threads=True)
    link = _LINK = _Link(down, up)
    sys.stdout = sys.stderr = _Out()
    files = link.files = _files_of(submission)
    real_exit = os._exit

    def _exit(status: int) -> NoReturn:
        where = _where_tb_stack(files)
        try:
            link.send(("exit", f"{status} {where}" if where else f"{status}"))
        finally:
            real_exit(status)

    os._exit = _exit
    while True:
        msg = link.recv()
        if msg is None:
            real_exit(0)
        kind, cid = msg[0], msg[1]
        if kind == "call":
            link.queues[cid] = SimpleQueue()
            if link.idle:
                link.idle.pop().put(msg)
            else:
                jobs: SimpleQueue[tuple[Any, ...]] = SimpleQueue()
                jobs.put(msg)
                threading.Thread(target=_child_thread, args=(link, submission, files, jobs),
                                 daemon=True).start()
        elif cid in link.queues:
            link.queues[cid].put(msg)


def _child_thread(link: _Link, submission: Callable[..., Any], files: set[str],
                  jobs: SimpleQueue[tuple[Any, ...]]) -> None:
    """One of the child's threads: runs calls one after the other (a call paused in
    ``ops.work`` holds its thread; the next call gets another)."""
    while True:
        _, cid, args, kwargs = jobs.get()
        _child_call(link, submission, files, cid, args, kwargs)
        link.idle.append(jobs)


def _where_tb_stack(files: set[str]) -> str:
    mine = [f for f in traceback.extract_stack() if f.filename in files]
    return _line_text(mine[-1].filename, mine[-1].lineno or 0) if mine else ""


def _child_call(link: _Link, submission: Callable[..., Any], files: set[str], cid: int,
                args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    link.local.cid = cid
    try:
        value = submission(*args, **kwargs)
    except _Abort:
        return
    except BaseException as exc:  # noqa: BLE001 - every ending of the submission is reported
        link.send(("raised", cid, type(exc).__name__, _text(exc),
                   _where_tb(exc.__traceback__, files), isinstance(exc, Exception)))
        return
    finally:
        link.queues.pop(cid, None)
    try:
        link.send(("done", cid, value))
    except Exception:  # noqa: BLE001 - a value the grader cannot read
        link.send(("raised", cid, "TypeError", f"your function returned a {type(value).__name__},"
                   " which the grader cannot read (return plain values: numbers, text,"
                   " lists, tuples, dicts)", "", True))


def _text(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return "" if exc.code is None else repr(exc.code)
    if isinstance(exc, KeyboardInterrupt) and not exc.args:
        return ""
    return str(exc)
