"""The ``deliverylab`` command: the lab as real processes, one terminal each.

::

    deliverylab init-db                       # data/app.db (or --db PATH, or DELIVERYLAB_DB)
    deliverylab api                           # http://127.0.0.1:3000
    ACK_FAIL_RATE=0.8 deliverylab worker      # one line per step; Ctrl-C stops it cleanly
    deliverylab worker --mode at-most-once --ack-answer-lost-rate 0.3   # loses orders, no crash
    deliverylab order --item coffee-beans --qty 1 --order-id o-001
    deliverylab status                        # queue, inbox, projection vs truth, verdict
    deliverylab trace o-001                   # every delivery of that order's event
    deliverylab reconcile [--dry-run]         # the drift, then the repair
    deliverylab redrive                       # dead letters back to the queue
    deliverylab drop --count 3                # lose queued messages on purpose
    deliverylab cluster start|status|stop     # three NATS JetStream servers on this machine
    deliverylab cleanup --store PATH --yes    # remove a lab's store and broker, any engine

Bad input exits with status 2 and a message naming the flag (or variable) and its value;
nothing is written. A failure at run time (the API is down, the server said no) exits with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import secrets
import signal
import socket
import stat
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from .. import __version__
from ..brokers.base import Broker, BrokerGone
from ..engine.display import safe_json, safe_text
from ..engine.errors import STORE_ERRORS, InvalidInput, check_int, check_number, check_text
from ..engine.faults import FAULT_POINTS
from ..engine.orders import MAX_ID_LENGTH, MAX_QTY
from ..engine.settings import DEFAULT_MAX_RECEIVES, WorkerSettings
from ..engine.store import SQLiteTooOld
from .redact import hide_secrets

DEFAULT_DB = "data/app.db"
DEFAULT_URL = "http://127.0.0.1:3000"
DEFAULT_CLUSTER_DIR = "data/nats-cluster"
WORKER_DEFAULTS = WorkerSettings()  # the worker's defaults, written once, in engine/settings.py
DEFAULT_VISIBILITY_TIMEOUT = WORKER_DEFAULTS.visibility_timeout
DB_ENV = "DELIVERYLAB_DB"
URL_ENV = "DELIVERYLAB_URL"
# One flag and one environment variable per fault point: --ack-fail-rate / ACK_FAIL_RATE, …
RATE_FLAGS = {p: "--" + p.replace("_", "-") + "-rate" for p in FAULT_POINTS}
RATE_ENVS = {p: p.upper() + "_RATE" for p in FAULT_POINTS}
# What each flag does to a delivery, for --help. The two halves of a lost ACK look the same to
# the worker (both are an ACK with no answer); only what the queue did differs.
RATE_HELP = {
    "ack_fail": "the ACK request is lost on the way: the queue never hears it, and the message"
                " comes back when its lease runs out",
    "ack_answer_lost": "the other half of a lost ACK: the queue deletes the message, but its"
                       " answer is lost; the worker sees the same failure as --ack-fail-rate,"
                       " and nothing comes back",
    "crash_after_receive": "the worker dies holding the lease, before the effect (after the ACK"
                           " in at-most-once mode)",
    "crash_after_commit": "the effect committed; the worker dies before the ACK",
    "process_error": "the handler raises; the message is retried with backoff",
    "lose_message": "the queue forgets the message before any work happens (an auto-ack broker)",
}
# The commands that only read, and so work on a database nobody here may write.
READERS = "'deliverylab status', 'deliverylab trace' and 'deliverylab reconcile --dry-run'"


class UsageError(Exception):
    """Bad input from the command line or the environment: exit status 2, nothing written."""


class Failure(Exception):
    """Something went wrong at run time: exit status 1."""


# -- argument types: the engine's rules, with argparse naming the flag -------------------------
def _typed(parse: Callable[[str], Any], check: Callable[[Any], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = text
        try:
            return check(value)
        except InvalidInput as exc:
            raise argparse.ArgumentTypeError(f"must be {exc.expected}, got {text!r}") from None
    return convert


def _int_arg(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    return _typed(int, lambda v: check_int("value", v, minimum=minimum, maximum=maximum))


def _num_arg(minimum: float | None = None, maximum: float | None = None) -> Callable[[str], float]:
    return _typed(float, lambda v: check_number("value", v, minimum=minimum, maximum=maximum))


def _utf8(text: str) -> str:
    """Bytes that are not UTF-8 reach Python as lone surrogates (PEP 383): refuse them here,
    showing the bytes, rather than fail deep inside SQLite or ``print``."""
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise argparse.ArgumentTypeError(
            f"must be valid UTF-8, got {os.fsencode(text)!r}") from None
    return text


def _text_arg(max_length: int = MAX_ID_LENGTH, *,
              printable: bool = True) -> Callable[[str], str]:
    """Non-empty UTF-8 text of at most ``max_length`` characters; with ``printable``, also
    without control characters (a name or an id written to the database and printed)."""
    check = _typed(str, lambda v: check_text("value", v, max_length=max_length))

    def convert(text: str) -> str:
        value = check(_utf8(text))
        if printable and not value.isprintable():
            raise argparse.ArgumentTypeError(
                f"must be printable text, without control characters, got {value!r}")
        return value
    return convert


def _path_text(text: str) -> str:
    """A file path: UTF-8 (SQLite takes file names as UTF-8), non-empty."""
    _utf8(text)
    if not text.strip() or len(text) > 4096 or "\0" in text:
        raise argparse.ArgumentTypeError(
            f"must be a file path (1 to 4096 characters), got {text!r}")
    return text


_HEADER_VALUE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,198}[\x21-\x7e])?$")


def _key_arg(text: str) -> str:
    """An ``Idempotency-Key`` header value: 1 to 200 visible ASCII characters (inner spaces
    allowed). HTTP sends header values as bytes, and a newline would end the header."""
    _utf8(text)
    if not _HEADER_VALUE.match(text):
        raise argparse.ArgumentTypeError(
            f"must be 1 to 200 visible ASCII characters (letters, digits, punctuation; inner"
            f" spaces allowed), got {text!r}")
    return text


def _rate(text: str, where: str) -> float:
    try:
        value: Any = float(text)
    except ValueError:
        value = text
    try:
        return check_number(where, value, minimum=0.0, maximum=1.0)
    except InvalidInput:
        raise UsageError(f"{where} must be a number in [0, 1], got {text!r}") from None


# -- the database -----------------------------------------------------------------------------
def db_path(args: argparse.Namespace) -> Path:
    if args.db is not None:
        return Path(args.db)
    env = os.environ.get(DB_ENV, "")
    if not env.strip():
        return Path(DEFAULT_DB)
    try:
        return Path(_path_text(env))
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{DB_ENV} {exc}") from None


def db_url(args: argparse.Namespace) -> str | None:
    """The PostgreSQL URL ``--db`` (or the environment) names, None for a SQLite file."""
    from ..engine.store_postgres import is_url

    text = args.db if args.db is not None else os.environ.get(DB_ENV, "").strip()
    return text if is_url(text) else None


def db_label(args: argparse.Namespace) -> str:
    """The database as the user named it, to print: a file path, or a PostgreSQL URL kept
    whole but for its password."""
    return hide_secrets(db_url(args) or str(db_path(args)))


def store_flag(args: argparse.Namespace) -> None:
    """``--store`` is ``--db`` (the consumer's database); both given must name the same."""
    if getattr(args, "store", None) is None:
        return
    if args.db is not None and args.db != args.store:
        raise UsageError(f"--store and --db name the same thing, the consumer's database;"
                         f" got {args.store!r} and {args.db!r}")
    args.db, args.flag = args.store, "--store"


def store_value(args: argparse.Namespace) -> str:
    """The store as the user named it: ``--db`` (or ``--store``), else the environment, else
    the default file."""
    return db_url(args) or str(db_path(args))


def open_lab(args: argparse.Namespace, *, write: bool = True, broker: bool = True,
             **kw: Any) -> Any:
    """The store the command names and the broker ``--broker`` names (without it, or with
    ``broker=False``: the queue table of the store's own database), opened together by
    :func:`deliverylab.brokers.registry.open_store_and_broker`, each database with this
    command's checks and words (:func:`_database`). ``kw`` (clock, ids, max_receives, worker,
    create) goes to the opener; ``create=False`` (status, redrive, drop): a broker URL's queue
    or stream must exist, nothing is created. A queue in another database writes no trace of
    its own: the command writes the rows into the store, as the worker does."""
    from ..brokers.registry import open_store_and_broker
    from ..engine.clock import SystemClock
    from ..engine.ids import Ids

    kw.setdefault("clock", SystemClock())
    kw.setdefault("ids", Ids())
    return open_store_and_broker(
        store_value(args), getattr(args, "broker", None) if broker else None,
        store_field=_where(args), broker_field="--broker",
        open_database=lambda value, where: _database(args, value, where,
                                                     write=write or where == "--broker"),
        **kw)


def _broker_label(opened: Any) -> str | None:
    """The broker as the user named it, password hidden; None for the store's queue table."""
    return None if opened.joined else hide_secrets(opened.broker_url)


def _where(args: argparse.Namespace) -> str:
    return getattr(args, "flag", "--db") if args.db is not None else (DB_ENV if os.environ.get(DB_ENV, "").strip()
                                               else "the default database")


def _kind(path: Path) -> str:
    """What a path that is not a regular file is, in words."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return exc.strerror or "not reachable"
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"


def _busy_timeout(args: argparse.Namespace) -> float:
    from ..engine.store import BUSY_TIMEOUT_S

    value = getattr(args, "busy_timeout", None)
    return BUSY_TIMEOUT_S if value is None else value


def _database(args: argparse.Namespace, value: str, where: str, *, write: bool = True) -> Any:
    """Open the database ``value`` (a file or a PostgreSQL URL, named by ``where``: the flag
    or variable) through :func:`deliverylab.brokers.registry.open_store`, or explain how to
    make one. ``write=False`` (status, trace) opens a file nobody here may write read-only
    instead of refusing it; every other command names why the file cannot be written."""
    from ..brokers.registry import NotALabDatabase, open_store
    from ..engine.store import why_read_only
    from ..engine.store_postgres import is_url

    # --busy-timeout is PostgreSQL's lock_timeout: a lock held elsewhere past it ends the
    # statement with "lock not available", which exits 2 "locked", as on SQLite.
    if is_url(value):  # a PostgreSQL schema: a bad URL or no server is InvalidInput, exit 2
        return open_store(value, field=where, busy_timeout=_busy_timeout(args))
    path = Path(value)
    named = where not in (DB_ENV, "the default database")
    init = f"deliverylab init-db{' --db ' + str(path) if named else ''}"
    if not path.exists():
        raise UsageError(f"no database at {str(path)!r} ({where}): run '{init}' first")
    if not path.is_file():
        raise UsageError(f"{where} must be a database file, got {str(path)!r}"
                         f" ({_kind(path)})")
    read_only = why_read_only(path)
    if read_only and write:
        raise UsageError(f"{str(path)!r} is read-only ({read_only}): 'deliverylab"
                         f" {args.command}' writes to it; {READERS} can still read it")
    try:
        return open_store(path, field=where, read_only=bool(read_only),
                          busy_timeout=_busy_timeout(args))
    except NotALabDatabase as exc:
        if exc.missing and "orders" not in exc.missing:  # an older version's file: keep its data
            raise UsageError(f"{str(path)!r} has no {', '.join(exc.missing)} table(s) (made by"
                             f" an older deliverylab): run '{init}' to add them; the data is"
                             f" kept") from None
        raise UsageError(f"{str(path)!r} is not a deliverylab database ({exc.reason}); run"
                         f" 'deliverylab init-db' on a new path") from None


def _make_room(path: Path, where: str) -> bool:
    """Create the directories and the empty file for a new database, naming the flag and the
    reason when the path cannot hold one. True when the file was created here."""
    missing = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
    blocker = missing[-1].parent if missing else path.parent
    if blocker.exists() and not blocker.is_dir():
        raise UsageError(f"{where} cannot be created at {str(path)!r}: {str(blocker)!r} is"
                         f" {_kind(blocker) if not blocker.is_file() else 'a file'}, not a"
                         f" directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False  # created meanwhile by someone else: init_db checks what it is
    except OSError as exc:
        for d in missing:  # write nothing: undo the directories made for it
            with contextlib.suppress(OSError):
                d.rmdir()
        raise UsageError(f"{where} cannot be created at {str(path)!r}:"
                         f" {exc.strerror or exc}") from None
    os.close(fd)
    return True


# -- commands ---------------------------------------------------------------------------------
def cmd_init_db(args: argparse.Namespace) -> int:
    from ..engine.store import (
        OUTBOX_TABLE,
        TABLES,
        check_schema,
        check_sqlite_version,
        init_db,
        is_busy,
        why_read_only,
    )

    url = db_url(args)
    if url is not None:
        from ..engine.store_postgres import init_db as pg_init_db

        pg = pg_init_db(url, field=_where(args))
        try:
            orders = pg.execute("SELECT count(*) FROM orders").fetchone()[0]
        finally:
            pg.close()
        print(safe_text(f"PostgreSQL schema {pg.schema!r} is ready at {hide_secrets(url)}"
                        f" ({orders} orders; tables: {', '.join(TABLES + (OUTBOX_TABLE,))})"))
        return 0
    check_sqlite_version()  # before anything is created
    path = db_path(args)
    where = _where(args)
    created = False
    if path.exists():
        if not path.is_file():
            raise UsageError(f"{where} must be a database file path, got {str(path)!r}"
                             f" ({_kind(path)})")
        read_only = why_read_only(path)
        if read_only:
            raise UsageError(f"{str(path)!r} is read-only ({read_only}): 'deliverylab init-db'"
                             f" cannot check or add its tables")
    else:
        created = _make_room(path, where)
    try:
        conn = init_db(path, busy_timeout=_busy_timeout(args))
        try:
            check_schema(conn)
            orders = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
        finally:
            conn.close()
    except STORE_ERRORS + (InvalidInput,) as exc:
        if created:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(f"{path}{suffix}")
        if is_busy(exc):
            raise
        raise UsageError(f"{str(path)!r} is not a deliverylab database ({exc})") from None
    if not created:
        print(safe_text(f"database {path} is ready (schema already there; {orders} orders kept)"))
    else:
        print(safe_text(f"created {path} (WAL mode; tables:"
                        f" {', '.join(TABLES + (OUTBOX_TABLE,))})"))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from ..engine.store import require_outbox

    database = db_url(args) or db_path(args)
    # Fail here, with a clear message, not inside the server. The API never sends on an
    # outside broker (the relay does): it is opened once to check it is there.
    outbox = args.broker is not None
    with open_lab(args, broker=False) as opened:  # the store alone: a refusal declares no queue
        if outbox:
            require_outbox(opened.store, _where(args))
    if outbox:
        with open_lab(args) as opened:
            if opened.joined:
                raise UsageError(f"--broker must be a broker outside the store, got the store"
                                 f" itself ({args.broker!r}); leave --broker out to use its"
                                 f" queue table")
    import uvicorn

    from .api import SHUTDOWN_WAIT_S, Server, check_allowed_hosts, create_app

    try:
        hosts = check_allowed_hosts(args.allowed_host, "--allowed-host")
        # The address the server was told to bind is a name it answers to (a wildcard is not).
        if args.host not in ("0.0.0.0", "::"):
            hosts += check_allowed_hosts([args.host], "--host")
        app = create_app(database, synchronous=args.synchronous, allowed_hosts=hosts,
                         outbox=outbox)
    except InvalidInput as exc:
        raise UsageError(str(exc)) from None
    sock = listen(args.host, args.port)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=not args.no_access_log,
                            timeout_graceful_shutdown=SHUTDOWN_WAIT_S)
    events = (f"; events to its outbox: run 'deliverylab relay --broker"
              f" {hide_secrets(args.broker)}'"
              if outbox else "")
    print(safe_text(f"deliverylab API on http://{args.host}:{args.port}  (database"
                    f" {db_label(args)}{events}; Ctrl-C to stop)"), flush=True)
    Server(config).run(sockets=[sock])  # quiet, bounded shutdown (see api.Server)
    return 0


def listen(host: str, port: int) -> socket.socket:
    """Bind the server's socket here, so a busy port is one clear sentence, not a log line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host must be an address of this machine, got {host!r}"
                         f" ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = (" (another 'deliverylab api'? pick another --port)"
                if exc.errno == errno.EADDRINUSE else "")
        raise Failure(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


_STAMP = re.compile(r"^(\[[^\]]*\]) t=(\d{9,}\.\d+) ")


def _wall(line: str) -> str:
    """The worker prints clock seconds; on a real clock show the time of day instead."""
    m = _STAMP.match(line)
    if not m:
        return line
    at = float(m.group(2))
    stamp = time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"
    return f"{m.group(1)} {stamp} {line[m.end():]}"


def stop_on_signals(runner: Any, name: str) -> None:
    """SIGTERM or Ctrl-C stops ``runner`` (a worker or a relay) after its current step; a
    second one stops it now, with KeyboardInterrupt."""
    def on_signal(signum: int, frame: Any) -> None:
        if runner.stopping:
            raise KeyboardInterrupt
        runner.stop()
        print(safe_text(f"[{name}] {signal.Signals(signum).name}: stopping after the current"
                        f" step"), flush=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def cmd_worker(args: argparse.Namespace) -> int:
    from ..engine.clock import SystemClock
    from ..engine.faults import Faults
    from ..engine.ids import Ids
    from ..engine.worker import Worker, refuse_apart

    rates = {}
    for point in FAULT_POINTS:
        flag_value = getattr(args, point + "_rate")
        env_value = os.environ.get(RATE_ENVS[point])
        if flag_value is not None:
            rates[point] = flag_value
        elif env_value is not None and env_value.strip():
            rates[point] = _rate(env_value, RATE_ENVS[point])
    if args.backoff_cap < args.backoff_base:
        raise UsageError(f"--backoff-cap must be >= --backoff-base ({args.backoff_base:g}),"
                         f" got {args.backoff_cap:g}")
    faults = Faults.from_rates(seed=args.seed, **rates)
    name = args.name or f"worker-{os.getpid()}"
    store_flag(args)
    from ..brokers.registry import is_broker_url

    if is_broker_url(args.broker):  # refused before connecting: a refusal declares no queue
        refuse_apart(args.mode)
    lease = _fixed_lease(args)
    vt = lease.seconds if lease is not None else (
        DEFAULT_VISIBILITY_TIMEOUT if args.visibility_timeout is None else args.visibility_timeout)

    def echo(line: str) -> None:
        print(safe_text(hide_secrets(_wall(line))), flush=True)

    clock, ids = SystemClock(), Ids()
    # The broker: the queue table in the store's own database, or (--broker) a queue in
    # another database or system, which leaves the trace rows of its verbs to the worker.
    opened = open_lab(args, clock=clock, ids=ids, max_receives=args.max_receives, worker=name)
    conn, broker, broker_label = opened.store, opened.broker, _broker_label(opened)
    try:
        worker = Worker(store=conn, broker=broker, clock=clock, mode=args.mode,
                        faults=faults, visibility_timeout=vt,
                        max_messages=args.max_messages,
                        backoff_base=args.backoff_base, backoff_cap=args.backoff_cap,
                        name=name, echo=echo, crash_exits=args.crash_exits,
                        work_time=args.work_time)
    except InvalidInput:
        opened.close()
        raise

    stop_on_signals(worker, name)  # a second Ctrl-C: open transactions roll back

    fault_text = ", ".join(f"{p}={r:g}" for p, r in rates.items() if r) or "none"
    # The lease really in force: where the engine fixes it per queue, the URL's, not a flag.
    lease_text = f"visibility_timeout={vt:g}s" if lease is None else f"lease={lease.shown}"
    print(safe_text(f"[{name}] started: mode={worker.mode} {lease_text}"
                    f" max_receives={args.max_receives} faults: {fault_text}"
                    f" (seed {faults.seed}) db={db_label(args)}"
                    + ("" if broker_label is None else f" broker={broker_label}")),
          flush=True)
    try:
        stats = worker.run_forever(poll_interval=args.poll_interval)
    except KeyboardInterrupt:
        print(safe_text(f"[{name}] interrupted"), flush=True)
        return 130
    finally:
        opened.close()
    totals = stats.as_dict()
    counts = " ".join(f"{k}={v}" for k, v in totals.items() if k != "steps")
    print(safe_text(f"[{name}] stopped: {counts}"), flush=True)
    return 0


def _fixed_lease(args: argparse.Namespace) -> Any:
    """The lease the ``--broker`` URL fixes (a :class:`~deliverylab.brokers.base.UrlLease`,
    from the registry), None when each receive sets its own. An engine that leases every
    message for the same time whatever a receive asks (``capabilities.fixed_lease``) refuses
    ``--visibility-timeout`` unless it says the same (it is then the same lease)."""
    from ..brokers.registry import ENGINES, fixed_lease, scheme_of

    try:
        lease = fixed_lease(args.broker, field="--broker")
    except InvalidInput as exc:
        raise UsageError(str(exc)) from None
    if lease is None or args.visibility_timeout in (None, lease.seconds):
        return lease
    title = next(e.title for e in ENGINES.values() if e.scheme == scheme_of(args.broker))
    raise UsageError(
        f"--visibility-timeout does not apply to a {title} broker, got"
        f" {args.visibility_timeout:g}: its lease is {lease.what}, set by {lease.option}= in"
        f" the --broker URL (here {lease.seconds:g}s{'' if lease.given else ', the default'});"
        f" leave the flag out, or put {lease.option}={args.visibility_timeout:g} in the URL")


def cmd_relay(args: argparse.Namespace) -> int:
    from ..engine.clock import SystemClock
    from ..engine.ids import Ids
    from ..engine.relay import Relay, unsent

    store_flag(args)
    name = args.name or f"relay-{os.getpid()}"
    clock = SystemClock()
    opened = open_lab(args, clock=clock, ids=Ids(), worker=name)
    if opened.joined:
        opened.close()
        raise UsageError(f"--broker must be a broker outside the store, got the store itself"
                         f" ({args.broker!r}): with the queue table in the store's own"
                         f" database an order and its event commit together, and there is"
                         f" nothing to relay")
    conn, broker, broker_label = opened.store, opened.broker, _broker_label(opened)
    try:
        relay = Relay(conn, broker, clock=clock, crash_after_publish=args.crash_after_publish_rate,
                      seed=args.seed if args.seed is not None else secrets.randbits(63),
                      crash_exits=args.crash_exits, name=name,
                      echo=lambda line: print(safe_text(hide_secrets(_wall(line))),
                                                 flush=True))
    except InvalidInput:
        opened.close()
        raise

    stop_on_signals(relay, name)  # a second Ctrl-C: what it published goes again
    dedup = broker.dedup_window
    print(safe_text(f"[{name}] started: {unsent(conn)} unsent outbox row(s) in {db_label(args)}"
                    f" → broker={broker_label} (producer dedup: "
                    + (f"{dedup:g}s window" if dedup is not None else "none") + ")"
                    f" faults: crash_after_publish={relay.rate:g} (seed {relay.faults.seed})"),
          flush=True)
    try:
        stats = relay.run_forever(args.batch, poll_interval=args.poll_interval)
    except KeyboardInterrupt:
        print(safe_text(f"[{name}] interrupted"), flush=True)
        return 130
    finally:
        opened.close()
    counts = " ".join(f"{k}={v}" for k, v in stats.as_dict().items())
    print(safe_text(f"[{name}] stopped: {counts}"), flush=True)
    return 0


def _http(method: str, url: str, body: dict[str, Any] | None = None,
          headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, str, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        "content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, reason, raw = resp.status, resp.reason, resp.read()
    except urllib.error.HTTPError as exc:
        status, reason, raw = exc.code, exc.reason, exc.read()
    except urllib.error.URLError as exc:
        raise Failure(f"cannot reach the API at {url} ({exc.reason}); is 'deliverylab api'"
                      f" running? (--url or {URL_ENV} to point elsewhere)") from None
    except TimeoutError:  # connected and sent, but no answer in time
        raise Failure(f"the API at {url} did not answer within {timeout:g}s; the order may"
                      f" or may not be written: send the same request again (same --order-id"
                      f" or --idempotency-key) to find out, or wait longer with --timeout"
                      ) from None
    except OSError as exc:
        raise Failure(f"cannot reach the API at {url} ({exc}); is 'deliverylab api'"
                      f" running? (--url or {URL_ENV} to point elsewhere)") from None
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw.decode(errors="replace")
    return status, str(reason), payload


def cmd_order(args: argparse.Namespace) -> int:
    url = (args.url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    if not re.match(r"^https?://[\x21-\x2e\x30-\x7e]+$", url):  # ASCII, no path
        raise UsageError(f"{'--url' if args.url else URL_ENV} must look like http://HOST:PORT,"
                         f" got {url!r}")
    body: dict[str, Any] = {"itemId": args.item, "qty": args.qty}
    if args.order_id is not None:
        body = {"orderId": args.order_id, **body}
    headers = {} if args.idempotency_key is None else {"Idempotency-Key": args.idempotency_key}
    status, reason, payload = _http("POST", url + "/orders", body, headers,
                                    timeout=args.timeout)
    text = safe_text(payload) if isinstance(payload, str) else safe_json(payload)
    if status == 503:  # the API's database stayed locked past its busy timeout
        error = payload.get("error") if isinstance(payload, dict) else payload
        raise UsageError(f"the API could not get its database's write lock: {error}")
    print(f"{status} {safe_text(reason)} {text}", flush=True)
    return 0 if 200 <= status < 300 else 1


def cmd_status(args: argparse.Namespace) -> int:
    from . import metrics
    from .status import Unlisted, collect, render

    store_flag(args)
    opened = open_lab(args, write=False, create=False)
    conn, broker = opened.store, opened.broker
    apart = None if opened.joined else cast(Broker, Unlisted(broker, conn))
    try:
        while True:
            report = collect(conn, broker=apart)
            reading = metrics.signals(conn, now=time.time(), broker=apart)
            if args.json:
                print(safe_json({**report, "signals": reading.as_dict()}), flush=True)
            else:
                if args.watch:
                    print("\033[H\033[2J" + time.strftime("%H:%M:%S"), end="\n\n")
                print(render(report, db=db_label(args)) + "\n\n" + metrics.render(reading),
                      flush=True)
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    finally:
        opened.close()


def cmd_trace(args: argparse.Namespace) -> int:
    from .status import render_trace, trace

    with open_lab(args, write=False, broker=False) as opened:
        story = trace(opened.store, args.order)
    if story is None:
        raise Failure(f"no order or event {args.order!r} in {db_label(args)}")
    print(safe_json(story) if args.json else render_trace(story))
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from ..engine.check import check
    from ..engine.clock import SystemClock
    from ..engine.reconcile import diff, repair
    from .status import snapshot, table

    opened = open_lab(args, write=not args.dry_run, broker=False)  # a dry run only reads
    conn = opened.store
    try:
        with snapshot(conn):
            drift = diff(conn)
        if drift.clean:
            print("nothing to repair: the projection equals the truth and every order's event"
                  " was applied")
            return 0
        if drift.items.empty:
            print("projection per item: equal to the truth")
        else:
            print("drift (projection - truth):")
            rows = [[r.item_id, r.truth, r.projection, f"{r.delta:+d}"]
                    for r in drift.items.itertuples()]
            print("\n".join(table(["item", "truth", "projection", "delta"], rows, {1, 2, 3})))
        if not drift.unapplied.empty:
            states = list(drift.unapplied["state"])
            print("events not applied: " + ", ".join(
                f"{states.count(s)} {s.replace('_', '-')}"
                for s in ("lost", "dead_lettered", "pending") if s in states))
            rows = [[r.order_id, r.item_id, r.qty, r.event_id, r.state]
                    for r in drift.unapplied.head(20).itertuples()]
            print("\n".join(table(["order", "item", "qty", "event", "state"], rows, {2})))
            if len(drift.unapplied) > len(rows):
                print(f"  … {len(drift.unapplied) - len(rows)} more")
        if args.dry_run:
            print("dry run: nothing written")
            return 0
        result = repair(conn, clock=SystemClock())
        print(f"repaired: rebuilt the projection from {result.orders} orders"
              f" ({result.items_changed} item(s) changed, {result.orders_recounted} order(s)"
              f" recounted); fenced {result.events_fenced} event(s): a late delivery of a"
              f" counted order is not applied again, whatever mode the workers run in")
        print(safe_text(f"verdict: {check(conn).verdict}"))
    finally:
        opened.close()
    return 0


def _operator_trace(conn: Any, broker: Any, rows: list[tuple[Any, ...]]) -> None:
    """Rows of (worker, correlation_id, event_id, message_id, delivery_count, outcome,
    detail) for what an operator verb did on a broker that wrote no trace of its own (one
    outside the store): written into the store right after the verb."""
    from ..engine.store import transaction
    from ..engine.trace import log_many

    if broker.writes_trace and broker.joins(conn) or not rows:
        return
    now = broker.clock.now()
    with transaction(conn):
        log_many(conn, [(now, *row) for row in rows])


def _open_for_verb(args: argparse.Namespace) -> Any:
    """The store and the broker ``--broker`` names (default the store's queue table), for an
    operator verb: nothing is created on a broker's server."""
    store_flag(args)
    return open_lab(args, create=False)


def cmd_redrive(args: argparse.Namespace) -> int:
    from ..engine.trace import Outcome

    opened = _open_for_verb(args)
    conn, broker = opened.store, opened.broker
    try:
        before = broker.dead_lettered_event_ids()
        try:
            moved = broker.redrive(args.message_ids or None, worker="operator")
        except InvalidInput as exc:
            raise UsageError(f"{exc.value!r} is not a dead letter's message id") from None
        # The events no longer dead-lettered: the broker's verb reports a count only; the
        # order (the correlation id) is the store's. The new message ids are the broker's.
        back = sorted(before - broker.dead_lettered_event_ids())
        orders = dict(conn.execute(
            "SELECT event_id, order_id FROM orders WHERE event_id IN"
            " (SELECT value FROM json_each(?))", (json.dumps(back),)).fetchall())
        _operator_trace(conn, broker, [
            ("operator", orders.get(e), e, None, 0, Outcome.REDRIVEN,
             "redriven by 'deliverylab redrive'") for e in back])
    finally:
        opened.close()
    print(f"redrove {moved} dead letter(s) back to the queue (delivery count reset to 0)")
    return 0


def cmd_drop(args: argparse.Namespace) -> int:
    from ..engine.trace import Outcome

    opened = _open_for_verb(args)
    conn, broker = opened.store, opened.broker
    try:
        queue = getattr(broker, "conn", None)
        if queue is None:
            raise UsageError(f"--broker must be a database whose queue 'deliverylab drop' can"
                             f" list (a file or a postgresql:// URL), got {args.broker!r}")
        columns = "message_id, event_id, correlation_id, delivery_count"
        if args.refs:
            rows = []
            for ref in args.refs:
                found = queue.execute(
                    f"SELECT {columns} FROM queue_messages"
                    " WHERE message_id = ?1 OR event_id = ?1 OR correlation_id = ?1",
                    (ref,)).fetchall()
                if not found:
                    raise UsageError(f"no queued message for {ref!r} (a message id, event id"
                                     f" or order id)")
                rows += found
        else:
            rows = queue.execute(f"SELECT {columns} FROM queue_messages ORDER BY seq LIMIT ?",
                                 (args.count,)).fetchall()
        reason = "dropped by 'deliverylab drop'"
        dropped = []
        for r in rows:
            if broker.drop(r["message_id"], reason=reason, worker="chaos"):
                dropped.append(r)
                print(safe_text(f"dropped {r['message_id']} event={r['event_id']}"
                                f" order={r['correlation_id']} (logged as lost)"))
        _operator_trace(conn, broker, [
            ("chaos", r["correlation_id"], r["event_id"], r["message_id"], r["delivery_count"],
             Outcome.LOST, reason) for r in dropped])
    finally:
        opened.close()
    print(f"{len(dropped)} message(s) dropped behind the workers' backs; 'deliverylab status'"
          f" shows the drift, 'deliverylab reconcile' repairs it")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    """Start, show or stop the three-node JetStream cluster whose files live in ``--dir``."""
    from ..clusters.nats_cluster import (
        DEFAULT_BASE_PORT,
        STATE_FILE,
        ClusterError,
        NatsCluster,
    )

    if args.action not in ("kill", "restart") and args.node is not None:
        raise UsageError(f"NODE is for 'cluster kill' and 'cluster restart', got {args.node!r}"
                         f" with 'cluster {args.action}'")
    if args.action != "kill" and args.leader_of is not None:
        raise UsageError(f"--leader-of is for 'cluster kill', got it with 'cluster"
                         f" {args.action}'")
    where = Path(args.dir)
    if where.exists() and not where.is_dir():
        raise UsageError(f"--dir must be a directory, got {args.dir!r}"
                         f" ({'a file' if where.is_file() else _kind(where)})")
    known = (where / STATE_FILE).exists()
    if known:
        try:
            cluster = NatsCluster.open(where)
        except InvalidInput as exc:
            raise UsageError(f"--dir must be {exc.expected}, got {args.dir!r}") from None
        if args.base_port is not None and args.base_port != cluster.base_port:
            raise UsageError(f"--base-port: the cluster in {args.dir!r} uses base port"
                             f" {cluster.base_port}, got {args.base_port}; stop it first, or"
                             f" use another --dir")
    elif args.action != "start":
        what = {"status": "runs", "stop": "to stop", "kill": "to kill",
                "restart": "to restart"}[args.action]
        print(safe_text(f"no cluster in {args.dir!r}: nothing {what} (start one with"
                        f" 'deliverylab cluster start --dir {args.dir}')"))
        return 0 if args.action == "stop" else 1
    else:
        cluster = NatsCluster(where, base_port=args.base_port or DEFAULT_BASE_PORT)
    try:
        if args.action == "kill":
            return _cluster_kill(args, cluster)
        if args.action == "restart":
            name = _cluster_node(args, cluster)
            if cluster.pid(name) is not None:
                raise UsageError(f"NODE must be a node that is down, got {name!r} (running): 'deliverylab cluster"
                                 f" kill {name} --dir {args.dir}' first")
            cluster.restart(name)
            print(safe_text(f"restarted {name} (pid {cluster.pid(name)}) on its own storage;"
                            f" it catches up on its streams from the others"))
        if args.action == "stop":
            stopped = cluster.stop()
            print(safe_text(f"stopped {', '.join(stopped) or 'nothing (no node was running)'}"
                            f"; the storage stays in {args.dir!r}"))
            return 0
        if args.action == "start":
            cluster.start()
    except ClusterError as exc:
        raise Failure(str(exc)) from None
    nodes = cluster.status()
    for n in nodes:
        state = ("answering" if n.answering else "not answering") if n.running else "down"
        lead = f", meta leader {n.meta_leader}" if n.meta_leader else ""
        node = cluster.node(n.name)
        print(safe_text(f"{n.name}: {state} (pid {n.pid or '-'}, client {node.url},"
                        f" monitoring http://127.0.0.1:{node.http_port}{lead})"))
    for st in cluster.streams():
        followers = ", ".join(f"{r} ({state})" for r, state in st.followers) or "none"
        print(safe_text(f"stream {st.name}: leader {st.leader or '(none: an election runs)'},"
                        f" followers {followers}; {st.messages} messages"))
    print(safe_text(f"broker URL: {cluster.url(stream='NAME', replicas=3)}"))
    return 0 if all(n.answering and n.meta_leader for n in nodes) else 1


def _cluster_node(args: argparse.Namespace, cluster: Any) -> str:
    """The node the positional NODE names, checked against the cluster's."""
    names = [n.name for n in cluster.nodes]
    if args.node is None:
        raise UsageError(f"'deliverylab cluster {args.action}' needs a NODE: one of"
                         f" {', '.join(names)}")
    if args.node not in names:
        raise UsageError(f"NODE must be one of {', '.join(names)}, got {args.node!r}")
    return args.node


def _cluster_kill(args: argparse.Namespace, cluster: Any) -> int:
    """SIGKILL one node: the one named, or the leader of ``--leader-of STREAM``; then wait
    for the stream (if named) to elect another leader, and say who."""
    from ..clusters.nats_cluster import ClusterError

    if (args.node is None) == (args.leader_of is None):
        raise UsageError("'deliverylab cluster kill' takes a NODE or --leader-of STREAM"
                         " (one of the two)")
    if args.leader_of is not None:
        known = [st.name for st in cluster.streams()]
        if args.leader_of not in known:
            raise UsageError(f"--leader-of must name a stream of the cluster"
                             f" ({', '.join(known) or 'it has none yet'}), got"
                             f" {args.leader_of!r}")
        try:
            name = cluster.wait_stream_leader(args.leader_of, timeout=10)
        except ClusterError as exc:
            raise Failure(str(exc)) from None
        whose = f", the leader of stream {args.leader_of}"
    else:
        name, whose = _cluster_node(args, cluster), ""
        if cluster.pid(name) is None:
            raise UsageError(f"NODE must be a running node, got {name!r} (down)")
    pid = cluster.kill(name)
    print(safe_text(f"killed {name} (pid {pid}, SIGKILL){whose}"), flush=True)
    if args.leader_of is not None:
        try:
            new = cluster.wait_stream_leader(args.leader_of, other_than=name, timeout=30)
            print(safe_text(f"stream {args.leader_of} is now led by {new}"))
        except ClusterError as exc:
            print(safe_text(f"no new leader yet: {exc}"))
    print(safe_text(f"bring it back with 'deliverylab cluster restart {name} --dir {args.dir}'"
                    f" (or 'deliverylab cluster start --dir {args.dir}', which starts every"
                    f" node that is not running)"))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove what ``--store`` and ``--broker`` name, on any engine, after finding all of it
    (a bad value removes nothing); ask first unless ``--yes``."""
    from ..brokers.registry import same_database
    from .cleanup import find

    if args.store is None and args.broker is None:
        raise UsageError("name what to remove: --store PATH|URL, --broker PATH|URL, or both")
    try:
        targets = [find(flag, value) for flag, value in (("--store", args.store),
                                                          ("--broker", args.broker))
                   if value is not None and not (flag == "--broker" and args.store is not None
                                                 and same_database(args.store, value))]
    except InvalidInput as exc:
        raise UsageError(f"{exc}; nothing was removed") from None
    doomed = [t for t in targets if t.remove is not None]
    for t in targets:
        if t.remove is None:
            print(safe_text(hide_secrets(f"{t.flag}: {t.what}")))
    if not doomed:
        return 0
    listing = "\n".join(hide_secrets(f"  {t.flag}: {t.what}"
                                      + (f": {', '.join(t.parts)}" if t.parts else ""))
                         for t in doomed)
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("this removes, for good:\n" + listing + "\npass --yes to remove"
                             " it (there is no terminal to ask on); nothing was removed")
        print(safe_text("this removes, for good:\n" + listing))
        try:
            answer = input("remove it? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing was removed")
            return 1
    for t in doomed:
        t.remove()  # type: ignore[misc]  # not None: doomed holds only those
        print(safe_text(hide_secrets(f"removed {t.what}"
                                     + (f": {', '.join(t.parts)}" if t.parts else ""))))
    return 0


# -- the parser -------------------------------------------------------------------------------
def _broker_help(role: str) -> str:
    """A ``--broker`` help text: ``role``, then every form a broker takes, from the registry."""
    from ..brokers.registry import broker_forms

    return f"{role}. One of: {broker_forms()}"


def build_parser() -> argparse.ArgumentParser:
    from ..engine.worker import Mode

    parser = argparse.ArgumentParser(
        prog="deliverylab",
        description="The message-delivery lab as real processes: an HTTP API, workers,"
                    " status, trace and reconcile, on one SQLite file.")
    parser.add_argument("--version", action="version", version=f"deliverylab {__version__}")
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", metavar="PATH", type=_path_text,
                    help=f"the database file (default: ${DB_ENV} or {DEFAULT_DB}), or a"
                         f" PostgreSQL schema as postgresql://HOST/DB?options=-csearch_path%%3DNAME")
    # Every command but the API (which keeps SQLite's 30 s) may wait less, or more, for a
    # write lock another connection holds.
    busy = argparse.ArgumentParser(add_help=False, parents=[db])
    busy.add_argument("--busy-timeout", type=_num_arg(0, 3600), default=None,
                      metavar="SECONDS",
                      help="how long to wait for another connection's write lock before"
                           " giving up (default 30)")
    # Where the consumer's database and the broker are, for the commands that read or act on
    # the broker (status, redrive, drop); with a broker outside the store, redrive and drop
    # write their trace rows into the store after the verb.
    where_flags = argparse.ArgumentParser(add_help=False)
    where_flags.add_argument("--store", metavar="PATH|URL", type=_path_text, default=None,
                             help="the consumer's database: the same as --db")
    where_flags.add_argument("--broker", metavar="PATH|URL", type=_path_text, default=None,
                             help=_broker_help("where the messages wait (default: the queue"
                                               " table of the store's own database)"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init-db", parents=[busy], help="create the database (idempotent)")
    p.set_defaults(run=cmd_init_db)

    p = sub.add_parser("api", parents=[db], help="serve the HTTP API (POST /orders, …)")
    p.add_argument("--host", default="127.0.0.1", type=_text_arg(255),
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", default=3000, type=_int_arg(1, 65535), help="default 3000")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    p.add_argument("--synchronous", type=str.lower, choices=["full", "normal"], default=None,
                   help="full (default, or $DELIVERYLAB_SYNCHRONOUS): a 201 survives a power"
                        " cut; normal: faster, survives a crash of the API only")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   type=_text_arg(255),
                   help="also answer requests whose Host is NAME (repeatable; besides"
                        " 127.0.0.1, localhost, [::1]; * for any, behind a proxy that checks)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--broker", metavar="PATH|URL", type=_path_text, default=None,
                   help=_broker_help("the workers' broker, outside the store: each order's"
                                     " event goes to the store's outbox, and 'deliverylab"
                                     " relay' publishes it (default: the store's own queue"
                                     " table, in the order's transaction)"))
    p.set_defaults(run=cmd_api)

    p = sub.add_parser(
        "worker", parents=[busy], help="consume OrderPlaced events, one line per step",
        description="Receive, apply, ack — printing one line per step. Fault rates come from"
                    " the flags or from the environment (ACK_FAIL_RATE=0.8,"
                    " ACK_ANSWER_LOST_RATE=0.3, …); default 0. A lost ACK has two halves:"
                    " --ack-fail-rate loses the request, --ack-answer-lost-rate the answer."
                    " SIGTERM or Ctrl-C stops after the current step.")
    p.add_argument("--mode", default=Mode.IDEMPOTENT.value, choices=[m.value for m in Mode],
                   help="default idempotent")
    p.add_argument("--visibility-timeout", type=_num_arg(0, 12 * 3600), default=None,
                   metavar="SECONDS",
                   help=f"lease length (default {DEFAULT_VISIBILITY_TIMEOUT:g}, like the seed);"
                        f" on a broker whose URL fixes the lease of its queue (a stream's"
                        f" ack_wait= or lease=) the URL's, and this flag is refused unless it"
                        f" says the same")
    p.add_argument("--max-receives", type=_int_arg(1, 1000), default=DEFAULT_MAX_RECEIVES,
                   help=f"deliveries before a message is dead-lettered (default"
                        f" {DEFAULT_MAX_RECEIVES})")
    p.add_argument("--max-messages", type=_int_arg(1, 1000),
                   default=WORKER_DEFAULTS.max_messages,
                   help=f"messages leased per receive (default {WORKER_DEFAULTS.max_messages})")
    p.add_argument("--poll-interval", type=_num_arg(0.001, 60), default=0.2,
                   metavar="SECONDS", help="wait when the queue is empty (default 0.2)")
    p.add_argument("--backoff-base", type=_num_arg(0, 3600),
                   default=WORKER_DEFAULTS.backoff_base, metavar="SECONDS")
    p.add_argument("--backoff-cap", type=_num_arg(0, 3600),
                   default=WORKER_DEFAULTS.backoff_cap, metavar="SECONDS")
    p.add_argument("--work-time", type=_num_arg(0, 3600), default=WORKER_DEFAULTS.work_time,
                   metavar="SECONDS",
                   help="pretend each message takes this long to process")
    for point in FAULT_POINTS:
        p.add_argument(RATE_FLAGS[point], dest=point + "_rate", type=_num_arg(0, 1),
                       default=None, metavar="RATE",
                       help=f"{RATE_HELP[point]}; a rate in [0, 1] (env {RATE_ENVS[point]})")
    p.add_argument("--crash-exits", action="store_true",
                   help="an injected crash ends the process (exit 70) instead of simulating it")
    p.add_argument("--seed", type=_int_arg(0, 2**63 - 1), default=None,
                   help="seed of the fault schedule (default: random, printed at start)")
    p.add_argument("--name", type=_text_arg(), default=None,
                   help="name in the output and the trace (default worker-PID)")
    p.add_argument("--store", metavar="PATH|URL", type=_path_text, default=None,
                   help="the consumer's database (orders, inbox, projection, trace): the same"
                        " as --db")
    p.add_argument("--broker", metavar="PATH|URL", type=_path_text, default=None,
                   help=_broker_help("where the messages wait (default: the queue table of"
                                     " the store's own database); a broker outside the store"
                                     " refuses --mode transactional"))
    p.set_defaults(run=cmd_worker)

    p = sub.add_parser(
        "relay", parents=[busy],
        help="publish the store's outbox to a broker outside it, one line per step",
        description="Read the unsent outbox rows in order, publish each to --broker (with the"
                    " event id as its dedup id), then mark them sent. SIGTERM or Ctrl-C stops"
                    " after the current step.")
    p.add_argument("--store", metavar="PATH|URL", type=_path_text, default=None,
                   help="the database whose outbox is published: the same as --db")
    p.add_argument("--broker", metavar="PATH|URL", type=_path_text, required=True,
                   help=_broker_help("a broker outside the store"))
    p.add_argument("--batch", type=_int_arg(1, 1000), default=100,
                   help="rows published per step, then marked in one commit (default 100)")
    p.add_argument("--poll-interval", type=_num_arg(0.001, 60), default=0.2,
                   metavar="SECONDS", help="wait when the outbox is empty (default 0.2)")
    p.add_argument("--crash-after-publish-rate", type=_num_arg(0, 1), default=0.0,
                   metavar="RATE", help="fault rate in [0, 1]: die after a publish, before"
                                        " the mark (default 0)")
    p.add_argument("--crash-exits", action="store_true",
                   help="an injected crash ends the process (exit 70) instead of the step")
    p.add_argument("--seed", type=_int_arg(0, 2**63 - 1), default=None,
                   help="seed of the fault schedule (default: random, printed at start)")
    p.add_argument("--name", type=_text_arg(), default=None,
                   help="name in the output (default relay-PID)")
    p.set_defaults(run=cmd_relay)

    p = sub.add_parser("order", help="POST /orders to the running API (curl not needed)")
    p.add_argument("--item", required=True, type=_text_arg(), help="itemId, e.g. coffee-beans")
    p.add_argument("--qty", type=_int_arg(1, MAX_QTY), default=1, help="1..10000 (default 1)")
    p.add_argument("--order-id", type=_text_arg(), default=None,
                   help="orderId (default: the server makes one)")
    p.add_argument("--idempotency-key", type=_key_arg, default=None,
                   help="the Idempotency-Key header: 1 to 200 visible ASCII characters")
    # Longer than the API's 30 s busy timeout, so a locked database comes back as its 503.
    p.add_argument("--timeout", type=_num_arg(0.1, 3600), default=45.0, metavar="SECONDS",
                   help="how long to wait for the answer (default 45)")
    p.add_argument("--url", default=None,
                   help=f"the API (default ${URL_ENV} or {DEFAULT_URL})")
    p.set_defaults(run=cmd_order)

    p = sub.add_parser("status", parents=[busy, where_flags],
                       help="queue, inbox, projection vs truth, dead letters, the verdict")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", type=_num_arg(0.1, 3600), default=None, metavar="SECONDS",
                   help="redraw every SECONDS until Ctrl-C")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("trace", parents=[busy], help="every delivery of one order's event")
    p.add_argument("order", metavar="ORDER_ID", type=_text_arg(4096, printable=False),
                   help="an order id (or an event id)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_trace)

    p = sub.add_parser("reconcile", parents=[busy],
                       help="show the drift from the truth, then repair the projection")
    p.add_argument("--dry-run", action="store_true", help="show the drift only")
    p.set_defaults(run=cmd_reconcile)

    p = sub.add_parser("redrive", parents=[busy, where_flags], help="move dead letters back to the queue")
    p.add_argument("message_ids", nargs="*", metavar="MESSAGE_ID",
                   type=_text_arg(4096, printable=False),
                   help="only these (default: all)")
    p.set_defaults(run=cmd_redrive)

    p = sub.add_parser("drop", parents=[busy, where_flags],
                       help="delete queued messages behind the workers' backs (fault injection)")
    p.add_argument("refs", nargs="*", metavar="ID", type=_text_arg(4096, printable=False),
                   help="message, event or order ids")
    p.add_argument("--count", type=_int_arg(1, 1_000_000), default=1,
                   help="without ids: drop the N oldest queued messages (default 1)")
    p.set_defaults(run=cmd_drop)

    p = sub.add_parser("cluster", help="three NATS JetStream servers on this machine, one"
                                       " replicated cluster: start, status, stop, kill a node,"
                                       " restart it",
                       description="start: every node that is not running (a new cluster, or"
                                   " the node a kill left down). status: each node, the meta"
                                   " leader, each stream's leader and replicas. kill: SIGKILL"
                                   " a node, named or the leader of --leader-of STREAM."
                                   " restart NODE: start that node again. stop: every node.")
    p.add_argument("action", choices=["start", "status", "stop", "kill", "restart"])
    p.add_argument("node", nargs="?", default=None, metavar="NODE",
                   help="kill, restart: the node (node1, node2 or node3)")
    p.add_argument("--leader-of", metavar="STREAM", type=_text_arg(255), default=None,
                   help="kill: the node that leads this stream now")
    p.add_argument("--dir", type=_path_text, default=DEFAULT_CLUSTER_DIR,
                   help=f"where the nodes' configuration, storage, logs and process ids live"
                        f" (default {DEFAULT_CLUSTER_DIR})")
    p.add_argument("--base-port", type=_int_arg(1024, 61534), default=None, metavar="PORT",
                   help="client ports PORT..PORT+2, routes PORT+2000.., monitoring PORT+4000.."
                        " (default 14222)")
    p.set_defaults(run=cmd_cluster)

    p = sub.add_parser(
        "cleanup", help="remove a lab's data on any engine: its store and its broker",
        description="Remove the store (a SQLite file with its -wal and -shm, or a PostgreSQL"
                    " schema) and the broker (a file or schema, or a queue or stream on a"
                    " broker's server with its dead letters), and say what was removed. Everything is found before anything is removed: a"
                    " bad value removes nothing. Without --yes it asks on a terminal, and"
                    " refuses when there is none.")
    p.add_argument("--store", metavar="PATH|URL", type=_path_text, default=None,
                   help="the lab's store: a SQLite file or a postgresql:// URL")
    p.add_argument("--broker", metavar="PATH|URL", type=_path_text, default=None,
                   help=_broker_help("the lab's broker outside the store (its file or schema,"
                                     " queue or stream)"))
    p.add_argument("--yes", action="store_true", help="remove without asking")
    p.set_defaults(run=cmd_cleanup)
    return parser


def _safe_output() -> None:
    """Never die on an arrow: a terminal that cannot show '→' gets an escape instead."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding not in ("utf8", "utf16", "utf32") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _database_error(args: argparse.Namespace, exc: Exception) -> tuple[int, str]:
    """An error the store's database (SQLite, PostgreSQL) raised mid-command, as (exit status,
    one sentence). Each command's writes are transactions, so whatever it was doing rolled
    back: nothing half-written."""
    from ..engine.store import is_busy, is_read_only_error

    path = db_label(args) if hasattr(args, "db") else "the database"
    if is_busy(exc):
        return 2, (f"the database {path!r} is locked: another connection held its lock for"
                   f" longer than the busy timeout ({_busy_timeout(args):g}s); what this"
                   f" command was about to write was not written. Try again when it is done,"
                   f" or wait longer with --busy-timeout")
    if is_read_only_error(exc):
        return 2, f"{path!r} is read-only ({exc}); {READERS} can still read it"
    return 1, f"database error on {path!r}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    _safe_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"deliverylab {args.command}"
    try:
        return args.run(args)
    except (UsageError, InvalidInput, BrokerGone) as exc:  # bad input, or the queue gone: 2
        print(safe_text(hide_secrets(f"{prog}: error: {exc}")), file=sys.stderr)
        return 2
    except Failure as exc:
        print(safe_text(hide_secrets(f"{prog}: error: {exc}")), file=sys.stderr)
        return 1
    except SQLiteTooOld as exc:
        print(safe_text(hide_secrets(f"{prog}: error: {exc}")), file=sys.stderr)
        return 1
    except STORE_ERRORS as exc:
        code, message = _database_error(args, exc)
        print(safe_text(hide_secrets(f"{prog}: error: {message}")), file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `deliverylab trace … | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
