"""Chapter 1's exercises: the order of work decides the guarantee.

The reader writes what a worker does with one delivery, ``process(delivery, ops)``, and the
checker's own rule for one order. Wrong answers kept here are the ones a reader is likely to
write first; the tests make sure the grader rejects each for the stated reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..brokers.base import Delivery
from ..engine.check import event_states
from ..engine.faults import Faults
from .grader import Exercise, Ops, Trial, describe_faults, judge, order_trace, register, run_workers

# -- 1.1 apply, then acknowledge -----------------------------------------------------------
ACK_AFTER = dict(crash_after_receive=0.2, crash_after_commit=0.1)
ACK_AFTER_RECEIVES = 10  # a correct worker is dead-lettered with odds below 1 in 10**5


def ack_after_solution(delivery: Delivery, ops: Ops) -> None:
    ops.apply(delivery)  # the effect commits first...
    ops.ack(delivery)    # ...then the queue may forget the message


def ack_first(delivery: Delivery, ops: Ops) -> None:
    ops.ack(delivery)
    ops.apply(delivery)


def never_ack(delivery: Delivery, ops: Ops) -> None:
    ops.apply(delivery)


def run_ack_after(process: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **ACK_AFTER)
    run, _ = run_workers(process=process, seed=seed, faults=faults, orders=30,
                         max_receives=ACK_AFTER_RECEIVES)
    dead = [r[0] for r in run.lab.conn.execute(
        "SELECT correlation_id FROM dead_letters ORDER BY dead_at, message_id")]
    extra = ([f"{len(dead)} messages went to the dead letters after {ACK_AFTER_RECEIVES}"
              " deliveries: they were never acknowledged"] if dead else [])
    return judge(run.lab, seed=seed, faults=describe_faults(faults, orders=30),
                 allow_duplicates=True, errors=run.errors, extra_failures=extra, focus=dead)


register(Exercise(
    id="ack-after", chapter=1, title="Apply, then acknowledge (at-least-once)",
    run=run_ack_after, solution=ack_after_solution, starter=ack_first,
    wrong=(("lost", ack_first), ("never acknowledged", never_ack))))


# -- 1.2 at most once, for real ------------------------------------------------------------
AT_MOST = dict(ack_fail=0.3, crash_after_receive=0.1)


def at_most_once_solution(delivery: Delivery, ops: Ops) -> None:
    if ops.ack(delivery):    # only once the queue confirmed it has forgotten the message...
        ops.apply(delivery)  # ...is it safe to work without ever working twice


def apply_then_ack(delivery: Delivery, ops: Ops) -> None:
    ops.apply(delivery)
    ops.ack(delivery)


def ack_unconfirmed(delivery: Delivery, ops: Ops) -> None:
    ops.ack(delivery)
    ops.apply(delivery)


def ack_only(delivery: Delivery, ops: Ops) -> None:
    ops.ack(delivery)


def run_at_most_once(process: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **AT_MOST)
    run, _ = run_workers(process=process, seed=seed, faults=faults, orders=30)
    conn = run.lab.conn
    crashed = {r[0] for r in conn.execute(
        "SELECT DISTINCT correlation_id FROM delivery_log WHERE outcome IN"
        " ('crashed', 'dead_lettered')")}
    # At-most-once may lose what a crash (or the dead letters) took, and nothing else.
    needless = [o for o, *_, s in event_states(conn)
                if s in ("lost", "dead_lettered") and o not in crashed]
    extra = ([f"{len(needless)} orders lost though no crash struck them: at-most-once may"
              " lose only what a crash takes"] if needless else [])
    return judge(run.lab, seed=seed, faults=describe_faults(faults, orders=30),
                 allow_lost=True, errors=run.errors, extra_failures=extra, focus=needless)


register(Exercise(
    id="at-most-once", chapter=1, title="Never twice (at-most-once)",
    run=run_at_most_once, solution=at_most_once_solution, starter=apply_then_ack,
    wrong=(("duplicated", apply_then_ack), ("duplicated", ack_unconfirmed),
           ("lost though no crash", ack_only))))


# -- 1.3 the checker's rule ----------------------------------------------------------------
CLASSIFY_MODES = ("at-most-once", "at-least-once", "idempotent")
CLASSIFY = dict(ack_fail=0.3, crash_after_receive=0.15, crash_after_commit=0.1)


def classify_solution(outcomes: list[str]) -> str:
    applied = outcomes.count("applied")  # processing, not delivery: count the effects
    if applied == 0:
        return "lost"
    return "correct" if applied == 1 else "duplicated"


def classify_by_deliveries(outcomes: list[str]) -> str:
    received = outcomes.count("received")
    if received == 0:
        return "lost"
    return "correct" if received == 1 else "duplicated"


def classify_by_acks(outcomes: list[str]) -> str:
    acked = outcomes.count("acked")
    if acked == 0:
        return "lost"
    return "correct" if acked == 1 else "duplicated"


def _engine_process(mode: str) -> Callable[[Delivery, Ops], None]:
    if mode == "at-most-once":
        return at_most_once_solution
    if mode == "at-least-once":
        return ack_after_solution

    def idempotent(delivery: Delivery, ops: Ops) -> None:
        with ops.transaction():
            ops.apply(delivery)
        ops.ack(delivery)
    return idempotent


def _inbox_handler(conn: Any, delivery: Delivery) -> None:
    from ..engine.worker import apply_order_placed

    if conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                    " VALUES ('inventory', ?, 0) ON CONFLICT DO NOTHING",
                    (delivery.event_id,)).rowcount:
        apply_order_placed(conn, delivery)


def run_classify(classify: Callable[[list[str]], Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **CLASSIFY)
    wrong: list[tuple[str, str, Any]] = []
    first_conn = None
    errors: list[str] = []
    for mode in CLASSIFY_MODES:
        handler = {"handler": _inbox_handler} if mode == "idempotent" else {}
        run, _ = run_workers(process=_engine_process(mode), seed=seed, faults=faults,
                             orders=10, mode=mode, **handler)
        conn = run.lab.conn
        for order_id, *_, state in event_states(conn):
            truth = "lost" if state in ("lost", "dead_lettered") else state
            outcomes = [r[0] for r in conn.execute(
                "SELECT outcome FROM delivery_log WHERE correlation_id = ? ORDER BY seq",
                (order_id,))]
            try:
                said = classify(list(outcomes))
            except Exception as exc:  # the reader's code: report it, keep grading
                said = f"an error ({type(exc).__name__}: {exc})"
                if not errors:
                    errors.append(f"{type(exc).__name__}: {exc} (order {order_id})")
            if said != truth:
                wrong.append((order_id, truth, said))
                if first_conn is None:
                    first_conn = conn
    where = describe_faults(faults, orders=10, extra="modes " + ", ".join(CLASSIFY_MODES))
    if not wrong:
        return Trial(seed=seed, faults=where, passed=True, reason="")
    order_id, truth, said = wrong[0]
    reason = (f"misjudged {len(wrong)} of {10 * len(CLASSIFY_MODES)} orders; order {order_id}"
              f" was {truth}, you said {said!r}")
    if errors:
        reason = f"your code raised {errors[0]}; " + reason
    return Trial(seed=seed, faults=where, passed=False, reason=reason,
                 trace=order_trace(first_conn, order_id))


register(Exercise(
    id="classify", chapter=1, title="The checker's rule: delivery is not processing",
    run=run_classify, solution=classify_solution, starter=classify_by_deliveries,
    params=("outcomes",),
    wrong=(("misjudged", classify_by_deliveries), ("misjudged", classify_by_acks))))
