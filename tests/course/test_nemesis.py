"""The course's nemesis: each class of fault catches wrong answers that nothing else does.

For each class, a wrong answer from the corpus fails with the nemesis on (the corpus checks
that) and passes with only that nemesis switched off: so the class is what catches it, and
the exercise's other faults would let it through.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from corpus import SEEDS, chapter1, chapter2, chapter3, chapter4, chapter7  # noqa: F401

from deliverylab.course import ex02, ex03, ex04, ex07, grade
from deliverylab.course.crew import HookedConnection, is_write, nemesis_handler, pausing_process
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults

pytestmark = pytest.mark.slow

# (nemesis class, exercise, wrong answer, module, {setting: value that switches it off})
ONLY = [
    ("interleaving", "idempotent-handler", chapter3.check_then_act, ex03,
     {"INBOX_INTERLEAVE": 0.0}),
    ("interleaving", "redrive-inbox", chapter4.redrive_check_then_act, ex04,
     {"REDRIVE_INTERLEAVE": 0.0}),
    ("interleaving", "late-worker", chapter2.lease_renewed_then_commit, ex02,
     {"LATE_PAUSE": 0.0}),
    ("interleaving", "heartbeat", chapter3.beat_then_commit_blindly, ex03,
     {"BEAT_PAUSE": 0.0}),
    ("store-failure", "idempotent-handler", chapter3.inbox_swallows_errors, ex03,
     {"INBOX_STORE_FAILURE": 0.0}),
    ("store-failure", "idempotent-handler", chapter3.integrity_error_means_seen, ex03,
     {"INBOX_STORE_FAILURE": 0.0}),
    ("store-failure", "redrive-inbox", chapter4.redrive_swallows_errors, ex04,
     {"REDRIVE_STORE_FAILURE": 0.0}),
    ("lost-message", "producer-retries", chapter3.no_retry, ex03,
     {"LOST_REQUEST": 0.0, "LOST_RESPONSE": 0.0, "OUTAGE": 0.0, "DOWN": 0.0,
      "BLACK_HOLE": 0.0}),
    ("stopped", "producer-retries", chapter3.key_per_call, ex03, {"RESTART": 0.0}),
    ("past-range", "producer-retries", ex03.retry_refusals, ex03, {"REFUSED": 0.0}),
    ("lost-message", "producer-retries", chapter3.every_error_is_a_refusal, ex03,
     {"OUTAGE": 0.0, "DOWN": 0.0}),
    ("lost-message", "producer-retries", chapter3.unknown_whatever_happened, ex03,
     {"DOWN": 0.0}),
    ("past-range", "late-worker", chapter2.lease_edge_counts_as_held, ex02,
     {"LATE_WORK": (0.5, 1.9, 3.0)}),
    ("past-range", "heartbeat", chapter3.beat_at_the_edge_checked, ex03,
     {"BEAT_LATENCY": (0.0, 0.0)}),
    ("store-failure", "poison-or-retry", chapter7.triage_retries_at_once, ex07,
     {"LOCK_SPAN": (0.0, 0.0)}),
]


@pytest.mark.parametrize(("nemesis", "ex_id", "wrong", "module", "off"), ONLY,
                         ids=[f"{n}:{w.__name__}" for n, _, w, _, _ in ONLY])
def test_only_this_nemesis_catches_the_wrong_answer(
        monkeypatch: pytest.MonkeyPatch, nemesis: str, ex_id: str, wrong: Any, module: Any,
        off: dict[str, Any]) -> None:
    assert not grade(ex_id, wrong, seeds=SEEDS).passed
    for name, value in off.items():
        assert hasattr(module, name), name
        monkeypatch.setattr(module, name, value)
    verdict = grade(ex_id, wrong, seeds=SEEDS)
    assert verdict.passed, f"{nemesis} off, still caught: {verdict}"


def test_the_lease_edge_and_a_little_less_differ() -> None:
    assert not grade("heartbeat", chapter3.beat_at_the_lease_edge, seeds=SEEDS).passed
    assert not grade("heartbeat", chapter3.beat_at_the_edge_checked, seeds=SEEDS).passed
    assert grade("heartbeat", chapter3.beat_just_inside_the_lease, seeds=SEEDS).passed


def test_a_hooked_connection_counts_statements_and_runs_the_hook_first() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    seen: list[tuple[str, int, int]] = []
    hooked = HookedConnection(conn, lambda sql, n: seen.append(
        (sql.split()[0], n, conn.execute("SELECT count(*) FROM t").fetchone()[0])))
    hooked.execute("INSERT INTO t VALUES (1)")
    hooked.executemany("INSERT INTO t VALUES (?)", [(2,), (3,)])
    assert hooked.execute("SELECT count(*) FROM t").fetchone()[0] == 3
    assert seen == [("INSERT", 0, 0), ("INSERT", 1, 1), ("SELECT", 2, 3)]
    assert hooked.in_transaction == conn.in_transaction  # the rest is the real connection's


@pytest.mark.parametrize(("sql", "writes"), [
    ("INSERT INTO t VALUES (1)", True), ("  update t SET x = 2", True),
    ("DELETE FROM t", True), ("REPLACE INTO t VALUES (1)", True),
    ("WITH a AS (SELECT 1) INSERT INTO t SELECT * FROM a", True),
    ("SELECT 1", False), ("WITH a AS (SELECT 1) SELECT * FROM a", False), ("", False)])
def test_is_write(sql: str, writes: bool) -> None:
    assert is_write(sql) is writes


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"interleave": 1.5}, "interleave"), ({"store_failure": -0.1}, "store_failure"),
    ({"interleave": True}, "interleave")])
def test_nemesis_handler_names_a_bad_rate(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        nemesis_handler(lambda conn, d: None, Faults(seed=1), **kwargs)
    assert err.value.field == field


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"pause": 2}, "pause"), ({"lease": 0}, "lease"), ({"latency": (0.5, 0.1)}, "latency"),
    ({"latency": 0.1}, "latency"), ({"latency": (0.0, 3.0)}, "latency")])
def test_pausing_process_names_a_bad_setting(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        pausing_process(lambda d, ops: None, Faults(seed=1), **kwargs)
    assert err.value.field == field


def test_workers_of_every_mode_run_between_two_transactions_of_a_job() -> None:
    """A job that reads in one transaction and writes in the next sees the queue move in
    between: the rivals (one per mode) consume orders while it is between statements."""
    from deliverylab.course.crew import rivals, workers_between
    from deliverylab.course.grader import CourseLab

    lab = CourseLab(seed=3, workers=1)
    lab.place_orders(8)
    team = rivals(lab)
    assert sorted(w.mode.value for w in team) == sorted(
        ["at-most-once", "at-least-once", "idempotent", "transactional"])
    conn = workers_between(lab.store, team, Faults(seed=3), rate=1.0, key="job")
    before = conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
    after = conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
    assert before == 8 and after == 8 - len(team)
    with pytest.raises(InvalidInput) as err:
        workers_between(lab.store, [object()], Faults(seed=3))
    assert err.value.field == "workers"
