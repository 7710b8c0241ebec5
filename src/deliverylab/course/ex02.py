"""Chapter 2's exercises: the lost ACK, the late worker, and which fault hurts which mode.

The first two take ``process(delivery, ops)``; the third asks the reader to predict, as a
function, what the engine's real worker modes do under each fault, and runs them to see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..book.lab import run_scenario
from ..brokers.base import Delivery
from ..engine.faults import Faults
from .grader import Exercise, Ops, Trial, describe_faults, judge, order_trace, register, run_workers

# -- 2.1 effect and ACK in one transaction -------------------------------------------------
TX = dict(ack_fail=0.3, crash_after_receive=0.1, crash_after_commit=0.1)


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
LATE_SLOW, LATE_FAST, LATE_SLOW_SHARE = 3.0, 0.5, 0.25  # seconds of work; a 2-second lease
LATE = dict(crash_after_receive=0.1)
# Each slow delivery is overtaken by the next one: ten receives make a run of slow ones that
# dead-letters a correct worker's message rarer than 1 in 10**5.


def late_work(faults: Faults) -> Callable[[Delivery], float]:
    """A quarter of the deliveries (chosen by the seed) outlast their lease."""
    def work(d: Delivery) -> float:
        slow = faults.uniform("slow", d.event_id, d.delivery_count) < LATE_SLOW_SHARE
        return LATE_SLOW if slow else LATE_FAST
    return work


def late_worker_solution(delivery: Delivery, ops: Ops) -> None:
    ops.work(ops.work_left)
    with ops.transaction():
        ops.apply(delivery)
        if not ops.ack(delivery):   # another delivery holds the message now:
            raise ops.Rollback      # undo the effect with the failed ACK


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
    run, _ = run_workers(process=process, seed=seed, faults=faults, orders=20, workers=2,
                         work=late_work(faults), visibility_timeout=2.0, max_receives=10)
    where = describe_faults(faults, workers=2, orders=20,
                            extra=f"work {LATE_FAST:g}s, or {LATE_SLOW:g}s for"
                                  f" {LATE_SLOW_SHARE:.0%} of deliveries; 2s lease")
    return judge(run.lab, seed=seed, faults=where, errors=run.errors)


register(Exercise(
    id="late-worker", chapter=2, title="The late worker rolls back",
    run=run_late_worker, solution=late_worker_solution, starter=late_ignores_ack,
    wrong=(("duplicated", late_ignores_ack), ("work left", late_skips_work))))


# -- 2.3 which fault hurts which mode ------------------------------------------------------
MODES = ("at-most-once", "at-least-once", "idempotent", "transactional")
FAULTS = ("ack_fail", "crash_after_receive", "crash_after_commit")
PREDICT_RATE = 0.3
PREDICT_ORDERS = 20


def predict_solution(mode: str, fault: str) -> str:
    if mode == "at-most-once":        # acks first: only a crash before the effect hurts
        return "lost" if fault == "crash_after_receive" else "correct"
    if mode == "at-least-once":       # acks last: anything that stops the ACK repeats it
        return "correct" if fault == "crash_after_receive" else "duplicated"
    return "correct"                  # the inbox, or the ACK inside the commit


def predict_by_name(mode: str, fault: str) -> str:
    return {"at-most-once": "lost", "at-least-once": "duplicated"}.get(mode, "correct")


def predict_all_correct(mode: str, fault: str) -> str:
    return "correct"


def _truth(lab: Any) -> tuple[str, str | None]:
    """What the checker saw (dead letters aside), and one order that shows it."""
    from ..engine.check import event_states

    states = event_states(lab.conn)
    for kind in ("lost", "duplicated"):
        hit = [o for o, *_, s in states if s == kind]
        if hit:
            return kind, hit[0]
    return "correct", states[0][0] if states else None


def run_predict(predict: Callable[[str, str], Any], seed: int) -> Trial:
    misses: list[tuple[str, str, str, Any, Any, str | None]] = []
    errors: list[str] = []
    for mode in MODES:
        for fault in FAULTS:
            faults = Faults.from_rates(seed=seed, **{fault: PREDICT_RATE})
            lab = run_scenario(mode=mode, orders=PREDICT_ORDERS, faults=faults, seed=seed)
            truth, example = _truth(lab)
            try:
                said = predict(mode, fault)
            except Exception as exc:  # the reader's code: report it, keep grading
                said = f"an error ({type(exc).__name__})"
                if not errors:
                    errors.append(f"{type(exc).__name__}: {exc} (for {mode}, {fault})")
            if said != truth:
                misses.append((mode, fault, truth, said, lab, example))
    where = (f"each fault alone at rate {PREDICT_RATE:g}; the engine's 4 worker modes;"
             f" {PREDICT_ORDERS} orders each")
    if not misses:
        return Trial(seed=seed, faults=where, passed=True, reason="")
    mode, fault, truth, said, lab, example = misses[0]
    reason = (f"wrong for {len(misses)} of {len(MODES) * len(FAULTS)} (mode, fault) pairs;"
              f" {mode} under {fault} gave {truth}, you said {said!r}")
    if errors:
        reason = f"your code raised {errors[0]}; " + reason
    trace = order_trace(lab.conn, example) if example else ""
    return Trial(seed=seed, faults=where, passed=False, reason=reason, trace=trace)


register(Exercise(
    id="predict-faults", chapter=2, title="Which fault hurts which mode",
    run=run_predict, solution=predict_solution, starter=predict_by_name,
    params=("mode", "fault"),
    wrong=(("wrong for", predict_by_name), ("wrong for", predict_all_correct))))
