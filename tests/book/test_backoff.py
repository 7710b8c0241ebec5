"""The backoff replay against the results of "Exponential Backoff And Jitter".

https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/ publishes the ranking
of the strategies; these tests assert the same relationships on our simulation, averaged over
seeds, with margins wide enough that no particular seed decides the outcome.
"""

import math
import random
import re

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deliverylab.book.backoff import STRATEGIES, SimResult, delay, simulate, sweep

CLIENTS = (25, 50, 75, 100)
CONTENDED = (50, 75, 100)  # where the post's differences are large enough to see
SEEDS = range(5)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return sweep(clients=CLIENTS, seeds=SEEDS)


def at(table: pd.DataFrame, strategy: str, clients: int, column: str) -> float:
    row = table[(table.strategy == strategy) & (table.clients == clients)]
    return float(row[column].iloc[0])


def total(table: pd.DataFrame, strategy: str, column: str) -> float:
    """A strategy's column summed over the contended client counts."""
    return sum(at(table, strategy, n, column) for n in CONTENDED)


# --- The published results -------------------------------------------------------------------


def test_without_backoff_work_grows_with_the_square_of_the_clients(table):
    xs = [math.log(n) for n in CLIENTS]
    ys = [math.log(at(table, "none", n, "work")) for n in CLIENTS]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    assert 1.6 <= slope <= 2.4
    # Doubling the clients roughly quadruples the work (less the linear term: every client
    # makes one winning write however busy the row is).
    assert 3.0 <= at(table, "none", 100, "work") / at(table, "none", 50, "work") <= 5.0


@pytest.mark.parametrize("strategy", ["none", "exponential"])
@pytest.mark.parametrize("clients", [1, 2, 10, 37])
def test_in_lockstep_each_round_has_one_winner(strategy, clients):
    # With no network jitter nothing tells identical clients apart: every round all waiting
    # clients write and exactly one wins, so the work is N + (N-1) + ... + 1. Backoff without
    # jitter only stretches the rounds.
    result = simulate(strategy, clients, latency_sd=0)
    assert result.work == clients * (clients + 1) // 2
    assert result.max_attempts == clients


def test_full_jitter_does_the_least_work(table):
    for n in CONTENDED:
        work = {s: at(table, s, n, "work") for s in STRATEGIES}
        assert min(work, key=work.get) == "full_jitter", (n, work)


def test_equal_jitter_does_a_little_more_work_than_full_and_takes_clearly_longer(table):
    full, equal = total(table, "full_jitter", "work"), total(table, "equal_jitter", "work")
    assert full < equal < 1.15 * full
    time_full = total(table, "full_jitter", "completion_time")
    assert total(table, "equal_jitter", "completion_time") > 1.15 * time_full


def test_decorrelated_jitter_is_about_as_fast_as_full_but_makes_more_calls(table):
    assert total(table, "decorrelated_jitter", "work") > 1.05 * total(table, "full_jitter", "work")
    time_full = total(table, "full_jitter", "completion_time")
    assert total(table, "decorrelated_jitter", "completion_time") < 1.1 * time_full


def test_plain_exponential_backoff_helps_only_a_little(table):
    none, expo = total(table, "none", "work"), total(table, "exponential", "work")
    assert 0.6 * none < expo < none
    # "In the case with 100 contending clients, we've reduced our call count by more than half."
    assert at(table, "full_jitter", 100, "work") < at(table, "exponential", 100, "work") / 2
    # And it is the clear loser on time: its herd retries together, once per capped sleep.
    jittered = ("full_jitter", "equal_jitter", "decorrelated_jitter")
    slowest_jitter = max(total(table, s, "completion_time") for s in jittered)
    assert total(table, "exponential", "completion_time") > 3 * slowest_jitter


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_strategy_removes_the_contention_cost_per_client(table, strategy):
    per_client = [at(table, strategy, n, "work") / n for n in CLIENTS]
    assert per_client == sorted(per_client) and per_client[0] < per_client[-1]


