"""Chapter 7's exercises on the broker contract: the harness, and real engines.

The corpus (``tests/course/corpus/chapter7.py``) grades wrong and right answers on the default
broker, a second SQLite file. Here: the same exercises on RabbitMQ and JetStream, each run on a
queue or stream of its own that is gone afterwards; the network's two halves of a lost
message look the same to the code and differ in the broker; the harness's second consumer
really runs between two statements; a bad ``broker`` is named.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from support.brokers import AMQP_URL, rabbitmq_declared

from deliverylab.brokers import registry
from deliverylab.course import ex07, grade
from deliverylab.course.external import Store, Wire, open_setup
from deliverylab.engine.errors import BrokerUnavailable, InvalidInput
from deliverylab.engine.faults import Faults

AMQP = AMQP_URL
NATS = registry.server_url("jetstream")
GRADED = [("external-inbox", ex07.consume_solution, ex07.consume_apply_then_ack,
           "applied twice"),
          ("relay-publish", ex07.relay_solution, ex07.relay_marks_first, "never applied"),
          ("poison-or-retry", ex07.triage_solution, ex07.triage_acks_every_error,
           "not in the dead letters")]


def _stream_exists(name: str) -> bool:
    import nats
    from nats.js.errors import NotFoundError

    async def probe() -> bool:
        nc = await nats.connect(NATS)
        try:
            await nc.jetstream().stream_info(name)
            return True
        except NotFoundError:
            return False
        finally:
            await nc.close()

    return asyncio.run(probe())


@pytest.mark.parametrize(("ex_id", "model", "wrong", "reason"), GRADED,
                         ids=[g[0] for g in GRADED])
def test_on_rabbitmq_the_model_passes_a_wrong_answer_fails_and_the_queue_is_removed(
        ex_id, model, wrong, reason) -> None:
    name = f"dl_test_{uuid.uuid4().hex[:12]}"
    url = f"{AMQP}?queue={name}"
    verdict = grade(ex_id, model, seeds=[0, 1], broker=url)
    assert verdict.passed, str(verdict)
    assert "broker: RabbitMQ" in verdict.trials[0].faults
    failed = grade(ex_id, wrong, seeds=[0, 1], broker=url)
    assert not failed.passed and reason in failed.failed[0].reason, str(failed)
    assert not rabbitmq_declared(name) and not rabbitmq_declared(f"{name}.dlq")


@pytest.mark.parametrize(("ex_id", "model", "wrong", "reason"), GRADED,
                         ids=[g[0] for g in GRADED])
def test_on_jetstream_the_model_passes_a_wrong_answer_fails_and_the_stream_is_removed(
        ex_id, model, wrong, reason) -> None:
    name = f"dl_test_{uuid.uuid4().hex[:12]}"
    url = f"{NATS}?stream={name}"
    verdict = grade(ex_id, model, seeds=[0], broker=url)
    assert verdict.passed, str(verdict)
    assert "broker: JetStream" in verdict.trials[0].faults
    failed = grade(ex_id, wrong, seeds=[0], broker=url)
    assert not failed.passed and reason in failed.failed[0].reason, str(failed)
    assert not _stream_exists(name)


def test_the_default_broker_is_a_second_sqlite_file_removed_afterwards() -> None:
    with open_setup(None, seed=0, max_receives=5) as s:
        assert not s.broker.joins(s.store)
        files = {r[2] for r in s.broker.conn.execute("PRAGMA database_list")}
        store_file = {r[2] for r in s.store.execute("PRAGMA database_list")}
        assert files.isdisjoint(store_file)
        paths = [p for p in files | store_file if p]
    from pathlib import Path

    assert paths and not any(Path(p).exists() for p in paths)


def test_both_halves_of_a_lost_ack_look_the_same_and_differ_in_the_broker() -> None:
    with open_setup(None, seed=0, max_receives=5) as s:
        for i in range(2):
            s.broker.send(f"evt-{i}", "OrderPlaced", {"orderId": f"o-{i}"},
                          correlation_id=f"o-{i}")
        request = Wire(s.broker, Faults(seed=0), request_lost={"ack": 1.0}, answer_lost={})
        answer = Wire(s.broker, Faults(seed=0), request_lost={}, answer_lost={"ack": 1.0})
        texts = []
        for wire in (request, answer):
            d = s.broker.receive(2.0, 1)[0]
            with pytest.raises(BrokerUnavailable) as err:
                wire.ack(d)
            texts.append(str(err.value))
        assert texts[0] == texts[1]
        assert s.broker.queued_event_ids() == {"evt-0"}  # the answer's half deleted evt-1


def test_the_second_consumer_runs_between_two_statements_outside_a_transaction() -> None:
    with open_setup(None, seed=0, max_receives=5) as s:
        ran: list[bool] = []
        store = Store(s.store, between=lambda: ran.append(s.store.in_transaction))
        store.execute("SELECT 1")
        assert ran == []  # not before the first statement
        store.execute("SELECT 2")
        store.execute("BEGIN IMMEDIATE")
        store.execute("SELECT 3")  # inside a transaction: nobody else can commit
        store.execute("COMMIT")
        assert ran == [False, False]
    # ...and a check made before the gap and acted on after it meets a duplicate there.
    from corpus.chapter7 import consume_checks_then_inserts

    verdict = grade("external-inbox", consume_checks_then_inserts, seeds=range(6))
    assert not verdict.passed and "applied twice" in verdict.failed[0].reason


def test_a_bad_broker_is_named_and_nothing_runs() -> None:
    for bad in ("kafka://127.0.0.1:9092", f"{AMQP}", f"{NATS}", 42, ""):
        with pytest.raises(InvalidInput) as err:
            grade("external-inbox", ex07.consume_solution, seeds=[0], broker=bad)
        assert err.value.field == "broker"
    with pytest.raises(InvalidInput) as err:  # an exercise on the lab's own queue
        grade("in-flight-repair", lambda conn, now: None, seeds=[0],
              broker=f"{AMQP}?queue=x")
    assert err.value.field == "broker" and "lab's own queue" in str(err.value)


def test_a_submission_that_exits_or_has_a_sql_typo_gets_a_verdict() -> None:
    def exits(store, broker, delivery):  # noqa: ANN001 - a reader's code
        raise SystemExit(3)

    def typo(store, broker):  # noqa: ANN001 - a reader's code
        store.execute("SELEC event_id FROM outbox")

    first = grade("external-inbox", exits, seeds=[0]).failed[0]
    assert "your code raised SystemExit(3) (your line" in first.reason
    assert "while working on delivery 1 of order" in first.reason
    second = grade("relay-publish", typo, seeds=[0]).failed[0]
    assert 'your code raised OperationalError: near "SELEC": syntax error' in second.reason
