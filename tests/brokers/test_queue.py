"""The queue's verbs — send / receive / extend / ack / nack / dead-letter / redrive — run as a
contract against an in-memory and a file database (``any_lab``)."""

from __future__ import annotations

import pytest

from deliverylab.brokers.sqlite import Queue
from deliverylab.engine import store
from deliverylab.engine.errors import InvalidInput

VT = 2.0


def send(lab, n=1, *, delay=0.0, prefix="evt"):
    return [lab.broker.send(f"{prefix}-{i}", "OrderPlaced", {"i": i}, correlation_id=f"o-{i}",
                           delay=delay) for i in range(n)]


def row(lab, message_id):
    return lab.store.execute("SELECT * FROM queue_messages WHERE message_id = ?",
                            (message_id,)).fetchone()


def outcomes(lab, message_id=None):
    sql = "SELECT outcome FROM delivery_log"
    args = ()
    if message_id is not None:
        sql += " WHERE message_id = ?"
        args = (message_id,)
    return [r[0] for r in lab.store.execute(sql + " ORDER BY seq", args)]


# -- send / receive ----------------------------------------------------------------------------

def test_send_then_receive_returns_the_message_with_a_lease(any_lab):
    lab = any_lab
    (mid,) = send(lab)
    (d,) = lab.broker.receive(VT)
    assert (d.message_id, d.event_id, d.type, d.payload, d.correlation_id) == (
        mid, "evt-0", "OrderPlaced", {"i": 0}, "o-0")
    assert d.delivery_count == 1
    assert d.lease_until == lab.clock.now() + VT
    r = row(lab, mid)
    assert r["receipt"] == d.receipt and r["lease_until"] == d.lease_until
    assert r["visible_at"] == d.lease_until
    assert outcomes(lab, mid) == ["received"]


def test_each_receive_increments_the_count_and_issues_a_fresh_receipt(any_lab):
    lab = any_lab
    send(lab)
    seen = []
    for expected in range(1, 5):
        (d,) = lab.broker.receive(VT)
        assert d.delivery_count == expected
        seen.append(d.receipt)
        lab.clock.advance(VT)
    assert len(set(seen)) == len(seen)


def test_receipts_differ_even_between_two_queues_sharing_a_seed(file_lab):
    """Two processes started with the same seed draw the same tokens; the count keeps the
    receipts of one message apart."""
    from deliverylab.engine.ids import Ids

    send(file_lab)
    twin = Queue(file_lab.connect(), clock=file_lab.clock, ids=Ids(file_lab.ids.seed))
    (a,) = Queue(file_lab.store, clock=file_lab.clock, ids=Ids(file_lab.ids.seed)).receive(VT)
    file_lab.clock.advance(VT)
    (b,) = twin.receive(VT)
    assert a.message_id == b.message_id and a.receipt != b.receipt
    assert not file_lab.broker.ack(a)
    assert file_lab.broker.ack(b)


def test_a_leased_message_is_invisible_until_its_lease_ends(any_lab):
    lab = any_lab
    send(lab)
    (d,) = lab.broker.receive(VT)
    lab.clock.advance(VT - 0.001)
    assert lab.broker.receive(VT) == []
    lab.clock.advance(0.001)  # exactly at lease end: visible again
    assert lab.clock.now() == d.lease_until
    (again,) = lab.broker.receive(VT)
    assert again.message_id == d.message_id and again.delivery_count == 2


def test_a_delayed_message_becomes_visible_after_its_delay(any_lab):
    lab = any_lab
    (mid,) = send(lab, delay=5)
    assert lab.broker.receive(VT) == []
    assert lab.broker.next_visible_at() == 5
    lab.clock.advance(5)
    assert [d.message_id for d in lab.broker.receive(VT)] == [mid]


def test_max_messages_batches_in_arrival_order(any_lab):
    lab = any_lab
    mids = send(lab, 7)
    first = lab.broker.receive(VT, max_messages=3)
    second = lab.broker.receive(VT, max_messages=3)
    third = lab.broker.receive(VT, max_messages=3)
    assert [d.message_id for d in first + second + third] == mids
    assert [len(first), len(second), len(third)] == [3, 3, 1]
    assert lab.broker.receive(VT, max_messages=3) == []
    # A delivery is named by (message id, receipt); no two deliveries share that pair.
    assert len({(d.message_id, d.receipt) for d in first + second + third}) == 7