# --- The simulation --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    strategy=st.sampled_from(STRATEGIES),
    clients=st.integers(1, 30),
    seed=st.integers(0, 2**32),
)
def test_every_write_is_accounted_for(strategy, clients, seed):
    result = simulate(strategy, clients, seed=seed)
    assert (result.strategy, result.clients, result.seed) == (strategy, clients, seed)
    assert result.work == clients + result.failures  # each client wins exactly once
    assert 1 <= result.max_attempts <= result.failures + 1
    assert result.completion_time > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_lone_client_never_conflicts(strategy):
    result = simulate(strategy, 1, seed=7)
    assert (result.work, result.failures, result.max_attempts) == (1, 0, 1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_seed_same_result(strategy):
    assert simulate(strategy, 40, seed=3) == simulate(strategy, 40, seed=3)
    assert isinstance(simulate(strategy, 5), SimResult)


def test_different_seeds_differ():
    results = {simulate("full_jitter", 40, seed=s) for s in range(5)}
    assert len({r.completion_time for r in results}) > 1


def test_sweep_is_deterministic_and_averages_simulate():
    first = sweep(["full_jitter", "none"], [5, 20], seeds=[1, 2])
    pd.testing.assert_frame_equal(first, sweep(["full_jitter", "none"], [5, 20], seeds=[1, 2]))
    assert list(first.columns) == ["strategy", "clients", "work", "completion_time"]
    assert list(zip(first.strategy, first.clients, strict=True)) == [
        ("full_jitter", 5),
        ("full_jitter", 20),
        ("none", 5),
        ("none", 20),
    ]
    runs = [simulate("none", 20, seed=s) for s in (1, 2)]
    row = first.iloc[3]
    assert row.work == sum(r.work for r in runs) / 2
    assert row.completion_time == sum(r.completion_time for r in runs) / 2


# --- The delay formulas ----------------------------------------------------------------------

bases = st.floats(1e-6, 10.0)
cap_factors = st.floats(1.0, 1e4)
attempts = st.integers(0, 3000)
seeds = st.integers(0, 2**32)


@given(base=bases, factor=cap_factors, attempt=attempts, seed=seeds)
def test_exponential_is_the_capped_doubling(base, factor, attempt, seed):
    cap = base * factor
    got = delay("exponential", attempt, base=base, cap=cap, prev=base, rng=random.Random(seed))
    expected = cap if attempt > 1000 else min(cap, base * 2.0**attempt)
    assert got == expected
    assert delay("none", attempt, base=base, cap=cap, prev=base, rng=random.Random(seed)) == 0


@given(base=bases, factor=cap_factors, attempt=attempts, seed=seeds)
def test_full_and_equal_jitter_bounds(base, factor, attempt, seed):
    cap = base * factor
    v = cap if attempt > 1000 else min(cap, base * 2.0**attempt)
    full = delay("full_jitter", attempt, base=base, cap=cap, prev=base, rng=random.Random(seed))
    equal = delay("equal_jitter", attempt, base=base, cap=cap, prev=base, rng=random.Random(seed))
    assert 0 <= full <= v
    assert v / 2 <= equal <= v


@given(base=bases, factor=cap_factors, prev_factor=st.floats(1.0, 1e5), seed=seeds)
def test_decorrelated_jitter_bounds_and_ignores_the_attempt(base, factor, prev_factor, seed):
    cap, prev = base * factor, base * prev_factor
    got = delay("decorrelated_jitter", 0, base=base, cap=cap, prev=prev, rng=random.Random(seed))
    assert base <= got <= cap
    assert got <= math.nextafter(prev * 3, math.inf)  # uniform() may round onto its end
    again = delay("decorrelated_jitter", 9, base=base, cap=cap, prev=prev, rng=random.Random(seed))
    assert again == got


@pytest.mark.parametrize("strategy", ["exponential", "full_jitter", "equal_jitter"])
def test_huge_attempts_stay_under_the_cap(strategy):
    got = delay(strategy, 10**30, base=0.005, cap=2.0, prev=0.005, rng=random.Random(0))
    assert 1.0 <= got <= 2.0


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    assert simulate("full_jitter", np.int64(12), seed=np.int64(4)) == simulate(
        "full_jitter", 12, seed=4
    )


@pytest.mark.parametrize("strategy", ["full_jitter", "equal_jitter", "decorrelated_jitter"])
def test_jitter_is_random_and_seeded(strategy):
    def draws(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [delay(strategy, 4, base=0.005, cap=2.0, prev=0.04, rng=rng) for _ in range(20)]

    assert draws(1) == draws(1)
    assert len(set(draws(1))) > 1


# --- Bad input -------------------------------------------------------------------------------

ALL = ", ".join(STRATEGIES)
OK = {"base": 0.005, "cap": 2.0, "prev": 0.005, "rng": random.Random(0)}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: simulate("fast", 3), f"strategy must be one of {ALL}, got 'fast'"),
        (lambda: delay("fast", 1, **OK), f"strategy must be one of {ALL}, got 'fast'"),
        (lambda: sweep(["none", "fast"]), f"strategy must be one of {ALL}, got 'fast'"),
        (lambda: simulate("none", 0), "clients must be an int >= 1, got 0"),
        (lambda: simulate("none", True), "clients must be an int >= 1, got True"),
        (lambda: simulate("none", 3.0), "clients must be an int >= 1, got 3.0"),
        (lambda: simulate("none", 3, base=0), "base must be a finite number > 0, got 0"),
        (lambda: simulate("none", 3, base=-1.0), "base must be a finite number > 0, got -1.0"),
        (lambda: simulate("none", 3, base=math.nan), "base must be a finite number > 0, got nan"),
        (lambda: simulate("none", 3, cap=math.inf), "cap must be a finite number > 0, got inf"),
        (lambda: simulate("none", 3, cap=0.001), "cap must be >= base (0.005), got 0.001"),
        (lambda: simulate("none", 3, seed=-1), "seed must be an int >= 0, got -1"),
        (lambda: simulate("none", 3, seed="x"), "seed must be an int >= 0, got 'x'"),
        (lambda: simulate("none", 3, latency=0), "latency must be a finite number > 0, got 0"),
        (
            lambda: simulate("none", 3, latency_sd=-1),
            "latency_sd must be a finite number >= 0, got -1",
        ),
        (lambda: delay("exponential", -1, **OK), "attempt must be an int >= 0, got -1"),
        (lambda: delay("exponential", False, **OK), "attempt must be an int >= 0, got False"),
        (
            lambda: delay("full_jitter", 1, base=0.005, cap=2.0, prev=0, rng=random.Random()),
            "prev must be a finite number > 0, got 0",
        ),
        (
            lambda: delay(
                "decorrelated_jitter", 1, base=0.005, cap=2.0, prev=0.001, rng=random.Random()
            ),
            "prev must be >= base (0.005), got 0.001",
        ),
        (
            lambda: delay("full_jitter", 1, base=0.005, cap=2.0, prev=0.005, rng=None),
            "rng must be a random.Random, got None",
        ),
        (lambda: sweep(seeds=[]), "seeds must not be empty, got []"),
        (lambda: sweep(clients=[10, 0]), "clients must be an int >= 1, got 0"),
        (lambda: sweep(seeds=[0, -2]), "seed must be an int >= 0, got -2"),
        (lambda: sweep(cap=0.001), "cap must be >= base (0.005), got 0.001"),
        (lambda: sweep(clients=[]), "clients must not be empty, got []"),
        (lambda: sweep(strategies=[]), "strategies must not be empty, got []"),
    ],
)
def test_bad_arguments_name_the_parameter_and_the_value(call, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()
