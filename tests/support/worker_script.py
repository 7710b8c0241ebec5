"""Entry points for the tests that run real processes on one database file.

``python tests/support/worker_script.py work DB …``  prints ``ready``, runs a worker on the wall
clock until the queue is empty (and, with ``--stop-file``, until that file exists too), then
prints its stats as JSON.
``python tests/support/worker_script.py claim DB …`` only claims: it receives with a long lease
until nothing is left and prints the message ids it got, to look for duplicate claims.
``command(…)`` is the command line that runs this file (its child needs the environment of
``support.processes.env()``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.faults import Faults
from deliverylab.engine.ids import Ids
from deliverylab.engine.worker import Worker

HERE = Path(__file__).resolve().parent


def command(*args: object) -> list[str]:
    return [sys.executable, str(HERE / "worker_script.py"), *map(str, args)]


def queue_empty(conn) -> bool:
    return conn.execute("SELECT NOT EXISTS (SELECT 1 FROM queue_messages)").fetchone()[0] == 1


def work(args: argparse.Namespace) -> None:
    conn = store.connect(args.db)
    faults = Faults(seed=args.fault_seed, ack_fail=args.ack_fail)
    worker = Worker(store=conn, clock=SystemClock(), mode=args.mode, faults=faults,
                    broker=Queue(conn, clock=SystemClock(), ids=Ids(),
                                max_receives=args.max_receives),
                    visibility_timeout=args.visibility_timeout,
                    max_messages=args.max_messages,
                    work_time=args.work_time, name=args.name)
    stop_file = Path(args.stop_file) if args.stop_file else None
    print("ready", flush=True)  # imported and connected: from here on a kill lands mid-work
    while True:
        if worker.step() == 0:
            if queue_empty(conn) and (stop_file is None or stop_file.exists()):
                break
            time.sleep(args.poll)
    print(json.dumps(worker.stats.as_dict()), flush=True)


def claim(args: argparse.Namespace) -> None:
    conn = store.connect(args.db)
    queue = Queue(conn, clock=SystemClock(), ids=Ids())
    got: list[str] = []
    if args.barrier:  # a barrier across processes: start only once every claimer is connected
        barrier = Path(args.barrier)
        (barrier / f"{args.name}.ready").touch()
        deadline = time.time() + 60
        while len(list(barrier.glob("*.ready"))) < args.parties and time.time() < deadline:
            time.sleep(0.001)
    while True:
        batch = queue.receive(3600, args.max_messages, worker=args.name)
        if not batch:
            break
        got.extend(d.message_id for d in batch)
        time.sleep(args.pause)
    print(json.dumps(got), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="verb", required=True)
    w = sub.add_parser("work")
    w.add_argument("db")
    w.add_argument("--name", default="worker")
    w.add_argument("--mode", default="idempotent")
    w.add_argument("--ack-fail", type=float, default=0.0)
    w.add_argument("--fault-seed", type=int, default=0)
    w.add_argument("--visibility-timeout", type=float, default=0.5)
    w.add_argument("--max-messages", type=int, default=1)
    w.add_argument("--max-receives", type=int, default=50)
    w.add_argument("--work-time", type=float, default=0.0)
    w.add_argument("--poll", type=float, default=0.01)
    w.add_argument("--stop-file")
    c = sub.add_parser("claim")
    c.add_argument("db")
    c.add_argument("--name", default="claimer")
    c.add_argument("--max-messages", type=int, default=3)
    c.add_argument("--barrier", help="a directory where the claimers meet before claiming,"
                                      " so several processes really compete")
    c.add_argument("--parties", type=int, default=1, help="how many claimers meet there")
    c.add_argument("--pause", type=float, default=0.0,
                   help="seconds between claims, outside any transaction, as if working: a"
                        " claimer that never pauses can keep the write lock to itself")
    args = parser.parse_args(argv)
    {"work": work, "claim": claim}[args.verb](args)


if __name__ == "__main__":
    main()
