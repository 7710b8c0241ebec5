"""Chapter 2's exercises: the lost ACK, the late worker, and which fault hurts which mode.

The first two take ``process(delivery, ops)``; the third asks the reader to predict, as a
function, what the engine's real worker modes do under each fault, and runs them to see.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..book.lab import run_scenario
from ..brokers.base import Delivery
from ..engine.faults import Faults
from .crew import pausing_process
from .grader import Exercise, Ops, Trial, describe_faults, judge, order_trace, register, run_workers

# -- 2.1 effect and ACK in one transaction -------------------------------------------------
TX = dict(ack_fail=0.3, ack_answer_lost=0.1, crash_after_receive=0.1, crash_after_commit=0.1)


def tx_ack_solution(delivery: Delivery, ops: Ops) -> None:
    with ops.transaction():     # one commit: the effect and the delete of the message
        ops.apply(delivery)
        ops.ack(delivery)


def separate_commits(delivery: Delivery, ops: Ops) -> None:
    ops.apply(delivery)
    ops.ack(delivery)


def ack_outside(delivery: Delivery, ops: Ops) -> None:
    with ops.transaction():
        ops.apply(delivery)
    ops.ack(delivery)


def run_tx_ack(process: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **TX)
    run, _ = run_workers(process=process, seed=seed, faults=faults, orders=30, workers=2)
    return judge(run.lab, seed=seed, faults=describe_faults(faults, workers=2, orders=30),
                 errors=run.errors)


register(Exercise(
    id="tx-ack", chapter=2, title="Effect and ACK in one transaction",
    run=run_tx_ack, solution=tx_ack_solution, starter=separate_commits,
    wrong=(("duplicated", separate_commits), ("duplicated", ack_outside))))


# -- 2.2 the late worker -------------------------------------------------------------------
LATE_LEASE = 2.0
LATE_WORK = (0.5, 2.0, 3.0)  # seconds of work: well inside the lease, exactly it, past it
LATE = dict(crash_after_receive=0.1, ack_fail=0.2, ack_answer_lost=0.1)
LATE_PAUSE = 0.3             # a stall between two verbs, about one lease long
LATE_RECEIVES = 10
# A slow delivery is overtaken by the next one: ten receives make a run of slow ones that
# dead-letters a correct worker's message rarer than 1 in 10**5.


def late_work(faults: Faults) -> Callable[[Delivery], float]:
    """Each delivery's work, chosen by the seed: a third finish well inside the lease, a
    third take exactly the lease, a third outlast it."""
    def work(d: Delivery) -> float:
        u = faults.uniform("slow", d.event_id, d.delivery_count)
        return LATE_WORK[min(int(u * len(LATE_WORK)), len(LATE_WORK) - 1)]
    return work


def late_worker_solution(delivery: Delivery, ops: Ops) -> None:
    ops.work(ops.work_left)
    late = ops.now() >= delivery.lease_until
    if late and not ops.extend(delivery, ops.visibility_timeout):
        return  # another delivery holds the message now: it does the effect, not this one
    # Renewed or not, the lease may still run out before the commit (a stall). Inside the
    # transaction the ACK is the delete of the message row: it fails only if this delivery
    # lost the message, and then the effect is undone with it.
    with ops.transaction():
        ops.apply(delivery)
        if not ops.ack(delivery):
            raise ops.Rollback


def late_worker_starter(delivery: Delivery, ops: Ops) -> None:
    """Do the delivery's work (``ops.work(ops.work_left)``, sometimes longer than the lease),
    then its effect, exactly once per order though a late worker and the worker that took
    over its message may both finish it."""


def late_ignores_ack(delivery: Delivery, ops: Ops) -> None:
    ops.work(ops.work_left)
    with ops.transaction():
        ops.apply(delivery)
        ops.ack(delivery)


def late_skips_work(delivery: Delivery, ops: Ops) -> None:
    with ops.transaction():
        ops.apply(delivery)
        if not ops.ack(delivery):
            raise ops.Rollback


def run_late_worker(process: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **LATE)
    hostile = pausing_process(process, faults, pause=LATE_PAUSE, lease=LATE_LEASE)
    run, _ = run_workers(process=hostile, seed=seed, faults=faults, orders=20, workers=2,
                         work=late_work(faults), visibility_timeout=LATE_LEASE,
                         max_receives=LATE_RECEIVES)
    where = describe_faults(faults, workers=2, orders=20,
                            extra="work " + ", ".join(f"{w:g}" for w in LATE_WORK)
                                  + f"s; {LATE_LEASE:g}s lease; stalls {LATE_PAUSE:g}")
    return judge(run.lab, seed=seed, faults=where, errors=run.errors)


register(Exercise(
    id="late-worker", chapter=2, title="The late worker rolls back",
    run=run_late_worker, solution=late_worker_solution, starter=late_worker_starter,
    wrong=(("duplicated", late_ignores_ack), ("work left", late_skips_work))))


# -- 2.3 which fault hurts which mode ------------------------------------------------------
MODES = ("at-most-once", "at-least-once", "idempotent", "transactional")
FAULTS = ("ack_fail", "ack_answer_lost", "crash_after_receive", "crash_after_commit",
          "lose_message", "process_error")
PREDICT_RATE = 0.3
PREDICT_ORDERS = 20


def predict_solution(mode: str, fault: str) -> str:
    if fault == "lose_message":  # auto-acked in transit: no worker ever sees it
        return "lost"
    if mode in ("idempotent", "transactional"):
        return "correct"         # the inbox, or the ACK inside the effect's commit
    acks_first = mode == "at-most-once"
    if fault == "ack_fail":      # the queue never heard the ACK: the message comes back
        return "correct" if acks_first else "duplicated"  # (applied only once confirmed)
    if fault == "ack_answer_lost":  # deleted, though the worker saw the ACK fail
        return "lost" if acks_first else "correct"
    if fault in ("crash_after_receive", "process_error"):  # before the effect
        return "lost" if acks_first else "correct"
    if fault == "crash_after_commit":  # after the effect, before the ACK
        return "correct" if acks_first else "duplicated"
    return "correct"


def predict_starter(mode: str, fault: str) -> str:
    """What the engine's worker in ``mode`` (one of :data:`MODES`) does to orders when
    ``fault`` (one of :data:`FAULTS`) strikes 30 % of deliveries, nothing else failing:
    ``"lost"``, ``"duplicated"`` or ``"correct"``."""


def predict_by_name(mode: str, fault: str) -> str:
    return {"at-most-once": "lost", "at-least-once": "duplicated"}.get(mode, "correct")


def predict_all_correct(mode: str, fault: str) -> str:
    return "correct"


def _truth(lab: Any) -> tuple[str, str | None]:
    """What the checker saw (dead letters aside), and one order that shows it."""
    from ..engine.check import event_states

    states = event_states(lab.store)
    for kind in ("lost", "duplicated"):
        hit = [o for o, *_, s in states if s == kind]
        if hit:
            return kind, hit[0]
    return "correct", states[0][0] if states else None


def _scenario(mode: str, fault: str, seed: int) -> Any:
    faults = Faults.from_rates(seed=seed, **{fault: PREDICT_RATE})
    return run_scenario(mode=mode, orders=PREDICT_ORDERS, faults=faults, seed=seed)


@functools.lru_cache(maxsize=4096)
def _scenario_truth(mode: str, fault: str, seed: int) -> tuple[str, str | None]:
    """The engine's answer does not depend on the submission: run each scenario once."""
    return _truth(_scenario(mode, fault, seed))


