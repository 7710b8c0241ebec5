"""The live lab: the plain view functions, and the widget panel driven from Python exactly as a
reader drives it (set a control's value, click a button), asserting what the tables, counters
and verdict then show."""

from __future__ import annotations

import re

import pytest

from deliverylab.book import labviews
from deliverylab.book.lab import Lab
from deliverylab.book.panel import LabPanel, Snapshot
from deliverylab.engine.check import check
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults

SCENARIOS = [
    ("idempotent", {"ack_fail": 0.8}),
    ("at-least-once", {"ack_fail": 0.5}),
    ("at-most-once", {"crash_after_receive": 0.3}),
    ("at-least-once", {"lose_message": 0.2, "crash_after_commit": 0.2}),
    ("idempotent", {"process_error": 0.6}),
    ("transactional", {"ack_fail": 0.5, "crash_after_receive": 0.2}),
]


def ran(mode: str = "idempotent", orders: int = 30, seed: int = 3, steps: int | None = None,
        **rates: float) -> Lab:
    lab = Lab(seed=seed, mode=mode, faults=Faults(seed=seed, **rates))
    lab.place_orders(orders)
    if steps is None:
        lab.run_until_idle()
    else:
        for _ in range(steps):
            lab.step()
    return lab


# -- counters ------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "rates"), SCENARIOS)
@pytest.mark.parametrize("steps", [None, 25])
def test_counters_agree_with_the_checker_and_the_log(mode, rates, steps):
    lab = ran(mode, steps=steps, **rates)
    counts = labviews.counters(lab.store)
    result = check(lab.store)
    assert counts["duplicated"] == result.extra_applications
    assert counts["lost"] == result.lost
    assert counts["orders"] == result.orders == 30
    # The dead-letter table also parks messages whose effect did happen (their ACKs kept
    # failing), which the checker does not count as a problem.
    assert counts["dead_lettered"] == len(lab.dead_letters()) >= result.dead_lettered
    log = lab.log()
    outcomes = log.outcome.value_counts()
    assert counts["deliveries"] == outcomes.get("received", 0)
    assert counts["applied"] == outcomes.get("applied", 0)
    assert counts["duplicates_skipped"] == outcomes.get("duplicate_skipped", 0)
    assert counts["queued"] == len(lab.queue_table())
    assert counts["inbox"] == len(lab.inbox())


def test_counters_follow_a_repair_like_the_checker():
    lab = ran("at-least-once", ack_fail=0.6)
    lab.place_orders(5)
    lab.lose_messages(3)
    lab.run_until_idle()
    before = labviews.counters(lab.store)
    assert before["duplicated"] > 0 and before["lost"] == 3
    lab.reconcile()
    after = labviews.counters(lab.store)
    # The repair fixed the projection, not the history: the duplicates stay counted, as the
    # verdict's "OK (repaired)" names them, and the lost orders are now counted by the repair.
    assert (after["duplicated"], after["lost"], after["repaired"]) == \
        (before["duplicated"], 0, 3)
    assert f"(+{after['duplicated']} extra)" in lab.check().verdict
    assert after["applied"] == before["applied"]  # the log keeps what happened


# -- tables --------------------------------------------------------------------------------

def test_queue_view_says_which_messages_are_visible_leased_or_delayed():
    lab = Lab(seed=1)
    lab.place_orders(3)
    (held,) = lab.broker.receive(2.0)
    other = lab.broker.receive(2.0)[0]
    lab.broker.nack(other, 5.0, error="RuntimeError: boom")
    view = labviews.queue_view(lab.store, lab.clock.now())
    assert list(view.columns) == ["message_id", "order_id", "deliveries", "state",
                                  "visible_at", "lease_until", "last_error"]
    by_id = view.set_index("message_id")
    assert by_id.loc[held.message_id, "state"] == "leased"
    assert by_id.loc[held.message_id, "lease_until"] == 2.0
    assert by_id.loc[other.message_id, "state"] == "delayed"
    assert by_id.loc[other.message_id, "last_error"] == "RuntimeError: boom"
    assert list(view.state).count("visible") == 1
    lab.advance(2.5)  # the lease ran out: visible again, nobody holds it
    later = labviews.queue_view(lab.store, lab.clock.now()).set_index("message_id")
    assert later.loc[held.message_id, "state"] == "visible"
    assert len(labviews.queue_view(lab.store, 0.0, limit=2)) == 2
    assert len(labviews.queue_view(lab.store, 0.0, limit=None)) == 3


