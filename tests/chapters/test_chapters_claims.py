"""What chapters 1 and 2 say in prose, asserted on the engine, so the text cannot drift.

Chapter 1 ("The three guarantee families") claims, for every seed and fault rate:

* at-most-once never applies an effect twice, and loses effects when the worker crashes after
  its ACK; a lost ACK alone loses nothing (the work is skipped and the message comes back);
* at-least-once never loses an effect, and applies effects twice when an ACK is lost or the
  worker dies between the commit and the ACK; a crash before the commit alone does no harm;
* the idempotent and the transactional consumers do neither: every order takes effect exactly
  once, although the idempotent one receives messages more than once (exactly-once
  *processing*, not exactly-once *delivery*);
* the fault schedule is fixed by the seed and shared by every mode, so the modes see the same
  deliveries and the tables are the same on every run.

Chapter 2 ("The lost ACK") tells one order, o-001, with seed 54: the ACK of delivery 1 is lost
and delivery 2 is acked; the same seed crashes delivery 1 in the crash schedule. It claims that
the naive consumer applies the order twice, the auto-ack consumer loses it, each survives the
other's fault, the transactional consumer applies it once under both faults, and a transaction
cannot take back an external side effect (an email sent twice while the database is right).
It also says this engine is stricter than SQS with a stale receipt: the ACK of a worker whose
lease ran out changes nothing, is answered ``False`` and leaves an ``ack_rejected`` row, and the
current holder's delivery is untouched.
"""

from __future__ import annotations

import pandas as pd
import pytest

from deliverylab.book.lab import Lab, fault_sweep, guarantee_matrix
from deliverylab.engine.faults import Faults
from deliverylab.engine.worker import apply_order_placed

MODES = ("at-most-once", "at-least-once", "idempotent", "transactional")
pytestmark = pytest.mark.slow  # about twenty seconds of guarantee matrices

SEEDS = (1, 7, 29, 54, 2024)
RATES = (0.1, 0.3)
ORDERS = 80
CHAPTER_SEED = 29  # chapter 1
STORY_SEED = 54  # chapter 2


def matrix(seed: int, **rates: float) -> pd.DataFrame:
    faults = Faults.from_rates(seed=seed, **rates)
    return guarantee_matrix(orders=ORDERS, faults=faults, seed=seed, modes=MODES) \
        .set_index("mode")


FAULT_MIXES = [
    {"ack_fail": r} for r in RATES] + [
    {"crash_after_receive": r} for r in RATES] + [
    {"crash_after_commit": r} for r in RATES] + [
    {"ack_fail": r, "crash_after_receive": r / 2, "crash_after_commit": r / 2} for r in RATES]


@pytest.fixture(scope="module")
def tables() -> dict[tuple[int, str], pd.DataFrame]:
    """Every (seed, fault mix) once, shared by the tests below."""
    return {(seed, repr(mix)): matrix(seed, **mix) for seed in SEEDS for mix in FAULT_MIXES}


# -- chapter 1: the guarantee matrix -----------------------------------------------------------

def test_at_most_once_never_duplicates(tables) -> None:
    for key, table in tables.items():
        assert table.loc["at-most-once", "duplicated"] == 0, key


def test_at_most_once_loses_effects_when_the_worker_crashes_after_its_ack() -> None:
    for seed in SEEDS:
        for rate in RATES:
            table = matrix(seed, crash_after_receive=rate)
            assert table.loc["at-most-once", "lost"] > 0, (seed, rate)


def test_at_most_once_skips_the_work_when_its_ack_is_lost_and_loses_nothing() -> None:
    for seed in SEEDS:
        table = matrix(seed, ack_fail=0.3)
        row = table.loc["at-most-once"]
        assert row["lost"] == 0 and row["duplicated"] == 0, seed
        assert row["deliveries"] > ORDERS, seed  # the skipped ones came back


def test_at_least_once_never_loses(tables) -> None:
    for key, table in tables.items():
        assert table.loc["at-least-once", "lost"] == 0, key


def test_at_least_once_duplicates_when_acks_are_lost(tables) -> None:
    for seed in SEEDS:
        for rate in RATES:
            table = tables[(seed, repr({"ack_fail": rate}))]
            assert table.loc["at-least-once", "duplicated"] > 0, (seed, rate)


def test_at_least_once_duplicates_when_the_worker_dies_between_commit_and_ack(tables) -> None:
    for seed in SEEDS:
        for rate in RATES:
            table = tables[(seed, repr({"crash_after_commit": rate}))]
            assert table.loc["at-least-once", "duplicated"] > 0, (seed, rate)


def test_a_crash_before_the_commit_alone_does_no_harm_to_at_least_once(tables) -> None:
    for seed in SEEDS:
        for rate in RATES:
            row = tables[(seed, repr({"crash_after_receive": rate}))].loc["at-least-once"]
            assert row["lost"] == 0 and row["duplicated"] == 0, (seed, rate)
            assert row["deliveries"] > ORDERS, (seed, rate)  # it was redelivered instead