def run_predict(predict: Callable[[str, str], Any], seed: int) -> Trial:
    misses: list[tuple[str, str, str, Any, str | None]] = []
    errors: list[str] = []
    for mode in MODES:
        for fault in FAULTS:
            truth, example = _scenario_truth(mode, fault, seed)
            try:
                said = predict(mode, fault)
            except Exception as exc:  # the reader's code: report it, keep grading
                said = f"an error ({type(exc).__name__})"
                if not errors:
                    errors.append(f"{type(exc).__name__}: {exc} (for {mode}, {fault})")
            if said != truth:
                misses.append((mode, fault, truth, said, example))
    where = (f"each fault alone at rate {PREDICT_RATE:g}; the engine's 4 worker modes;"
             f" {PREDICT_ORDERS} orders each")
    if not misses:
        return Trial(seed=seed, faults=where, passed=True, reason="")
    mode, fault, truth, said, example = misses[0]
    reason = (f"wrong for {len(misses)} of {len(MODES) * len(FAULTS)} (mode, fault) pairs;"
              f" {mode} under {fault} gave {truth}, you said {said!r}")
    if errors:
        reason = f"your code raised {errors[0]}; " + reason
    trace = order_trace(_scenario(mode, fault, seed).store, example) if example else ""
    return Trial(seed=seed, faults=where, passed=False, reason=reason, trace=trace)


register(Exercise(
    id="predict-faults", chapter=2, title="Which fault hurts which mode",
    run=run_predict, solution=predict_solution, starter=predict_starter,
    params=("mode", "fault"),
    wrong=(("wrong for", predict_by_name), ("wrong for", predict_all_correct))))