def test_a_batch_logs_each_delivery_as_single_receives_do(any_lab):
    lab = any_lab
    send(lab, 4)
    (one,) = lab.broker.receive(VT)
    batch = lab.broker.receive(VT, max_messages=3)
    rows = lab.store.execute(
        "SELECT at, worker, correlation_id, event_id, message_id, delivery_count, outcome,"
        " detail FROM delivery_log ORDER BY seq").fetchall()
    assert [tuple(r) for r in rows] == [
        (0.0, "worker", d.correlation_id, d.event_id, d.message_id, 1, "received",
         f"lease until {VT:g}") for d in [one, *batch]]


def test_redelivered_messages_come_back_oldest_visible_first(any_lab):
    lab = any_lab
    a, b = send(lab, 2)
    (da,) = lab.broker.receive(VT)
    assert da.message_id == a
    lab.clock.advance(VT)
    # a's lease ended at t=VT, b has been visible since t=0: b is claimed first, then a.
    assert [d.message_id for d in lab.broker.receive(VT)] == [b]
    assert [d.message_id for d in lab.broker.receive(VT)] == [a]


# -- ack / extend / nack -----------------------------------------------------------------------

def test_ack_deletes_and_a_second_ack_is_refused(any_lab):
    lab = any_lab
    (mid,) = send(lab)
    (d,) = lab.broker.receive(VT)
    assert lab.broker.ack(d) is True
    assert row(lab, mid) is None
    assert lab.broker.ack(d) is False
    assert outcomes(lab, mid) == ["received", "acked", "ack_rejected"]


def test_a_deleted_message_seq_is_never_given_to_a_new_one(any_lab):
    # ack / extend / nack name a message by seq (and receipt): a seq handed out again could let
    # a stale delivery reach a message it never held.
    lab = any_lab
    send(lab, 2)
    _, newest = lab.broker.receive(VT, max_messages=2)
    assert lab.broker.ack(newest)  # the highest seq is gone
    send(lab, 1, prefix="later")
    (later,) = [d for d in lab.broker.receive(VT, max_messages=2) if d.event_id == "later-0"]
    assert later.seq > newest.seq
    assert lab.broker.ack(newest) is False and lab.broker.extend(newest, 5) is False
    assert row(lab, later.message_id)["receipt"] == later.receipt


def test_ack_many_reports_each_delivery(any_lab):
    lab = any_lab
    send(lab, 3)
    ds = lab.broker.receive(VT, max_messages=3)
    assert lab.broker.ack(ds[1])
    assert lab.broker.ack_many(ds) == [True, False, True]
    assert lab.broker.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 0}


def test_extend_pushes_the_lease_past_now(any_lab):
    lab = any_lab
    send(lab)
    (d,) = lab.broker.receive(VT)
    lab.clock.advance(1.5)
    assert lab.broker.extend(d, 10) is True
    lab.clock.advance(VT)  # the original lease has ended; the extension holds
    assert lab.broker.receive(VT) == []
    lab.clock.advance(10 - VT - 0.001)
    assert lab.broker.receive(VT) == []
    lab.clock.advance(0.001)
    assert len(lab.broker.receive(VT)) == 1
    assert "extended" in outcomes(lab)


def test_extend_by_zero_makes_it_visible_now(any_lab):
    lab = any_lab
    send(lab)
    (d,) = lab.broker.receive(VT)
    assert lab.broker.extend(d, 0)
    assert len(lab.broker.receive(VT)) == 1


def test_nack_returns_the_message_after_the_delay_and_keeps_the_error(any_lab):
    lab = any_lab
    (mid,) = send(lab)
    (d,) = lab.broker.receive(VT)
    assert lab.broker.nack(d, 0.5, error="RuntimeError: nope") is True
    r = row(lab, mid)
    assert r["receipt"] is None and r["lease_until"] is None
    assert r["last_error"] == "RuntimeError: nope"
    assert lab.broker.receive(VT) == []
    lab.clock.advance(0.5)
    (again,) = lab.broker.receive(VT)
    assert again.delivery_count == 2 and again.last_error == "RuntimeError: nope"
    assert lab.broker.ack(d) is False  # the nacked delivery's receipt died with the nack
    assert lab.broker.ack(again) is True


# -- the stale receipt: a lease that ran out and was taken over --------------------------------

@pytest.fixture
def taken_over(any_lab):
    """Worker A received, its lease ran out, worker B received the same message."""
    lab = any_lab
    (mid,) = send(lab)
    (a,) = lab.broker.receive(VT, worker="A")
    lab.clock.advance(VT)
    (b,) = lab.broker.receive(VT, worker="B")
    assert a.message_id == b.message_id == mid and a.receipt != b.receipt
    return lab, a, b