@pytest.mark.parametrize("mode", ["idempotent", "transactional"])
def test_idempotent_and_transactional_neither_lose_nor_duplicate(tables, mode: str) -> None:
    for key, table in tables.items():
        row = table.loc[mode]
        assert row["lost"] == 0 and row["duplicated"] == 0, key
        # An order whose message crashed its worker max_receives times waits in the
        # dead-letter table (redrive is chapter 3's); every other order took effect once.
        assert row["correct"] + row["dead_lettered"] == ORDERS, key
        assert row["projection_equals_truth"] == (row["dead_lettered"] == 0), key


def test_idempotent_is_exactly_once_processing_not_exactly_once_delivery(tables) -> None:
    for key, table in tables.items():
        row = table.loc["idempotent"]
        assert row["correct"] + row["dead_lettered"] == ORDERS, key
        assert row["deliveries"] > ORDERS, key  # some messages were received twice or more


def test_transactional_has_no_ack_to_lose() -> None:
    for seed in SEEDS:
        row = matrix(seed, ack_fail=0.3, crash_after_commit=0.3).loc["transactional"]
        # The ACK is a row delete inside the effect's transaction: nothing to lose on the
        # way, no gap between commit and ACK to die in, so nothing is ever redelivered.
        assert row["deliveries"] == ORDERS and row["correct"] == ORDERS, seed


def test_every_mode_sees_the_same_fault_schedule(tables) -> None:
    # Modes that apply, then ack, make the same decisions at the same deliveries, so they
    # receive exactly as many messages: the schedule belongs to the seed, not to the mode.
    for key, table in tables.items():
        assert table.loc["at-least-once", "deliveries"] == table.loc["idempotent",
                                                                     "deliveries"], key


def test_the_chapter_tables_are_the_same_on_every_run() -> None:
    faults = Faults(seed=CHAPTER_SEED, ack_fail=0.2, crash_after_receive=0.1)
    first = guarantee_matrix(orders=200, faults=faults, seed=CHAPTER_SEED, modes=MODES)
    again = guarantee_matrix(orders=200, faults=faults, seed=CHAPTER_SEED, modes=MODES)
    pd.testing.assert_frame_equal(first, again)
    # The chapter leaves these two columns out of its view and says why.
    assert (first["orders"] == 200).all() and (first["dead_lettered"] == 0).all()


def test_the_sweep_rises_with_the_rate_only_where_the_chapter_says() -> None:
    rates = [0.0, 0.1, 0.2, 0.3]
    for point, mode, column in (("ack_fail", "at-least-once", "duplicated"),
                                ("crash_after_receive", "at-most-once", "lost")):
        sweep = fault_sweep(rates=rates, point=point, orders=200, seed=CHAPTER_SEED,
                            modes=MODES)
        curve = sweep[sweep["mode"] == mode][column].tolist()
        assert curve[0] == 0 and curve == sorted(curve) and curve[-1] > curve[1], (point, curve)
        others = sweep[sweep["mode"] != mode]
        assert others["lost"].sum() == 0 and others["duplicated"].sum() == 0, point


# -- chapter 2: one order, step by step --------------------------------------------------------

def one_order(mode: str, **rates: float) -> Lab:
    lab = Lab(seed=STORY_SEED, mode=mode, faults=Faults(seed=STORY_SEED, **rates))
    lab.place_order("coffee-beans", 1, order_id="o-001")
    return lab


def outcomes(lab: Lab) -> list[tuple[int, str]]:
    log = lab.log("o-001")
    return list(zip(log["delivery_count"], log["outcome"], strict=True))


def test_the_story_seed_loses_the_first_ack_and_not_the_second() -> None:
    lab = one_order("at-least-once", ack_fail=0.5)
    event = lab.orders()["event_id"][0]
    assert [lab.faults.fires("ack_fail", event, n) for n in (1, 2)] == [True, False]
    assert [lab.faults.fires("crash_after_receive", event, n) for n in (1, 2)] == [False] * 2
    crash = Faults(seed=STORY_SEED, crash_after_receive=0.5)
    assert [crash.fires("crash_after_receive", event, n) for n in (1, 2)] == [True, False]


def test_the_naive_consumer_applies_the_order_twice_step_by_step() -> None:
    lab = one_order("at-least-once", ack_fail=0.5)
    assert lab.step() == 1
    # Effect committed, ACK lost: the message is still in the queue, leased until t=2.
    queue = lab.queue_table()
    assert queue[["delivery_count", "lease_until"]].values.tolist() == [[1, 2.0]]
    assert lab.projection()[["truth", "projection"]].values.tolist() == [[1, 1]]
    assert lab.broker.depth() == {"visible": 0, "in_flight": 1, "dead_letters": 0}
    lab.advance(1.9)
    assert lab.clock.now() == 2.0
    assert lab.broker.depth() == {"visible": 1, "in_flight": 0, "dead_letters": 0}
    assert lab.step() == 1
    assert outcomes(lab) == [(1, "received"), (1, "applied"), (1, "ack_failed"),
                             (2, "received"), (2, "applied"), (2, "acked")]
    assert lab.projection()[["truth", "projection", "delta"]].values.tolist() == [[1, 2, 1]]
    assert lab.queue_table().empty and lab.inbox().empty
    result = lab.check()
    assert (result.duplicated, result.extra_applications) == (1, 1)


