"""What durability costs: ``synchronous=FULL`` against ``synchronous=NORMAL``, in one run.

    python benchmarks/bench_durability.py [--commits 2000] [--repeat 5] [--dir PATH]

In WAL mode, ``synchronous=NORMAL`` does not fsync at a commit: the commit is in the WAL file,
in the operating system's cache, and survives a crash of the process but not a power cut or a
kernel panic. ``synchronous=FULL`` fsyncs the WAL at every commit, so a commit that returned is
on the disk. https://www.sqlite.org/pragma.html#pragma_synchronous

Two measurements, each with both settings, on a database file in WAL mode with the engine's
connection settings (``store.connect``), in a directory on a real file system (``--dir``; by
default the system's temporary directory, which must not be a RAM disk for the numbers to
mean anything: the script prints the file system it ran on):

* one-row committed writes: ``INSERT`` of one small row, one commit each;
* ``place_order``: the order row and its ``OrderPlaced`` event, one commit each (what the API
  does for every ``POST /orders``).

Every measurement runs ``--repeat`` times on a fresh database, in interleaved rounds so that
the machine's load falls on all of them alike; the table gives the median and the best, and
the ratio of FULL's median to NORMAL's median measured in the same run. Each timed run ends
by closing its connection, which checkpoints the WAL into the database file, so a run pays for
moving what it wrote (with FULL, that checkpoint fsyncs too).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

try:
    import deliverylab  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.clock import SystemClock
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order

SETTINGS = ("NORMAL", "FULL")
ITEMS = [f"item-{i}" for i in range(50)]


def set_synchronous(conn: sqlite3.Connection, setting: str) -> None:
    conn.execute(f"PRAGMA synchronous = {setting}")
    # PRAGMA synchronous answers 1 for NORMAL and 2 for FULL: check it took.
    got = conn.execute("PRAGMA synchronous").fetchone()[0]
    assert got == {"NORMAL": 1, "FULL": 2}[setting], (setting, got)


def one_row_writes(n: int, setting: str) -> Callable[[Path], Callable[[], int]]:
    def make(path: Path) -> Callable[[], int]:
        conn = store.connect(path, must_exist=False)
        conn.execute("CREATE TABLE w (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        set_synchronous(conn, setting)

        def run() -> int:
            for i in range(n):
                with store.transaction(conn):
                    conn.execute("INSERT INTO w (body) VALUES (?)", (f"row {i}",))
            conn.close()
            return n
        return run
    return make


def place_orders(n: int, setting: str) -> Callable[[Path], Callable[[], int]]:
    def make(path: Path) -> Callable[[], int]:
        conn = store.init_db(path)
        set_synchronous(conn, setting)
        queue = Queue(conn, clock=SystemClock(), ids=Ids(seed=0))

        def run() -> int:
            for i in range(n):
                place_order(queue, item_id=ITEMS[i % len(ITEMS)], qty=1, order_id=f"o-{i}")
            conn.close()
            return n
        return run
    return make


def timed(fn: Callable[[], int]) -> float:
    """Run ``fn`` (which returns how many commits it made); commits per second."""
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def measure(repeat: int, directory: Path,
            makers: dict[str, Callable[[Path], Callable[[], int]]]) -> dict[str, list[float]]:
    """Every measurement once per round, round after round, each on a fresh database."""
    rates: dict[str, list[float]] = {label: [] for label in makers}
    for _ in range(repeat):
        for label, make in makers.items():
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                rates[label].append(timed(make(Path(tmp) / "bench.db")))
    return rates


def file_system(directory: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(directory)], capture_output=True, text=True,
                             check=True).stdout.splitlines()[-1].split()
        return f"{out[1]} ({out[0]})"
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the database files go (a real disk, not a RAM disk)")
    args = parser.parse_args(argv)
    if args.commits < 1 or args.repeat < 1:
        parser.error(f"--commits and --repeat must be >= 1, got {args.commits}, {args.repeat}")
    if not args.dir.is_dir():
        parser.error(f"argument --dir: not a directory, got '{args.dir}'")
    n, r = args.commits, args.repeat

    print(f"deliverylab durability benchmark: SQLite {sqlite3.sqlite_version}, Python "
          f"{sys.version.split()[0]}, {os.cpu_count()} CPUs, WAL mode, {n:,} commits per run,"
          f" {r} interleaved rounds;\nfiles in {args.dir} on {file_system(args.dir)}\n",
          flush=True)
    plan: dict[str, tuple[str, Callable[[Path], Callable[[], int]]]] = {}
    for what, maker in (("one-row write, 1 commit", one_row_writes),
                        ("place_order: order + event, 1 commit", place_orders)):
        for setting in SETTINGS:
            plan[f"{what}, synchronous={setting}"] = (what, maker(n, setting))
    rates = measure(r, args.dir, {label: make for label, (_, make) in plan.items()})
    med = {label: statistics.median(v) for label, v in rates.items()}

    print("| measurement | median commits/s | best commits/s | FULL / NORMAL (medians) |")
    print("|---|---:|---:|---|")
    for label, (what, _) in plan.items():
        normal = f"{what}, synchronous=NORMAL"
        ratio = f"{med[label] / med[normal]:.2f}x" if label != normal else ""
        print(f"| {label} | {med[label]:,.0f} | {max(rates[label]):,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
