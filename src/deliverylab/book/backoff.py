"""Exponential backoff and jitter: a deterministic replay of the AWS experiment.

Marc Brooker's post "Exponential Backoff And Jitter" (AWS Architecture Blog, 2015,
https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/) compares retry sleeps
with a small discrete-event simulator, ``src/backoff_simulator.py`` in
https://github.com/aws-samples/aws-arch-backoff-simulator. :func:`simulate` mirrors its model:

* One row on a remote server carries a version number (optimistic concurrency control).
* ``clients`` clients start together at t = 0 and each wants to update the row once. A client
  reads the version, then writes conditioned on that version. The server accepts the write only
  if the version is unchanged (and bumps it); otherwise the write fails.
* Each of the four messages of an attempt (read request, read reply, write request, write reply)
  takes its own network delay ``|Normal(latency, latency_sd)|``: 10 ms mean and 2 ms standard
  deviation, the post's "mean of 10ms and variance of 4ms".
* After its n-th failed write a client sleeps ``delay(strategy, n)`` (n starts at 1, as in the
  original) and starts over with a read; after a successful write it stops.
* ``work`` counts writes reaching the server (the original's ``stats.calls``; reads are free).
  ``completion_time`` is when the last client hears that its write succeeded (the original's
  ``run_sim`` return value). Defaults are the original's base 5 ms and cap 2 s, in seconds here.

Only two things differ, both for reproducibility: every run draws from its own
``random.Random(seed)`` instead of the global generator, and simultaneous events are served in
the order they were scheduled. The original averages 100 runs per point; :func:`sweep` averages
the seeds it is given.

What the replay shows (10-100 clients, a few seeds each), against the post:

* No backoff: work grows as the square of the clients and completion time linearly. With a
  perfectly steady network (``latency_sd=0``) every round is a lockstep: all waiting clients
  write, one wins, so the work is exactly N(N+1)/2. The network's jitter pulls clients out of
  step: a write only loses to a win in the ~20 ms between its read and its write, while a
  client cycles every ~40 ms, so about half the waiting clients collide per win: close to N²/4.
* Plain exponential backoff helps a little (about 10% less work at 50 clients, 25% at 100)
  and takes 30 times as long. Identical clients sleep identical amounts, so backoff alone does
  not break the herd: with ``latency_sd=0`` it does exactly the work of no backoff. It helps
  only because the network's jitter widens the herd a little every round until, during the
  long capped rounds, it spans several conflict windows and more than one client wins.
* Full Jitter does the least work; Equal Jitter a few percent more, and takes clearly longer;
  Decorrelated Jitter makes more calls than Full (10-25%) but finishes about as fast or
  faster. At 100 clients Full Jitter makes fewer than half the calls of plain exponential
  backoff ("we've reduced our call count by more than half"). All as published.
* Jitter does not remove the superlinear growth ("none of these approaches fundamentally
  change the N² nature"): calls per client still grow with N. In this range the exponent is
  only about 1.3, because when sleeps are long against the 20 ms conflict window most retries
  succeed; the quadratic term takes over only at many hundreds of clients.
* No backoff completes fastest of all: backoff buys less work with time. The post compares
  the backoff strategies with one another on time, and this replay agrees with that ranking.
"""

from __future__ import annotations

import heapq
import itertools
import math
import numbers
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

STRATEGIES = ("none", "exponential", "full_jitter", "equal_jitter", "decorrelated_jitter")


def _check_strategy(strategy: object) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an Integral too, but True clients is a bug, not one client. NumPy ints are fine.
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_real(name: str, value: object, minimum: float, *, strict: bool) -> float:
    sign = ">" if strict else ">="
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not math.isfinite(value) or value < minimum or (strict and value == minimum)):
        raise ValueError(f"{name} must be a finite number {sign} {minimum:g}, got {value!r}")
    return float(value)


def _check_base_cap(base: float, cap: float) -> tuple[float, float]:
    base = _check_real("base", base, 0, strict=True)
    if _check_real("cap", cap, 0, strict=True) < base:
        raise ValueError(f"cap must be >= base ({base!r}), got {cap!r}")
    return base, float(cap)


