"""The toolkit's measurements (chapter 3): each asserted exactly where the seed allows it."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deliverylab.book.lab import Lab
from deliverylab.book.toolkit import (
    CRASH_POINT,
    INBOX_ORDERINGS,
    RETRY_POLICIES,
    UnknownItem,
    WhileWorking,
    ack_loss_run,
    catalogue_handler,
    delivery_histogram,
    delivery_summary,
    follow,
    geometric_expected,
    inbox_commit_table,
    place_order_with_crash,
    retry_budget_table,
    retry_load,
    separate_inbox_commit,
)
from deliverylab.engine import store
from deliverylab.engine.check import check
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput, OrderConflict, SimulatedCrash
from deliverylab.engine.faults import Faults

# -- WhileWorking -------------------------------------------------------------------------------


def test_while_working_runs_the_action_once_after_the_sleep():
    clock = FakeClock()
    seen = []
    ww = WhileWorking(clock, lambda: seen.append(clock.now()) or "done", after=1.0)
    ww.sleep(0.5)  # too short: not yet
    assert seen == []
    ww.sleep(2.0)
    ww.sleep(2.0)
    assert seen == [2.5] and ww.result == "done" and ww.now() == 4.5
    ww.sleep_until(10)
    assert clock.now() == 10.0 and "pending=False" in repr(ww)


def test_while_working_ignores_a_zero_sleep_and_checks_after():
    clock = FakeClock()
    ww = WhileWorking(clock, lambda: 1)
    ww.sleep(0)
    assert ww.action is not None
    with pytest.raises(InvalidInput, match="^after must be a number >= 0, got -1$"):
        WhileWorking(clock, lambda: 1, after=-1)


# -- the outbox under a crash -------------------------------------------------------------------


def test_place_order_with_crash_writes_nothing(lab):
    with pytest.raises(SimulatedCrash, match="between_order_and_event"):
        place_order_with_crash(lab.broker, item_id="tea", qty=1, idempotency_key="k-1")
    assert store.table_counts(lab.store) == dict.fromkeys(store.TABLES, 0)
    # The key was never used, so the retry is a first request, and a replay after it is not.
    assert lab.order("tea", 1, idempotency_key="k-1").created
    assert not lab.order("tea", 1, idempotency_key="k-1").created
    with pytest.raises(OrderConflict):
        lab.order("tea", 2, idempotency_key="k-1")


# -- the inbox committed apart from the effect ---------------------------------------------------


@pytest.fixture(scope="module")
def inbox_runs():
    return {o: separate_inbox_commit(o, orders=150, crash_rate=0.2, seed=3)
            for o in INBOX_ORDERINGS}


def first_delivery_crashes(orders: int, rate: float, seed: int) -> int:
    """How many events the crash schedule kills on their first delivery."""
    lab = Lab(seed=seed)
    lab.place_orders(orders)
    faults = Faults(seed=seed)
    return sum(faults.uniform(CRASH_POINT, e, 1) < rate for e in lab.orders().event_id)


def test_one_transaction_never_loses_or_doubles(inbox_runs):
    run = inbox_runs["one_transaction"]
    assert run.crashes > 0 and run.deliveries == run.orders + run.crashes
    assert (run.correct, run.lost, run.duplicated) == (150, 0, 0)
    assert run.projection_equals_truth


def test_inbox_first_loses_every_event_whose_first_attempt_crashed(inbox_runs):
    run = inbox_runs["inbox_then_effect"]
    assert run.lost == run.crashes == first_delivery_crashes(150, 0.2, 3) > 0
    assert run.duplicated == 0 and run.correct == 150 - run.lost
    assert not run.projection_equals_truth


def test_effect_first_applies_once_more_for_every_crash(inbox_runs):
    run, same = inbox_runs["effect_then_inbox"], inbox_runs["one_transaction"]
    # The crash schedule is shared: the same deliveries crash in both runs ...
    assert (run.deliveries, run.crashes) == (same.deliveries, same.crashes)
    # ... and here every crash is one more application of an effect already made.
    assert run.extra_applications == run.crashes and run.lost == 0
    assert 0 < run.duplicated <= run.crashes


@pytest.mark.parametrize("ordering", INBOX_ORDERINGS)
def test_without_crashes_every_ordering_is_correct(ordering):
    run = separate_inbox_commit(ordering, orders=40, crash_rate=0.0, seed=1)
    assert (run.correct, run.deliveries, run.crashes) == (40, 40, 0)


def test_separate_inbox_commit_is_deterministic_and_validates():
    assert separate_inbox_commit("inbox_then_effect", orders=30, seed=4) == \
        separate_inbox_commit("inbox_then_effect", orders=30, seed=4)
    with pytest.raises(InvalidInput, match="^ordering must be one of one_transaction, "
                                           "inbox_then_effect, effect_then_inbox, got 'x'$"):
        separate_inbox_commit("x")
    with pytest.raises(InvalidInput, match="^crash_rate must be a number in"):
        separate_inbox_commit("one_transaction", crash_rate=1.5)


def test_inbox_commit_table_has_a_row_per_run():
    table = inbox_commit_table(crash_rates=(0.1, 0.3), orders=30, seed=2)
    assert list(table.ordering) == list(INBOX_ORDERINGS) * 2
    assert list(table.crash_rate) == [0.1] * 3 + [0.3] * 3
    assert {"lost", "duplicated", "extra_applications", "crashes"} <= set(table.columns)
    ok = table[table.ordering == "one_transaction"]
    assert (ok["lost"] == 0).all() and (ok["duplicated"] == 0).all()


# -- retry budgets ------------------------------------------------------------------------------


def test_a_healthy_server_sees_one_call_per_request():
    for policy in RETRY_POLICIES:
        r = retry_load(policy, 0.0, requests=500)
        assert (r.calls, r.succeeded, r.calls_per_request) == (500, 500, 1.0)


def test_in_an_outage_the_per_request_limit_multiplies_the_load():
    r = retry_load("per-request limit", 1.0, requests=500, max_attempts=5)
    assert (r.calls, r.succeeded) == (2500, 0)


def test_in_an_outage_the_budget_caps_the_load():
    r = retry_load("limit + retry budget", 1.0, requests=500, max_attempts=5, budget_ratio=0.1)
    assert r.succeeded == 0 and r.calls == 500 + 50


@settings(max_examples=50, deadline=None)
@given(rate=st.floats(0, 1), ratio=st.floats(0, 1), attempts=st.integers(1, 6),
       seed=st.integers(0, 1000))
def test_the_budget_bounds_retries_and_the_limit_bounds_attempts(rate, ratio, attempts, seed):
    limit = retry_load("per-request limit", rate, requests=200, max_attempts=attempts,
                       seed=seed)
    budget = retry_load("limit + retry budget", rate, requests=200, max_attempts=attempts,
                        budget_ratio=ratio, seed=seed)
    for r in (limit, budget):
        assert 200 <= r.calls <= 200 * attempts and 0 <= r.succeeded <= 200
    assert budget.calls - 200 <= math.ceil(ratio * 200)  # retries stay within the budget


def test_retry_budget_table_and_validation():
    table = retry_budget_table((0.0, 1.0), requests=100)
    assert list(table.columns) == ["failure_rate", "policy", "calls_per_request", "succeeded"]
    assert table.calls_per_request.tolist() == [1.0, 1.0, 5.0, 1.1]
    with pytest.raises(InvalidInput, match="^policy must be one of"):
        retry_load("forever", 0.5)
    with pytest.raises(InvalidInput, match="^max_attempts must be an integer >= 1"):
        retry_load("per-request limit", 0.5, max_attempts=0)


# -- the catalogue handler ----------------------------------------------------------------------


def test_catalogue_handler_refuses_unknown_items_and_applies_known_ones(lab):
    lab.order("tea", 2)
    lab.order("oat-milk", 1)
    handle = catalogue_handler(["tea"])
    first, second = lab.broker.receive(2.0, max_messages=2)
    handle(lab.store, first)
    with pytest.raises(UnknownItem, match="item 'oat-milk' is not in the catalogue"):
        handle(lab.store, second)
    assert lab.projection() == {"tea": 2}


# -- delivery counts and the geometric distribution ---------------------------------------------


@given(n=st.integers(0, 10_000), p=st.floats(0, 0.99), m=st.integers(1, 40))
def test_geometric_expected_accounts_for_every_event(n, p, m):
    frame = geometric_expected(n, p, m)
    assert frame.deliveries.tolist() == list(range(1, m + 1))
    assert math.isclose(frame.expected.sum(), n, rel_tol=1e-9, abs_tol=1e-9)


def test_geometric_mean_is_one_over_one_minus_p():
    for p in (0.0, 0.3, 0.5, 0.8):
        frame = geometric_expected(1000, p, 200)
        mean = (frame.deliveries * frame.expected).sum() / 1000
        assert math.isclose(mean, 1 / (1 - p), rel_tol=1e-6)


@pytest.fixture(scope="module")
def acks_lost():
    return ack_loss_run(0.5, orders=400, seed=0, max_receives=10)


def test_ack_loss_run_applies_every_order_once_and_parks_the_poison(acks_lost):
    result = acks_lost.check()
    assert result.ok and result.orders == 400
    parked = acks_lost.dead_letters()
    assert parked[["order_id", "delivery_count"]].values.tolist() == [["o-poison", 10]]


def test_delivery_counts_follow_the_geometric_distribution(acks_lost):
    hist = delivery_histogram(acks_lost.store, 0.5, 10)
    assert hist.observed.sum() == 401 and math.isclose(hist.expected.sum(), 401)
    healthy = delivery_summary(acks_lost.store).query("order_id != 'o-poison'")
    assert abs(healthy.deliveries.mean() - 2.0) < 0.15  # 1 / (1 - p)
    # Chi-square over the bins with at least five expected events: well inside 0.1% level.
    big = hist[hist.expected >= 5]
    chi2 = (((big.observed - big.expected) ** 2) / big.expected).sum()
    assert chi2 < 20.5  # the 0.999 quantile of chi-square with 5 degrees of freedom


def test_the_poison_message_stands_out_by_its_errors(acks_lost):
    summary = delivery_summary(acks_lost.store)
    top = summary.iloc[0]
    assert (top.order_id, top.deliveries, top.errors, top.applied, top.ended) == (
        "o-poison", 10, 10, 0, "dead_lettered")
    healthy = summary.iloc[1:]
    assert (healthy.errors == 0).all() and (healthy.applied == 1).all()
    assert (healthy.deliveries == healthy.ack_failed + 1).all()  # every redelivery: a lost ACK
    assert set(healthy.ended) == {"acked"}


def test_delivery_histogram_without_poison_is_within_max_receives():
    lab = ack_loss_run(0.3, orders=100, seed=5, max_receives=3, poison=False)
    hist = delivery_histogram(lab.store, 0.3, 3)
    assert hist.observed.sum() == 100
    # A healthy message whose ACKs keep failing is dead-lettered after max_receives receives,
    # though it was applied: the check still counts it once.
    assert lab.check().ok


# -- following one correlation id ---------------------------------------------------------------


def test_follow_lists_the_order_each_delivery_and_the_inbox_row_in_time_order():
    lab = Lab(seed=9, mode="idempotent", faults=Faults(seed=9, ack_fail=0.8))
    lab.place_order("coffee-beans", 1, order_id="o-001")
    lab.run_until_idle()
    trail = follow(lab.store, "o-001")
    assert list(trail.columns) == ["at", "table", "what", "detail"]
    assert trail.table.iloc[0] == "orders"
    whats = trail.what.tolist()
    assert whats.index("inbox row") == whats.index("applied (delivery #1)") + 1
    assert whats.count("inbox row") == 1
    assert trail["at"].is_monotonic_increasing
    log_rows = trail[trail.table == "delivery_log"]
    assert len(log_rows) == len(lab.log("o-001"))
    assert check(lab.store).ok
    # Seed 9 (chapter 3) loses the first two ACKs and lets the third through.
    assert log_rows.what.tolist()[-3:] == ["received (delivery #3)",
                                           "duplicate_skipped (delivery #3)",
                                           "acked (delivery #3)"]


def test_follow_shows_a_dead_letter_and_an_unknown_id(acks_lost):
    trail = follow(acks_lost.store, "o-poison")
    assert trail.table.iloc[-1] == "dead_letters" and "orders" not in set(trail.table)
    assert follow(acks_lost.store, "o-nobody").empty
    assert isinstance(follow(acks_lost.store, "o-nobody"), pd.DataFrame)