def test_stale_ack_is_refused_and_the_new_holder_acks(taken_over):
    lab, a, b = taken_over
    assert lab.broker.ack(a, worker="A") is False
    assert row(lab, a.message_id) is not None
    assert lab.broker.ack(b, worker="B") is True
    assert row(lab, a.message_id) is None
    log = lab.store.execute("SELECT worker, outcome FROM delivery_log ORDER BY seq").fetchall()
    assert [tuple(r) for r in log] == [("A", "received"), ("B", "received"),
                                       ("A", "ack_rejected"), ("B", "acked")]


def test_stale_extend_is_refused_and_leaves_the_new_lease(taken_over):
    lab, a, b = taken_over
    before = tuple(row(lab, a.message_id))
    assert lab.broker.extend(a, 60, worker="A") is False
    assert tuple(row(lab, a.message_id)) == before
    assert lab.broker.extend(b, 60, worker="B") is True
    assert row(lab, b.message_id)["lease_until"] == lab.clock.now() + 60


def test_stale_nack_is_refused_and_leaves_the_new_lease(taken_over):
    lab, a, b = taken_over
    before = tuple(row(lab, a.message_id))
    assert lab.broker.nack(a, 0, error="A gives up", worker="A") is False
    assert tuple(row(lab, a.message_id)) == before
    assert lab.broker.receive(VT) == []  # still B's
    assert lab.broker.ack(b) is True


def test_stale_dead_letter_is_refused(taken_over):
    lab, a, b = taken_over
    assert lab.broker.dead_letter(a, "A thinks it is poison") is False
    assert lab.store.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    assert lab.broker.ack(b)


# -- dead letters and redrive ------------------------------------------------------------------

def test_max_receives_moves_the_message_to_dead_letters_with_its_last_error(any_lab):
    lab = any_lab
    q = Queue(lab.store, clock=lab.clock, ids=lab.ids, max_receives=3)
    (mid,) = send(lab)
    for n in range(1, 4):
        (d,) = q.receive(VT)
        assert d.delivery_count == n
        assert q.nack(d, 0, error=f"failure {n}")
    assert q.receive(VT) == []
    assert row(lab, mid) is None
    dead = lab.store.execute("SELECT * FROM dead_letters").fetchone()
    assert (dead["message_id"], dead["event_id"], dead["last_error"]) == (mid, "evt-0", "failure 3")
    assert dead["payload"] == '{"i":0}' and dead["correlation_id"] == "o-0"
    # It was handed out exactly max_receives times, then parked.
    assert outcomes(lab, mid).count("received") == 3
    assert outcomes(lab, mid)[-1] == "dead_lettered"
    assert q.depth() == {"visible": 0, "in_flight": 0, "dead_letters": 1}


def test_expired_leases_count_as_receives_too(any_lab):
    lab = any_lab
    q = Queue(lab.store, clock=lab.clock, ids=lab.ids, max_receives=2)
    (mid,) = send(lab)
    for _ in range(2):
        assert len(q.receive(VT)) == 1
        lab.clock.advance(VT)
    assert q.receive(VT) == []
    dead = lab.store.execute("SELECT message_id, last_error FROM dead_letters").fetchone()
    assert dead[0] == mid and "max_receives=2" in dead[1]


def test_dead_letter_now_with_an_error(any_lab):
    lab = any_lab
    (mid,) = send(lab)
    (d,) = lab.broker.receive(VT)
    assert lab.broker.dead_letter(d, "PoisonMessage: bad payload") is True
    assert row(lab, mid) is None
    assert lab.store.execute("SELECT last_error FROM dead_letters").fetchone()[0] == \
        "PoisonMessage: bad payload"
    assert lab.broker.ack(d) is False


def test_redrive_brings_it_back_as_a_new_message_with_count_zero(any_lab):
    lab = any_lab
    (mid,) = send(lab)
    (d,) = lab.broker.receive(VT)
    lab.broker.dead_letter(d, "boom")
    assert lab.broker.redrive() == 1
    assert lab.store.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    back = lab.store.execute("SELECT * FROM queue_messages").fetchone()
    assert back["message_id"] != mid
    assert back["event_id"] == "evt-0" and back["delivery_count"] == 0
    assert back["payload"] == '{"i":0}' and back["correlation_id"] == "o-0"
    (again,) = lab.broker.receive(VT)
    assert again.delivery_count == 1 and again.message_id == back["message_id"]
    assert outcomes(lab, back["message_id"]) == ["redriven", "received"]