def test_inbox_view_is_newest_first_with_the_order_of_each_event():
    lab = ran("idempotent", orders=6)
    view = labviews.inbox_view(lab.store)
    assert list(view.columns) == ["event_id", "order_id", "processed_at"]
    assert list(view.processed_at) == sorted(view.processed_at, reverse=True)
    orders = lab.orders().set_index("event_id")
    assert all(orders.loc[e, "order_id"] == o for e, o in zip(view.event_id, view.order_id,
                                                              strict=True))
    assert len(labviews.inbox_view(lab.store, limit=4)) == 4


def test_dead_letter_view_shows_the_last_error():
    lab = ran("idempotent", orders=5, process_error=1.0)
    view = labviews.dead_letter_view(lab.store)
    assert len(view) == 5
    assert list(view.columns) == ["message_id", "order_id", "deliveries", "last_error",
                                  "dead_at"]
    assert set(view.last_error) == {"RuntimeError: injected processing error"}


def test_views_refuse_a_negative_limit():
    lab = Lab()
    with pytest.raises(InvalidInput, match="^limit must be an integer >= 0, got -1$"):
        labviews.inbox_view(lab.store, limit=-1)


def test_table_html_escapes_shades_and_counts_rows():
    import pandas as pd

    frame = pd.DataFrame({"name": ["<b>x</b>", "y"], "n": [1, 2], "t": [0.5, None]})
    out = labviews.table_html(frame, title="T & U", total=7, highlight=lambda r: r["n"] > 1)
    assert '<b>T &amp; U</b>' in out and "&lt;b&gt;x&lt;/b&gt;" in out
    assert 'data-rows="7">7 rows</span>, showing 2' in out
    assert out.count('<tr style="background-color: #fff3cd">') == 1
    assert "<td>0.500</td>" in out and "<td></td>" in out
    assert labviews.table_html(frame.iloc[:0], title="E").endswith(
        '<div class="dl-empty">(empty)</div>')


def test_projection_html_highlights_only_the_items_that_drifted():
    lab = ran("at-least-once", orders=12, ack_fail=0.5)
    frame = labviews.projection_view(lab.store)
    drifted = int((frame.delta != 0).sum())
    assert 0 < drifted < len(frame)
    out = labviews.projection_html(frame, uuid="t")
    style = out[out.index("<style"):out.index("</style>")]  # Styler's CSS, rule per cell id
    shaded = {i for i in range(len(frame)) if f"#T_t_row{i}_col0" in style}
    assert shaded == {i for i, delta in enumerate(frame.delta) if delta != 0}
    assert "background-color: #fde2e1" in style
    assert 'id="T_t"' in out  # a fixed Styler uuid: the same tables give the same HTML


# -- reconfigure ---------------------------------------------------------------------------

