"""The book's figures say what the chapters say they say: every curve findable, the capped
bar labelled as a cap, the seeds' spread drawn, not only their mean."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
import numpy as np
import pytest

from deliverylab.book import backoff
from deliverylab.book.lab import fault_sweep
from deliverylab.book.labviews import plot_fault_sweep
from deliverylab.book.toolkit import ack_loss_run, delivery_histogram, plot_delivery_histogram
from deliverylab.engine.errors import InvalidInput

MODES = ["at-most-once", "at-least-once", "idempotent", "transactional"]


@pytest.fixture(autouse=True)
def _agg_figures() -> Iterator[None]:
    plt.switch_backend("Agg")
    yield
    plt.close("all")


# -- chapter 1: lost and duplicated against the fault rate --------------------------------------

@pytest.fixture(scope="module")
def sweeps():
    rates = [0.0, 0.1, 0.3]
    return {point: fault_sweep(rates=rates, point=point, orders=60, seed=29, modes=MODES)
            for point in ("ack_fail", "crash_after_receive")}


def test_the_legend_has_one_entry_per_drawn_mode_and_per_count(sweeps) -> None:
    fig = plot_fault_sweep(sweeps, orders=60, seed=29)
    [legend] = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    # Only at-least-once duplicates and only at-most-once loses: two modes, two counts.
    assert labels == ["at-most-once", "at-least-once", "lost", "duplicated"]


def test_every_curve_is_either_drawn_or_named_as_flat_on_zero(sweeps) -> None:
    fig = plot_fault_sweep(sweeps, orders=60, seed=29)
    for ax, (point, sweep) in zip(fig.axes, sweeps.items(), strict=True):
        drawn = [line for line in ax.get_lines() if line.get_marker() in ("o", "s")]
        note = "\n".join(t.get_text() for t in ax.texts)
        for mode, rows in sweep.groupby("mode", sort=False):
            for count, marker in (("lost", "o"), ("duplicated", "s")):
                values = rows[count].tolist()
                on_plot = [line for line in drawn if line.get_marker() == marker
                           and list(line.get_ydata()) == values]
                if any(values):
                    assert on_plot, (point, mode, count)
                else:  # flat: not drawn on top of the others, but named in the panel
                    assert not on_plot, (point, mode, count)
                    assert mode in note, (point, mode, count)
        # No drawn curve sits on zero all the way, hiding another.
        assert all(any(line.get_ydata()) for line in drawn)


def test_a_fault_sweep_plot_needs_a_sweep() -> None:
    with pytest.raises(InvalidInput, match="sweeps"):
        plot_fault_sweep({}, orders=1, seed=0)


# -- chapter 3: delivery counts, capped by max_receives -----------------------------------------

@pytest.fixture(scope="module")
def histogram():
    lab = ack_loss_run(0.5, orders=120, seed=0, max_receives=6)
    return delivery_histogram(lab.store, 0.5, 6)


def test_the_last_bar_is_labelled_as_the_capped_tail(histogram) -> None:
    ax = plot_delivery_histogram(histogram, 0.5)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:-1] == ["1", "2", "3", "4", "5"]
    assert labels[-1] == "≥ 6\n(max_receives)"
    bars = ax.patches
    assert [b.get_hatch() for b in bars] == [None] * 5 + ["//"]
    assert [b.get_height() for b in bars] == histogram["observed"].tolist()


@pytest.mark.parametrize(("kwargs", "field"), [({"p": 1.5}, "p"), ({"p": "0.5"}, "p")])
def test_the_histogram_plot_refuses_a_bad_p(histogram, kwargs, field) -> None:
    with pytest.raises(InvalidInput, match=field):
        plot_delivery_histogram(histogram, **kwargs)


def test_the_histogram_plot_refuses_an_empty_frame(histogram) -> None:
    with pytest.raises(InvalidInput, match="histogram"):
        plot_delivery_histogram(histogram.iloc[0:0], 0.5)


# -- chapter 3: backoff, mean and spread over the seeds -----------------------------------------

STRATEGIES = ["none", "full_jitter"]
CLIENTS = [5, 15]
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def per_seed():
    return backoff.runs(STRATEGIES, CLIENTS, seeds=SEEDS)


def test_runs_are_one_row_per_seed_and_sweep_is_their_mean(per_seed) -> None:
    assert len(per_seed) == len(STRATEGIES) * len(CLIENTS) * len(SEEDS)
    mean = backoff.sweep(STRATEGIES, CLIENTS, seeds=SEEDS)
    for row in mean.itertuples():
        sims = [backoff.simulate(row.strategy, row.clients, seed=s) for s in SEEDS]
        assert row.work == sum(r.work for r in sims) / len(sims)
        assert row.completion_time == sum(r.completion_time for r in sims) / len(sims)


def test_the_plot_shows_every_seed_and_the_band_between_the_extremes(per_seed) -> None:
    ax_work, ax_time = backoff.plot_sweep(per_seed)
    for ax, column in ((ax_work, "work"), (ax_time, "completion_time")):
        bands = ax.collections
        assert len(bands) == len(STRATEGIES)
        for band, (_, rows) in zip(bands, per_seed.groupby("strategy", sort=False), strict=True):
            ys = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
            assert ys.min() == pytest.approx(rows[column].min())
            assert ys.max() == pytest.approx(rows[column].max())
        dots = [line for line in ax.get_lines() if line.get_marker() == "."]
        assert sum(len(d.get_ydata()) for d in dots) == len(per_seed)
    assert f"{len(SEEDS)} seeds" in ax_work.get_legend().get_title().get_text()


def test_the_backoff_plot_refuses_an_empty_frame(per_seed) -> None:
    with pytest.raises(ValueError, match="per_seed"):
        backoff.plot_sweep(per_seed.iloc[0:0])
