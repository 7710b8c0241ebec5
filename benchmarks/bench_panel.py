"""How fast the live lab panel redraws, for a lab of 1,000 orders.

The budget: a slider change redraws within 100 ms. Three numbers are measured on a lab with
1,000 orders caught mid-run (a queue of redeliveries, an inbox, some dead letters):

* **slider change**: set a fault-rate slider, as a reader does. The knob reaches every
  worker and the status line says so; the tables are redrawn only if a row changed, and a
  slider changes none;
* **full redraw**: every view recomputed from the database (checker verdict, counters,
  chart, four tables), as after a step;
* **step**: one auto-run tick, a worker step plus the full redraw.

Usage: ``python benchmarks/bench_panel.py [--orders 1000] [--repeat 30]``. Exits with status 1
when the slowest slider change or the median full redraw is over budget.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from deliverylab.book.panel import LabPanel

BUDGET_S = 0.100


def measure(orders: int, repeat: int) -> dict[str, list[float]]:
    panel = LabPanel(seed=7, orders=orders, ack_fail=0.8, limit=10)
    panel.place_orders()
    for _ in range(orders):  # mid-run: about half the orders applied, redeliveries queued
        panel.lab.step()
        panel.steps += 1
    panel._record()
    panel.refresh(force=True)  # warm up (imports, first render)
    times: dict[str, list[float]] = {"slider change": [], "full redraw": [], "step": []}
    for i in range(repeat):
        t0 = time.perf_counter()
        panel.ack_fail.value = 0.5 if i % 2 else 0.8
        times["slider change"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        panel.refresh(force=True)
        times["full redraw"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        panel.autorun.value += 1  # one auto-run tick
        times["step"].append(time.perf_counter() - t0)
    counts = panel.counts
    print(f"lab: {counts['orders']} orders, {counts['deliveries']} deliveries,"
          f" {counts['queued']} queued, {counts['inbox']} in the inbox,"
          f" {counts['dead_lettered']} dead letters")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    times = measure(args.orders, args.repeat)
    print(f"{'action':<14} {'median ms':>10} {'max ms':>8}   (budget {BUDGET_S * 1000:.0f} ms)")
    for name, samples in times.items():
        print(f"{name:<14} {statistics.median(samples) * 1000:>10.1f}"
              f" {max(samples) * 1000:>8.1f}")
    over = (max(times["slider change"]) > BUDGET_S
            or statistics.median(times["full redraw"]) > BUDGET_S)
    print("over budget" if over else "within budget")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
