"""The worker: four modes on one seeded fault schedule, retries with backoff, dead letters,
the inbox's "already done" versus real database errors, stale leases, and determinism."""

from __future__ import annotations

import itertools
import sqlite3
from collections import defaultdict

import pytest
from support.engine import make_lab

from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.check import check, event_states
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults
from deliverylab.engine.ids import Ids
from deliverylab.engine.orders import place_order
from deliverylab.engine.worker import Mode, PoisonMessage, Worker, apply_order_placed

MODES = [m.value for m in Mode]
ITEMS = 7

# One fault schedule for every mode: the same deliveries fail in each run.
FAULTY = dict(ack_fail=0.3, crash_after_receive=0.1, crash_after_commit=0.1, process_error=0.1)


def scenario(mode, *, seed=3, fault_seed=21, orders=200, workers=1, max_messages=1,
             path=":memory:", **rates):
    """``orders`` orders over ``ITEMS`` items, drained by ``workers`` workers in turn."""
    lab = make_lab(path, seed=seed)
    for i in range(orders):
        lab.order(f"item-{i % ITEMS}", 1 + i % 3)
    faults = Faults(seed=fault_seed, **(rates or FAULTY))
    ws = [lab.worker(mode=mode, faults=faults, max_messages=max_messages, max_receives=10,
                     name=f"worker-{k + 1}") for k in range(workers)]
    lab.drain(*ws)
    return lab, ws


def applied_per_item(lab):
    """What the log says was applied, per item: sum of qty over every 'applied' row."""
    out = defaultdict(int)
    for _, item, qty, _, n, _ in event_states(lab.store):
        out[item] += qty * n
    return {k: v for k, v in out.items() if v}


def dead_qty(lab):
    out = defaultdict(int)
    for _, item, qty, _, _, state in event_states(lab.store):
        if state == "dead_lettered":
            out[item] += qty
    return out


# -- the guarantees, mode by mode ----------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("workers", "max_messages"), [(1, 1), (2, 1), (2, 10)])
def test_every_mode_keeps_its_promise_on_one_fault_schedule(mode, workers, max_messages):
    lab, ws = scenario(mode, workers=workers, max_messages=max_messages)
    result = check(lab.store)
    assert result.orders == 200 and result.pending == 0
    # Whatever the mode, the projection is exactly what the log says was applied: the
    # 'applied' row commits in the effect's own transaction.
    assert lab.projection() == applied_per_item(lab)
    truth, proj = lab.truth(), lab.projection()
    if mode == "at-most-once":
        assert result.duplicated == 0
        assert all(proj.get(item, 0) <= truth[item] for item in truth)
        assert result.lost > 0  # the crashes after the ACK cost effects
    elif mode == "at-least-once":
        assert result.lost == 0
        assert result.duplicated > 0  # the lost ACKs and crashes after commit cost duplicates
        assert all(proj.get(item, 0) >= truth[item] - dead_qty(lab)[item] for item in truth)
    else:  # idempotent, transactional
        assert result.lost == 0 and result.duplicated == 0
        assert result.correct + result.dead_lettered == result.orders
        assert proj == {k: v - dead_qty(lab)[k] for k, v in truth.items()
                        if v - dead_qty(lab)[k]}
    stats = [w.stats for w in ws]
    assert sum(s.crashed for s in stats) > 0
    # A processing error after the ACK is a loss in at-most-once; elsewhere it is retried.
    assert (sum(s.nacked for s in stats) > 0) == (mode != "at-most-once")
    if mode != "transactional":
        assert sum(s.ack_failed for s in stats) > 0


@pytest.mark.parametrize("mode", ["idempotent", "transactional"])
def test_after_a_redrive_without_faults_the_safe_modes_are_exactly_once(mode):
    # Batches of ten crash together, so some messages use up their receives.
    lab, _ = scenario(mode, workers=2, max_messages=10)
    first = check(lab.store)
    assert first.dead_lettered > 0 or mode == "transactional"
    lab.broker.redrive()
    lab.drain(lab.worker(mode=mode, name="after-redrive"))
    result = check(lab.store)
    assert result.ok, result.verdict
    assert lab.projection() == lab.truth()


