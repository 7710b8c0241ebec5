"""What chapter 6 ("What an inbox does not cover") says in prose, asserted on the engine with
the chapter's own seeds, so the text cannot drift from what the engine does.

1. Effects outside the database: the service replays a repeated key and refuses a changed
   request; without a key, lost ACKs (no inbox) and lost answers (with an inbox) charge
   orders twice while the checker, reading the database, is satisfied in the lost-answer runs;
   with the event id as the key, charges equal orders; the relay charges once more per crash
   without the key, and once per order with it.
2. Order: seed 6 (a lost ACK, no inbox) and seed 7 (a failed first attempt, with an inbox)
   leave o-001 ``paid`` although it was shipped, and two workers leave o-002 ``paid``; the
   checker is satisfied every time; versions fix all three and every scenario of the table.
3. Retention: pruning levels the inbox at eight days of orders; the default worker's horizon
   is 50 s, 604,900 s with a 7-day redrive window; on seed 3 the short horizon duplicates
   every redriven dead letter, the long one none.
"""

from __future__ import annotations

import pytest

from deliverylab.book import ordering, payment_outbox, retention_runs
from deliverylab.book.effects import PaymentService, charge_table, worker_for
from deliverylab.book.lab import Lab
from deliverylab.book.ordering import change_status, status_check, status_lab, status_log
from deliverylab.book.toolkit import WhileWorking
from deliverylab.engine import retention
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput, OrderConflict
from deliverylab.engine.faults import Faults
from deliverylab.engine.worker import Worker

pytestmark = pytest.mark.slow  # the chapter's tables: about fifteen seconds


# -- 1. effects outside the database ------------------------------------------------------------

def test_five_calls_four_answers_three_charges() -> None:
    service = PaymentService(clock=FakeClock(), seed=1)
    first = service.charge(order_id="o-001", amount=500, idempotency_key="evt-1")
    again = service.charge(order_id="o-001", amount=500, idempotency_key="evt-1")
    with pytest.raises(OrderConflict):
        service.charge(order_id="o-001", amount=1000, idempotency_key="evt-1")
    a = service.charge(order_id="o-002", amount=500)
    b = service.charge(order_id="o-002", amount=500)
    assert again == first.__class__(first.charge_id, "o-001", 500, replayed=True)
    assert a.charge_id != b.charge_id
    assert service.calls == 5 and service.charge_count() == 3


@pytest.fixture(scope="module")
def charges():
    return charge_table(seeds=range(20), orders=20, ack_fail=0.3, lost_answer=0.3) \
        .set_index(["fault", "consumer", "key"])


def test_with_the_event_id_as_key_charges_equal_orders_in_every_row(charges) -> None:
    keyed = charges.xs("event id", level="key")
    assert (keyed.charges == keyed.orders).all() and (keyed.double_charged == 0).all()
    bare = charges.xs("none", level="key")
    assert (keyed.calls == bare.calls).all()  # the calls repeat all the same


def test_without_a_key_each_consumer_charges_twice_for_its_own_reason(charges) -> None:
    def row(fault, consumer):
        return charges.loc[(fault, consumer, "none")]

    assert row("lost ACKs", "at-least-once").double_charged > 0
    assert row("lost ACKs", "idempotent").charges == row("lost ACKs", "idempotent").orders
    assert row("lost answers", "at-least-once").double_charged > 0
    assert row("lost answers", "idempotent").double_charged > 0
    # The checker reads the database: every lost-answer run is correct there.
    assert (charges.xs("lost answers").runs_with_db_ok == 20).all()
    assert (charges.xs(("lost ACKs", "at-least-once")).runs_with_db_ok == 0).all()


