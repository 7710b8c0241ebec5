"""A Hypothesis stateful model of queue + worker + faults.

Two workers receive, process, ack, lose acks, crash and let leases run out in any order
Hypothesis can think of, while orders keep arriving. Each worker phase calls the engine's own
code: ``Queue.receive`` / ``Queue.ack``, the worker's guarded apply (inbox + UPSERT under a
savepoint), its nack-with-backoff / dead-letter path, and for ``transactional`` its
apply-and-ack transaction. After every step the log and the projection must agree; once the
queue is drained (and dead letters redriven) each mode must have kept its promise:

* ``at-most-once`` never applies an order twice;
* ``at-least-once`` never loses an order;
* ``idempotent`` and ``transactional`` do neither: every order exactly once.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support.engine import make_lab

from deliverylab.engine.check import check, event_states
from deliverylab.engine.errors import SimulatedCrash
from deliverylab.engine.store import transaction
from deliverylab.engine.worker import Mode

VT = 2.0
MAX_RECEIVES = 4
ITEMS = ["coffee-beans", "tea", "milk"]
WORKER = st.integers(0, 1)
PICK = st.integers(0, 5)


class DeliveryModel(RuleBasedStateMachine):
    mode: Mode = Mode.IDEMPOTENT

    def __init__(self) -> None:
        super().__init__()
        self.lab = make_lab(seed=0)
        self.workers = [self.lab.worker(mode=self.mode, name=f"w{k}", max_receives=MAX_RECEIVES,
                                        backoff_base=0.5, backoff_cap=4.0) for k in range(2)]
        # What the workers hold: [worker index, delivery, phase]. The phase is "received",
        # then "acked" (at-most-once: acked, not yet applied) or "applied" (not yet acked).
        self.held: list[list] = []

    # -- helpers -------------------------------------------------------------------------------
    @property
    def _before_effect(self) -> str:
        return "acked" if self.mode is Mode.AT_MOST_ONCE else "received"

    @property
    def _before_ack(self) -> str:
        return "received" if self.mode is Mode.AT_MOST_ONCE else "applied"

    def _eligible(self, phase: str) -> list[list]:
        return [h for h in self.held if h[2] == phase]

    def _pick(self, i: int, phase: str) -> list:
        eligible = self._eligible(phase)
        return eligible[i % len(eligible)]

    def _apply(self, k: int, d) -> None:
        w = self.workers[k]
        with transaction(w.conn):
            applied, error = w._apply_guarded(d)
        assert error is None

    # -- rules ---------------------------------------------------------------------------------
    @rule(item=st.sampled_from(ITEMS), qty=st.integers(1, 5))
    def place_order(self, item, qty):
        self.lab.order(item, qty)

    @rule(k=WORKER, n=st.integers(1, 3))
    def receive(self, k, n):
        w = self.workers[k]
        for d in w.broker.receive(VT, n, worker=w.name):
            self.held.append([k, d, "received"])

    @precondition(lambda self: self._eligible(self._before_effect))
    @rule(i=PICK)
    def process(self, i):
        """The effect. at-most-once applies only what it acked; transactional applies and
        acks in one transaction; the others apply and leave the ack for later."""
        held = self._pick(i, self._before_effect)
        k, d, _ = held
        if self.mode is Mode.TRANSACTIONAL:
            self.workers[k].handle([d])
            self.held.remove(held)
        elif self.mode is Mode.AT_MOST_ONCE:
            self._apply(k, d)
            self.held.remove(held)
        else:
            self._apply(k, d)
            held[2] = "applied"

    @precondition(lambda self: self.mode is not Mode.TRANSACTIONAL
                  and self._eligible(self._before_ack))
    @rule(i=PICK)
    def ack(self, i):
        held = self._pick(i, self._before_ack)
        k, d, _ = held
        w = self.workers[k]
        if w.broker.ack(d, worker=w.name) and self.mode is Mode.AT_MOST_ONCE:
            held[2] = "acked"
        else:  # settled, or (at-most-once) stale: someone else holds it, so do not process
            self.held.remove(held)

    @precondition(lambda self: self.mode is not Mode.TRANSACTIONAL
                  and self._eligible(self._before_ack))
    @rule(i=PICK)
    def ack_lost(self, i):
        """The ACK never reaches the queue; the worker moves on."""
        self.held.remove(self._pick(i, self._before_ack))

    @precondition(lambda self: self._eligible(self._before_effect))
    @rule(i=PICK)
    def processing_error(self, i):
        """The handler fails: nack with backoff, or dead-letter after MAX_RECEIVES (in
        at-most-once the ACK went first, so the effect is simply gone)."""
        held = self._pick(i, self._before_effect)
        k, d, _ = held
        if self.mode is not Mode.AT_MOST_ONCE:
            self.workers[k]._retry_or_dead_letter(d, "RuntimeError: model says no")
        self.held.remove(held)

    @precondition(lambda self: self.mode is not Mode.AT_MOST_ONCE
                  and self._eligible("received"))
    @rule(i=PICK)
    def crash_before_commit(self, i):
        """The worker dies inside the effect's transaction: the effect is undone."""
        held = self._pick(i, "received")
        k, d, _ = held
        w = self.workers[k]
        try:
            with transaction(w.conn):
                w._apply_guarded(d)
                raise SimulatedCrash("model crash before commit")
        except SimulatedCrash:
            pass
        self.held = [h for h in self.held if h[0] != k]

    @rule(seconds=st.sampled_from([0.5, 1.0, VT, 3 * VT]))
    def time_passes(self, seconds):
        """Leases run out: what a worker still holds may be redelivered to the other."""
        self.lab.clock.advance(seconds)

    @rule(k=WORKER)
    def crash(self, k):
        """The worker dies and forgets everything it held; the leases will run out."""
        self.held = [h for h in self.held if h[0] != k]

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def projection_matches_the_log(self):
        applied = defaultdict(int)
        for _, item, qty, _, n, _ in event_states(self.lab.store):
            applied[item] += qty * n
        assert self.lab.projection() == {k: v for k, v in applied.items() if v}

    @invariant()
    def never_double_applies_unless_at_least_once(self):
        if self.mode is not Mode.AT_LEAST_ONCE:
            assert check(self.lab.store).duplicated == 0

    def teardown(self):
        try:
            self._drain_and_judge()
        finally:
            self.lab.store.close()

    def _drain_and_judge(self):
        self.held = []  # every worker crashes; a fresh one drains the queue
        self.lab.clock.advance(3 * VT)
        cleaner = self.lab.worker(mode=self.mode, name="drain", max_receives=MAX_RECEIVES)
        for _ in range(10):
            self.lab.drain(cleaner)
            if not self.lab.broker.redrive():
                break
        result = check(self.lab.store)
        assert result.pending == 0 and result.dead_lettered == 0
        if self.mode is Mode.AT_MOST_ONCE:
            assert result.duplicated == 0, result.verdict
        elif self.mode is Mode.AT_LEAST_ONCE:
            assert result.lost == 0, result.verdict
        else:
            assert result.ok, result.verdict


MODEL_SETTINGS = settings(max_examples=60, stateful_step_count=30, derandomize=True,
                          database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])


def _machine(mode: Mode) -> type[DeliveryModel]:
    return type(f"DeliveryModel_{mode.name}", (DeliveryModel,), {"mode": mode})


@pytest.mark.parametrize("mode", list(Mode), ids=[m.value for m in Mode])
def test_each_mode_keeps_its_promise_under_any_interleaving(mode):
    run_state_machine_as_test(_machine(mode), settings=MODEL_SETTINGS)