def test_reconfigure_changes_the_knobs_and_keeps_the_data():
    lab = ran("idempotent", orders=4)
    before = lab.orders()
    faults = Faults(seed=9, ack_fail=0.5)
    assert labviews.reconfigure(lab, mode="at-least-once", faults=faults,
                                visibility_timeout=0.5, workers=3) is lab
    assert len(lab.workers) == 3 and lab.faults is faults
    assert [w.name for w in lab.workers] == ["worker-1", "worker-2", "worker-3"]
    assert {str(w.mode) for w in lab.workers} == {"at-least-once"}
    assert {w.visibility_timeout for w in lab.workers} == {0.5}
    assert all(w.broker is lab.broker and w.faults is faults for w in lab.workers)
    labviews.reconfigure(lab, workers=1)
    assert len(lab.workers) == 1 and str(lab.mode) == "at-least-once"
    assert lab.orders().equals(before)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "sometimes"}, "^mode must be one of at-most-once, at-least-once, idempotent,"
                            " transactional, got 'sometimes'$"),
    ({"workers": 0}, "^workers must be an integer >= 1 and <= 16, got 0$"),
    ({"visibility_timeout": -1}, "^visibility_timeout must be a number in \\[0, 43200\\], got -1$"),
    ({"faults": {"ack_fail": 1}}, "^faults must be a deliverylab.engine.faults.Faults"),
])
def test_reconfigure_names_the_bad_knob(kwargs, message):
    lab = Lab()
    with pytest.raises(InvalidInput, match=message):
        labviews.reconfigure(lab, **kwargs)
    assert len(lab.workers) == 1 and str(lab.mode) == "idempotent"


# -- the chart -----------------------------------------------------------------------------

def test_history_thins_itself_and_keeps_the_last_point():
    history = labviews.History(max_points=10)
    counts = {k: 0 for k, _, _ in labviews.SERIES}
    for step in range(1, 101):
        history.record(step, step * 0.1, {**counts, "deliveries": step})
    assert len(history) <= 10
    assert history.rows[-1]["step"] == 100 and history.rows[-1]["deliveries"] == 100
    steps = [r["step"] for r in history.rows]
    assert steps == sorted(steps)
    history.record(100, 10.0, {**counts, "deliveries": 101})  # same step: replaced
    assert history.rows[-1]["deliveries"] == 101 and len(history) <= 10
    assert list(history.frame().columns) == ["step", "t", *[k for k, _, _ in labviews.SERIES]]


def test_svg_chart_draws_one_line_per_series_with_its_last_value():
    rows = [{"step": s, "t": s / 10, "deliveries": 2 * s, "applied": s,
             "duplicates_skipped": s, "duplicated": 0, "lost": 0} for s in range(5)]
    svg = labviews.svg_chart(rows)
    assert svg.startswith('<svg class="dl-chart-svg"') and svg.endswith("</svg>")
    assert svg.count("<polyline") == len(labviews.SERIES)
    assert "deliveries (8)" in svg and "step 4" in svg
    assert svg == labviews.svg_chart(rows)
    assert "no steps yet" in labviews.svg_chart([])


def test_render_is_the_same_for_the_same_seed():
    first = labviews.render(ran("at-least-once", ack_fail=0.5), labviews.History())
    second = labviews.render(ran("at-least-once", ack_fail=0.5), labviews.History())
    assert first == second
    assert first.verdict.startswith("BROKEN:")
    assert set(first.counters) == {k for k, _ in labviews.COUNTERS}


# -- the panel, driven like a reader -------------------------------------------------------

def value_of(counter_widget) -> int:
    return int(re.search(r'data-value="(\d+)"', counter_widget.value).group(1))


def rows_of(table_widget) -> int:
    return int(re.search(r'data-rows="(\d+)"', table_widget.value).group(1))


def test_a_fresh_panel_shows_an_empty_lab_and_says_what_to_do():
    panel = LabPanel(seed=7)
    assert "place orders" in panel.status.value
    assert all(value_of(w) == 0 for w in panel.counter_widgets.values())
    assert rows_of(panel.queue_table) == rows_of(panel.inbox_table) == 0
    assert "no steps yet" not in panel.chart.value  # the starting point is recorded
    assert "make lab" in panel.header.value and "running kernel" in panel.header.value


def test_place_then_run_at_a_high_ack_failure_rate_skips_duplicates():
    panel = LabPanel(seed=7, orders=20)
    panel.ack_fail.value = 0.8
    panel.place_button.click()
    assert rows_of(panel.queue_table) == 20 and rows_of(panel.inbox_table) == 0
    panel.run_button.click()
    assert rows_of(panel.queue_table) == 0 and rows_of(panel.inbox_table) == 20
    counts = panel.counts
    assert counts["duplicates_skipped"] > 0 and counts["applied"] == 20
    assert value_of(panel.counter_widgets["duplicates_skipped"]) == counts["duplicates_skipped"]
    assert "OK: all 20 orders applied exactly once" in panel.verdict.value
    assert "dl-verdict-ok" in panel.verdict.value
    assert "#fde2e1" not in panel.projection_table.value  # nothing drifted
    assert panel.status.value.count("Ran ") == 1


