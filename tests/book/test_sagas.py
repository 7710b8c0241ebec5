"""Chapter 8, sagas: a compensation delivered twice, or before the step it undoes."""

from __future__ import annotations

import pytest

from deliverylab.book import sagas
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults


@pytest.mark.parametrize("design", sagas.HANDLERS)
def test_every_handler_releases_a_declined_order_once_when_nothing_goes_wrong(design):
    r = sagas.saga_run(design, orders=9, decline_every=3)
    assert (r.declined, r.leaked, r.over_released, r.correct) == (3, 0, 0, 9)


def test_delta_compensation_published_twice_releases_twice():
    r = sagas.saga_run("delta", republish=1.0)
    assert (r.over_released, r.correct) == (1, 0)


@pytest.mark.parametrize("design", ["guarded", "tombstone"])
def test_a_compensation_by_state_is_idempotent(design):
    r = sagas.saga_run(design, orders=6, republish=1.0)
    assert (r.over_released, r.leaked, r.correct) == (0, 0, 6)


@pytest.mark.parametrize("design", ["delta", "guarded"])
def test_a_compensation_that_comes_first_leaks_the_late_reservation(design):
    r = sagas.saga_run(design, orders=4, first_attempt_fails=True)
    assert (r.leaked, r.correct) == (4, 0)


def test_the_tombstone_refuses_the_late_reservation():
    r = sagas.saga_run("tombstone", orders=4, first_attempt_fails=True)
    assert (r.leaked, r.over_released, r.correct) == (0, 0, 4)


@pytest.mark.parametrize("seed", range(8))
def test_tombstone_holds_on_seeded_schedules(seed):
    faults = Faults(seed=seed, ack_fail=0.3, process_error=0.3)
    r = sagas.saga_run("tombstone", orders=30, decline_every=3, republish=0.2, faults=faults,
                       seed=seed)
    assert r.leaked == 0 and r.over_released == 0
    # What it gets wrong is only what waits in the dead letters, for a redrive.
    assert r.orders - r.correct <= r.dead_lettered


def test_sweep_orders_the_three_handlers():
    table = sagas.sweep(seeds=range(6))
    assert table.loc["delta", "over_released"] > 0
    assert table.loc["guarded", "over_released"] == 0 and table.loc["guarded", "leaked"] > 0
    assert table.loc["tombstone", "leaked"] == 0 and table.loc["tombstone", "over_released"] == 0


@pytest.mark.parametrize("kwargs, field", [({"design": "undo"}, "design"),
                                          ({"orders": 0}, "orders"),
                                          ({"republish": 2.0}, "republish")])
def test_saga_run_names_the_bad_field(kwargs, field):
    kwargs.setdefault("design", "delta")
    with pytest.raises(InvalidInput) as err:
        sagas.saga_run(**kwargs)
    assert err.value.field == field
