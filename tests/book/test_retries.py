"""Chapter 8, retries multiply: attempts per layer, amplification, the budget and the deadline."""

from __future__ import annotations

import pytest

from deliverylab.book import retries
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput

EVERY, BUDGET, DEADLINE, BOTH = retries.POLICIES


@pytest.mark.parametrize("tries, receives", [(3, 3), (2, 4), (1, 5), (4, 2)])
def test_attempts_multiply_layer_by_layer(tries, receives):
    policy = retries.Policy("p", tries=tries, max_receives=receives)
    r = retries.run(policy, orders=1)
    assert r.deliveries == receives
    assert r.api_requests == receives * tries
    assert r.bank_calls == receives * tries * tries
    assert r.dead_lettered == 1 and r.charged == 0


def test_three_layers_of_three_make_27_calls_at_the_bottom():
    counts = retries.layer_counts((EVERY,))[EVERY.name]
    assert (counts["queue deliveries (the worker)"], counts["calls to the payment API"],
            counts["calls to the bank"]) == (3, 9, 27)


def test_the_deadline_keeps_every_delivery_within_its_lease():
    counts = retries.layer_counts()
    assert counts.loc["deliveries still at work after their lease", EVERY.name] == 3
    assert counts.loc["deliveries still at work after their lease", DEADLINE.name] == 0
    assert counts.loc["deliveries still at work after their lease", BOTH.name] == 0
    # A 2 s lease holds at most 4 calls that time out after 0.5 s each.
    assert counts.loc["calls to the bank", DEADLINE.name] <= 3 * 4


def test_budget_caps_amplification_under_an_outage():
    table = retries.outage_table()
    assert table.loc[EVERY.name, "amplification"] == 27.0
    # The budget holds each client's retries under a tenth of its calls once its bucket is
    # empty; the queue's own redeliveries (3) remain.
    assert table.loc[BUDGET.name, "amplification"] < 5
    assert table.loc[BUDGET.name, "bank_calls"] < table.loc[EVERY.name, "bank_calls"] / 4
    # Outside the outage every policy charges every order once.
    assert (table["charged"] + table["dead_lettered"] == table["orders"]).all()


@pytest.mark.parametrize("ratio, firsts, expected_retries", [(0.1, 100, 10), (0.5, 10, 5),
                                                             (0.0, 50, 0)])
def test_empty_budget_allows_ratio_of_first_attempts(ratio, firsts, expected_retries):
    budget = retries.RetryBudget(ratio, tokens=0.0)
    allowed = 0
    for _ in range(firsts):
        budget.first_attempt()
        allowed += budget.allow_retry()
    assert allowed == pytest.approx(expected_retries, abs=1)
    assert budget.refused == firsts - allowed


def test_bank_counts_calls_and_times_out_in_its_outage():
    clock = FakeClock()
    bank = retries.Bank(clock, outage=(1.0, 2.0), timeout_s=0.5)
    bank.charge("o-1")
    clock.advance(1.0)
    with pytest.raises(retries.Unavailable):
        bank.charge("o-1")
    assert clock.now() == pytest.approx(1.55) and len(bank.calls) == 2


@pytest.mark.parametrize("kwargs, field", [({"tries": 0}, "tries"), ({"max_receives": 0},
                                          "max_receives"), ({"budget_ratio": 2}, "budget_ratio")])
def test_policy_names_the_bad_field(kwargs, field):
    with pytest.raises(InvalidInput) as err:
        retries.Policy("p", **kwargs)
    assert err.value.field == field


@pytest.mark.parametrize("kwargs, field", [({"policy": "x"}, "policy"), ({"orders": 0}, "orders"),
                                          ({"timeout_s": 0}, "timeout_s")])
def test_run_names_the_bad_field(kwargs, field):
    kwargs.setdefault("policy", EVERY)
    with pytest.raises(InvalidInput) as err:
        retries.run(**kwargs)
    assert err.value.field == field
