"""The worker's settings (one frozen, validated object) and its hooks (stats, trace, narration
and any the caller adds, called at named points around the modes)."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
from support.engine import make_lab

from deliverylab.brokers.sqlite import SQLiteBroker
from deliverylab.engine import hooks as hooks_module
from deliverylab.engine import store
from deliverylab.engine.broker import Delivery, Received
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults
from deliverylab.engine.hooks import POINTS, Dispatch, Hook, Narration, WorkerStats
from deliverylab.engine.ids import Ids
from deliverylab.engine.settings import DEFAULT_MAX_RECEIVES, FIELDS, Mode, WorkerSettings
from deliverylab.engine.trace import Outcome
from deliverylab.engine.worker import Worker

BAD = {
    "mode": "exactly-once",
    "faults": {"ack_fail": 0.5},
    "visibility_timeout": -1,
    "max_messages": 0,
    "backoff_base": float("nan"),
    "backoff_cap": "10",
    "name": "",
    "consumer": "a\nb",
    "work_time": True,
    "crash_exits": "yes",
}


def test_every_setting_has_its_default_once_and_a_bad_value_for_the_test():
    assert set(BAD) == set(FIELDS)
    s = WorkerSettings()
    assert s.mode is Mode.IDEMPOTENT and s.max_messages == 1 and s.name == "worker-1"


@pytest.mark.parametrize("field", sorted(BAD))
def test_a_bad_setting_is_refused_naming_the_field_and_the_value(field):
    with pytest.raises(InvalidInput) as refused:
        WorkerSettings(**{field: BAD[field]})
    assert refused.value.field == field
    assert refused.value.value is BAD[field] or refused.value.value == BAD[field]
    assert str(refused.value).startswith(f"{field} must be ")


def test_the_cap_is_never_below_the_base():
    with pytest.raises(InvalidInput) as refused:
        WorkerSettings(backoff_base=2.0, backoff_cap=1.0)
    assert (refused.value.field, refused.value.value) == ("backoff_cap", 1.0)
    assert WorkerSettings(backoff_base=2.0, backoff_cap=2.0).backoff_cap == 2.0


def test_settings_are_frozen_parsed_and_replaced_with_validation():
    s = WorkerSettings(mode="at-least-once", visibility_timeout=3)
    assert s.mode is Mode.AT_LEAST_ONCE and isinstance(s.visibility_timeout, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "other"  # type: ignore[misc]
    t = s.replace(name="worker-2")
    assert (t.name, t.mode, s.name) == ("worker-2", Mode.AT_LEAST_ONCE, "worker-1")
    with pytest.raises(InvalidInput) as refused:
        s.replace(max_receives=3)
    assert (refused.value.field, refused.value.value) == ("max_receives", 3)
    with pytest.raises(InvalidInput) as refused:
        s.replace(max_messages=5000)
    assert refused.value.field == "max_messages"


def test_a_worker_takes_settings_or_keywords_and_keywords_replace_fields():
    conn, clock = store.init_db(), FakeClock()
    broker = SQLiteBroker(conn, clock=clock, ids=Ids(1))
    assert broker.max_receives == DEFAULT_MAX_RECEIVES
    s = WorkerSettings(mode="at-most-once", max_messages=4, name="w-a")
    w = Worker(store=conn, broker=broker, clock=clock, settings=s)
    assert (w.settings, w.mode, w.max_messages, w.name) == (s, Mode.AT_MOST_ONCE, 4, "w-a")
    w = Worker(store=conn, broker=broker, clock=clock, settings=s, name="w-b")
    assert (w.settings.name, w.settings.mode, w.name) == ("w-b", Mode.AT_MOST_ONCE, "w-b")
    w = Worker(store=conn, broker=broker, clock=clock, mode="transactional")
    assert w.settings == WorkerSettings(mode=Mode.TRANSACTIONAL)
    with pytest.raises(InvalidInput) as refused:
        Worker(store=conn, broker=broker, clock=clock, settings={"mode": "idempotent"})
    assert refused.value.field == "settings"
    with pytest.raises(InvalidInput) as refused:
        Worker(store=conn, broker=broker, clock=clock, max_messages=-2)
    assert (refused.value.field, refused.value.value) == ("max_messages", -2)
    with pytest.raises(InvalidInput) as refused:
        Worker(store=conn, broker=broker, clock=clock, hooks=[print])
    assert refused.value.field == "hooks"
    w = Worker(store=conn, broker=broker, clock=clock)
    assert not w.stopping
    w.stop()
    assert w.stopping
    assert w.run_forever() is w.stats  # stopped: returns at once
    conn.close()


class Recorder(Hook):
    """Every point it is called at, in order, with the deliveries' event ids."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def after_receive(self, w, received: Received) -> None:
        self.calls.append(("after_receive", [d.event_id for d in received]))

    def before_process(self, w, d: Delivery) -> None:
        self.calls.append(("before_process", d.event_id))

    def after_lose(self, w, d, recorded) -> None:
        self.calls.append(("after_lose", d.event_id))

    def after_apply(self, w, done) -> None:
        self.calls.append(("after_apply", [(d.event_id, o) for d, o in done]))

    def after_ack(self, w, d) -> None:
        self.calls.append(("after_ack", d.event_id))

    def on_rejected(self, w, d, verb) -> None:
        self.calls.append(("on_rejected", verb))

    def on_ack_failed(self, w, d, detail, in_doubt) -> None:
        self.calls.append(("on_ack_failed", d.event_id))

    def after_nack(self, w, d, delay, error) -> None:
        self.calls.append(("after_nack", d.event_id))

    def after_dead_letter(self, w, d, error) -> None:
        self.calls.append(("after_dead_letter", d.event_id))

    def on_failure(self, w, d, error) -> None:
        self.calls.append(("on_failure", d.event_id))

    def on_crash(self, w, deliveries, point) -> None:
        self.calls.append(("on_crash", point))

    def count(self, point: str) -> int:
        return sum(1 for p, _ in self.calls if p == point)