def test_the_outbox_demo_and_the_relays_table() -> None:
    lab = Lab(seed=12)
    payment_outbox.install(lab.store)
    lab.workers = [worker_for(lab, payment_outbox.outbox_handler(clock=lab.clock))]
    for i, (item, qty) in enumerate([("coffee-beans", 1), ("green-tea", 2), ("croissant", 3)]):
        lab.place_order(item, qty, order_id=f"o-10{i}")
    assert lab.run_until_idle().ok
    assert payment_outbox.outbox_frame(lab.store).amount.tolist() == [500, 1000, 1500]
    assert payment_outbox.pending(lab.store) == 3
    provider = PaymentService(clock=lab.clock, seed=12)
    assert (payment_outbox.relay(lab.store, provider, clock=lab.clock)
            == payment_outbox.RelayPass(3, False))

    table = payment_outbox.outbox_table(seeds=range(20), orders=20).set_index("key")
    bare, keyed = table.loc["none"], table.loc["event id"]
    assert bare.relay_crashes == keyed.relay_crashes > 0
    assert bare.charges == bare.orders + bare.relay_crashes  # one more per crash
    assert keyed.charges == keyed.orders and keyed.double_charged == 0
    assert (table.runs_with_db_ok == 20).all()


# -- 2. order -------------------------------------------------------------------------------------

def life_of_o_001(versioned, mode, faults, seed):
    lab, _ = status_lab(versioned=versioned, seed=seed, mode=mode, faults=faults)
    lab.place_order("coffee-beans", 1, order_id="o-001")
    change_status(lab.broker, "o-001", "paid")
    change_status(lab.broker, "o-001", "shipped")
    return lab, lab.run_until_idle()


def final_status(lab):
    return lab.store.execute("SELECT status FROM order_status").fetchone()[0]


def test_seed_6_a_lost_ack_brings_paid_back_after_shipped() -> None:
    lab, result = life_of_o_001(False, "at-least-once", Faults(seed=6, ack_fail=0.5), 6)
    log = status_log(lab.store, "o-001")
    assert log.outcome.tolist().count("ack_failed") == 1
    lost = log[log.outcome == "ack_failed"].iloc[0]
    assert lost.event == "paid (v2)" and lost.delivery_count == 1
    shipped = log[(log.event == "shipped (v3)") & (log.outcome == "applied")]["at"].tolist()
    again = log[(log.event == "paid (v2)") & (log.delivery_count == 2)]
    assert shipped == [0.25] and again["at"].tolist()[0] == 2.1
    assert final_status(lab) == "paid" and status_check(lab.store).wrong == 1
    assert result.ok  # the checker counts OrderPlaced: applied once


def test_seed_7_a_failed_attempt_is_overtaken_while_the_checker_is_satisfied() -> None:
    lab, result = life_of_o_001(False, "idempotent", Faults(seed=7, process_error=0.5), 7)
    log = status_log(lab.store, "o-001")
    nacked = log[log.outcome == "nacked"]
    assert nacked.event.tolist() == ["paid (v2)"]
    applied = log[log.outcome == "applied"].event.tolist()
    assert applied == ["placed (v1)", "shipped (v3)", "paid (v2)"]
    assert final_status(lab) == "paid" and result.ok


def two_workers(versioned):
    lab, _ = status_lab(versioned=versioned, seed=40)
    lab.place_order("coffee-beans", 1, order_id="o-002")
    lab.run_until_idle()
    change_status(lab.broker, "o-002", "paid")
    change_status(lab.broker, "o-002", "shipped")
    kw = {"broker": lab.broker, "work_time": 0.05,
          "handler": ordering.status_handler(versioned=versioned, clock=lab.clock)}
    second = Worker(store=lab.store, clock=lab.clock, name="worker-2", **kw)
    first = Worker(store=lab.store, clock=WhileWorking(lab.clock, second.step), name="worker-1",
                   **kw)
    first.step()
    return lab


def test_two_workers_commit_in_the_opposite_order_of_the_events() -> None:
    lab = two_workers(False)
    log = status_log(lab.store, "o-002")
    applied = log[log.outcome == "applied"][["worker", "event"]].values.tolist()
    assert applied == [["worker-1", "placed (v1)"], ["worker-2", "shipped (v3)"],
                       ["worker-1", "paid (v2)"]]
    assert final_status(lab) == "paid"
    assert final_status(two_workers(True)) == "shipped"