def test_at_least_once_never_loses_and_lose_message_does():
    lab, _ = scenario("at-least-once", lose_message=0.2, ack_fail=0.3)
    result = check(lab.store)
    assert result.lost > 0
    lost = {o for o, *_, s in event_states(lab.store) if s == "lost"}
    logged = {r[0] for r in lab.store.execute(
        "SELECT correlation_id FROM delivery_log WHERE outcome = 'lost'")}
    # Every loss was the injected fault (some dropped messages had taken effect before).
    assert lost <= logged


# -- the lost ACK's two halves -------------------------------------------------------------------
@pytest.mark.parametrize("max_messages", [1, 10])
def test_a_lost_answer_loses_at_most_once_orders_with_no_crash_at_all(max_messages):
    """``if ack(d): apply(d)``: the queue deleted the message, the worker heard nothing, so
    it never applies. No crash anywhere, and orders are lost."""
    lab, ws = scenario("at-most-once", max_messages=max_messages, ack_answer_lost=0.3)
    result = check(lab.store)
    assert sum(w.stats.crashed for w in ws) == 0
    assert result.lost > 0 and result.duplicated == 0 and result.pending == 0
    lost = {o for o, *_, s in event_states(lab.store) if s == "lost"}
    # Each lost order was acked by the queue and then logged ack_failed by the worker.
    acked_then_failed = {o for (o,) in lab.store.execute(
        "SELECT a.correlation_id FROM delivery_log AS a JOIN delivery_log AS f"
        " ON f.correlation_id = a.correlation_id AND f.seq > a.seq"
        " WHERE a.outcome = 'acked' AND f.outcome = 'ack_failed'")}
    assert lost and lost <= acked_then_failed


@pytest.mark.parametrize("mode", ["at-least-once", "idempotent", "transactional"])
@pytest.mark.parametrize("max_messages", [1, 10])
def test_a_lost_answer_harms_no_mode_that_applies_before_it_acks(mode, max_messages):
    lab, ws = scenario(mode, max_messages=max_messages, ack_answer_lost=0.4)
    result = check(lab.store)
    assert result.ok, result.verdict
    assert lab.projection() == lab.truth()
    # The message is gone: nothing comes back, so no duplicate either, even at-least-once.
    assert result.duplicated == 0
    if mode != "transactional":  # a local ACK has no answer to lose
        assert sum(w.stats.ack_failed for w in ws) > 0


def test_the_worker_takes_the_same_path_after_either_half():
    """Same seed, same deliveries: with the request lost the message comes back; with the
    answer lost it does not. The worker's own words and counters are the same for both."""
    lines = {}
    for point in ("ack_fail", "ack_answer_lost"):
        lab = make_lab(":memory:", seed=3)
        lab.order("coffee-beans", 1, order_id="o-001")
        said: list[str] = []
        w = lab.worker(mode="at-least-once", faults=Faults(seed=1, **{point: 1.0}),
                       echo=said.append, max_receives=2)
        w.step()
        lines[point] = (said, w.stats.ack_failed, w.stats.acked)
        details = [r[0] for r in lab.store.execute(
            "SELECT detail FROM delivery_log WHERE outcome = 'ack_failed'")]
        assert details == ["the ACK never reached the queue" if point == "ack_fail" else
                           "the queue deleted the message, but its answer never came back"]
        depth = lab.broker.depth()
        assert (depth["in_flight"] == 1) == (point == "ack_fail")
    assert lines["ack_fail"] == lines["ack_answer_lost"]


@pytest.mark.parametrize("mode", MODES)
def test_no_faults_means_exactly_once_in_every_mode(mode):
    lab, (w,) = scenario(mode, orders=50, ack_fail=0.0)
    assert check(lab.store).ok
    assert w.stats.applied == 50 and w.stats.received == 50 and w.stats.acked == 50


