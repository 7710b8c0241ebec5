"""Chapter 8, leases lie: the zombie's stale write, and the fencing token that refuses it."""

from __future__ import annotations

import pytest

from deliverylab.book import zombies
from deliverylab.book.lab import Lab
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput


def test_unfenced_store_keeps_the_zombies_stale_label():
    run = zombies.sqlite_story(fence=False)
    # The newer lease wrote first, the zombie's write landed after it and won.
    assert list(run.writes["writer"]) == ["worker-B", "worker-A"]
    assert run.writes["accepted"].all()
    assert run.final_label.endswith("12 Old Street")
    # The inbox kept the reservation single, and the receipt refused the zombie's ACK.
    assert run.verdict.startswith("OK")
    assert run.acks == {"worker-B": True, "worker-A": False}


def test_fencing_token_refuses_the_zombies_write_and_ack():
    run = zombies.sqlite_story(fence=True)
    assert list(run.writes["token"]) == [2, 1]
    assert list(run.writes["accepted"]) == [True, False]
    assert run.final_label.endswith("7 New Road")
    assert run.acks == {"worker-B": True, "worker-A": None}
    assert run.verdict.startswith("OK")


def test_a_refused_write_is_in_the_trace_as_fenced():
    lab = Lab(seed=8)
    lab.place_order("coffee-beans", 1, order_id="o-001")
    zombies.zombie_story(lab.store, lab.broker, lab.clock, fence=True, pause=lab.clock.advance)
    rows = lab.store.execute("SELECT worker, detail FROM delivery_log WHERE outcome = 'fenced'"
                            ).fetchall()
    assert [tuple(r) for r in rows] == [("worker-A", "stale fencing token 1")]


@pytest.mark.parametrize("tokens, accepted", [
    ([1, 2, 3], [True, True, True]),
    ([3, 1, 2, 3], [True, False, False, True]),  # equal is the same lease writing again
    ([2, 2, 1], [True, True, False]),
])
def test_fenced_store_accepts_only_tokens_at_or_above_the_highest(tokens, accepted):
    docs = zombies.DocumentStore(clock=FakeClock(), fenced=True)
    got = [docs.put("k", f"v{t}", token=t, writer="w") for t in tokens]
    assert got == accepted
    highest = max(tokens)
    assert docs.get("k") == f"v{highest}"


def test_last_write_wins_without_the_fence():
    docs = zombies.DocumentStore(clock=FakeClock())
    assert docs.put("k", "new", token=2, writer="b") and docs.put("k", "old", token=1, writer="a")
    assert docs.get("k") == "old"


@pytest.mark.parametrize("kwargs, field", [
    ({"key": "", "body": "x", "token": 1}, "key"),
    ({"key": "k", "body": "", "token": 1}, "body"),
    ({"key": "k", "body": "x", "token": 0}, "token"),
    ({"key": "k", "body": "x", "token": None}, "token"),
])
def test_fenced_put_names_the_bad_argument_and_writes_nothing(kwargs, field):
    docs = zombies.DocumentStore(clock=FakeClock(), fenced=True)
    with pytest.raises(InvalidInput) as err:
        docs.put(writer="w", **kwargs)
    assert err.value.field == field
    assert docs.writes().empty


def test_store_refuses_a_non_bool_fenced():
    with pytest.raises(InvalidInput, match="fenced"):
        zombies.DocumentStore(clock=FakeClock(), fenced="yes")


def test_attempt_before_receive_is_refused():
    lab = Lab(seed=1)
    attempt = zombies.LabelAttempt(lab.store, lab.broker, zombies.DocumentStore(clock=lab.clock),
                                   lab.clock, "w")
    with pytest.raises(InvalidInput, match="delivery"):
        attempt.write_label()


@pytest.mark.slow
@pytest.mark.parametrize("fence", [False, True])
def test_jetstream_accepts_the_zombies_ack_unless_the_consumer_fences_it(fence):
    run = zombies.jetstream_story(fence=fence)
    assert run.verdict.startswith("OK")
    if fence:
        # The store refused token 1; the zombie sent no ACK, so the current holder's counts.
        assert run.acks == {"worker-A": None, "worker-B": True}
        assert run.final_label.endswith("7 New Road")
    else:
        # The server took the zombie's ACK on an old delivery and deleted the message the
        # current holder was still working on: that holder's own ACK then finds nothing.
        assert run.acks == {"worker-A": True, "worker-B": False}
        assert run.final_label.endswith("12 Old Street")