def _ceiling(attempt: int, base: float, cap: float) -> float:
    """``min(cap, base * 2**attempt)`` without overflowing for huge attempts."""
    try:
        return min(cap, math.ldexp(base, attempt))
    except OverflowError:
        return cap


def _draw(
    strategy: str, attempt: int, base: float, cap: float, prev: float, rng: random.Random
) -> float:
    """The post's sleep formulas, unchecked (the simulator calls this in its inner loop)."""
    if strategy == "none":
        return 0.0
    if strategy == "decorrelated_jitter":
        # Ignores the attempt: the next sleep grows from the previous one, not from n.
        return min(cap, rng.uniform(base, prev * 3))
    v = _ceiling(attempt, base, cap)
    if strategy == "exponential":
        return v
    if strategy == "full_jitter":
        return rng.uniform(0, v)
    return v / 2 + rng.uniform(0, v / 2)  # equal_jitter


def delay(
    strategy: str, attempt: int, *, base: float, cap: float, prev: float, rng: random.Random
) -> float:
    """Seconds to sleep before retry number ``attempt`` (the post's formulas).

    With ``v = min(cap, base * 2**attempt)``:

    * ``none``: 0, retry at once.
    * ``exponential``: ``v``.
    * ``full_jitter``: ``uniform(0, v)``.
    * ``equal_jitter``: ``v/2 + uniform(0, v/2)``.
    * ``decorrelated_jitter``: ``min(cap, uniform(base, prev*3))``, where ``prev`` is the
      previous sleep (``base`` before the first one). Only this strategy reads ``prev``.

    See https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/.
    """
    _check_strategy(strategy)
    attempt = _check_int("attempt", attempt, 0)
    base, cap = _check_base_cap(base, cap)
    prev = _check_real("prev", prev, 0, strict=True)
    if strategy == "decorrelated_jitter" and prev < base:
        raise ValueError(f"prev must be >= base ({base!r}), got {prev!r}")
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random, got {rng!r}")
    return _draw(strategy, attempt, base, cap, prev, rng)


@dataclass(frozen=True, slots=True)
class SimResult:
    """One run of :func:`simulate`."""

    strategy: str
    clients: int
    seed: int
    work: int  # writes that reached the server, failed or not
    failures: int  # writes rejected because the version had moved on
    completion_time: float  # seconds until the last client learned it succeeded
    max_attempts: int  # most writes any single client needed


def simulate(
    strategy: str,
    clients: int,
    *,
    base: float = 0.005,
    cap: float = 2.0,
    seed: int = 0,
    latency: float = 0.010,
    latency_sd: float = 0.002,
) -> SimResult:
    """Run ``clients`` OCC writers against one row until each has written once.

    The model (see the module docstring) follows aws-samples/aws-arch-backoff-simulator, the
    simulator behind https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/.
    The same arguments always give the same result.
    """
    _check_strategy(strategy)
    clients = _check_int("clients", clients, 1)
    base, cap = _check_base_cap(base, cap)
    seed = _check_int("seed", seed, 0)
    latency = _check_real("latency", latency, 0, strict=True)
    latency_sd = _check_real("latency_sd", latency_sd, 0, strict=False)

    rng = random.Random(seed)

    def net() -> float:
        return abs(rng.gauss(latency, latency_sd))

    # Events at the server: (time, order, client, version read or -1 for a read).
    # The client reacts instantly to replies, so a reply's delay is folded into the next event.
    order = itertools.count()
    queue = [(net(), next(order), c, -1) for c in range(clients)]
    heapq.heapify(queue)
    failures = [0] * clients
    prev_sleep = [base] * clients
    version = work = 0
    done_at = 0.0
    while queue:
        now, _, c, seen = heapq.heappop(queue)
        if seen < 0:  # a read: reply travels back, then the conditional write travels out
            heapq.heappush(queue, (now + net() + net(), next(order), c, version))
            continue
        work += 1
        if seen == version:  # the write wins; the client hears so one trip later and stops
            version += 1
            done_at = max(done_at, now + net())
            continue
        failures[c] += 1
        sleep = _draw(strategy, failures[c], base, cap, prev_sleep[c], rng)
        prev_sleep[c] = sleep
        heapq.heappush(queue, (now + net() + sleep + net(), next(order), c, -1))

    return SimResult(
        strategy=strategy,
        clients=clients,
        seed=seed,
        work=work,
        failures=sum(failures),
        completion_time=done_at,
        max_attempts=max(failures) + 1,
    )


