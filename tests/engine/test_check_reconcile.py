"""The checker's verdict, and reconciliation that stays correct while events are in flight."""

from __future__ import annotations

import pytest

from deliverylab.engine import store
from deliverylab.engine.check import EVENT_COLUMNS, check, drift_frame, events_frame
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults
from deliverylab.engine.reconcile import diff, repair

ITEMS = ["coffee-beans", "tea", "milk"]


def place(lab, n=30):
    return [lab.order(ITEMS[i % 3], 1 + i % 4) for i in range(n)]


def message_of(lab, event_id):
    return lab.store.execute("SELECT message_id FROM queue_messages WHERE event_id = ?",
                            (event_id,)).fetchone()[0]


# -- the checker ---------------------------------------------------------------------------------

def test_a_clean_run_is_ok(lab):
    place(lab)
    lab.drain(lab.worker())
    result = check(lab.store)
    assert result.ok and result.correct == result.orders == 30
    assert result.verdict == "OK: all 30 orders applied exactly once; projection equals truth"
    assert result.as_dict()["verdict"] == result.verdict
    assert diff(lab.store).clean


def test_queued_events_are_pending_not_lost(lab):
    place(lab, 4)
    result = check(lab.store)
    assert (result.pending, result.lost, result.ok) == (4, 0, False)
    assert result.verdict.startswith("PENDING: 4 pending;")
    lab.broker.receive(2.0)  # in flight is pending too
    assert check(lab.store).pending == 4


def test_duplicates_are_counted_with_their_extra_applications(lab):
    place(lab)
    lab.drain(lab.worker(mode="at-least-once", faults=Faults(seed=4, ack_fail=0.5)))
    result = check(lab.store)
    frame = events_frame(lab.store)
    assert result.duplicated == int((frame.applications > 1).sum()) > 0
    assert result.extra_applications == int((frame.applications - 1).clip(lower=0).sum())
    assert result.verdict.startswith("BROKEN:") and "duplicated" in result.verdict
    drift = drift_frame(lab.store)
    assert (drift.delta >= 0).all() and (drift.delta > 0).any()
    assert list(drift.columns) == ["item_id", "truth", "projection", "delta"]


def test_dead_letters_are_their_own_state(lab):
    place(lab, 3)
    lab.drain(lab.worker(faults=Faults(seed=1, process_error=1.0), max_receives=2,
                         backoff_base=0.0, backoff_cap=0.0))
    result = check(lab.store)
    assert (result.dead_lettered, result.lost, result.correct) == (3, 0, 0)
    assert set(diff(lab.store).unapplied.state) == {"dead_lettered"}


# -- lost messages, the drift, and the repair -----------------------------------------------------

@pytest.fixture
def drifted(any_lab):
    """30 orders: 5 messages lost before processing, 20 applied, 5 still in the queue."""
    lab = any_lab
    placed = place(lab)
    lost = placed[:5]
    for p in lost:
        assert lab.broker.drop(message_of(lab, p.event_id), reason="operator error")
    w = lab.worker()
    for _ in range(20):
        assert w.step() == 1
    return lab, placed, lost


def test_lost_messages_show_as_lost_drift_and_unapplied(drifted):
    lab, placed, lost = drifted
    result = check(lab.store)
    assert (result.lost, result.correct, result.pending) == (5, 20, 5)
    assert not result.projection_equals_truth
    d = diff(lab.store)
    assert not d.clean
    lost_ids = {p.order_id for p in lost}
    assert set(d.unapplied[d.unapplied.state == "lost"].order_id) == lost_ids
    assert list(d.unapplied.columns) == ["order_id", "item_id", "qty", "event_id", "state"]
    # The drift per item is what the lost and pending orders would have added.
    missing = {}
    for _, row in d.unapplied.iterrows():
        missing[row.item_id] = missing.get(row.item_id, 0) - row.qty
    assert dict(zip(d.items.item_id, d.items.delta, strict=True)) == missing


def test_repair_fixes_it_and_leftover_events_are_fenced(drifted):
    lab, placed, lost = drifted
    outcome = repair(lab.store, clock=lab.clock)
    assert outcome.orders == 30
    assert outcome.events_fenced == 30  # every order it counted, applied or not
    assert outcome.orders_recounted == 10  # 5 lost + 5 still in flight
    assert outcome.items_changed == len({ITEMS[i % 3] for i in range(5)} |
                                        {ITEMS[i % 3] for i in range(25, 30)})
    assert check(lab.store).ok and diff(lab.store).clean
    assert lab.projection() == lab.truth()
    # The repair leaves the inbox to the consumer: it holds what the worker processed.
    assert store.table_counts(lab.store)["inbox_processed"] == 20

    # The five in-flight events now arrive: the fence refuses them, and they are acked.
    w = lab.worker(name="after-repair")
    lab.drain(w)
    assert (w.stats.received, w.stats.fenced, w.stats.applied, w.stats.acked) == (5, 5, 0, 5)
    assert check(lab.store).ok and lab.projection() == lab.truth()
    fenced = lab.store.execute("SELECT count(*), min(detail), max(detail) FROM delivery_log"
                              " WHERE outcome = 'fenced'").fetchone()
    assert tuple(fenced) == (5, "counted by reconcile", "counted by reconcile")

    # New orders after the repair apply normally.
    lab.order("tea", 7)
    lab.drain(w)
    assert w.stats.applied == 1 and check(lab.store).ok


