"""Fault injection, ids and the clock: everything chance or time depends on is seeded or
injected, so a run replays exactly."""

from __future__ import annotations

import math
import re

import pytest

from deliverylab.engine.clock import FakeClock, SystemClock
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import FAULT_POINTS, NO_FAULTS, Faults
from deliverylab.engine.ids import Ids

EVENTS = [f"evt-{i:04d}" for i in range(4000)]


def schedule(faults, point, deliveries=3):
    return [(e, n) for e in EVENTS for n in range(1, deliveries + 1) if faults.fires(point, e, n)]


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_rate_zero_never_fires_and_rate_one_always_does(point):
    assert schedule(Faults(seed=3), point) == []
    assert len(schedule(Faults(seed=3, **{point: 1.0}), point)) == 3 * len(EVENTS)
    assert NO_FAULTS.rate(point) == 0.0


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.8])
def test_the_fraction_that_fires_matches_the_rate(rate):
    fired = len(schedule(Faults(seed=11, ack_fail=rate), "ack_fail"))
    trials = 3 * len(EVENTS)
    # Five standard deviations of a binomial: a hash that is not uniform would miss this.
    assert abs(fired / trials - rate) < 5 * math.sqrt(rate * (1 - rate) / trials)


def test_the_schedule_is_a_pure_function_of_seed_point_event_and_delivery():
    a = Faults(seed=7, ack_fail=0.5, crash_after_receive=0.5)
    b = Faults.from_rates(seed=7, crash_after_receive=0.5, ack_fail=0.5)
    assert schedule(a, "ack_fail") == schedule(b, "ack_fail")
    # Asking in another order, or asking other things in between, changes nothing.
    backwards = [(e, n) for e in reversed(EVENTS) for n in (3, 2, 1)
                 if a.fires("crash_after_receive", e, n) | a.fires("ack_fail", e, n)]
    assert sorted(x for x in backwards if a.fires("ack_fail", *x)) == sorted(
        schedule(a, "ack_fail"))


def test_a_different_seed_gives_a_different_schedule():
    assert schedule(Faults(seed=1, ack_fail=0.5), "ack_fail") != schedule(
        Faults(seed=2, ack_fail=0.5), "ack_fail")


def test_points_are_decided_independently():
    f = Faults(seed=5, ack_fail=0.5, process_error=0.5)
    assert schedule(f, "ack_fail") != schedule(f, "process_error")


def test_the_schedule_does_not_depend_on_the_other_rates():
    """The same delivery loses its ACK whatever else is switched on: modes compare fairly."""
    alone = Faults(seed=9, ack_fail=0.3)
    busy = Faults(seed=9, ack_fail=0.3, crash_after_commit=0.2, lose_message=0.1)
    assert schedule(alone, "ack_fail") == schedule(busy, "ack_fail")


def test_from_rates_without_a_seed_draws_one():
    f = Faults.from_rates(ack_fail=0.2)
    assert isinstance(f.seed, int) and f.ack_fail == 0.2


# -- backoff -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("base", "cap"), [(0.1, 10.0), (0.5, 2.0), (1.0, 1.0), (0.0, 5.0)])
def test_backoff_is_full_jitter_inside_its_ceiling(base, cap):
    f = Faults(seed=4)
    for attempt in range(0, 80):
        ceiling = min(cap, base * 2 ** attempt)
        delays = [f.backoff(attempt, base=base, cap=cap, event_id=e) for e in EVENTS[:200]]
        assert all(0.0 <= d <= ceiling for d in delays)
        if ceiling > 0:
            # Full jitter spreads over the whole range, not just its top or bottom half.
            assert min(delays) < 0.25 * ceiling and max(delays) > 0.75 * ceiling


