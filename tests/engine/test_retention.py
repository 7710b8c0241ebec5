"""Inbox retention: the dedup horizon, pruning that refuses a shorter one, and the duplicate a
horizon without the redrive window lets in."""

from __future__ import annotations

import pytest

from deliverylab.book import retention_runs
from deliverylab.book.lab import Lab
from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import retention
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.retention import DAY, dedup_horizon, horizon_of, prune_inbox
from deliverylab.engine.worker import Worker

HORIZON = dedup_horizon(visibility_timeout=2, max_receives=5, backoff_cap=10)


def inbox(lab: Lab) -> list[tuple[str, float]]:
    return [tuple(r) for r in lab.store.execute(
        "SELECT event_id, processed_at FROM inbox_processed ORDER BY processed_at, event_id")]


@pytest.fixture
def lab() -> Lab:
    """Ten orders applied at t = 0 … 1, ten more an hour later."""
    lab = Lab(seed=5)
    lab.place_orders(10)
    lab.run_until_idle()
    lab.advance(3600)
    lab.place_orders(10)
    lab.run_until_idle()
    yield lab
    lab.store.close()


# -- the horizon ----------------------------------------------------------------------------------

def test_the_horizon_adds_the_redeliveries_and_each_way_back() -> None:
    assert HORIZON.redelivery == 5 * 2 + 4 * 10 == HORIZON.total
    with_wait = dedup_horizon(visibility_timeout=2, max_receives=5, backoff_cap=10, max_wait=1)
    assert with_wait.redelivery == 5 * (2 + 1) + 4 * 10
    redrive = dedup_horizon(visibility_timeout=2, max_receives=5, backoff_cap=10,
                            redrive_window=DAY)
    assert redrive.total == 50 + DAY + 50
    both = dedup_horizon(visibility_timeout=2, max_receives=5, backoff_cap=10,
                         redrive_window=DAY, replay_window=7 * DAY)
    assert both.total == 50 + (DAY + 50) + (7 * DAY + 50)
    assert "redrive window 86400 s" in both.explain() and "replay window" in both.explain()


def test_horizon_of_reads_the_workers_own_settings() -> None:
    lab = Lab(seed=1)
    queue = Queue(lab.store, clock=lab.clock, ids=lab.ids, max_receives=7)
    worker = Worker(store=lab.store, clock=lab.clock, broker=queue,
                    visibility_timeout=30, backoff_cap=60)
    assert horizon_of(worker, redrive_window=DAY) == dedup_horizon(
        visibility_timeout=30, max_receives=7, backoff_cap=60, redrive_window=DAY)
    with pytest.raises(InvalidInput, match="worker"):
        horizon_of(queue)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_receives": 0}, "max_receives"),
    ({"max_receives": True}, "max_receives"),
    ({"visibility_timeout": -1}, "visibility_timeout"),
    ({"backoff_cap": float("nan")}, "backoff_cap"),
    ({"redrive_window": -5}, "redrive_window"),
    ({"replay_window": "7d"}, "replay_window"),
    ({"max_wait": None}, "max_wait"),
])
def test_a_bad_horizon_names_the_field(kwargs, field) -> None:
    args = {"visibility_timeout": 2, "max_receives": 5, "backoff_cap": 10, **kwargs}
    with pytest.raises(InvalidInput) as refused:
        dedup_horizon(**args)
    assert refused.value.field == field


# -- pruning --------------------------------------------------------------------------------------

def test_pruning_shorter_than_the_horizon_is_refused_naming_the_field_and_writes_nothing(
        lab) -> None:
    before = inbox(lab)
    with pytest.raises(InvalidInput) as refused:
        prune_inbox(lab.store, older_than=30, horizon=HORIZON, clock=lab.clock)
    assert (refused.value.field, refused.value.value) == ("older_than", 30.0)
    message = str(refused.value)
    assert message.startswith("older_than must be at least the dedup horizon of 50 s")
    assert "unless force=True" in message and message.endswith("got 30.0")
    assert inbox(lab) == before