def test_redrive_by_id_moves_only_those(any_lab):
    lab = any_lab
    send(lab, 3)
    for d in lab.broker.receive(VT, max_messages=3):
        lab.broker.dead_letter(d, "boom")
    dead = [r[0] for r in lab.store.execute("SELECT message_id FROM dead_letters ORDER BY 1")]
    assert lab.broker.redrive([dead[1]]) == 1
    left = [r[0] for r in lab.store.execute("SELECT message_id FROM dead_letters ORDER BY 1")]
    assert left == [dead[0], dead[2]]
    assert lab.broker.depth()["visible"] == 1


def test_redrive_of_the_same_id_twice_moves_one_message(any_lab):
    lab = any_lab
    send(lab)
    (d,) = lab.broker.receive(VT)
    lab.broker.dead_letter(d, "boom")
    assert lab.broker.redrive([d.message_id, d.message_id]) == 1
    assert lab.store.execute("SELECT count(*) FROM queue_messages").fetchone()[0] == 1


def test_redrive_of_an_unknown_id_writes_nothing(any_lab):
    lab = any_lab
    send(lab)
    (d,) = lab.broker.receive(VT)
    lab.broker.dead_letter(d, "boom")
    before = store.dump(lab.store)
    with pytest.raises(InvalidInput, match=r"message_ids must be the id of a dead letter, got "
                                           r"'msg-nope'"):
        lab.broker.redrive([d.message_id, "msg-nope"])
    assert store.dump(lab.store) == before


def test_drop_deletes_behind_the_workers_back_and_logs_lost(any_lab):
    lab = any_lab
    (mid,) = send(lab)
    (d,) = lab.broker.receive(VT)
    assert lab.broker.drop(mid, reason="chaos") is True
    assert lab.broker.drop(mid) is False
    assert lab.broker.ack(d) is False
    assert outcomes(lab, mid) == ["received", "lost", "ack_rejected"]


def test_lose_forgets_a_received_message_even_after_another_receive(any_lab):
    lab = any_lab
    a, b = send(lab, 2)
    (da,) = lab.broker.receive(VT)
    lab.clock.advance(VT)
    lab.broker.receive(VT, max_messages=2)  # both leased again: da's receipt is stale now
    assert lab.broker.lose(da, reason="lost in transit") is True
    assert row(lab, a) is None and row(lab, b) is not None
    assert lab.broker.lose(da, reason="again") is False
    assert outcomes(lab, a) == ["received", "received", "lost"]
    (lost,) = lab.store.execute("SELECT delivery_count, detail FROM delivery_log"
                               " WHERE outcome = 'lost'").fetchall()
    assert tuple(lost) == (1, "lost in transit")  # the delivery that was lost


def test_depth_and_next_visible_at(any_lab):
    lab = any_lab
    assert lab.broker.next_visible_at() is None
    send(lab, 3)
    send(lab, 1, delay=9, prefix="late")
    lab.broker.receive(VT)
    assert lab.broker.depth() == {"visible": 2, "in_flight": 2, "dead_letters": 0}
    assert lab.broker.next_visible_at() == 0


# -- bad input: a named error, nothing written -------------------------------------------------

BAD_CALLS = [
    ("visibility_timeout", -1, lambda q: q.receive(-1)),
    ("visibility_timeout", "2", lambda q: q.receive("2")),
    ("visibility_timeout", float("nan"), lambda q: q.receive(float("nan"))),
    ("visibility_timeout", 12 * 3600 + 1, lambda q: q.receive(12 * 3600 + 1)),
    ("max_messages", 0, lambda q: q.receive(VT, 0)),
    ("max_messages", 1001, lambda q: q.receive(VT, 1001)),
    ("max_messages", 2.0, lambda q: q.receive(VT, 2.0)),
    ("max_messages", True, lambda q: q.receive(VT, True)),
    ("delay", -0.5, lambda q: q.send("evt-x", "OrderPlaced", {}, delay=-0.5)),
    ("event_id", "", lambda q: q.send("", "OrderPlaced", {})),
    ("type", "", lambda q: q.send("evt-x", "", {})),
    ("payload", [1, 2], lambda q: q.send("evt-x", "OrderPlaced", [1, 2])),
    ("payload", {"x": {1, 2}}, lambda q: q.send("evt-x", "OrderPlaced", {"x": {1, 2}})),
    ("message_ids", "msg-1", lambda q: q.redrive("msg-1")),
    ("message_id", "", lambda q: q.drop("")),
    # A message id where a delivery belongs: the verbs that settle a delivery need the one
    # receive returned (its row and receipt).
    ("delivery", "msg-1", lambda q: q.ack("msg-1")),
    ("delivery", None, lambda q: q.extend(None, 5)),
    ("delivery", "msg-1", lambda q: q.nack("msg-1", 1)),
    ("delivery", 42, lambda q: q.dead_letter(42, "boom")),
    ("delivery", "msg-1", lambda q: q.lose("msg-1", reason="chaos")),
    ("delivery", "msg-1", lambda q: q.ack_many(["msg-1"])),
    ("deliveries", "msg-1", lambda q: q.ack_many("msg-1")),
]


