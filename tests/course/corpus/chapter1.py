"""Chapter 1: apply then acknowledge, at-most-once for real, the checker's rule."""

from __future__ import annotations

from collections import Counter
from itertools import groupby

from deliverylab.course.ex01 import (
    ack_first,
    ack_only,
    ack_unconfirmed,
    apply_then_ack,
    classify_by_acks,
    classify_by_deliveries,
    never_ack,
)

CHAPTER = 1


# -- ack-after: wrong ------------------------------------------------------------------------
def ack_confirmed_then_apply(delivery, ops):
    if ops.ack(delivery):  # "the queue confirmed, so the message is mine"
        ops.apply(delivery)


def redelivery_means_done(delivery, ops):
    if delivery.delivery_count > 1:  # "it came back, so we did it already"
        ops.ack(delivery)
        return
    ops.apply(delivery)
    ops.ack(delivery)


# -- ack-after: correct ----------------------------------------------------------------------
def nack_when_the_ack_fails(delivery, ops):
    ops.apply(delivery)
    if not ops.ack(delivery):
        ops.nack(delivery)  # give it back now rather than when the lease runs out


def effect_and_ack_in_one_commit(delivery, ops):
    with ops.transaction():
        ops.apply(delivery)
        ops.ack(delivery)


def ack_retried_a_few_times(delivery, ops):
    ops.apply(delivery)
    for _ in range(3):
        if ops.ack(delivery):
            return


# -- at-most-once: wrong ---------------------------------------------------------------------
def apply_when_the_ack_failed(delivery, ops):
    if not ops.ack(delivery):
        ops.apply(delivery)


def commit_then_ack(delivery, ops):
    with ops.transaction():
        ops.apply(delivery)
    if ops.ack(delivery):
        return


# -- at-most-once: correct -------------------------------------------------------------------
def first_delivery_only(delivery, ops):
    if delivery.delivery_count == 1:  # a redelivery may have been applied: drop it
        ops.apply(delivery)
    ops.ack(delivery)


def ack_inside_the_commit(delivery, ops):
    with ops.transaction():
        if not ops.ack(delivery):
            raise ops.Rollback
        ops.apply(delivery)


def ack_retried_once(delivery, ops):
    if ops.ack(delivery) or ops.ack(delivery):
        ops.apply(delivery)


# -- classify: wrong -------------------------------------------------------------------------
def no_pending(orders, log, queued):
    applied = Counter(o for o, out in log if out == "applied")
    return {o: "correct" if applied[o] == 1 else "duplicated" if applied[o] > 1 else "lost"
            for o in orders}


def last_outcome_decides(orders, log, queued):
    last = {o: out for o, out in log}
    return {o: {"acked": "correct", "applied": "correct"}.get(
        last.get(o), "pending" if o in queued else "lost") for o in orders}


def dead_letter_is_lost(orders, log, queued):
    applied = Counter(o for o, out in log if out == "applied")
    dead = {o for o, out in log if out == "dead_lettered"}
    out = {}
    for o in orders:
        if o in dead:
            out[o] = "lost"
        elif applied[o]:
            out[o] = "correct" if applied[o] == 1 else "duplicated"
        else:
            out[o] = "pending" if o in queued else "lost"
    return out


def skips_count_as_effects(orders, log, queued):
    done = Counter(o for o, out in log if out in ("applied", "duplicate_skipped"))
    return {o: "correct" if done[o] == 1 else "duplicated" if done[o] > 1
            else "pending" if o in queued else "lost" for o in orders}


# -- classify: correct -----------------------------------------------------------------------
def counter_of_effects(orders, log, queued):
    effects = Counter(order_id for order_id, outcome in log if outcome == "applied")
    names = {0: "lost", 1: "correct"}
    states = {o: names.get(effects[o], "duplicated") for o in orders}
    for o in orders:
        if effects[o] == 0 and o in queued:
            states[o] = "pending"
    return states


def grouped_by_order(orders, log, queued):
    states = {o: "pending" if o in queued else "lost" for o in orders}
    rows = sorted((o, out) for o, out in log if out == "applied")
    for order_id, group in groupby(rows, key=lambda r: r[0]):
        states[order_id] = "correct" if len(list(group)) == 1 else "duplicated"
    return states


WRONG = [
    ("ack-after", ack_first, "lost", "stopped"),
    ("ack-after", never_ack, "never acknowledged", "baseline"),
    ("ack-after", ack_confirmed_then_apply, "lost", "lost-message"),
    ("ack-after", redelivery_means_done, "lost", "stopped"),
    ("ack-after", apply_when_the_ack_failed, "lost", "baseline"),
    ("at-most-once", apply_then_ack, "duplicated", "lost-message"),
    ("at-most-once", ack_unconfirmed, "duplicated", "lost-message"),
    ("at-most-once", ack_only, "lost though no crash", "baseline"),
    ("at-most-once", apply_when_the_ack_failed, "lost though no crash", "lost-message"),
    ("at-most-once", commit_then_ack, "duplicated", "stopped"),
    ("classify", classify_by_deliveries, "misjudged", "lost-message"),
    ("classify", classify_by_acks, "misjudged", "lost-message"),
    ("classify", no_pending, "was pending", "stopped"),
    ("classify", last_outcome_decides, "misjudged", "stopped"),
    ("classify", dead_letter_is_lost, "you said 'lost'", "lost-message"),
    ("classify", skips_count_as_effects, "was correct, you said 'duplicated'",
     "lost-message"),
]

CORRECT = [
    ("ack-after", nack_when_the_ack_fails),
    ("ack-after", effect_and_ack_in_one_commit),
    ("ack-after", ack_retried_a_few_times),
    ("at-most-once", first_delivery_only),
    ("at-most-once", ack_inside_the_commit),
    ("at-most-once", ack_retried_once),
    ("classify", counter_of_effects),
    ("classify", grouped_by_order),
]