def test_pruning_at_the_horizon_deletes_only_rows_older_than_it(lab) -> None:
    before = inbox(lab)
    cutoff = lab.clock.now() - 1800
    gone = prune_inbox(lab.store, older_than=1800, horizon=HORIZON, clock=lab.clock)
    assert gone == 10 == sum(1 for _, at in before if at < cutoff)
    assert inbox(lab) == [r for r in before if r[1] >= cutoff]


def test_force_prunes_inside_the_horizon(lab) -> None:
    assert prune_inbox(lab.store, older_than=0, horizon=HORIZON, clock=lab.clock,
                       force=True) == 20


def test_pruning_one_consumer_leaves_the_others(lab) -> None:
    lab.store.execute("INSERT INTO inbox_processed VALUES ('mailer', 'evt-x', 0.0)")
    assert prune_inbox(lab.store, older_than=1800, horizon=HORIZON, clock=lab.clock,
                       consumer="mailer") == 1
    assert len(inbox(lab)) == 20


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"older_than": -1}, "older_than"),
    ({"older_than": "1d"}, "older_than"),
    ({"horizon": 50}, "horizon"),
    ({"force": "yes"}, "force"),
    ({"consumer": ""}, "consumer"),
])
def test_bad_prune_arguments_name_the_field_and_write_nothing(lab, kwargs, field) -> None:
    before = inbox(lab)
    args = {"older_than": 1800, "horizon": HORIZON, "clock": lab.clock, **kwargs}
    with pytest.raises(InvalidInput) as refused:
        prune_inbox(lab.store, **args)
    assert refused.value.field == field
    assert inbox(lab) == before


def test_expiring_dead_letters_deletes_only_the_old_ones() -> None:
    lab = Lab(seed=2, max_receives=1)
    from deliverylab.book.toolkit import catalogue_handler

    lab.workers = [Worker(store=lab.store, clock=lab.clock, broker=lab.broker,
                          handler=catalogue_handler([]))]
    lab.place_orders(2)
    lab.run_until_idle()
    lab.advance(DAY)
    lab.place_orders(1)
    lab.run_until_idle()
    assert len(lab.dead_letters()) == 3
    assert retention.expire_dead_letters(lab.store, older_than=3600, clock=lab.clock) == 2
    assert len(lab.dead_letters()) == 1
    with pytest.raises(InvalidInput, match="older_than"):
        retention.expire_dead_letters(lab.store, older_than=-1, clock=lab.clock)


# -- the duplicate a short horizon lets in --------------------------------------------------------

def test_a_horizon_without_the_redrive_window_lets_every_redriven_dead_letter_apply_twice() -> None:
    for seed in range(30):
        run = retention_runs.late_redrive(redrive_window=0.0, seed=seed, orders=20)
        assert run.dead_letters > 0 and run.pruned == 20, seed
        assert run.duplicated == run.redriven == run.dead_letters, seed
        assert run.verdict.startswith(f"BROKEN: {run.duplicated} duplicated"), seed


def test_a_horizon_with_the_redrive_window_keeps_the_rows_and_the_redrive_is_skipped() -> None:
    for seed in range(30):
        run = retention_runs.late_redrive(redrive_window=7 * DAY, seed=seed, orders=20)
        assert run.dead_letters > 0 and run.pruned == 0 and run.duplicated == 0, seed
        assert run.verdict.startswith("OK"), seed


def test_pruning_bounds_the_inbox_while_keeping_it_forever_grows_with_the_orders() -> None:
    growth = retention_runs.growth_table(days=12, orders_per_day=10, keep_days=3)
    assert growth["inbox rows, kept forever"].tolist() == growth["orders so far"].tolist()
    pruned = growth["inbox rows, pruned at 3 days"]
    assert pruned.max() == 40 and pruned.tolist()[-1] == 40  # three days and the current one