def test_at_most_once_loses_the_effect_of_a_crash_after_the_ack(lab):
    lab.order("coffee-beans", 1, order_id="o-001")
    w = lab.worker(mode="at-most-once", faults=Faults(seed=1, crash_after_receive=1.0))
    lab.drain(w)
    result = check(lab.store)
    assert (result.lost, result.correct) == (1, 0)
    assert w.stats.acked == 1 and w.stats.crashed == 1 and w.stats.applied == 0


def test_at_least_once_redelivers_after_a_crash_before_processing(lab):
    lab.order("coffee-beans", 1, order_id="o-001")
    (event_id,) = [r[0] for r in lab.store.execute("SELECT event_id FROM orders")]
    seed = next(s for s in itertools.count() if
                Faults(seed=s, crash_after_receive=0.5).fires("crash_after_receive", event_id, 1)
                and not Faults(seed=s, crash_after_receive=0.5).fires(
                    "crash_after_receive", event_id, 2))
    w = lab.worker(mode="at-least-once", faults=Faults(seed=seed, crash_after_receive=0.5))
    assert w.step() == 1 and w.stats.crashed == 1
    assert lab.broker.receive(2.0) == []  # still leased by the dead worker
    lab.drain(w)
    assert check(lab.store).ok and w.stats.received == 2
    # The redelivery waited for the lease to run out.
    at = [r[0] for r in lab.store.execute(
        "SELECT at FROM delivery_log WHERE outcome = 'received' ORDER BY seq")]
    assert at == [0.0, 2.0]


def test_the_seeds_lab_story_ack_lost_then_duplicate_skipped(lab):
    """The chapter's scenario: ACK_FAIL_RATE=0.8, order o-001 for 1 coffee-beans."""
    placed = lab.order("coffee-beans", 1, order_id="o-001")
    seed = next(s for s in itertools.count()
                if Faults(seed=s, ack_fail=0.8).fires("ack_fail", placed.event_id, 1)
                and not Faults(seed=s, ack_fail=0.8).fires("ack_fail", placed.event_id, 2))
    lines: list[str] = []
    w = lab.worker(mode="idempotent", faults=Faults(seed=seed, ack_fail=0.8), echo=lines.append)
    lab.drain(w)
    said = [line.split(" delivery=")[1] for line in lines]
    assert said == ["1 received", "1 applied projection (first time)",
                    "1 ack failed → expect redelivery",
                    "2 received", "2 duplicate skipped", "2 acked"]
    assert all(line.startswith("[worker-1] t=") and "order=o-001" in line for line in lines)
    assert lab.projection() == {"coffee-beans": 1}
    assert check(lab.store).ok


# -- processing errors: nack with backoff, then dead-letter -------------------------------------

def test_a_processing_error_is_retried_with_full_jitter_then_dead_lettered(lab):
    lab.order("coffee-beans", 1, order_id="o-001")
    base, cap, max_receives = 0.4, 3.0, 6
    w = lab.worker(faults=Faults(seed=8, process_error=1.0), backoff_base=base,
                   backoff_cap=cap, max_receives=max_receives, echo=lambda _: None)
    delays = []
    while True:
        before = lab.clock.now()
        assert w.step() == 1
        row = lab.store.execute("SELECT visible_at, delivery_count, last_error"
                               " FROM queue_messages").fetchone()
        if row is None:
            break
        delays.append((row["delivery_count"], row["visible_at"] - before))
        assert row["last_error"] == "RuntimeError: injected processing error"
        lab.clock.sleep_until(row["visible_at"])
    assert [n for n, _ in delays] == list(range(1, max_receives))
    for n, delay in delays:  # attempt n-1: uniform(0, min(cap, base * 2**(n-1)))
        assert 0 <= delay <= min(cap, base * 2 ** (n - 1)) + 1e-9
    assert len({d for _, d in delays}) > 1  # jittered, not a constant
    dead = lab.store.execute("SELECT delivery_count, last_error FROM dead_letters").fetchone()
    assert tuple(dead) == (max_receives, "RuntimeError: injected processing error")
    assert w.stats.nacked == max_receives - 1 and w.stats.dead_lettered == 1
    assert w.stats.applied == 0
    result = check(lab.store)
    assert result.dead_lettered == 1 and result.lost == 0


