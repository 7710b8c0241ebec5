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
ACK_AFTER = dict(crash_after_receive=0.2, crash_after_commit=0.1, ack_fail=0.2,
                 ack_answer_lost=0.1)
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
    dead = [r[0] for r in run.lab.store.execute(
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
AT_MOST = dict(ack_fail=0.3, ack_answer_lost=0.1, crash_after_receive=0.1,
               crash_after_commit=0.1)
ANSWER_LOST = "%answer never came back%"  # how the delivery log notes a lost ACK answer


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
    conn = run.lab.store
    crashed = {r[0] for r in conn.execute(
        "SELECT DISTINCT correlation_id FROM delivery_log WHERE outcome IN"
        " ('crashed', 'dead_lettered') OR (outcome = 'ack_failed' AND detail LIKE ?)",
        (ANSWER_LOST,))}
    # At-most-once may lose what a crash, a lost ACK answer (the worker cannot tell it from a
    # lost request) or the dead letters took, and nothing else.
    needless = [o for o, *_, s in event_states(conn)
                if s in ("lost", "dead_lettered") and o not in crashed]
    extra = ([f"{len(needless)} orders lost though no crash struck them: at-most-once may"
              " lose only what a crash or a lost ACK answer takes"] if needless else [])
    return judge(run.lab, seed=seed, faults=describe_faults(faults, orders=30),
                 allow_lost=True, errors=run.errors, extra_failures=extra, focus=needless)


register(Exercise(
    id="at-most-once", chapter=1, title="Never twice (at-most-once)",
    run=run_at_most_once, solution=at_most_once_solution, starter=apply_then_ack,
    wrong=(("duplicated", apply_then_ack), ("duplicated", ack_unconfirmed),
           ("lost though no crash", ack_only))))


# -- 1.3 the checker's rule ----------------------------------------------------------------
CLASSIFY_MODES = ("at-most-once", "at-least-once", "idempotent")
CLASSIFY = dict(ack_fail=0.3, ack_answer_lost=0.1, crash_after_receive=0.15,
                crash_after_commit=0.1)
CLASSIFY_ORDERS = 12
CLASSIFY_RECEIVES = 3   # a few messages use up their receives: dead letters, applied or not
STATES = ("correct", "duplicated", "lost", "pending")


def classify_solution(orders: list[str], log: list[tuple[str, str]],
                      queued: set[str]) -> dict[str, str]:
    # Processing, not delivery: count the effects each order had, from the log.
    applied = dict.fromkeys(orders, 0)
    for order_id, outcome in log:
        if outcome == "applied":
            applied[order_id] += 1
    states = {}
    for order_id, n in applied.items():
        if n == 1:
            states[order_id] = "correct"      # acked or not, dead-lettered or not
        elif n > 1:
            states[order_id] = "duplicated"
        elif order_id in queued:
            states[order_id] = "pending"      # a message left may still apply it
        else:
            states[order_id] = "lost"         # never applied, nothing left to apply it
    return states


def classify_starter(orders: list[str], log: list[tuple[str, str]],
                     queued: set[str]) -> dict[str, str]:
    """Judge a run that may have been stopped at any moment. ``orders``: every order id;
    ``log``: the delivery log as ``(order_id, outcome)`` rows in the order they happened;
    ``queued``: the orders with a message still in the queue (visible, leased or waiting).
    Return each order's state: ``"correct"``, ``"duplicated"``, ``"lost"`` or
    ``"pending"``."""


def classify_by_deliveries(orders: list[str], log: list[tuple[str, str]],
                           queued: set[str]) -> dict[str, str]:
    received = {o: sum(1 for i, out in log if i == o and out == "received") for o in orders}
    return {o: "lost" if n == 0 else "correct" if n == 1 else "duplicated"
            for o, n in received.items()}


def classify_by_acks(orders: list[str], log: list[tuple[str, str]],
                     queued: set[str]) -> dict[str, str]:
    acked = {o: sum(1 for i, out in log if i == o and out == "acked") for o in orders}
    return {o: ("pending" if o in queued else "lost") if n == 0
            else "correct" if n == 1 else "duplicated" for o, n in acked.items()}


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


def run_classify(classify: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed, **CLASSIFY)
    wrong: list[tuple[str, str, Any]] = []
    first_conn = None
    errors: list[str] = []
    total = 0
    for i, mode in enumerate(CLASSIFY_MODES):
        handler: dict[str, Any] = {"handler": _inbox_handler} if mode == "idempotent" else {}
        # Stopped at a seeded moment: some orders still queued, some held mid-delivery.
        steps = 4 + (seed * 7 + i * 11) % 40
        run, _ = run_workers(process=_engine_process(mode), seed=seed, faults=faults,
                             orders=CLASSIFY_ORDERS, workers=2, mode=mode,
                             max_receives=CLASSIFY_RECEIVES, max_steps=steps, **handler)
        conn = run.lab.store
        truth = {o: "lost" if s == "dead_lettered" else s for o, *_, s in event_states(conn)}
        total += len(truth)
        log = [(o, out) for o, out in conn.execute(
            "SELECT correlation_id, outcome FROM delivery_log WHERE correlation_id IS NOT NULL"
            " ORDER BY seq")]
        queued = {r[0] for r in conn.execute("SELECT correlation_id FROM queue_messages")}
        try:
            said = classify(list(truth), list(log), set(queued))
            if not isinstance(said, dict):
                raise TypeError(f"returned {type(said).__name__}, not a dict")
        except Exception as exc:  # the reader's code: report it, keep grading
            said = {}
            if not errors:
                errors.append(f"{type(exc).__name__}: {exc} ({mode})")
        for order_id, state in truth.items():
            if said.get(order_id) != state:
                wrong.append((order_id, state, said.get(order_id)))
                if first_conn is None:
                    first_conn = conn
    where = describe_faults(faults, workers=2, orders=CLASSIFY_ORDERS,
                            extra=f"{CLASSIFY_RECEIVES} receives; stopped mid-run; modes "
                                  + ", ".join(CLASSIFY_MODES))
    if not wrong:
        return Trial(seed=seed, faults=where, passed=True, reason="")
    order_id, truth_state, said_state = wrong[0]
    assert first_conn is not None  # kept with the first wrong answer
    reason = (f"misjudged {len(wrong)} of {total} orders; order {order_id} was"
              f" {truth_state}, you said {said_state!r}")
    if errors:
        reason = f"your code raised {errors[0]}; " + reason
    return Trial(seed=seed, faults=where, passed=False, reason=reason,
                 trace=order_trace(first_conn, order_id))


register(Exercise(
    id="classify", chapter=1, title="The checker's rule: delivery is not processing",
    run=run_classify, solution=classify_solution, starter=classify_starter,
    params=("orders", "log", "queued"),
    wrong=(("misjudged", classify_by_deliveries), ("misjudged", classify_by_acks))))
