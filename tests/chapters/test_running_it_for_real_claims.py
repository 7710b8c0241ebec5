"""What chapter 8 ("Running it for real") says in prose, held to what the code measures.

Each test reads a claim from the chapter's text and checks it against a fresh run of the
module the chapter calls, so neither can change without the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deliverylab.book import alerts, batches, retries, sagas, zombies

CHAPTER = Path(__file__).resolve().parents[2] / "chapters" / "08_running_it_for_real.ipynb"


@pytest.fixture(scope="module")
def prose() -> str:
    nb = json.loads(CHAPTER.read_text(encoding="utf-8"))
    return " ".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def said(prose: str, *phrases: str) -> None:
    flat = " ".join(prose.split())
    for phrase in phrases:
        assert phrase in flat, f"the chapter no longer says {phrase!r}"


def test_zombie_story_times_and_outcome(prose):
    said(prose, "stalls for 5 s", "At t = 1 the customer", "At t = 2.1 the lease has run out",
         "At t = 5 A wakes", "B's lease carries 2 and A's 1")
    run = zombies.sqlite_story(fence=False)
    wake = run.steps[run.steps["step"] == "wake"]["t"].item()
    got_b = run.steps[(run.steps["worker"] == "worker-B") & (run.steps["step"] == "receive")]
    assert (got_b["t"].item(), wake) == (2.1, 5.0)
    assert run.final_label.endswith("12 Old Street") and run.verdict.startswith("OK")
    fenced = zombies.sqlite_story(fence=True)
    assert list(fenced.writes["token"]) == [2, 1]


def test_retry_numbers(prose):
    said(prose, "27: 3 deliveries × 3 API calls × 3 bank calls", "120 orders, one every half",
         "20-second outage", "dead-letters the same 40", "The budget cut that to about 4, of which"
         " 3 are the queue's own redeliveries", "9 calls of 0.5 s take 4.5 s against a lease of 2")
    table = retries.outage_table()
    assert (table["orders"] == 120).all() and (table["dead_lettered"] == 40).all()
    assert table.loc[retries.POLICIES[0].name, "amplification"] == 27.0
    assert round(table.loc[retries.POLICIES[1].name, "amplification"]) == 4
    layers = retries.layer_counts()
    assert layers.loc["calls to the bank", retries.POLICIES[0].name] == 27
    assert layers.loc["deliveries still at work after their lease",
                      retries.POLICIES[2].name] == 0


def test_batch_and_prefetch_numbers(prose, tmp_path):
    said(prose, "one {term}`poison message` (an `OrderPlaced` whose `qty` is `\"three\"`) among"
         " 100", "Per message: 99", "Prefetch − 1 each time", "after three deaths")
    table = batches.batch_table()
    assert table.loc["per message", "applied"] == 99
    assert table.loc["all or nothing", "good_orders_dead_lettered"] == 99
    r = batches.crash_run(10, tmp_path, n=20)
    assert (r.sigkills, r.good_orders_dead_lettered) == (3, 10 - 1)


def test_saga_claims(prose):
    said(prose, "20 seeded schedules, 30 orders each, a third declined, a fifth of the declines"
         " published twice, 30 % of ACKs lost and 30 % of attempts failing",
         "Only the tombstone leaks nothing and releases nothing twice")
    table = sagas.hazard_table()
    assert list(table.loc["tombstone"]) == ["0 (right)", "0 (right)"]
    assert table.loc["delta", "compensation twice: reserved"] == "released twice"
    sweep = sagas.sweep()
    assert (sweep.loc["tombstone", ["leaked", "over_released"]] == 0).all()
    assert sweep.loc["delta", "over_released"] > 0 and sweep.loc["guarded", "leaked"] > 0
    # "the same messages are parked under every handler"
    assert sweep["dead_lettered"].nunique() == 1


def test_alert_claims(prose):
    said(prose, "None, and every rule fires on its own fault")
    table = alerts.fire_table()
    assert not table["healthy fires"].any() and table["faulty fires"].all()