def test_switching_to_at_least_once_duplicates_effects_and_the_checker_says_so():
    panel = LabPanel(seed=7, orders=20, ack_fail=0.8)
    panel.place_button.click()
    panel.run_button.click()
    panel.mode.value = "at-least-once"
    assert "mode is now at-least-once" in panel.status.value
    panel.place_button.click()
    panel.run_button.click()
    assert panel.verdict_text.startswith("BROKEN:") and "duplicated" in panel.verdict_text
    assert "dl-verdict-broken" in panel.verdict.value
    assert value_of(panel.counter_widgets["duplicated"]) > 0
    assert "#fde2e1" in panel.projection_table.value  # the drift is highlighted
    assert rows_of(panel.inbox_table) == 20  # at-least-once keeps no inbox


def test_at_most_once_with_crashes_loses_effects():
    panel = LabPanel(seed=7, orders=20, mode="at-most-once", crash_rate=0.3)
    panel.place_button.click()
    panel.run_button.click()
    assert value_of(panel.counter_widgets["lost"]) == check(panel.lab.store).lost > 0
    assert "lost" in panel.verdict_text


def test_step_does_one_worker_step_and_reports_it():
    panel = LabPanel(seed=7, orders=3, ack_fail=0.8)
    panel.step_button.click()
    assert "Nothing to step" in panel.status.value
    panel.place_button.click()
    panel.step_button.click()
    assert panel.steps == 1
    assert 'data-action="step"' in panel.status.value
    assert '>Step 1 (t=0.100s): ' in panel.status.value
    assert "worker-1" in panel.status.value and "worker-1" in panel.log_view.value
    assert value_of(panel.counter_widgets["deliveries"]) == 1
    assert panel.history.rows[-1]["step"] == 1


def test_auto_run_steps_once_per_tick_and_stops_when_idle():
    panel = LabPanel(seed=7, orders=2)
    panel.place_button.click()
    panel.autorun_button.value = True  # the reader presses "auto-run"
    assert panel.autorun.playing  # the timer runs in the browser
    for tick in range(1, 4):
        panel.autorun.value = tick  # what the timer does on each tick
    assert panel.steps == 2 and not panel.autorun.playing
    assert not panel.autorun_button.value  # the button pops back up when the queue is empty
    assert "Auto-run stopped: the queue is empty." in panel.status.value
    panel.autorun.value = 0  # a rewound timer is not a tick
    assert panel.steps == 2


def test_a_run_is_the_same_from_the_same_seed_and_clicks():
    def play(seed: int) -> str:
        panel = LabPanel(seed=seed, orders=15, ack_fail=0.5, mode="at-least-once")
        panel.place_button.click()
        for _ in range(5):
            panel.step_button.click()
        panel.lose_button.click()
        panel.run_button.click()
        return panel.snapshot()._repr_html_()

    assert play(11) == play(11)
    assert play(11) != play(12)


def test_lose_a_message_then_reconcile_repairs_the_projection():
    panel = LabPanel(seed=7, orders=10)
    panel.lose_button.click()
    assert "Nothing to lose" in panel.status.value
    panel.place_button.click()
    panel.lose_button.click()
    assert "Lost message msg-" in panel.status.value
    panel.run_button.click()
    assert value_of(panel.counter_widgets["lost"]) == 1
    assert "1 lost" in panel.verdict_text and "#fde2e1" in panel.projection_table.value
    panel.reconcile_button.click()
    assert "1 item(s) changed, 1 order(s) recounted, 10 event(s) newly fenced" \
        in panel.status.value
    # Green, and the history stays on the record: the order's effect never ran.
    assert panel.verdict_text == ("OK (repaired): projection equals truth; 1 order was never"
                                  " applied (lost or in flight) and counted by the repair")
    assert "dl-verdict-ok" in panel.verdict.value
    assert value_of(panel.counter_widgets["lost"]) == 0


