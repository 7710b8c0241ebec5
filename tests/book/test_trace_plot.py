"""The swimlane picture: drawn from delivery_log, readable, and the same on every run.

Each story is one order on a seeded lab with a fake clock; seed 54 puts the lost ACK (or the
crash) on delivery 1 of order o-001 and lets delivery 2 through, as chapter 2 tells it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from itertools import combinations

import matplotlib.pyplot as plt
import pytest

from deliverylab.book import traceviews
from deliverylab.book.lab import Lab
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults

SEED = 54


@pytest.fixture(autouse=True)
def _agg_figures() -> Iterator[None]:
    """Draw off screen, and close every figure a test opened."""
    plt.switch_backend("Agg")
    yield
    plt.close("all")


def story(mode: str, faults: Faults, *, workers: int = 1) -> Lab:
    """Order o-001 (and, with several workers, o-002), run until the queue is empty."""
    lab = Lab(seed=SEED, mode=mode, faults=faults, workers=workers)
    lab.place_order("coffee-beans", 1, order_id="o-001")
    if workers > 1:  # a second order keeps worker-1 busy, so worker-2 gets the redelivery
        lab.place_order("green-tea", 1, order_id="o-002")
    lab.run_until_idle()
    return lab


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def arrows(ax) -> list:
    return [t for t in ax.texts if getattr(t, "arrow_patch", None) is not None]


ACK_LOSS = Faults(seed=SEED, ack_fail=0.5)
CRASH = Faults(seed=SEED, crash_after_receive=0.5)


def test_the_seed_puts_the_lost_ack_on_delivery_one_only() -> None:
    lab = story("at-least-once", ACK_LOSS)
    log = lab.log("o-001")
    assert list(zip(log.delivery_count, log.outcome, strict=True)) == [
        (1, "received"), (1, "applied"), (1, "ack_failed"),
        (2, "received"), (2, "applied"), (2, "acked")]


def test_leases_show_the_visibility_timeout_running_out() -> None:
    lab = story("at-least-once", ACK_LOSS)
    frame = traceviews.timeline(lab.store, "o-001")
    # Delivery 1 is never acked: its lease runs to t=2 and the queue redelivers.
    # Delivery 2 is acked at t=2.05, which ends its lease early.
    assert traceviews.leases(frame) == [(1, 0.0, 2.0, True), (2, 2.0, 2.05, False)]


def test_an_extended_lease_ends_at_the_new_deadline() -> None:
    lab = Lab(seed=SEED)
    lab.place_order("coffee-beans", 1, order_id="o-001")
    [d] = lab.broker.receive(2.0, worker="worker-1")
    lab.advance(1.0)
    assert lab.broker.extend(d, 5.0, worker="worker-1")
    frame = traceviews.timeline(lab.store, "o-001")
    # Still held, nothing redelivered yet: not "expired".
    assert traceviews.leases(frame) == [(1, 0.0, 6.0, False)]


def test_the_ack_loss_story_is_drawn_from_the_log() -> None:
    lab = story("at-least-once", ACK_LOSS)
    ax = traceviews.plot_timeline(lab.store, "o-001")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["queue", "worker", "database"]
    assert ax.get_title() == "deliveries of order o-001, at-least-once worker"
    labels = texts(ax)
    for expected in ("received #1", "applied #1", "ACK lost #1", "received #2",
                     "applied #2", "acked #2", "lease expired: visible again"):
        assert expected in labels
    # One arrow per row that travels between lanes: received, applied, ACK, twice.
    assert len(arrows(ax)) == 6
    # The lost ACK ends in an x mark, drawn as a line marker.
    assert [line.get_marker() for line in ax.lines if line.get_marker() == "X"] == ["X"]


def test_the_auto_ack_crash_shows_the_ack_before_the_effect_and_no_database_arrow() -> None:
    lab = story("at-most-once", CRASH)
    ax = traceviews.plot_timeline(lab.store, "o-001")
    labels = texts(ax)
    assert {"received #1", "acked #1", "crashed #1"} <= set(labels)
    assert not any(label.startswith("applied") for label in labels)
    assert lab.check().lost == 1


@pytest.mark.parametrize("mode", ["at-least-once", "idempotent", "transactional"])
def test_the_title_names_the_mode_the_log_recorded(mode: str) -> None:
    lab = story(mode, ACK_LOSS)
    assert traceviews.plot_timeline(lab.store, "o-001").get_title() == \
        f"deliveries of order o-001, {mode} worker"


def test_a_story_with_nothing_applied_is_titled_with_the_mode_it_is_given() -> None:
    # The auto-ack worker crashed before any effect: the log records no mode.
    lab = story("at-most-once", CRASH)
    assert traceviews.plot_timeline(lab.store, "o-001").get_title() == "deliveries of order o-001"
    ax = traceviews.plot_timeline(lab.store, "o-001", mode="at-most-once")
    assert ax.get_title() == "deliveries of order o-001, at-most-once worker"


def test_an_unknown_mode_is_refused_by_name() -> None:
    lab = story("at-least-once", ACK_LOSS)
    with pytest.raises(InvalidInput, match="mode.*'exactly-once'"):
        traceviews.plot_timeline(lab.store, "o-001", mode="exactly-once")


def test_the_transactional_commit_is_drawn_as_one_transaction() -> None:
    lab = story("transactional", CRASH)
    labels = texts(traceviews.plot_timeline(lab.store, "o-001"))
    assert labels.count("one transaction") == 1
    assert {"crashed #1", "applied #2", "acked #2"} <= set(labels)


def test_several_workers_are_named_in_the_labels() -> None:
    lab = story("idempotent", ACK_LOSS, workers=2)
    labels = texts(traceviews.plot_timeline(lab.store, "o-001"))
    assert "received #1 (worker-1)" in labels
    assert "duplicate skipped #2 (worker-2)" in labels


def test_an_order_with_no_deliveries_yet_says_so() -> None:
    lab = Lab(seed=SEED)
    lab.place_order("coffee-beans", 1, order_id="o-001")
    ax = traceviews.plot_timeline(lab.store, "o-001")
    assert texts(ax) == ["no deliveries logged for order o-001 yet"]


def test_it_draws_on_the_axes_it_is_given() -> None:
    lab = story("at-least-once", ACK_LOSS)
    _, (left, right) = plt.subplots(1, 2)
    assert traceviews.plot_timeline(lab.store, "o-001", ax=right) is right
    assert not left.texts and right.texts


def test_labels_never_overlap_even_when_deliveries_crowd_together() -> None:
    # Every attempt fails and is nacked with a short backoff: five deliveries in 0.7 s.
    lab = story("at-least-once", Faults(seed=3, process_error=0.9))
    assert lab.check().dead_lettered == 1
    ax = traceviews.plot_timeline(lab.store, "o-001")
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts if t.get_text()]
    assert len(boxes) >= 10
    for (a, box_a), (b, box_b) in combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"


def test_the_picture_is_byte_for_byte_the_same_on_every_run() -> None:
    def png() -> bytes:
        lab = story("at-least-once", ACK_LOSS)
        ax = traceviews.plot_timeline(lab.store, "o-001")
        buf = io.BytesIO()
        ax.figure.savefig(buf, format="png")
        plt.close(ax.figure)
        return buf.getvalue()

    assert png() == png()