@pytest.mark.parametrize("mode", ["at-least-once", "idempotent", "transactional"])
def test_a_failed_handler_leaves_no_partial_write_and_the_retry_applies(lab, mode):
    lab.order("coffee-beans", 2, order_id="o-001")
    lab.order("tea", 1, order_id="o-002")
    calls = []

    def flaky(conn, delivery):
        calls.append(delivery.delivery_count)
        conn.execute("INSERT INTO inventory_projection VALUES ('half-done', 1)")
        if delivery.delivery_count == 1 and delivery.payload["itemId"] == "coffee-beans":
            raise PoisonMessage("not this time")
        conn.execute("DELETE FROM inventory_projection WHERE item_id = 'half-done'")
        apply_order_placed(conn, delivery)

    w = lab.worker(mode=mode, handler=flaky, max_messages=2)
    lab.drain(w)
    assert lab.projection() == {"coffee-beans": 2, "tea": 1}
    assert check(lab.store).ok
    assert w.stats.nacked == 1 and w.stats.duplicates_skipped == 0


def test_a_poison_message_is_dead_lettered_with_its_error(lab):
    lab.broker.send("evt-bad", "OrderPlaced", {"orderId": "o-x", "itemId": "", "qty": 1})
    lab.broker.send("evt-odd", "OrderCancelled", {"orderId": "o-y"})
    w = lab.worker(max_receives=2, backoff_base=0.0, backoff_cap=0.0)
    lab.drain(w)
    errors = dict(lab.store.execute("SELECT event_id, last_error FROM dead_letters"))
    assert errors == {
        "evt-bad": "PoisonMessage: payload itemId must be a non-empty string, got ''",
        "evt-odd": "PoisonMessage: unknown event type 'OrderCancelled'",
    }
    assert lab.projection() == {}


# -- the inbox: a conflict is "already done", any other error surfaces ---------------------------

def test_an_inbox_conflict_is_a_duplicate_skipped_and_acked(lab):
    placed = lab.order("coffee-beans", 1)
    lab.store.execute("INSERT INTO inbox_processed VALUES ('inventory', ?, 0)", (placed.event_id,))
    w = lab.worker()
    lab.drain(w)
    assert (w.stats.duplicates_skipped, w.stats.applied, w.stats.acked) == (1, 0, 1)
    assert lab.projection() == {}


def test_the_inbox_is_per_consumer(lab):
    lab.order("coffee-beans", 1)
    ((event_id,),) = lab.store.execute("SELECT event_id FROM orders").fetchall()
    lab.store.execute("INSERT INTO inbox_processed VALUES ('billing', ?, 0)", (event_id,))
    w = lab.worker()
    lab.drain(w)
    assert w.stats.applied == 1 and lab.projection() == {"coffee-beans": 1}