def test_reset_and_a_new_seed_start_a_fresh_lab():
    panel = LabPanel(seed=7, orders=5)
    panel.place_button.click()
    panel.run_button.click()
    old = panel.lab
    panel.reset_button.click()
    assert panel.lab is not old and panel.steps == 0 and panel.counts["orders"] == 0
    assert "Reset: a fresh lab with seed 7" in panel.status.value
    panel.place_button.click()
    first_ids = list(panel.lab.orders().order_id)
    panel.seed.value = 8
    assert panel.counts["orders"] == 0 and "seed 8" in panel.status.value
    panel.place_button.click()
    assert list(panel.lab.orders().order_id) != first_ids


def test_the_orders_slider_sets_how_many_orders_a_click_places():
    panel = LabPanel(seed=7, orders=5)
    panel.orders.value = 12
    assert panel.place_button.description == "place 12 orders"
    panel.place_button.click()
    assert panel.counts["orders"] == 12


def test_knobs_reach_every_worker_and_apply_from_the_next_delivery():
    panel = LabPanel(seed=7, orders=6)
    panel.workers.value = 3
    panel.visibility_timeout.value = 0.5
    panel.crash_rate.value = 0.25
    assert len(panel.lab.workers) == 3
    assert {w.visibility_timeout for w in panel.lab.workers} == {0.5}
    assert {w.faults.crash_after_receive for w in panel.lab.workers} == {0.25}
    assert "visibility timeout (s) is now 0.50" not in panel.status.value
    assert "crash rate is now 0.25" in panel.status.value
    panel.place_button.click()
    panel.run_button.click()
    log = panel.lab.log()
    assert set(log.worker) >= {"worker-1", "worker-2", "worker-3"}
    assert panel.verdict_text.startswith("OK:")


def test_a_slider_change_redraws_only_what_changed():
    panel = LabPanel(seed=7, orders=5)
    panel.place_button.click()
    drawn = panel.views
    panel.ack_fail.value = 0.5
    assert panel.views is drawn  # no row changed: the tables are not recomputed
    assert "ACK failure rate is now 0.50" in panel.status.value
    assert panel.refresh(force=True) is not drawn


def test_the_snapshot_and_the_cell_output():
    panel = LabPanel(seed=7, orders=4, ack_fail=0.8)
    panel.place_button.click()
    panel.run_button.click()
    snap = panel.snapshot()
    assert isinstance(snap, Snapshot)
    text = repr(snap)
    assert text.splitlines()[0] == f"checker: {panel.verdict_text}"
    assert "duplicates skipped" in text
    page = snap._repr_html_()
    assert "make lab" in page and page.count('class="dl-table"') == 3  # queue is empty
    assert "Inbox (newest first)" in page and "<svg" in page
    bundle = panel._repr_mimebundle_()
    assert bundle["text/plain"] == repr(panel).replace("\n", "") and \
        repr(panel).startswith("LabPanel(seed=7, mode='idempotent', ack_fail=0.80")
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == \
        panel.widget.model_id