def test_backoff_replays_and_depends_on_the_seed():
    a, b = Faults(seed=1), Faults(seed=2)
    ka = [a.backoff(3, base=0.1, cap=10, event_id=e) for e in EVENTS[:50]]
    assert ka == [a.backoff(3, base=0.1, cap=10, event_id=e) for e in EVENTS[:50]]
    assert ka != [b.backoff(3, base=0.1, cap=10, event_id=e) for e in EVENTS[:50]]


def test_backoff_refuses_a_negative_attempt():
    with pytest.raises(InvalidInput, match="^attempt must be an integer >= 0, got -1$"):
        NO_FAULTS.backoff(-1, base=0.1, cap=1)


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [-0.1, 1.01, float("nan"), "0.5", True, None])
@pytest.mark.parametrize("point", FAULT_POINTS)
def test_rates_outside_zero_one_name_the_point_and_the_value(point, rate):
    with pytest.raises(InvalidInput) as info:
        Faults.from_rates(seed=1, **{point: rate})
    assert info.value.field == f"{point} rate"
    assert str(info.value).startswith(f"{point} rate must be a number in [0, 1], got ")
    assert str(info.value).endswith(repr(rate))


def test_an_unknown_fault_point_is_named():
    with pytest.raises(InvalidInput, match="^fault point must be one of ack_fail, .*, got "
                                           "'ack_fial'$"):
        Faults.from_rates(seed=1, ack_fial=0.5)
    with pytest.raises(InvalidInput, match="^fault point must be .*got 'nope'$"):
        NO_FAULTS.fires("nope", "evt-1", 1)


@pytest.mark.parametrize("seed", ["7", 1.5, True, [1]])
def test_a_bad_fault_seed_is_named(seed):
    with pytest.raises(InvalidInput) as info:
        Faults.from_rates(seed=seed, ack_fail=0.1)
    assert str(info.value) == f"seed must be an integer, got {seed!r}"


@pytest.mark.parametrize("seed", ["7", 1.5, True])
def test_a_bad_id_seed_is_named(seed):
    with pytest.raises(ValueError, match=re.escape(f"seed must be an integer or None, got {seed!r}")):
        Ids(seed)


# -- ids ---------------------------------------------------------------------------------------

def draw(ids):
    return [ids.order_id(), ids.event_id(), ids.message_id(), ids.receipt()]


def test_seeded_ids_replay_and_differ_between_seeds():
    assert draw(Ids(42)) == draw(Ids(42))
    assert draw(Ids(42)) != draw(Ids(43))
    prefixes = [i.split("-")[0] for i in draw(Ids(42))]
    assert prefixes == ["o", "evt", "msg", "rcpt"]


def test_unseeded_ids_are_unique():
    ids = Ids()
    assert ids.seed is None
    drawn = {ids.event_id() for _ in range(5000)}
    assert len(drawn) == 5000
    assert all(re.fullmatch(r"evt-[0-9a-f]{12}", i) for i in drawn)


# -- clocks ------------------------------------------------------------------------------------

def test_fake_clock_moves_only_when_told():
    c = FakeClock(start=10)
    assert c.now() == 10.0
    c.sleep(0.25)
    assert c.now() == 10.25
    c.sleep(-5)  # waiting a negative time is no time
    c.sleep_until(3)  # the past: no change
    assert c.now() == 10.25
    c.sleep_until(10.3)
    assert c.now() == 10.3


def test_fake_clock_advances_to_reproducible_floats():
    a, b = FakeClock(), FakeClock()
    for _ in range(1000):
        a.advance(0.1)
    b.advance(100.0)
    assert a.now() == b.now() == 100.0


@pytest.mark.parametrize("bad", [-1, "1", True, None])
def test_fake_clock_refuses_to_go_back(bad):
    with pytest.raises(ValueError, match=re.escape(f"seconds must be a number >= 0, got {bad!r}")):
        FakeClock().advance(bad)


def test_system_clock_follows_the_wall():
    c = SystemClock()
    t0 = c.now()
    c.sleep(0.01)
    c.sleep_until(c.now() + 0.01)
    assert c.now() - t0 >= 0.02