BREAKAGES = {
    "projection-trigger": (
        "CREATE TRIGGER no_writes BEFORE INSERT ON inventory_projection"
        " BEGIN SELECT RAISE(ABORT, 'projection is read-only'); END",
        sqlite3.IntegrityError, "projection is read-only"),
    "inbox-trigger": (
        "CREATE TRIGGER inbox_full BEFORE INSERT ON inbox_processed"
        " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
        sqlite3.IntegrityError, "disk is full"),
    "dropped-table": ("DROP TABLE inventory_projection", sqlite3.OperationalError,
                      "no such table"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_any_other_database_error_surfaces_and_nothing_is_acked(lab, mode, breakage):
    sql, error, words = BREAKAGES[breakage]
    lab.order("coffee-beans", 1, order_id="o-001")
    lab.store.execute(sql)
    w = lab.worker(mode=mode)
    if mode == "idempotent" or breakage != "inbox-trigger":
        with pytest.raises(error, match=words):
            w.step()
        assert not lab.store.in_transaction
        assert lab.store.execute("SELECT count(*) FROM inbox_processed").fetchone()[0] == 0
        outcomes = [r[0] for r in lab.store.execute("SELECT outcome FROM delivery_log")]
        assert "applied" not in outcomes and "duplicate_skipped" not in outcomes
        if mode == "at-most-once":
            # This mode acked before it processed: the error cost the message, as promised.
            assert outcomes == ["received", "acked"]
        else:
            assert outcomes == ["received"]
            msg = lab.store.execute("SELECT delivery_count, receipt FROM queue_messages").fetchone()
            assert msg["delivery_count"] == 1 and msg["receipt"] is not None  # still leased
    else:  # the inbox is not on these modes' path
        lab.drain(w)
        assert check(lab.store).ok


# -- the projection update is one UPSERT ----------------------------------------------------------

def test_the_effect_is_one_upsert_never_a_read_then_write(lab):
    for i in range(3):
        lab.order("coffee-beans", i + 1)
    statements: list[str] = []
    lab.store.set_trace_callback(statements.append)
    lab.drain(lab.worker())
    lab.store.set_trace_callback(None)
    touching = [s for s in statements if "inventory_projection" in s]
    assert len(touching) == 3
    for s in touching:
        normal = " ".join(s.split())
        assert normal.startswith("INSERT INTO inventory_projection")
        assert "ON CONFLICT (item_id) DO UPDATE SET reserved_qty =" \
               " inventory_projection.reserved_qty + excluded.reserved_qty" in normal
    assert lab.projection() == {"coffee-beans": 6}


def test_two_workers_on_two_connections_interleaved_reach_the_truth(file_lab):
    lab = file_lab
    for i in range(60):
        lab.order(["coffee-beans", "tea"][i % 2], 1 + i % 4)
    faults = Faults(seed=2, ack_fail=0.4, crash_after_commit=0.1)
    a = lab.worker(conn=lab.connect(), name="a", faults=faults)
    b = lab.worker(conn=lab.connect(), name="b", faults=faults)
    lab.drain(a, b)
    assert a.stats.applied > 0 and b.stats.applied > 0
    assert lab.projection() == lab.truth() and check(lab.store).ok


# -- a lease that runs out mid-processing: another worker takes over ------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_a_worker_whose_lease_was_taken_over_cannot_ack(file_lab, mode):
    lab = file_lab
    lab.order("coffee-beans", 1, order_id="o-001")
    b = lab.worker(conn=lab.connect(), mode=mode, name="B")

    def slow_a(line):
        if line.endswith("delivery=1 received"):
            lab.clock.advance(a.visibility_timeout)  # A is slow: its lease runs out
            assert b.step() == 1                     # ... and B gets the message

    a = lab.worker(mode=mode, name="A", echo=slow_a)
    assert a.step() == 1
    result = check(lab.store)
    assert a.stats.ack_rejected == 1 and a.stats.acked == 0
    assert b.stats.acked == 1
    if mode == "at-least-once":
        assert result.duplicated == 1  # both applied: why this mode needs an idempotent consumer
        assert lab.projection() == {"coffee-beans": 2}
    else:
        assert result.ok, result.verdict
        assert lab.projection() == {"coffee-beans": 1}
    if mode == "idempotent":
        assert a.stats.duplicates_skipped == 1
    if mode == "transactional":
        detail = lab.store.execute("SELECT detail FROM delivery_log WHERE worker = 'A' AND"
                                  " outcome = 'ack_rejected'").fetchone()[0]
        assert "rolled back" in detail


def test_a_stale_nack_is_refused_and_traced(file_lab):
    lab = file_lab
    lab.order("coffee-beans", 1, order_id="o-001")

    def fails_first_time(conn, delivery):
        if delivery.delivery_count == 1:
            raise RuntimeError("first delivery fails")
        apply_order_placed(conn, delivery)

    b = lab.worker(conn=lab.connect(), name="B", handler=fails_first_time,
                   mode="at-least-once")

    def slow_a(line):
        if line.endswith("delivery=1 received"):
            lab.clock.advance(a.visibility_timeout)
            assert b.step() == 1

    a = lab.worker(name="A", handler=fails_first_time, echo=slow_a, mode="at-least-once")
    a.step()
    assert a.stats.nacked == 0 and a.stats.ack_rejected == 1
    assert check(lab.store).ok
    a_rows = [tuple(r) for r in lab.store.execute(
        "SELECT delivery_count, outcome FROM delivery_log WHERE worker = 'A' ORDER BY seq")]
    assert a_rows == [(1, "received"), (1, "ack_rejected")]


# -- loops ------------------------------------------------------------------------------------

def test_run_until_idle_jumps_the_fake_clock_over_backoff(lab):
    placed = lab.order("coffee-beans", 1)
    faults = Faults(seed=3, process_error=0.9)
    w = lab.worker(faults=faults, max_receives=50, backoff_base=1.0, backoff_cap=60.0)
    stats = w.run_until_idle()
    assert stats is w.stats and lab.broker.next_visible_at() is None
    # The schedule says which delivery first gets through; the clock waited out every backoff.
    first_ok = next(n for n in range(1, 51)
                    if not faults.fires("process_error", placed.event_id, n))
    assert check(lab.store).ok
    assert stats.received == first_ok and stats.nacked == first_ok - 1
    waited = sum(faults.backoff(n - 1, base=1.0, cap=60.0, event_id=placed.event_id)
                 for n in range(1, first_ok))
    assert lab.clock.now() == pytest.approx(waited)


def test_run_forever_stops_cleanly_when_asked(lab):
    for _ in range(5):
        lab.order("tea", 1)

    def stop_when_done(line):
        if line.endswith("acked") and w.stats.acked == 5:
            w.stop()

    w = lab.worker(echo=stop_when_done)
    stats = w.run_forever(poll_interval=0.5)
    assert stats.acked == 5 and check(lab.store).ok


# -- bad input -----------------------------------------------------------------------------------

BAD_WORKERS = [
    ("mode", {"mode": "exactly-once"}), ("mode", {"mode": None}),
    ("visibility_timeout", {"visibility_timeout": -1}),
    ("visibility_timeout", {"visibility_timeout": "2"}),
    ("max_messages", {"max_messages": 0}), ("max_messages", {"max_messages": 1.5}),
    ("backoff_base", {"backoff_base": -0.1}),
    ("backoff_cap", {"backoff_base": 1.0, "backoff_cap": 0.5}),
    ("name", {"name": ""}), ("consumer", {"consumer": ""}),
    ("faults", {"faults": {"ack_fail": 0.5}}),
    ("max_receives", {"max_receives": 0}),
    ("work_time", {"work_time": -1}),
]


@pytest.mark.parametrize(("field", "change"), BAD_WORKERS,
                         ids=[f"{f}={next(iter(c.values()))!r}" for f, c in BAD_WORKERS])
def test_bad_worker_settings_name_the_field_and_value_and_write_nothing(lab, field, change):
    lab.order("coffee-beans", 1)
    before = store.dump(lab.store)
    kwargs = {"clock": lab.clock, **change}
    with pytest.raises(InvalidInput) as info:
        Worker(store=lab.store, broker=Queue(lab.store, clock=lab.clock, ids=lab.ids,
                                     max_receives=kwargs.pop("max_receives", 5)), **kwargs)
    value = change[field]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field} must be ")
    assert str(info.value).endswith(f"got {value!r}")
    assert store.dump(lab.store) == before


def test_mode_message_lists_the_modes():
    with pytest.raises(InvalidInput) as info:
        Mode.parse("exactly-once")
    assert str(info.value) == ("mode must be one of at-most-once, at-least-once, idempotent,"
                               " transactional, got 'exactly-once'")
    assert Mode.parse("idempotent") is Mode.IDEMPOTENT is Mode.parse(Mode.IDEMPOTENT)


# -- determinism ---------------------------------------------------------------------------------

def replay(path, seed, mode="idempotent"):
    lab = make_lab(path, seed=seed)
    for i in range(40):
        lab.order(f"item-{i % 3}", 1 + i % 5)
        lab.clock.advance(0.01)
    faults = Faults(seed=seed, **FAULTY)
    ws = [lab.worker(mode=mode, faults=faults, name=f"w{k}", max_messages=1 + k) for k in range(2)]
    lab.drain(*ws)
    lab.broker.redrive()
    lab.drain(*ws)
    text = store.dump(lab.store)
    lab.store.close()
    return text


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_scenario_same_bytes(tmp_path, mode):
    memory = [replay(":memory:", 5, mode) for _ in range(2)]
    files = [replay(tmp_path / f"run{k}.db", 5, mode) for k in range(2)]
    assert memory[0] == memory[1] == files[0] == files[1]
    assert "applied" in memory[0]


def test_a_different_seed_gives_a_different_run():
    assert replay(":memory:", 5) != replay(":memory:", 6)


def test_a_worker_built_by_hand_matches_the_fixture(tmp_path):
    """No hidden state: a worker assembled from parts replays a fixture-built one."""
    def by_hand():
        conn = store.init_db(":memory:")
        clock, ids = FakeClock(), Ids(9)
        q = Queue(conn, clock=clock, ids=ids)
        for i in range(10):
            place_order(q, item_id="tea", qty=i + 1)
        Worker(store=conn, clock=clock, broker=q, faults=Faults(seed=1, ack_fail=0.5)) \
            .run_until_idle()
        return store.dump(conn)

    lab = make_lab(seed=9)
    for i in range(10):
        lab.order("tea", i + 1)
    lab.worker(faults=Faults(seed=1, ack_fail=0.5)).run_until_idle()
    assert store.dump(lab.store) == by_hand()


# -- the batch fast path writes exactly what the one-by-one path writes ---------------------------

def _one_by_one(conn, delivery):
    """The default effect without its batch form: forces the savepoint-per-delivery path."""
    apply_order_placed(conn, delivery)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_messages", [1, 4, 25])
def test_the_batch_fast_path_is_indistinguishable_from_one_by_one(mode, max_messages):
    def run(handler):
        lab = make_lab(seed=31)
        for i in range(80):
            lab.order(f"item-{i % 6}", 1 + i % 4)
            lab.clock.advance(0.01)
        lab.broker.send("evt-poison", "OrderPlaced", {"orderId": "o-p", "itemId": "", "qty": 1})
        faults = Faults(seed=2, ack_fail=0.3, crash_after_receive=0.05, crash_after_commit=0.1,
                        process_error=0.05)
        ws = [lab.worker(mode=mode, faults=faults, max_messages=max_messages, handler=handler,
                         name=f"w{k}", max_receives=4) for k in range(2)]
        lab.drain(*ws)
        lab.broker.redrive()  # a second message for events already applied: duplicates in a batch
        lab.drain(*ws)
        return store.dump(lab.store), [w.stats.as_dict() for w in ws]

    fast, slow = run(apply_order_placed), run(_one_by_one)
    assert fast[1] == slow[1]
    assert fast[0] == slow[0]


def test_the_fast_path_takes_a_handful_of_statements_per_batch(lab):
    for i in range(50):
        lab.order(f"item-{i % 5}", 1)
    statements: list[str] = []
    lab.store.set_trace_callback(statements.append)
    assert lab.worker(max_messages=50).step() == 50
    lab.store.set_trace_callback(None)
    assert not any(s.startswith(("SAVEPOINT", "RELEASE")) for s in statements)
    # receive (claim + log), apply (inbox + UPSERT per item + log), ack (delete + log)
    assert sum(1 for s in statements if s.startswith("BEGIN")) == 3
    assert check(lab.store).ok
