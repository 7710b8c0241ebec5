"""The payment service deduplicates by idempotency key; the consumer and the outbound outbox
charge each order once with the key, and more than once without it, over many fault schedules.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deliverylab.book import payment_outbox
from deliverylab.book.effects import PaymentService, charge_handler, charge_run, worker_for
from deliverylab.book.lab import Lab
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput, OrderConflict
from deliverylab.engine.faults import Faults
from deliverylab.engine.store import transaction
from deliverylab.engine.worker import PoisonMessage

SEEDS = range(50)


@pytest.fixture
def service() -> PaymentService:
    s = PaymentService(clock=FakeClock(), seed=1)
    yield s
    s.conn.close()


def rows(service: PaymentService) -> tuple[int, int]:
    keys = service.conn.execute("SELECT count(*) FROM payment_idempotency").fetchone()[0]
    return service.charge_count(), keys


# -- the service ----------------------------------------------------------------------------------

def test_the_same_key_and_request_returns_the_first_charge_and_charges_nothing(service) -> None:
    first = service.charge(order_id="o-1", amount=500, idempotency_key="evt-1")
    again = service.charge(order_id="o-1", amount=500, idempotency_key="evt-1")
    assert not first.replayed and again.replayed
    assert again.charge_id == first.charge_id and again.amount == 500
    assert rows(service) == (1, 1) and service.calls == 2


@pytest.mark.parametrize("changed", [{"amount": 600}, {"order_id": "o-2"}])
def test_the_same_key_with_another_request_is_refused_and_writes_nothing(service, changed) -> None:
    service.charge(order_id="o-1", amount=500, idempotency_key="evt-1")
    with pytest.raises(OrderConflict, match="idempotency_key 'evt-1' was already used"):
        service.charge(**{"order_id": "o-1", "amount": 500, **changed}, idempotency_key="evt-1")
    assert rows(service) == (1, 1)


def test_without_a_key_every_call_charges(service) -> None:
    a = service.charge(order_id="o-1", amount=500)
    b = service.charge(order_id="o-1", amount=500)
    assert a.charge_id != b.charge_id and not b.replayed
    assert rows(service) == (2, 0)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"order_id": "", "amount": 5}, "order_id"),
    ({"order_id": 7, "amount": 5}, "order_id"),
    ({"order_id": "o-1", "amount": 0}, "amount"),
    ({"order_id": "o-1", "amount": 1.5}, "amount"),
    ({"order_id": "o-1", "amount": True}, "amount"),
    ({"order_id": "o-1", "amount": "5"}, "amount"),
    ({"order_id": "o-1", "amount": 5, "idempotency_key": ""}, "idempotency_key"),
    ({"order_id": "o-1", "amount": 5, "idempotency_key": "k" * 256}, "idempotency_key"),
])
def test_bad_input_names_the_field_and_value_and_writes_nothing(service, kwargs, field) -> None:
    with pytest.raises(InvalidInput) as refused:
        service.charge(**kwargs)
    assert refused.value.field == field and field in str(refused.value)
    assert rows(service) == (0, 0) and service.calls == 0
    assert not service.charge(order_id="o-1", amount=5).replayed  # still serving


def test_a_charge_survives_the_callers_rollback() -> None:
    """The service commits on its own connection: the caller's transaction cannot take a
    charge back (chapter 2's emails)."""
    lab = Lab(seed=1)
    service = PaymentService(clock=lab.clock)
    with pytest.raises(TimeoutError), transaction(lab.store):
        lab.store.execute("INSERT INTO inventory_projection VALUES ('coffee-beans', 1)")
        service.charge(order_id="o-1", amount=500, idempotency_key="evt-1")
        raise TimeoutError
    assert lab.store.execute("SELECT count(*) FROM inventory_projection").fetchone()[0] == 0
    assert service.charge_count() == 1


def test_keys_live_in_the_services_file_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "payments.db"
    first = PaymentService(path, clock=FakeClock())
    charge = first.charge(order_id="o-1", amount=500, idempotency_key="evt-1")
    first.conn.close()
    second = PaymentService(path, clock=FakeClock())
    again = second.charge(order_id="o-1", amount=500, idempotency_key="evt-1")
    assert again.replayed and again.charge_id == charge.charge_id
    assert second.charge_count() == 1


def test_without_a_seed_a_reopened_service_keeps_charging_with_fresh_ids(tmp_path: Path) -> None:
    path = tmp_path / "payments.db"
    for _ in range(2):
        service = PaymentService(path, clock=FakeClock())
        service.charge(order_id="o-1", amount=500)
        service.conn.close()
    assert PaymentService(path, clock=FakeClock()).charge_count() == 2


def test_charge_ids_do_not_repeat_the_labs_event_ids() -> None:
    lab = Lab(seed=12)
    placed = lab.place_order("coffee-beans", 1)
    service = PaymentService(clock=lab.clock, seed=12)
    charge = service.charge(order_id=placed.order_id, amount=500)
    assert charge.charge_id.split("-")[1] != placed.event_id.split("-")[1]


# -- the consumer that calls out ------------------------------------------------------------------

def test_charge_handler_refuses_bad_arguments(service) -> None:
    with pytest.raises(InvalidInput, match="service"):
        charge_handler(object(), keyed=True)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="lost_answer"):
        charge_handler(service, keyed=True, lost_answer=1.5)
    with pytest.raises(InvalidInput, match="keyed"):
        charge_run("idempotent", keyed="yes")  # type: ignore[arg-type]


