"""The ``deliverylab`` command: the lab as real processes, one terminal each.

::

    deliverylab init-db                       # data/app.db (or --db PATH, or DELIVERYLAB_DB)
    deliverylab api                           # http://127.0.0.1:3000
    ACK_FAIL_RATE=0.8 deliverylab worker      # one line per step; Ctrl-C stops it cleanly
    deliverylab order --item coffee-beans --qty 1 --order-id o-001
    deliverylab status                        # queue, inbox, projection vs truth, verdict
    deliverylab trace o-001                   # every delivery of that order's event
    deliverylab reconcile [--dry-run]         # the drift, then the repair
    deliverylab redrive                       # dead letters back to the queue
    deliverylab drop --count 3                # lose queued messages on purpose

Bad input exits with status 2 and a message naming the flag (or variable) and its value;
nothing is written. A failure at run time (the API is down, the server said no) exits with 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .display import safe_json, safe_text
from .errors import InvalidInput, check_int, check_number, check_text
from .faults import FAULT_POINTS
from .orders import MAX_ID_LENGTH, MAX_QTY

DEFAULT_DB = "data/app.db"
DEFAULT_URL = "http://127.0.0.1:3000"
DB_ENV = "DELIVERYLAB_DB"
URL_ENV = "DELIVERYLAB_URL"
# One flag and one environment variable per fault point: --ack-fail-rate / ACK_FAIL_RATE, …
RATE_FLAGS = {p: "--" + p.replace("_", "-") + "-rate" for p in FAULT_POINTS}
RATE_ENVS = {p: p.upper() + "_RATE" for p in FAULT_POINTS}


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


def _text_arg(max_length: int = MAX_ID_LENGTH) -> Callable[[str], str]:
    return _typed(str, lambda v: check_text("value", v, max_length=max_length))


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
    return Path(env) if env.strip() else Path(DEFAULT_DB)


def _where(args: argparse.Namespace) -> str:
    return "--db" if args.db is not None else (DB_ENV if os.environ.get(DB_ENV, "").strip()
                                               else "the default database")


def open_db(args: argparse.Namespace) -> sqlite3.Connection:
    """Connect to an existing lab database, or explain how to make one."""
    from .db import check_schema, connect

    path = db_path(args)
    if not path.is_file():
        raise UsageError(f"no database at {str(path)!r} ({_where(args)}): run 'deliverylab"
                         f" init-db{'' if args.db is None else ' --db ' + str(path)}' first")
    try:
        conn = connect(path)
        check_schema(conn)
    except (sqlite3.DatabaseError, InvalidInput) as exc:
        raise UsageError(f"{str(path)!r} is not a deliverylab database ({exc}); run"
                         f" 'deliverylab init-db' on a new path") from None
    return conn


# -- commands ---------------------------------------------------------------------------------
def cmd_init_db(args: argparse.Namespace) -> int:
    from .db import TABLES, check_schema, init_db

    path = db_path(args)
    if path.exists() and not path.is_file():
        raise UsageError(f"--db must be a file path, got {str(path)!r} (a directory)")
    existed = path.is_file()
    try:
        conn = init_db(path)
        check_schema(conn)
        orders = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
        conn.close()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"{str(path)!r} is not a deliverylab database ({exc})") from None
    if existed:
        print(safe_text(f"database {path} is ready (schema already there; {orders} orders kept)"))
    else:
        print(safe_text(f"created {path} (WAL mode; tables: {', '.join(TABLES)})"))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    path = db_path(args)
    open_db(args).close()  # fail here, with a clear message, not inside the server
    import uvicorn

    from .api import create_app

    sock = listen(args.host, args.port)
    app = create_app(path)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=not args.no_access_log,
                            timeout_graceful_shutdown=5)
    print(safe_text(f"deliverylab API on http://{args.host}:{args.port}  (database {path};"
                    f" Ctrl-C to stop)"), flush=True)
    uvicorn.Server(config).run(sockets=[sock])
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


def cmd_worker(args: argparse.Namespace) -> int:
    from .clock import SystemClock
    from .faults import Faults
    from .ids import Ids
    from .worker import Worker

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
    conn = open_db(args)

    def echo(line: str) -> None:
        print(safe_text(_wall(line)), flush=True)

    clock, ids = SystemClock(), Ids()
    worker = Worker(conn, clock=clock, ids=ids, mode=args.mode, faults=faults,
                    visibility_timeout=args.visibility_timeout, max_messages=args.max_messages,
                    max_receives=args.max_receives, backoff_base=args.backoff_base,
                    backoff_cap=args.backoff_cap, name=name, echo=echo,
                    crash_exits=args.crash_exits, work_time=args.work_time)

    def on_signal(signum: int, frame: Any) -> None:
        if worker._stopping:  # a second Ctrl-C: stop now; open transactions roll back
            raise KeyboardInterrupt
        worker.stop()
        print(safe_text(f"[{name}] {signal.Signals(signum).name}: stopping after the current"
                        f" step"), flush=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    fault_text = ", ".join(f"{p}={r:g}" for p, r in rates.items() if r) or "none"
    print(safe_text(f"[{name}] started: mode={worker.mode}"
                    f" visibility_timeout={args.visibility_timeout:g}s"
                    f" max_receives={args.max_receives} faults: {fault_text}"
                    f" (seed {faults.seed}) db={db_path(args)}"), flush=True)
    try:
        stats = worker.run_forever(poll_interval=args.poll_interval)
    except KeyboardInterrupt:
        print(safe_text(f"[{name}] interrupted"), flush=True)
        return 130
    finally:
        conn.close()
    totals = stats.as_dict()
    counts = " ".join(f"{k}={v}" for k, v in totals.items() if k != "steps")
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
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Failure(f"cannot reach the API at {url} ({reason}); is 'deliverylab api'"
                      f" running? (--url or {URL_ENV} to point elsewhere)") from None
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw.decode(errors="replace")
    return status, str(reason), payload


def cmd_order(args: argparse.Namespace) -> int:
    url = (args.url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    if not re.match(r"^https?://[^/\s]+$", url):
        raise UsageError(f"--url must look like http://HOST:PORT, got {url!r}")
    body: dict[str, Any] = {"itemId": args.item, "qty": args.qty}
    if args.order_id is not None:
        body = {"orderId": args.order_id, **body}
    headers = {} if args.idempotency_key is None else {"Idempotency-Key": args.idempotency_key}
    status, reason, payload = _http("POST", url + "/orders", body, headers)
    text = safe_text(payload) if isinstance(payload, str) else safe_json(payload)
    print(f"{status} {safe_text(reason)} {text}", flush=True)
    return 0 if 200 <= status < 300 else 1


def cmd_status(args: argparse.Namespace) -> int:
    from .status import collect, render

    conn = open_db(args)
    try:
        while True:
            report = collect(conn)
            if args.json:
                print(safe_json(report), flush=True)
            else:
                if args.watch:
                    print("\033[H\033[2J" + time.strftime("%H:%M:%S"), end="\n\n")
                print(render(report, db=str(db_path(args))), flush=True)
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    finally:
        conn.close()


def cmd_trace(args: argparse.Namespace) -> int:
    from .status import render_trace, trace

    conn = open_db(args)
    try:
        story = trace(conn, args.order)
    finally:
        conn.close()
    if story is None:
        raise Failure(f"no order or event {args.order!r} in {db_path(args)}")
    print(safe_json(story) if args.json else render_trace(story))
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from .check import check
    from .clock import SystemClock
    from .reconcile import diff, repair
    from .status import snapshot, table

    conn = open_db(args)
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
              f" ({result.items_changed} item(s) changed); added {result.events_marked}"
              f" event(s) to the inbox, so a late delivery of one is skipped as a duplicate")
        print(safe_text(f"verdict: {check(conn).verdict}"))
    finally:
        conn.close()
    return 0


def cmd_redrive(args: argparse.Namespace) -> int:
    from .clock import SystemClock
    from .ids import Ids
    from .queue import Queue

    conn = open_db(args)
    try:
        queue = Queue(conn, clock=SystemClock(), ids=Ids())
        try:
            moved = queue.redrive(args.message_ids or None)
        except InvalidInput as exc:
            raise UsageError(f"{exc.value!r} is not a dead letter's message id") from None
    finally:
        conn.close()
    print(f"redrove {moved} dead letter(s) back to the queue (delivery count reset to 0)")
    return 0


def cmd_drop(args: argparse.Namespace) -> int:
    from .clock import SystemClock
    from .ids import Ids
    from .queue import Queue

    conn = open_db(args)
    try:
        if args.refs:
            rows = []
            for ref in args.refs:
                found = conn.execute(
                    "SELECT message_id, event_id, correlation_id FROM queue_messages"
                    " WHERE message_id = ?1 OR event_id = ?1 OR correlation_id = ?1",
                    (ref,)).fetchall()
                if not found:
                    raise UsageError(f"no queued message for {ref!r} (a message id, event id"
                                     f" or order id)")
                rows += found
        else:
            rows = conn.execute(
                "SELECT message_id, event_id, correlation_id FROM queue_messages"
                " ORDER BY seq LIMIT ?", (args.count,)).fetchall()
        queue = Queue(conn, clock=SystemClock(), ids=Ids())
        dropped = 0
        for r in rows:
            if queue.drop(r["message_id"], reason="dropped by 'deliverylab drop'",
                          worker="chaos"):
                dropped += 1
                print(safe_text(f"dropped {r['message_id']} event={r['event_id']}"
                                f" order={r['correlation_id']} (logged as lost)"))
    finally:
        conn.close()
    print(f"{dropped} message(s) dropped behind the workers' backs; 'deliverylab status' shows"
          f" the drift, 'deliverylab reconcile' repairs it")
    return 0


# -- the parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .worker import Mode

    parser = argparse.ArgumentParser(
        prog="deliverylab",
        description="The message-delivery lab as real processes: an HTTP API, workers,"
                    " status, trace and reconcile, on one SQLite file.")
    parser.add_argument("--version", action="version", version=f"deliverylab {__version__}")
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", metavar="PATH", type=_text_arg(4096),
                    help=f"the database file (default: ${DB_ENV} or {DEFAULT_DB})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init-db", parents=[db], help="create the database (idempotent)")
    p.set_defaults(run=cmd_init_db)

    p = sub.add_parser("api", parents=[db], help="serve the HTTP API (POST /orders, …)")
    p.add_argument("--host", default="127.0.0.1", type=_text_arg(255),
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", default=3000, type=_int_arg(1, 65535), help="default 3000")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=cmd_api)

    p = sub.add_parser(
        "worker", parents=[db], help="consume OrderPlaced events, one line per step",
        description="Receive, apply, ack — printing one line per step. Fault rates come from"
                    " the flags or from the environment (ACK_FAIL_RATE=0.8, …); default 0."
                    " SIGTERM or Ctrl-C stops after the current step.")
    p.add_argument("--mode", default=Mode.IDEMPOTENT.value, choices=[m.value for m in Mode],
                   help="default idempotent")
    p.add_argument("--visibility-timeout", type=_num_arg(0, 12 * 3600), default=2.0,
                   metavar="SECONDS", help="lease length (default 2, like the seed)")
    p.add_argument("--max-receives", type=_int_arg(1, 1000), default=5,
                   help="deliveries before a message is dead-lettered (default 5)")
    p.add_argument("--max-messages", type=_int_arg(1, 1000), default=1,
                   help="messages leased per receive (default 1)")
    p.add_argument("--poll-interval", type=_num_arg(0.001, 60), default=0.2,
                   metavar="SECONDS", help="wait when the queue is empty (default 0.2)")
    p.add_argument("--backoff-base", type=_num_arg(0, 3600), default=0.1, metavar="SECONDS")
    p.add_argument("--backoff-cap", type=_num_arg(0, 3600), default=10.0, metavar="SECONDS")
    p.add_argument("--work-time", type=_num_arg(0, 3600), default=0.0, metavar="SECONDS",
                   help="pretend each message takes this long to process")
    for point in FAULT_POINTS:
        p.add_argument(RATE_FLAGS[point], dest=point + "_rate", type=_num_arg(0, 1),
                       default=None, metavar="RATE",
                       help=f"fault rate in [0, 1] (env {RATE_ENVS[point]})")
    p.add_argument("--crash-exits", action="store_true",
                   help="an injected crash ends the process (exit 70) instead of simulating it")
    p.add_argument("--seed", type=_int_arg(0, 2**63 - 1), default=None,
                   help="seed of the fault schedule (default: random, printed at start)")
    p.add_argument("--name", type=_text_arg(), default=None,
                   help="name in the output and the trace (default worker-PID)")
    p.set_defaults(run=cmd_worker)

    p = sub.add_parser("order", help="POST /orders to the running API (curl not needed)")
    p.add_argument("--item", required=True, type=_text_arg(), help="itemId, e.g. coffee-beans")
    p.add_argument("--qty", type=_int_arg(1, MAX_QTY), default=1, help="1..10000 (default 1)")
    p.add_argument("--order-id", type=_text_arg(), default=None,
                   help="orderId (default: the server makes one)")
    p.add_argument("--idempotency-key", type=_text_arg(200), default=None)
    p.add_argument("--url", default=None,
                   help=f"the API (default ${URL_ENV} or {DEFAULT_URL})")
    p.set_defaults(run=cmd_order)

    p = sub.add_parser("status", parents=[db],
                       help="queue, inbox, projection vs truth, dead letters, the verdict")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", type=_num_arg(0.1, 3600), default=None, metavar="SECONDS",
                   help="redraw every SECONDS until Ctrl-C")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("trace", parents=[db], help="every delivery of one order's event")
    p.add_argument("order", metavar="ORDER_ID", help="an order id (or an event id)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_trace)

    p = sub.add_parser("reconcile", parents=[db],
                       help="show the drift from the truth, then repair the projection")
    p.add_argument("--dry-run", action="store_true", help="show the drift only")
    p.set_defaults(run=cmd_reconcile)

    p = sub.add_parser("redrive", parents=[db], help="move dead letters back to the queue")
    p.add_argument("message_ids", nargs="*", metavar="MESSAGE_ID",
                   help="only these (default: all)")
    p.set_defaults(run=cmd_redrive)

    p = sub.add_parser("drop", parents=[db],
                       help="delete queued messages behind the workers' backs (fault injection)")
    p.add_argument("refs", nargs="*", metavar="ID", help="message, event or order ids")
    p.add_argument("--count", type=_int_arg(1, 1_000_000), default=1,
                   help="without ids: drop the N oldest queued messages (default 1)")
    p.set_defaults(run=cmd_drop)
    return parser


def _safe_output() -> None:
    """Never die on an arrow: a terminal that cannot show '→' gets an escape instead."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding not in ("utf8", "utf16", "utf32") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    _safe_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"deliverylab {args.command}"
    try:
        return args.run(args)
    except UsageError as exc:
        print(safe_text(f"{prog}: error: {exc}"), file=sys.stderr)
        return 2
    except Failure as exc:
        print(safe_text(f"{prog}: error: {exc}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `deliverylab trace … | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