def test_every_control_and_view_carries_its_css_class():
    panel = LabPanel()
    expected = {
        panel.ack_fail: "dl-ack-slider", panel.crash_rate: "dl-crash-slider",
        panel.visibility_timeout: "dl-visibility-slider", panel.orders: "dl-orders-slider",
        panel.workers: "dl-workers-slider", panel.mode: "dl-mode-dropdown",
        panel.seed: "dl-seed", panel.place_button: "dl-place-button",
        panel.step_button: "dl-step-button", panel.run_button: "dl-run-button",
        panel.autorun: "dl-autorun", panel.autorun_button: "dl-autorun-button",
        panel.lose_button: "dl-lose-button",
        panel.reconcile_button: "dl-reconcile-button", panel.reset_button: "dl-reset-button",
        panel.verdict: "dl-verdict", panel.status: "dl-status", panel.chart: "dl-chart",
        panel.queue_table: "dl-queue", panel.inbox_table: "dl-inbox",
        panel.projection_table: "dl-projection", panel.dead_letters_table: "dl-dead-letters",
        panel.widget: "dl-live",
        panel.counter_widgets["duplicates_skipped"]: "dl-count-duplicates-skipped",
    }
    for widget, css in expected.items():
        assert css in widget._dom_classes
    assert panel.mode.options == ("at-most-once", "at-least-once", "idempotent",
                                  "transactional")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ack_fail": 1.5}, "^ack_fail must be a number in \\[0, 1\\], got 1.5$"),
    ({"orders": 0}, "^orders must be an integer >= 1 and <= 1000, got 0$"),
    ({"mode": "twice"}, "^mode must be one of "),
    ({"seed": -1}, "^seed must be an integer >= 0, got -1$"),
])
def test_the_panel_refuses_bad_settings(kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        LabPanel(**kwargs)


# -- reconciliation on a schedule (chapter 5) ------------------------------------------------

def test_a_schedule_bounds_the_drift_that_no_schedule_lets_grow():
    def run(every):
        lab = Lab(seed=3, faults=Faults(seed=3, lose_message=0.05))
        return labviews.run_with_schedule(lab, steps=300, every=every, record_every=20)

    never, scheduled = run(None), run(50)
    assert list(never.columns) == labviews.SCHEDULE_COLUMNS
    assert list(never.step) == list(range(20, 301, 20))
    assert list(never.orders) == list(scheduled.orders) == [s // 2 for s in never.step]
    assert never.lost.is_monotonic_increasing and never.lost.iloc[-1] > 5
    assert (never.repairs == 0).all()
    assert scheduled.repairs.iloc[-1] > 0 and scheduled.lost.max() < never.lost.iloc[-1]
    after_repair = scheduled[scheduled.step % 50 == 0]
    assert (after_repair.lost == 0).all() and (after_repair.drift == 0).all()
    assert run(50).equals(scheduled)


def test_a_schedule_leaves_a_healthy_lab_alone():
    lab = Lab(seed=3)
    frame = labviews.run_with_schedule(lab, steps=40, every=5, order_every=1, record_every=7)
    assert list(frame.step) == [7, 14, 21, 28, 35, 40]
    assert (frame.repairs == 0).all() and (frame.lost == 0).all()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"steps": 0, "every": 5}, "^steps must be an integer >= 1 and <= 1000000, got 0$"),
    ({"steps": 5, "every": 0}, "^every must be an integer >= 1, got 0$"),
    ({"steps": 5, "every": 1, "record_every": 0}, "^record_every must be an integer >= 1"),
])
def test_a_schedule_refuses_bad_arguments(kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        labviews.run_with_schedule(Lab(), **kwargs)


def test_the_status_line_changes_last_and_counts_the_actions():
    """In the browser a new status line means every view above it is already redrawn, and
    its ``data-seq`` tells a test which click it answers."""
    panel = LabPanel(seed=7, orders=5, ack_fail=0.5)
    seq = int(re.search(r'data-seq="(\d+)"', panel.status.value).group(1))
    changed = []
    views = [panel.verdict, panel.chart, panel.queue_table, panel.inbox_table,
             panel.projection_table, panel.log_view, *panel.counter_widgets.values()]
    for widget in [*views, panel.status]:
        widget.observe(lambda change: changed.append(change["owner"]), names="value")
    panel.place_button.click()
    panel.run_button.click()
    assert changed[-1] is panel.status and panel.inbox_table in changed
    place = changed.index(panel.status)  # the answer to the first click ...
    assert {panel.queue_table, panel.verdict} <= set(changed[:place])  # ... came after these
    assert f'data-seq="{seq + 2}"' in panel.status.value
    assert 'data-action="run"' in panel.status.value