def test_a_poison_payload_charges_nothing_and_is_dead_lettered() -> None:
    lab = Lab(seed=2, max_receives=2)
    service = PaymentService(clock=lab.clock)
    handler = charge_handler(service, keyed=True)
    lab.workers = [worker_for(lab, handler)]
    lab.broker.send("evt-bad", "OrderPlaced", {"orderId": "o-x", "itemId": "tea", "qty": "2"})
    lab.run_until_idle()
    assert service.calls == 0 and len(lab.dead_letters()) == 1
    lab.broker.send("evt-bad-2", "OrderPlaced", {"orderId": "o-y", "qty": None})
    with pytest.raises(PoisonMessage, match="integer qty"):
        handler(lab.store, lab.broker.receive(1.0)[0])
    assert service.calls == 0


@pytest.mark.slow
def test_lost_acks_without_an_inbox_charge_twice_without_a_key_and_once_with_it() -> None:
    for seed in SEEDS:
        keyed = charge_run("at-least-once", keyed=True, orders=20, seed=seed, ack_fail=0.3)
        bare = charge_run("at-least-once", keyed=False, orders=20, seed=seed, ack_fail=0.3)
        assert keyed.charges == keyed.orders == 20 and keyed.double_charged == 0, seed
        assert bare.charges > bare.orders and bare.double_charged > 0, seed
        assert keyed.calls == bare.calls, seed  # the same schedule: the key changes no call


@pytest.mark.slow
def test_lost_answers_charge_twice_through_the_inbox_without_a_key_and_once_with_it() -> None:
    for seed in SEEDS:
        keyed = charge_run("idempotent", keyed=True, orders=20, seed=seed, lost_answer=0.3)
        bare = charge_run("idempotent", keyed=False, orders=20, seed=seed, lost_answer=0.3)
        assert keyed.charges == 20 and keyed.verdict.startswith("OK"), seed
        # The database is right, the customer is charged twice.
        assert bare.charges > 20 and bare.verdict.startswith("OK"), seed


def test_lost_acks_through_the_inbox_never_call_again() -> None:
    for seed in range(10):
        run = charge_run("idempotent", keyed=False, orders=20, seed=seed, ack_fail=0.5)
        assert run.calls == run.charges == 20, seed


# -- the outbound outbox and its relay ------------------------------------------------------------