def test_versions_fix_the_three_stories() -> None:
    ack, _ = life_of_o_001(True, "at-least-once", Faults(seed=6, ack_fail=0.5), 6)
    retry, _ = life_of_o_001(True, "idempotent", Faults(seed=7, process_error=0.5), 7)
    for lab in (ack, retry, two_workers(True)):
        assert status_check(lab.store).ok and final_status(lab) == "shipped"


def test_the_status_table() -> None:
    table = ordering.status_table(seeds=range(20), orders=30).set_index(
        ["scenario", "projection"])
    assert (table.xs("newer wins", level="projection").wrong_status == 0).all()
    last = table.xs("last write wins", level="projection")
    assert last.loc["lost ACKs, inbox"].wrong_status == 0
    for scenario in ("lost ACKs, no inbox", "failed first attempts, inbox",
                     "two workers at once, inbox"):
        assert last.loc[scenario].wrong_status > 0
    # With an inbox the checker says OK in every run, wrong statuses or not.
    for scenario in ("lost ACKs, inbox", "failed first attempts, inbox",
                     "two workers at once, inbox"):
        assert (table.xs(scenario, level="scenario").runs_checker_ok == 20).all()
    assert (table.xs("lost ACKs, no inbox", level="scenario").runs_checker_ok == 0).all()


# -- 3. retention ---------------------------------------------------------------------------------

def test_pruning_levels_the_inbox_at_eight_days_of_orders() -> None:
    growth = retention_runs.growth_table(days=30, orders_per_day=50, keep_days=7)
    assert growth["inbox rows, kept forever"].iloc[-1] == 1500
    assert growth["inbox rows, pruned at 7 days"].iloc[7:].eq(400).all()


def test_the_default_workers_horizons() -> None:
    lab = Lab(seed=21)
    assert retention.horizon_of(lab.workers[0]).total == 50
    assert retention.horizon_of(lab.workers[0], redrive_window=7 * retention.DAY).total == 604_900


def flaky_day(seed=3):
    lab = Lab(seed=seed, faults=Faults(seed=seed, ack_fail=0.8))
    lab.place_orders(20)
    assert lab.run_until_idle().ok
    assert len(lab.dead_letters()) > 0
    return lab


def healthy(lab):
    return Worker(store=lab.store, clock=lab.clock, broker=lab.broker, name="worker-healthy")


def test_seed_3_the_short_horizon_duplicates_every_redriven_dead_letter() -> None:
    lab = flaky_day()
    plain = retention.horizon_of(lab.workers[0])
    parked = len(lab.dead_letters())
    lab.advance(retention.DAY)
    assert retention.prune_inbox(lab.store, older_than=plain.total, horizon=plain,
                                 clock=lab.clock) == 20
    assert lab.broker.redrive() == parked
    healthy(lab).run_until_idle()
    result = lab.check()
    assert result.duplicated == result.extra_applications == parked


def test_seed_3_the_horizon_with_the_redrive_window_keeps_the_rows() -> None:
    lab = flaky_day()
    plain = retention.horizon_of(lab.workers[0])
    long = retention.horizon_of(lab.workers[0], redrive_window=7 * retention.DAY)
    parked = len(lab.dead_letters())
    lab.advance(retention.DAY)
    with pytest.raises(InvalidInput):
        retention.prune_inbox(lab.store, older_than=plain.total, horizon=long, clock=lab.clock)
    assert retention.prune_inbox(lab.store, older_than=long.total, horizon=long,
                                 clock=lab.clock) == 0
    assert lab.broker.redrive() == parked
    assert healthy(lab).run_until_idle().duplicates_skipped == parked
    assert lab.check().ok


def test_ten_seeds_of_late_redrives() -> None:
    for seed in range(10):
        short = retention_runs.late_redrive(redrive_window=0.0, seed=seed, orders=20)
        kept = retention_runs.late_redrive(redrive_window=7 * retention.DAY, seed=seed, orders=20)
        assert short.duplicated == short.dead_letters > 0, seed
        assert kept.dead_letters == short.dead_letters and kept.duplicated == 0, seed
