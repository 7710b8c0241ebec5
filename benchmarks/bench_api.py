"""The lab's HTTP API under load, and how long an order takes to reach the projection.

Real processes, as a reader runs them: ``deliverylab api`` and ``deliverylab worker`` on a
fresh database in a temporary directory, on a free loopback port.

1. **POST /orders**: 16 concurrent clients (one keep-alive connection each) send orders as
   fast as the server answers; throughput and the p50 / p99 latency of each request. Once
   with the API's default ``synchronous=FULL`` (every commit waits for its fsync, so a 201
   survives a power cut), once with ``--synchronous normal``: the price of that durability.
   Then the same with a single client, where no two orders can share a commit.
2. **201 → applied**: the same burst with 1 and then 2 workers running (no faults): for each
   order, the time from its 201 to the worker's ``applied`` row in the delivery log (both
   stamped by the same machine clock), and how long the workers take to drain the burst.
   A trickle of single orders shows the latency of an idle worker (its poll interval).
3. **A write lock held elsewhere**: another connection holds ``BEGIN IMMEDIATE`` while 45
   clients POST at once; how long each waits for its 503, and how fast ``GET /health``
   answers meanwhile (the target is under 100 ms).

Usage: ``python benchmarks/bench_api.py [--orders 3000] [--clients 16] [--e2e-orders 1500]``.
Prints a Markdown table. Exits with status 1 if any request got a 5xx or a connection error
(the 503s of part 3 excepted: they are what it measures).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
ITEMS = [f"item-{i:02d}" for i in range(20)]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.endswith("_RATE")}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), e.get("PYTHONPATH", "")])
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ApiRig:
    def __init__(self, tmp: Path, name: str) -> None:
        self.db = tmp / f"{name}.db"
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self._run("init-db")
        self.port = free_port()

    def _run(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "deliverylab", *args, "--db", str(self.db)],
                       env=env(), check=True, capture_output=True, timeout=60)

    def start(self, *args: str) -> None:
        log = open(self.tmp / f"{self.db.stem}-{len(self.procs)}.log", "w")  # noqa: SIM115
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "deliverylab", *args, "--db", str(self.db)], env=env(),
            stdout=log, stderr=subprocess.STDOUT))

    def api(self, *extra: str) -> None:
        self.start("api", "--port", str(self.port), "--no-access-log", "--log-level", "warning",
                   *extra)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the API did not start")

    def workers(self, n: int) -> None:
        for i in range(n):
            self.start("worker", "--name", f"worker-{i + 1}")

    def connect(self) -> Any:
        if str(ROOT / "src") not in sys.path:
            sys.path.insert(0, str(ROOT / "src"))
        from deliverylab.engine import store

        return store.connect(self.db)

    def applied_at(self) -> dict[str, float]:
        conn = self.connect()
        try:
            return {r[0]: r[1] for r in conn.execute(
                "SELECT correlation_id, min(at) FROM delivery_log WHERE outcome = 'applied'"
                " GROUP BY correlation_id")}
        finally:
            conn.close()

    def queued(self) -> int:
        conn = self.connect()
        try:
            return conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
        finally:
            conn.close()

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def burst(port: int, orders: list[dict[str, Any]], clients: int) -> list[tuple[str, int, float,
                                                                               float]]:
    """Send ``orders`` from ``clients`` threads; (orderId, status, latency, wall time of the
    answer) per order."""
    out: list[tuple[str, int, float, float]] = []
    lock = threading.Lock()

    def client(mine: list[dict[str, Any]]) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        rows = []
        for order in mine:
            body = json.dumps(order).encode()
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/orders", body=body,
                             headers={"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=60)
            rows.append((order["orderId"], status, time.perf_counter() - t0, time.time()))
        conn.close()
        with lock:
            out.extend(rows)

    threads = [threading.Thread(target=client, args=(orders[i::clients],))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def make_orders(n: int, prefix: str) -> list[dict[str, Any]]:
    rng = random.Random(prefix)
    return [{"orderId": f"{prefix}-{i:06d}", "itemId": rng.choice(ITEMS), "qty": rng.randint(1, 5)}
            for i in range(n)]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(
        values) > 1 else values[0]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def bench_post(tmp: Path, n: int, clients: int, synchronous: str) -> tuple[list[str], int]:
    lab = ApiRig(tmp, f"post-{clients}-{synchronous}")
    try:
        lab.api("--synchronous", synchronous)
        burst(lab.port, make_orders(200, f"warm-{clients}-{synchronous}"), clients)
        t0 = time.perf_counter()
        rows = burst(lab.port, make_orders(n, f"post-{clients}-{synchronous}"), clients)
        elapsed = time.perf_counter() - t0
    finally:
        lab.close()
    bad = sum(1 for r in rows if r[1] != 201)
    lat = [r[2] for r in rows]
    return [f"POST /orders, {clients} client{'s' if clients > 1 else ''}, {n} orders, no worker,"
            f" synchronous={synchronous.upper()}",
            f"{n / elapsed:,.0f} orders/s", ms(pct(lat, 50)), ms(pct(lat, 99)),
            f"{bad} errors"], bad


def get_health(port: int) -> tuple[int, float]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    t0 = time.perf_counter()
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - t0
    finally:
        conn.close()


def bench_locked(tmp: Path, requests: int = 45, probes: int = 20) -> tuple[list[list[str]], int]:
    """Another process holds the write lock while ``requests`` clients POST at once."""
    lab = ApiRig(tmp, "locked")
    try:
        lab.api()
        holder = lab.connect()
        holder.execute("BEGIN IMMEDIATE")
        answers: list[tuple[str, int, float, float]] = []
        threads = [threading.Thread(target=lambda o=o: answers.extend(burst(lab.port, [o], 1)))
                   for o in make_orders(requests, "locked")]
        try:
            for t in threads:
                t.start()
            time.sleep(0.3)  # every POST is queued on the server now
            health = [get_health(lab.port) for _ in range(probes)]
            for t in threads:
                t.join()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    finally:
        lab.close()
    refused = sum(1 for a in answers if a[1] == 503)
    bad = len(answers) - refused + sum(1 for status, _ in health if status != 503)
    lat = [a[2] for a in answers]
    took = [t for _, t in health]
    return [
        [f"POST /orders, {requests} at once, write lock held by another process",
         "", ms(pct(lat, 50)), ms(pct(lat, 99)), f"{refused} × 503"],
        [f"GET /health meanwhile, {probes} probes (reports writable: false)", "",
         ms(pct(took, 50)), ms(pct(took, 99)), f"{probes - sum(1 for s, _ in health if s == 503)}"
         " not 503"],
    ], bad


def bench_e2e(tmp: Path, workers: int, n: int, clients: int) -> tuple[list[list[str]], int]:
    lab = ApiRig(tmp, f"e2e{workers}")
    try:
        lab.api()
        lab.workers(workers)
        burst(lab.port, make_orders(50, f"warm{workers}"), 4)
        deadline = time.monotonic() + 60
        while lab.queued() and time.monotonic() < deadline:
            time.sleep(0.05)
        start = time.time()
        rows = burst(lab.port, make_orders(n, f"burst{workers}"), clients)
        sent = time.time()
        deadline = time.monotonic() + 300
        while lab.queued() and time.monotonic() < deadline:
            time.sleep(0.05)
        applied = lab.applied_at()
        trickle = []
        for order in make_orders(40, f"trickle{workers}"):
            trickle += burst(lab.port, [order], 1)
            time.sleep(0.05)
        deadline = time.monotonic() + 60
        while lab.queued() and time.monotonic() < deadline:
            time.sleep(0.05)
        applied_trickle = lab.applied_at()
    finally:
        lab.close()
    bad = sum(1 for r in rows + trickle if r[1] != 201)
    e2e = [applied[oid] - at for oid, _, _, at in rows if oid in applied]
    missing = len(rows) - len(e2e)
    done = max(applied[oid] for oid, *_ in rows if oid in applied)
    lat = [r[2] for r in rows]
    idle = [applied_trickle[oid] - at for oid, _, _, at in trickle if oid in applied_trickle]
    label = f"{workers} worker{'s' if workers > 1 else ''}"
    return [
        [f"POST /orders, {clients} clients, {n} orders, {label} running",
         f"{n / (sent - start):,.0f} orders/s", ms(pct(lat, 50)), ms(pct(lat, 99)),
         f"{bad} errors"],
        [f"201 → applied, burst of {n}, {label}",
         f"drained at {n / (done - start):,.0f} orders/s", ms(pct(e2e, 50)), ms(pct(e2e, 99)),
         f"{missing} not applied"],
        [f"201 → applied, one order every 50 ms, {label} (poll 0.2 s)", "",
         ms(pct(idle, 50)), ms(pct(idle, 99)), ""],
    ], bad + missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=3000)
    parser.add_argument("--e2e-orders", type=int, default=1500)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args(argv)
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        # 16 clients: orders that queue up share a commit (group commit). 1 client: every
        # order pays its own commit, so the latency shows what an fsync costs here.
        for clients, n in ((args.clients, args.orders), (1, 500)):
            for synchronous in ("full", "normal"):
                row, b = bench_post(Path(tmp), n, clients, synchronous)
                rows.append(row)
                bad += b
        for workers in (1, 2):
            more, b = bench_e2e(Path(tmp), workers, args.e2e_orders, args.clients)
            rows += more
            bad += b
        more, b = bench_locked(Path(tmp))
        rows += more
        bad += b
    header = ["what", "rate", "p50", "p99", "failures"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print(f"\n{os.cpu_count()} CPU(s); client, API and workers share them. Python"
          f" {sys.version.split()[0]}; SQLite WAL, the API's writes with synchronous=FULL"
          f" unless the row says NORMAL, the workers' with NORMAL.")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