def test_a_second_repair_changes_nothing(drifted):
    lab = drifted[0]
    repair(lab.store, clock=lab.clock)
    before = store.dump(lab.store)
    lab.clock.advance(60)
    again = repair(lab.store, clock=lab.clock)
    assert (again.items_changed, again.events_fenced, again.orders_recounted) == (0, 0, 0)
    assert store.dump(lab.store) == before


def test_the_seeds_naive_rebuild_double_counts_in_flight_events(drifted):
    """The seed's reconcile: empty the projection, SUM the orders — and nothing else."""
    lab = drifted[0]
    with store.transaction(lab.store):
        lab.store.execute("DELETE FROM inventory_projection")
        lab.store.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                         " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
    assert lab.projection() == lab.truth()  # looks repaired ...
    lab.drain(lab.worker())                 # ... until the in-flight events land
    in_flight_qty = sum(1 + i % 4 for i in range(25, 30))
    assert sum(lab.projection().values()) == sum(lab.truth().values()) + in_flight_qty
    assert not check(lab.store).projection_equals_truth


def test_repair_also_fixes_duplicates_and_dead_letters(lab):
    place(lab)
    lab.drain(lab.worker(mode="at-least-once", faults=Faults(seed=4, ack_fail=0.5,
                                                            process_error=0.3),
                         max_receives=2))
    before = check(lab.store)
    assert before.duplicated > 0 and before.dead_lettered > 0
    repair(lab.store, clock=lab.clock)
    assert check(lab.store).ok
    # A redrive after the repair: the fence refuses what the repair counted.
    parked = store.table_counts(lab.store)["dead_letters"]
    assert lab.broker.redrive() == parked >= before.dead_lettered
    w = lab.worker(name="after-redrive")
    lab.drain(w)
    assert w.stats.applied == 0 and w.stats.fenced == parked
    assert check(lab.store).ok


def test_repair_is_recorded_in_the_trace(drifted):
    lab = drifted[0]
    repair(lab.store, clock=lab.clock)
    rows = lab.store.execute("SELECT worker, delivery_count, message_id FROM delivery_log"
                            " WHERE outcome = 'reconciled'").fetchall()
    assert len(rows) == 10
    assert {tuple(r) for r in rows} == {("reconcile", 0, None)}


def test_repair_refuses_a_bad_consumer_and_writes_nothing(drifted):
    lab = drifted[0]
    before = store.dump(lab.store)
    with pytest.raises(InvalidInput, match="^consumer must be a non-empty string .*, got ''$"):
        repair(lab.store, clock=lab.clock, consumer="")
    assert store.dump(lab.store) == before


def test_events_frame_has_one_row_per_order(drifted):
    lab, placed, _ = drifted
    frame = events_frame(lab.store)
    assert list(frame.columns) == EVENT_COLUMNS
    # In placement order; all were placed at t=0, so the order id breaks the tie.
    assert list(frame.order_id) == sorted(p.order_id for p in placed)
    assert set(frame.state) == {"lost", "correct", "pending"}


# -- the verdict after a repair keeps the history -------------------------------------------------

def broken_then_repaired(lab):
    """40 orders through an at-least-once worker that loses ACKs and messages, then a repair."""
    place(lab, 40)
    lab.drain(lab.worker(mode="at-least-once",
                         faults=Faults(seed=8, ack_fail=0.5, lose_message=0.1)))
    before = check(lab.store)
    assert before.duplicated > 0 and before.lost > 0 and not before.repaired
    repair(lab.store, clock=lab.clock)
    return before


def test_after_a_repair_the_verdict_says_what_happened_before_it(lab):
    before = broken_then_repaired(lab)
    after = check(lab.store)
    assert after.ok and after.repaired and after.correct == 40
    assert (after.repaired_duplicated, after.repaired_extra_applications,
            after.repaired_never_applied) == (before.duplicated, before.extra_applications,
                                              before.lost)
    assert after.verdict == (
        f"OK (repaired): projection equals truth; {before.duplicated} orders had duplicated"
        f" effects before the repair (+{before.extra_applications} extra);"
        f" {before.lost} orders were never applied (lost or in flight) and counted by the repair")
    assert after.as_dict()["repaired_duplicated"] == before.duplicated
    # A second repair has nothing to repair, and hides nothing either.
    repair(lab.store, clock=lab.clock)
    assert check(lab.store).verdict == after.verdict


def test_the_status_report_and_the_panel_show_the_same_verdict(lab):
    from deliverylab.app import status
    from deliverylab.book import labviews

    broken_then_repaired(lab)
    verdict = check(lab.store).verdict
    report = status.collect(lab.store, now=lab.clock.now())
    assert report["verdict"] == verdict and report["ok"] is True
    assert report["check"]["repaired_duplicated"] > 0
    assert f"verdict      {verdict}" in status.render(report)
    assert 'class="dl-verdict-line dl-verdict-ok"' in labviews.verdict_html(verdict)


def test_new_damage_after_a_repair_is_reported_with_the_history(lab):
    before = broken_then_repaired(lab)
    for i in range(10):
        lab.order(ITEMS[i % 3], 1)
    lab.drain(lab.worker(mode="at-least-once", faults=Faults(seed=2, ack_fail=0.7)))
    result = check(lab.store)
    assert result.duplicated > 0 and not result.ok
    assert result.verdict.startswith(f"BROKEN: {result.duplicated} duplicated")
    assert result.verdict.endswith(
        f"; {before.duplicated} orders had duplicated effects before the repair"
        f" (+{before.extra_applications} extra); {before.lost} orders were never applied"
        " (lost or in flight) and counted by the repair")