def test_the_auto_ack_consumer_loses_the_order_when_it_crashes() -> None:
    lab = one_order("at-most-once", crash_after_receive=0.5)
    assert lab.step() == 1
    assert outcomes(lab) == [(1, "received"), (1, "acked"), (1, "crashed")]
    assert lab.queue_table().empty  # acked before the work: nothing left to redeliver
    assert lab.projection()[["truth", "projection", "delta"]].values.tolist() == [[1, 0, -1]]
    assert lab.run_until_idle().lost == 1


def test_the_same_schedules_leave_the_other_consumer_correct() -> None:
    # Each consumer fails on its own fault only: the naive one survives the crash (redelivery),
    # the auto-ack one survives the lost ACK (it skips the work and the message comes back).
    assert one_order("at-least-once", crash_after_receive=0.5).run_until_idle().ok
    assert one_order("at-most-once", ack_fail=0.5).run_until_idle().ok


def test_the_transactional_consumer_has_nothing_to_lose_on_the_ack_loss_schedule() -> None:
    lab = one_order("transactional", ack_fail=0.5)
    assert lab.step() == 1
    assert outcomes(lab) == [(1, "received"), (1, "applied"), (1, "acked")]
    assert lab.queue_table().empty and lab.check().ok


def test_the_transactional_consumer_crash_undoes_the_effect_and_redelivers_once() -> None:
    lab = one_order("transactional", crash_after_receive=0.5)
    assert lab.step() == 1
    assert outcomes(lab) == [(1, "received"), (1, "crashed")]
    assert lab.projection()[["truth", "projection"]].values.tolist() == [[1, 0]]
    assert lab.queue_table()["delivery_count"].tolist() == [1]
    lab.advance(1.9)
    assert lab.step() == 1
    assert outcomes(lab)[2:] == [(2, "received"), (2, "applied"), (2, "acked")]
    log = lab.log("o-001")
    applied, acked = log[log["outcome"] == "applied"], log[log["outcome"] == "acked"]
    assert applied["at"].tolist() == acked["at"].tolist() == [2.05]  # one transaction
    assert lab.check().ok


def test_the_idempotent_consumer_skips_the_redelivery() -> None:
    lab = one_order("idempotent", ack_fail=0.5)
    result = lab.run_until_idle()
    assert result.ok
    assert outcomes(lab) == [(1, "received"), (1, "applied"), (1, "ack_failed"),
                             (2, "received"), (2, "duplicate_skipped"), (2, "acked")]
    assert lab.inbox()["event_id"].tolist() == lab.orders()["event_id"].tolist()


def test_the_transactional_consumer_meets_both_faults_on_delivery_one() -> None:
    lab = one_order("transactional", ack_fail=0.5, crash_after_receive=0.5)
    lab.step()
    assert outcomes(lab) == [(1, "received"), (1, "crashed")]
    lab.advance(1.9)
    lab.step()
    assert outcomes(lab)[2:] == [(2, "received"), (2, "applied"), (2, "acked")]
    assert lab.check().ok and lab.queue_table().empty


def test_a_transaction_cannot_take_back_an_email() -> None:
    sent: list[str] = []

    def reserve_and_email(conn, delivery) -> None:
        sent.append(delivery.correlation_id)
        apply_order_placed(conn, delivery)
        if len(sent) == 1:
            raise TimeoutError("the payment service did not answer")

    lab = Lab(seed=STORY_SEED, mode="transactional", handler=reserve_and_email)
    lab.place_order("coffee-beans", 1, order_id="o-001")
    assert lab.run_until_idle().ok  # the database write happened once
    assert sent == ["o-001", "o-001"]  # the email went out twice


def test_a_stale_receipt_is_refused_and_the_refusal_is_recorded() -> None:
    lab = Lab(seed=STORY_SEED)
    lab.place_order("coffee-beans", 1, order_id="o-001")
    [stale] = lab.broker.receive(2.0, worker="worker-1")
    lab.advance(2.5)  # the lease ran out; the queue hands the message to worker 2
    [current] = lab.broker.receive(2.0, worker="worker-2")
    assert lab.broker.ack(stale, worker="worker-1") is False
    assert len(lab.queue_table()) == 1  # nothing deleted
    rejected = lab.log("o-001").query("outcome == 'ack_rejected'")
    assert rejected[["worker", "delivery_count"]].values.tolist() == [["worker-1", 1]]
    assert lab.broker.ack(current, worker="worker-2") is True
    assert lab.queue_table().empty