FAULTS = Faults(seed=5, ack_fail=0.2, ack_answer_lost=0.1, crash_after_receive=0.1,
                crash_after_commit=0.1, process_error=0.15, lose_message=0.05)


@pytest.mark.parametrize("mode", [m.value for m in Mode])
@pytest.mark.parametrize("max_messages", [1, 3])
def test_a_hook_sees_what_the_stats_count(mode, max_messages):
    lab = make_lab(seed=3)
    for i in range(25):
        lab.order(qty=1 + i % 3)
    rec = Recorder()
    w = lab.worker(mode=mode, faults=FAULTS, max_messages=max_messages, hooks=[rec])
    w.run_until_idle()
    s = w.stats
    assert rec.count("after_receive") == s.steps
    assert sum(len(x) for p, x in rec.calls if p == "after_receive") == s.received
    assert rec.count("before_process") == s.received
    applied = [o for p, x in rec.calls if p == "after_apply" for _, o in x]
    assert applied.count(Outcome.APPLIED) == s.applied
    assert applied.count(Outcome.DUPLICATE_SKIPPED) == s.duplicates_skipped
    assert rec.count("after_ack") == s.acked
    assert rec.count("on_ack_failed") == s.ack_failed
    assert rec.count("on_rejected") == s.ack_rejected
    assert rec.count("after_nack") == s.nacked
    assert rec.count("on_crash") == s.crashed
    assert rec.count("after_lose") + rec.count("on_failure") <= s.lost
    # The same run, seen by the trace: one received row per delivery, one applied per effect.
    rows = dict(lab.store.execute("SELECT outcome, count(*) FROM delivery_log GROUP BY 1"))
    assert rows.get("received", 0) == s.received
    assert rows.get("applied", 0) == s.applied
    assert rows.get("crashed", 0) >= s.crashed
    # Every delivery a hook saw received comes before whatever happened to it next.
    first_seen: dict[str, int] = {}
    for i, (point, x) in enumerate(rec.calls):
        if point == "before_process":
            first_seen.setdefault(x, i)
        elif point in ("after_ack", "after_lose", "on_failure", "after_nack"):
            assert first_seen[x] < i


def test_narration_is_a_hook_like_any_other():
    """``echo=`` is the Narration hook: passing it as a hook gives the same lines."""
    def run(**kw) -> int:
        lab = make_lab(seed=4)
        for _ in range(12):
            lab.order()
        lab.worker(mode="at-least-once", faults=FAULTS, **kw).run_until_idle()
        return lab.store.execute("SELECT count(*) FROM delivery_log").fetchone()[0]

    by_echo: list[str] = []
    by_hook: list[str] = []
    rows_echo = run(echo=by_echo.append)
    rows_hook = run(hooks=[Narration(by_hook.append)])
    assert by_echo == by_hook and len(by_echo) > 12 and rows_echo == rows_hook