@pytest.mark.parametrize(("field", "value", "call"), BAD_CALLS,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_CALLS])
def test_bad_input_names_the_field_and_value_and_writes_nothing(any_lab, field, value, call):
    lab = any_lab
    send(lab)
    before = store.dump(lab.store)
    with pytest.raises(InvalidInput) as info:
        call(lab.broker)
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(f"{field} must be ")
    assert message.endswith(f"got {value!r}")
    assert store.dump(lab.store) == before
    assert not lab.store.in_transaction


@pytest.mark.parametrize(("verb", "field"), [("extend", "seconds"), ("nack", "delay")])
def test_negative_times_on_a_held_delivery_are_refused(any_lab, verb, field):
    lab = any_lab
    send(lab)
    (d,) = lab.broker.receive(VT)
    before = store.dump(lab.store)
    with pytest.raises(InvalidInput, match=rf"^{field} must be a number in \[0, 43200\], got -1$"):
        getattr(lab.broker, verb)(d, -1)
    assert store.dump(lab.store) == before


@pytest.mark.parametrize("bad", [0, -3, 1.5, "5", None])
def test_max_receives_must_be_a_positive_integer(lab, bad):
    with pytest.raises(InvalidInput, match=rf"^max_receives must be an integer >= 1, got {bad!r}$"
                       .replace("(", r"\(").replace(")", r"\)")):
        Queue(lab.store, clock=lab.clock, ids=lab.ids, max_receives=bad)


# -- the claim's plan: receive cost does not grow with depth ------------------------------------

def _claim_plan(conn, sql=Queue._CLAIM):
    params = {"lease_until": 1.0, "token": "t", "now": 0.0, "n": 10}
    return [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]


def _assert_claim_uses_the_index(plan):
    inner = [d for d in plan if "queue_messages" in d and "INTEGER PRIMARY KEY" not in d]
    assert inner, plan
    assert all("USING COVERING INDEX queue_messages_visible (visible_at<?)" in d
               for d in inner), plan
    assert not any(d.startswith("SCAN") for d in plan), plan
    assert not any("TEMP B-TREE" in d for d in plan), plan


@pytest.mark.parametrize("sql", [Queue._CLAIM, Queue._CLAIM_ONE], ids=["batch", "one"])
def test_the_claim_searches_the_visible_index_without_a_sort(lab, sql):
    _assert_claim_uses_the_index(_claim_plan(lab.store, sql))


def _fill_and_analyze(lab, n, visible_at):
    """``n`` raw messages, message ``i`` visible at ``visible_at(i)``, then ANALYZE: the
    planner's statistics of a deep queue."""
    with store.transaction(lab.store):
        lab.store.executemany(
            "INSERT INTO queue_messages (message_id, event_id, type, payload, visible_at,"
            " created_at) VALUES (?, ?, 'OrderPlaced', '{}', ?, 0)",
            [(f"m{i}", f"e{i}", visible_at(i)) for i in range(n)])
    lab.store.execute("ANALYZE")


def test_the_claim_keeps_its_plan_on_a_deep_analyzed_queue(file_lab):
    lab = file_lab
    _fill_and_analyze(lab, 20_000, lambda i: float(i % 97))
    _assert_claim_uses_the_index(_claim_plan(lab.store))
    _assert_claim_uses_the_index(_claim_plan(lab.store, Queue._CLAIM_ONE))


def test_the_batched_ack_looks_each_message_up_by_its_row(file_lab):
    lab = file_lab
    _fill_and_analyze(lab, 5_000, lambda i: 0.0)
    plan = [r[3] for r in lab.store.execute("EXPLAIN QUERY PLAN " + Queue._ACK_MANY,
                                           {"pairs": '[[1, "r"]]'})]
    assert any("SCAN j" in d for d in plan), plan  # driven by the (small) list of deliveries
    assert not any(d.startswith("SCAN q") or d == "SCAN queue_messages" for d in plan), plan
    assert any(d == "SEARCH q USING INTEGER PRIMARY KEY (rowid=?)" for d in plan), plan
