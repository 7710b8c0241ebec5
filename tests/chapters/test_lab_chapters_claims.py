"""What chapters 4 (the hands-on lab) and 5 (reconciliation) say in prose, asserted on the
engine, so the text cannot drift from what the engine does.

Chapter 4 tells order o-001 with seed 6 and an ACK failure rate of 0.8: the ACKs of deliveries
1 to 3 are lost, deliveries 2 to 4 are skipped as duplicates, the effect happens once; without
an inbox the same schedule reserves 4 bags. Its panel run (seed 7, 20 orders, rate 0.8)
applies every order once and parks some messages whose effect did happen.

Chapter 5 loses messages with seed 11 (the same orders lost in every mode), then shows the
race: seed 5, three messages lost, five orders in flight; the naive rebuild double-counts the
five, the engine's repair recounts eight orders, fences every counted event and stays correct
in every worker mode, where a repair that marked only the inbox broke all but the idempotent
one. A watermark loses an order committed out of id order. A repair leaves the history (seed
8: 68 emails for 40 orders) and the verdict says so. A schedule bounds the loss.

Chapter 4's durability section says a commit with ``synchronous=NORMAL`` in WAL mode survives a
killed process (only a power cut or an operating-system crash can take it back): a real process
commits an order, is SIGKILLed before it closes anything, and the order is there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

from deliverylab.book import labviews, naive
from deliverylab.book.lab import Lab, guarantee_matrix
from deliverylab.book.panel import LabPanel
from deliverylab.book.traceviews import timeline
from deliverylab.engine import store, trace
from deliverylab.engine.check import event_states
from deliverylab.engine.faults import Faults
from deliverylab.engine.worker import apply_order_placed


def test_chapter_4_one_order_with_most_acks_lost():
    lines: list[str] = []
    lab = Lab(seed=6, mode="idempotent", faults=Faults(seed=6, ack_fail=0.8),
              echo=lines.append)
    lab.place_order("coffee-beans", 1, order_id="o-001")
    assert lab.run_until_idle().ok
    story = timeline(lab.store, "o-001")
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
    repaired = panel.lab.check()
    assert repaired.ok and repaired.repaired
    # The red line stays where it was: the repair fixed the projection, not the history, and
    # the counter agrees with the verdict's "(+N extra)".
    top = max(r["duplicated"] for r in panel.history.rows)
    assert panel.history.rows[-1]["duplicated"] == top == repaired.repaired_extra_applications > 0
    assert f"(+{top} extra)" in repaired.verdict


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
    naive.rebuild_projection(seed_style.store)
    assert (seed_style.projection().delta == 0).all()  # looks repaired ...
    seed_style.run_until_idle()
    after = seed_style.projection().set_index("item_id").delta
    assert after[after != 0].to_dict() == in_flight_qty.to_dict()  # ... counted twice

    fixed = drifted_lab()
    assert fixed.reconcile().orders_recounted == 8
    assert fixed.run_until_idle().ok
    fenced = fixed.log().query("outcome == 'fenced'")
    assert sorted(fenced.correlation_id) == sorted(in_flight.order_id)


def drifted_in(mode: str) -> Lab:
    lab = Lab(seed=5, mode=mode)
    lab.place_orders(12)
    lab.lose_messages(3)
    lab.run_until_idle()
    lab.place_orders(5)
    return lab


def repair_inbox_only(conn, *, now):
    """The chapter's deliberately wrong repair: the fence is the inbox (same statements)."""
    with store.transaction(conn):
        recount = [(o, e) for o, _, _, e, n, _ in event_states(conn) if n != 1]
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                     " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
        conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                     " SELECT 'inventory', event_id, ? FROM orders WHERE true"
                     " ON CONFLICT DO NOTHING", (now,))
        for order_id, event_id in recount:
            trace.log(conn, at=now, worker="reconcile", event_id=event_id,
                      correlation_id=order_id, message_id=None, delivery_count=0,
                      outcome=trace.Outcome.RECONCILED)


def test_chapter_5_the_inbox_protected_only_the_idempotent_worker_the_fence_every_mode():
    for mode in ("at-most-once", "at-least-once", "idempotent", "transactional"):
        wrong, right = drifted_in(mode), drifted_in(mode)
        repair_inbox_only(wrong.store, now=wrong.clock.now())
        assert wrong.check().ok  # green right after the repair ...
        after = wrong.run_until_idle()
        if mode == "idempotent":
            assert after.ok
        else:  # ... until the five queued events are applied on top
            assert (after.duplicated, after.extra_applications) == (5, 5), mode
            assert after.verdict.startswith("BROKEN: 5 duplicated (+5 extra)")
        fixed = right.reconcile()
        assert (fixed.events_fenced, fixed.orders_recounted) == (17, 8)
        result = right.run_until_idle()
        assert result.ok and result.verdict.startswith("OK (repaired): projection equals truth")
        assert right.stats().fenced == 5 and right.stats().applied == 9