def test_a_point_no_hook_uses_is_empty_so_it_costs_nothing():
    d = Dispatch([WorkerStats()])
    used = {p for p in POINTS if getattr(d, p)}
    assert used == {"after_receive", "after_lose", "after_apply", "after_ack", "on_rejected",
                    "on_ack_failed", "after_nack", "after_dead_letter", "on_failure",
                    "on_crash"}
    assert all(getattr(Dispatch([Hook()]), p) == () for p in POINTS)
    rec = Recorder()
    both = Dispatch([WorkerStats(), rec])
    assert len(both.after_ack) == 2 and both.on_wait == ()


def test_each_point_is_typed_in_dispatch_as_the_hook_method_is():
    """Dispatch's annotation of each point is a tuple of callables taking what Hook's method
    of that name takes (after ``self``) and returning None: the two cannot drift apart."""
    dispatch = typing.get_type_hints(Dispatch, vars(hooks_module))
    assert set(dispatch) == set(POINTS) == {
        name for name, _ in inspect.getmembers(Hook, inspect.isfunction)
        if not name.startswith("_")}
    for point in POINTS:
        method = typing.get_type_hints(getattr(Hook, point), vars(hooks_module))
        params = [v for k, v in method.items() if k != "return"]
        assert method["return"] is type(None), point
        [callable_type, ellipsis] = typing.get_args(dispatch[point])
        assert ellipsis is Ellipsis, point
        args, returns = typing.get_args(callable_type)
        assert list(args) == params and returns in (None, type(None)), point


def test_a_setting_set_on_the_worker_is_checked_and_takes_effect():
    lab = make_lab(seed=6)
    for _ in range(3):
        lab.order()
    w = lab.worker(mode="at-least-once")
    w.mode = "at-most-once"  # as the panel's reconfigure does
    assert w.mode is Mode.AT_MOST_ONCE and w.settings.mode is Mode.AT_MOST_ONCE
    with pytest.raises(InvalidInput) as refused:
        w.visibility_timeout = -3
    assert (refused.value.field, refused.value.value) == ("visibility_timeout", -3)
    assert w.visibility_timeout == w.settings.visibility_timeout == 2.0
    said: list[str] = []
    w.echo = said.append  # a new echo narrates from the next step on
    w.run_until_idle()
    assert said and all(line.startswith("[worker-1]") for line in said)
    # at-most-once acks first: each message's "acked" line comes before its "applied" one
    for line in said:
        if "applied projection" in line:
            message = line.split(" message=")[1].split()[0]
            acked = [x for x in said if f"message={message} " in x and x.endswith(" acked")]
            assert acked and said.index(acked[0]) < said.index(line)
    w.faults = Faults(seed=1, ack_fail=1.0)
    assert w.settings.faults.ack_fail == 1.0


def test_transactional_is_refused_apart_from_the_store_even_when_set_later():
    conn, other, clock = store.init_db(), store.init_db(), FakeClock()
    apart = SQLiteBroker(other, clock=clock, ids=Ids(1))
    w = Worker(store=conn, broker=apart, clock=clock, mode="idempotent")
    with pytest.raises(InvalidInput) as refused:
        w.mode = "transactional"
    assert refused.value.field == "mode" and w.mode is Mode.IDEMPOTENT
    conn.close()
    other.close()


def test_a_signal_stops_a_worker_or_a_relay_through_their_public_stopping(capsys):
    import signal

    from deliverylab.app.cli import stop_on_signals
    from deliverylab.engine.relay import Relay

    conn, other, clock = store.init_db(), store.init_db(), FakeClock()
    apart = SQLiteBroker(other, clock=clock, ids=Ids(1))
    runners = [Worker(store=conn, broker=apart, clock=clock), Relay(conn, apart, clock=clock)]
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        for runner in runners:
            stop_on_signals(runner, "runner-1")
            assert not runner.stopping
            signal.raise_signal(signal.SIGTERM)  # the first: stop after the current step
            assert runner.stopping
            with pytest.raises(KeyboardInterrupt):  # the second: now
                signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    assert capsys.readouterr().out.count("[runner-1] SIGTERM: stopping after the current") == 2
    conn.close()
    other.close()
