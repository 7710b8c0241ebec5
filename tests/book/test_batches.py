"""Chapter 8, partial batch failure and prefetch: one poison among a hundred."""

from __future__ import annotations

import pytest

from deliverylab.book import batches
from deliverylab.book.lab import Lab
from deliverylab.engine.errors import InvalidInput


@pytest.mark.parametrize("poison_at", [0, 37, 99])
def test_all_or_nothing_takes_every_good_message_to_the_dead_letters(poison_at):
    r = batches.poison_batch("all or nothing", poison_at=poison_at)
    assert (r.applied, r.dead_lettered, r.good_orders_dead_lettered) == (0, 100, 99)
    assert r.deliveries == 3 * 100  # every message received max_receives times


@pytest.mark.parametrize("n, poison_at", [(100, 0), (100, 37), (10, 9)])
def test_per_message_settlement_isolates_the_poison(n, poison_at):
    r = batches.poison_batch("per message", n=n, poison_at=poison_at)
    assert (r.applied, r.dead_lettered, r.good_orders_dead_lettered) == (n - 1, 1, 0)
    assert r.deliveries == n - 1 + 3  # each good message once, the poison max_receives times


def test_poison_batch_refuses_an_unknown_consumer():
    with pytest.raises(InvalidInput, match="consumer"):
        batches.poison_batch("sometimes")


@pytest.mark.parametrize("kwargs, field", [({"n": 0}, "n"), ({"n": 5, "poison_at": 5},
                                                             "poison_at")])
def test_place_batch_names_the_bad_field(kwargs, field):
    lab = Lab()
    with pytest.raises(InvalidInput) as err:
        batches.place_batch(lab, **kwargs)
    assert err.value.field == field
    assert lab.store.execute("SELECT count(*) FROM queue_messages").fetchone()[0] == 0


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [1, 10])
def test_a_sigkilling_poison_takes_its_whole_prefetch_to_the_dead_letters(prefetch, tmp_path):
    r = batches.crash_run(prefetch, tmp_path, n=30)
    assert r.sigkills == 3  # max_receives deaths, then the broker parks the batch
    assert r.dead_lettered == prefetch
    assert r.good_orders_dead_lettered == prefetch - 1
    assert r.applied == 30 - prefetch