def runs(
    strategies: Iterable[str] = STRATEGIES,
    clients: Iterable[int] = range(10, 101, 10),
    *,
    seeds: Iterable[int] = range(3),
    base: float = 0.005,
    cap: float = 2.0,
) -> pd.DataFrame:
    """One row per (strategy, clients, seed): ``work`` and ``completion_time`` of each run.

    The seeds' spread is part of the result: plot it (:func:`plot_sweep`) rather than only
    the mean, which :func:`sweep` gives.
    """
    strategies, clients, seeds = list(strategies), list(clients), list(seeds)
    for name, values in (("strategies", strategies), ("clients", clients), ("seeds", seeds)):
        if not values:
            raise ValueError(f"{name} must not be empty, got {values!r}")
    # Fail before running anything: a typo in the last strategy should not cost a whole sweep.
    for strategy in strategies:
        _check_strategy(strategy)
    clients = [_check_int("clients", n, 1) for n in clients]
    seeds = [_check_int("seed", s, 0) for s in seeds]
    _check_base_cap(base, cap)
    rows = []
    for strategy in strategies:
        for n in clients:
            for s in seeds:
                r = simulate(strategy, n, base=base, cap=cap, seed=s)
                rows.append({"strategy": strategy, "clients": n, "seed": s, "work": r.work,
                             "completion_time": r.completion_time})
    return pd.DataFrame(rows, columns=["strategy", "clients", "seed", "work", "completion_time"])


def mean_over_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    """:func:`runs`'s rows averaged over the seeds: one row per (strategy, clients)."""
    rows = []
    for (strategy, n), group in per_seed.groupby(["strategy", "clients"], sort=False):
        rows.append({"strategy": strategy, "clients": n,
                     "work": sum(group["work"]) / len(group),
                     "completion_time": sum(group["completion_time"]) / len(group)})
    return pd.DataFrame(rows, columns=["strategy", "clients", "work", "completion_time"])


def sweep(
    strategies: Iterable[str] = STRATEGIES,
    clients: Iterable[int] = range(10, 101, 10),
    *,
    seeds: Iterable[int] = range(3),
    base: float = 0.005,
    cap: float = 2.0,
) -> pd.DataFrame:
    """Mean ``work`` and ``completion_time`` over ``seeds`` for each strategy and client count.

    One row per (strategy, clients), in the order given: tidy for plotting work or time
    against clients with one line per strategy, like the post's figures.
    """
    return mean_over_seeds(runs(strategies, clients, seeds=seeds, base=base, cap=cap))


def plot_sweep(per_seed: pd.DataFrame, axes: Any = None) -> Any:
    """Work and completion time against clients, one colour per strategy: the mean over the
    seeds as a line, every seed's run as a dot, and the band from the lowest to the highest.

    ``per_seed`` is :func:`runs`'s frame. Returns the two axes (work, completion time).
    """
    import matplotlib.pyplot as plt

    if per_seed.empty:
        raise ValueError("per_seed must not be empty, got an empty frame")
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax_work, ax_time = axes
    seeds = per_seed["seed"].nunique()
    for strategy, rows in per_seed.groupby("strategy", sort=False):
        for ax, column in ((ax_work, "work"), (ax_time, "completion_time")):
            by_n = rows.groupby("clients")[column]
            lo, hi, mean = by_n.min(), by_n.max(), by_n.mean()
            line, = ax.plot(mean.index, mean.values, lw=1.5, label=strategy)
            ax.fill_between(lo.index, lo.values, hi.values, color=line.get_color(), alpha=0.18,
                            lw=0)
            ax.plot(rows["clients"], rows[column], ".", ms=3, color=line.get_color(),
                    alpha=0.6)
    ax_work.set(title="work: calls to the server", xlabel="contending clients", ylabel="calls")
    ax_time.set(title="completion time", xlabel="contending clients",
                ylabel="seconds (log scale)", yscale="log")
    ax_work.legend(title=f"line: mean of {seeds} seeds\nband: lowest to highest", fontsize=8,
                   title_fontsize=8)
    ax_work.figure.tight_layout()
    return axes
