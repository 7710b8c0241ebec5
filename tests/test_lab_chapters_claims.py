"""What chapters 4 (the hands-on lab) and 5 (reconciliation) say in prose, asserted on the
engine, so the text cannot drift from what the engine does.

Chapter 4 tells order o-001 with seed 6 and an ACK failure rate of 0.8: the ACKs of deliveries
1 to 3 are lost, deliveries 2 to 4 are skipped as duplicates, the effect happens once; without
an inbox the same schedule reserves 4 bags. Its panel run (seed 7, 20 orders, rate 0.8)
applies every order once and parks some messages whose effect did happen.

Chapter 5 loses messages with seed 11 (the same orders lost in every mode), then shows the
race: seed 5, three messages lost, five orders in flight; the naive rebuild double-counts the
five, the engine's repair marks eight events and stays correct. A schedule bounds the loss.
"""

from __future__ import annotations

from deliverylab import labviews, naive
from deliverylab.faults import Faults
from deliverylab.lab import Lab, guarantee_matrix
from deliverylab.panel import LabPanel
from deliverylab.trace import timeline


def test_chapter_4_one_order_with_most_acks_lost():
    lines: list[str] = []
    lab = Lab(seed=6, mode="idempotent", faults=Faults(seed=6, ack_fail=0.8),
              echo=lines.append)
    lab.place_order("coffee-beans", 1, order_id="o-001")
    assert lab.run_until_idle().ok
    story = timeline(lab.conn, "o-001")
    by_delivery = story.groupby("delivery_count").outcome.apply(list).to_dict()
    assert by_delivery == {1: ["received", "applied", "ack_failed"],
                           2: ["received", "duplicate_skipped", "ack_failed"],
                           3: ["received", "duplicate_skipped", "ack_failed"],
                           4: ["received", "duplicate_skipped", "acked"]}
    assert sum("applied projection (first time)" in line for line in lines) == 1
    assert sum("ack failed → expect redelivery" in line for line in lines) == 3
    received = story[story.outcome == "received"]
    assert list(received["at"]) == [0.0, 2.0, 4.0, 6.0]  # one visibility timeout apart

    without_inbox = Lab(seed=6, mode="at-least-once", faults=Faults(seed=6, ack_fail=0.8))
    without_inbox.place_order("coffee-beans", 1, order_id="o-001")
    result = without_inbox.run_until_idle()
    assert (result.duplicated, result.extra_applications) == (1, 3)
    assert without_inbox.projection().projection.tolist() == [4]


def test_chapter_4_the_panel_run():
    panel = LabPanel(seed=7, orders=20)
    panel.ack_fail.value = 0.8
    panel.place_button.click()
    panel.run_button.click()
    counts, result = panel.counts, panel.lab.check()
    assert result.ok and counts["duplicates_skipped"] > counts["orders"]
    assert counts["dead_lettered"] > 0 and result.dead_lettered == 0  # parked, yet applied
    panel.mode.value = "at-least-once"
    panel.place_button.click()
    panel.run_button.click()
    result = panel.lab.check()
    assert result.duplicated > 0 and not result.projection_equals_truth
    first_twenty = panel.lab.events().iloc[:20]
    assert set(first_twenty.state) == {"correct"}  # history is not undone by a mode switch
    panel.reconcile_button.click()
    assert panel.lab.check().ok
    assert panel.history.rows[-1]["duplicated"] == 0 < max(r["duplicated"]
                                                          for r in panel.history.rows)


def test_chapter_5_a_lost_message_is_lost_in_every_mode():
    faults = Faults(seed=11, lose_message=0.2)
    matrix = guarantee_matrix(orders=30, faults=faults, seed=11,
                              modes=("at-most-once", "at-least-once", "idempotent",
                                     "transactional"))
    assert set(matrix["lost"]) == {4} and set(matrix["duplicated"]) == {0}
    lab = Lab(seed=11, faults=faults)
    lab.place_orders(30)
    lab.run_until_idle()
    drift = lab.diff()
    lost_qty = int(drift.unapplied.qty.sum())
    assert int(drift.items.delta.sum()) == -lost_qty and set(drift.unapplied.state) == {"lost"}
    repair = lab.reconcile()
    assert repair.orders_recounted == 4 and lab.check().ok and lab.diff().clean


def drifted_lab() -> Lab:
    lab = Lab(seed=5)
    lab.place_orders(12)
    lab.lose_messages(3)
    lab.run_until_idle()
    lab.place_orders(5)
    return lab


def test_chapter_5_the_race_between_a_rebuild_and_events_in_flight():
    before = drifted_lab()
    result = before.check()
    assert (result.lost, result.pending) == (3, 5)
    in_flight = before.events().query("state == 'pending'")
    in_flight_qty = in_flight.groupby("item_id").qty.sum()

    seed_style = drifted_lab()
    naive.rebuild_projection(seed_style.conn)
    assert (seed_style.projection().delta == 0).all()  # looks repaired ...
    seed_style.run_until_idle()
    after = seed_style.projection().set_index("item_id").delta
    assert after[after != 0].to_dict() == in_flight_qty.to_dict()  # ... counted twice

    fixed = drifted_lab()
    assert fixed.reconcile().orders_recounted == 8
    assert fixed.run_until_idle().ok
    fenced = fixed.log().query("outcome == 'fenced'")
    assert sorted(fenced.correlation_id) == sorted(in_flight.order_id)


def test_chapter_5_a_schedule_bounds_the_loss():
    def run(every):
        lab = Lab(seed=3, faults=Faults(seed=3, lose_message=0.05))
        return labviews.run_with_schedule(lab, steps=600, every=every, record_every=10)

    never, every_50 = run(None), run(50)
    assert never.lost.iloc[-1] == never.lost.max() > 10 and never.repairs.iloc[-1] == 0
    assert every_50.lost.iloc[-1] == 0 and every_50.lost.max() < never.lost.max() / 3
    assert every_50.repairs.iloc[-1] > 5


def test_chapter_5_only_the_orders_rebuild_the_projection():
    broken = Lab(seed=8, mode="at-least-once",
                 faults=Faults(seed=8, ack_fail=0.5, lose_message=0.1))
    broken.place_orders(40)
    result = broken.run_until_idle()
    assert result.lost > 0 and result.duplicated > 0
    truth = broken.conn.execute("SELECT sum(qty) FROM orders").fetchone()[0]
    applied = broken.conn.execute(
        "SELECT sum(o.qty) FROM delivery_log AS l JOIN orders AS o USING (event_id)"
        " WHERE l.outcome = 'applied'").fetchone()[0]
    projection = broken.conn.execute(
        "SELECT sum(reserved_qty) FROM inventory_projection").fetchone()[0]
    assert applied == projection != truth