def outbox_lab(seed: int, **rates: float) -> Lab:
    lab = Lab(seed=seed, max_receives=2)
    payment_outbox.install(lab.store)
    lab.workers = [worker_for(lab, payment_outbox.outbox_handler(clock=lab.clock),
                              faults=Faults(seed=seed, **rates))]
    return lab


def test_an_outbox_row_exists_exactly_for_the_orders_that_took_effect() -> None:
    lab = outbox_lab(4, process_error=0.6)
    lab.place_orders(30)
    lab.run_until_idle()
    events = lab.events()
    applied = set(events[events.state == "correct"].order_id)
    assert 0 < len(applied) < 30  # some orders were dead-lettered, never applied
    assert set(payment_outbox.outbox_frame(lab.store).order_id) == applied


def test_the_outbox_holds_one_request_per_event_even_without_an_inbox() -> None:
    lab = Lab(seed=5, mode="at-least-once")
    payment_outbox.install(lab.store)
    lab.workers = [worker_for(lab, payment_outbox.outbox_handler(clock=lab.clock),
                              faults=Faults(seed=5, ack_fail=0.6))]
    lab.place_orders(20)
    assert lab.run_until_idle().duplicated > 0
    assert len(payment_outbox.outbox_frame(lab.store)) == 20


def test_a_relay_crash_leaves_the_row_pending_and_the_next_pass_sends_it_again() -> None:
    lab = outbox_lab(6)
    lab.place_orders(5)
    lab.run_until_idle()
    service = PaymentService(clock=lab.clock)
    crashed = payment_outbox.relay(lab.store, service, clock=lab.clock, crash_rate=1.0)
    assert crashed == payment_outbox.RelayPass(sent=0, crashed=True)
    assert payment_outbox.pending(lab.store) == 5
    done = payment_outbox.relay(lab.store, service, clock=lab.clock)
    assert done == payment_outbox.RelayPass(sent=5, crashed=False)
    assert payment_outbox.pending(lab.store) == 0
    frame = payment_outbox.outbox_frame(lab.store)
    assert frame.attempts.tolist()[0] == 2 and service.calls == 6 and service.charge_count() == 5


def test_relay_refuses_bad_arguments_and_writes_nothing() -> None:
    lab = outbox_lab(7)
    lab.place_orders(2)
    lab.run_until_idle()
    service = PaymentService(clock=lab.clock)
    for kwargs, field in (({"crash_rate": -0.1}, "crash_rate"), ({"limit": 0}, "limit"),
                          ({"keyed": 1}, "keyed")):
        with pytest.raises(InvalidInput) as refused:
            payment_outbox.relay(lab.store, service, clock=lab.clock, **kwargs)
        assert refused.value.field == field
    with pytest.raises(InvalidInput, match="service"):
        payment_outbox.relay(lab.store, object(), clock=lab.clock)  # type: ignore[arg-type]
    assert payment_outbox.outbox_frame(lab.store).attempts.tolist() == [0, 0] and service.calls == 0


def test_relay_without_its_table_says_which_install_to_run() -> None:
    lab = Lab(seed=8)
    with pytest.raises(InvalidInput, match=r"with payment_outbox \(run deliverylab.book.payment_outbox.install") as refused:
        payment_outbox.relay(lab.store, PaymentService(clock=lab.clock), clock=lab.clock)
    assert refused.value.field == "conn"


@pytest.mark.slow
def test_relay_crashes_charge_twice_without_a_key_and_once_with_it() -> None:
    for seed in SEEDS:
        keyed = payment_outbox.outbox_run(keyed=True, orders=20, seed=seed, relay_crash=0.3)
        bare = payment_outbox.outbox_run(keyed=False, orders=20, seed=seed, relay_crash=0.3)
        assert keyed.relay_crashes == bare.relay_crashes > 0, seed
        assert keyed.charges == 20 and keyed.double_charged == 0, seed
        assert bare.charges == 20 + bare.relay_crashes and bare.double_charged > 0, seed