def test_chapter_5_a_watermark_loses_an_order_committed_out_of_id_order():
    watermark = {}

    def skip_up_to_watermark(conn, d):
        if "order_id" in watermark and d.correlation_id <= watermark["order_id"]:
            return
        apply_order_placed(conn, d)

    lab = Lab(seed=21, handler=skip_up_to_watermark)
    for n in range(1, 11):
        lab.place_order("green-tea", 1, order_id=f"o-{n:04d}")
    lab.run_until_idle()
    lab.place_order("green-tea", 2, order_id="o-0012")
    with store.transaction(lab.store):  # the chapter's repair_with_watermark
        lab.store.execute("DELETE FROM inventory_projection")
        lab.store.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                         " SELECT item_id, sum(qty) FROM orders GROUP BY item_id")
        watermark["order_id"] = lab.store.execute("SELECT max(order_id) FROM orders").fetchone()[0]
    lab.place_order("green-tea", 5, order_id="o-0011")
    result = lab.run_until_idle()
    assert watermark == {"order_id": "o-0012"}
    assert lab.projection().to_dict("records") == [
        {"item_id": "green-tea", "truth": 17, "projection": 12, "delta": -5}]
    assert result.verdict == ("BROKEN: no event problems; projection differs from truth on"
                              " 1 item(s)")
    # The same two writers with the engine's fence instead: nothing lost.
    fenced = Lab(seed=21)
    for n in range(1, 11):
        fenced.place_order("green-tea", 1, order_id=f"o-{n:04d}")
    fenced.run_until_idle()
    fenced.place_order("green-tea", 2, order_id="o-0012")
    fenced.reconcile()
    fenced.place_order("green-tea", 5, order_id="o-0011")
    assert fenced.run_until_idle().ok


def test_chapter_5_a_repair_leaves_the_emails_and_the_verdict_says_so():
    emails = []

    def reserve_and_email(conn, d):
        apply_order_placed(conn, d)
        emails.append(d.correlation_id)

    mail = Lab(seed=8, mode="at-least-once", handler=reserve_and_email,
               faults=Faults(seed=8, ack_fail=0.5, lose_message=0.1))
    mail.place_orders(40)
    before = mail.run_until_idle()
    assert (before.lost, before.duplicated, before.extra_applications) == (2, 14, 30)
    mail.reconcile()
    after = mail.check()
    assert after.ok and after.verdict == (
        "OK (repaired): projection equals truth; 14 orders had duplicated effects before the"
        " repair (+30 extra); 2 orders were never applied (lost or in flight) and counted by"
        " the repair")
    sent = Counter(emails)
    ids = list(mail.orders().order_id)
    assert (len(ids), len(emails)) == (40, 68)
    assert sum(sent[o] > 1 for o in ids) == after.repaired_duplicated == 14
    assert sum(sent[o] == 0 for o in ids) == after.repaired_never_applied == 2


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
    truth = broken.store.execute("SELECT sum(qty) FROM orders").fetchone()[0]
    applied = broken.store.execute(
        "SELECT sum(o.qty) FROM delivery_log AS l JOIN orders AS o USING (event_id)"
        " WHERE l.outcome = 'applied'").fetchone()[0]
    projection = broken.store.execute(
        "SELECT sum(reserved_qty) FROM inventory_projection").fetchone()[0]
    assert applied == projection != truth


COMMIT_THEN_WAIT = textwrap.dedent("""
    import sys, time
    from deliverylab.engine import store
    from deliverylab.engine.clock import SystemClock
    from deliverylab.engine.ids import Ids
    from deliverylab.engine.orders import place_order
    from deliverylab.brokers.sqlite import Queue

    conn = store.connect(sys.argv[1])
    conn.execute("PRAGMA synchronous = NORMAL")
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    place_order(Queue(conn, clock=SystemClock(), ids=Ids(seed=1)), item_id="coffee-beans",
                qty=1, order_id="o-001")
    print("committed", flush=True)
    time.sleep(60)  # killed long before this ends: nothing is closed or checkpointed
""")


def test_chapter_4_a_normal_commit_survives_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    store.init_db(path).close()
    src = str(Path(__file__).resolve().parents[2] / "src")
    child = subprocess.Popen([sys.executable, "-c", COMMIT_THEN_WAIT, str(path)],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": src})
    try:
        assert child.stdout.readline().strip() == "committed"
        # The commit is in the write-ahead log only; nothing was fsynced or checkpointed.
        assert Path(f"{path}-wal").stat().st_size > 0
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    conn = store.connect(path)
    assert [tuple(r) for r in conn.execute("SELECT order_id, qty FROM orders")] == [("o-001", 1)]
    assert conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0] == 1
    conn.close()
