"""Chapter 2: effect and ACK in one commit, the late worker, which fault hurts which mode."""

from __future__ import annotations

from deliverylab.course.ex02 import (
    ack_outside,
    late_ignores_ack,
    late_skips_work,
    predict_all_correct,
    predict_by_name,
    predict_solution,
    separate_commits,
)

CHAPTER = 2


# -- tx-ack: wrong ---------------------------------------------------------------------------
def ack_then_commit(delivery, ops):
    ops.ack(delivery)
    with ops.transaction():
        ops.apply(delivery)


def two_transactions(delivery, ops):
    with ops.transaction():
        ops.apply(delivery)
    with ops.transaction():
        ops.ack(delivery)


# -- tx-ack: correct -------------------------------------------------------------------------
def ack_first_inside(delivery, ops):
    with ops.transaction():
        if not ops.ack(delivery):
            raise ops.Rollback
        ops.apply(delivery)


def checked_ack(delivery, ops):
    with ops.transaction():
        ops.apply(delivery)
        if not ops.ack(delivery):
            raise ops.Rollback


def ack_then_apply_inside(delivery, ops):
    with ops.transaction():
        ops.ack(delivery)
        ops.apply(delivery)


# -- late-worker: wrong ----------------------------------------------------------------------
def lease_checked_then_two_commits(delivery, ops):
    ops.work(ops.work_left)
    if ops.now() < delivery.lease_until:  # "still mine"
        ops.apply(delivery)
        ops.ack(delivery)


def lease_edge_counts_as_held(delivery, ops):
    ops.work(ops.work_left)
    with ops.transaction():
        if ops.now() <= delivery.lease_until:  # the lease's last instant is still mine
            ops.apply(delivery)
            ops.ack(delivery)


def lease_renewed_then_commit(delivery, ops):
    ops.work(ops.work_left)
    if not ops.extend(delivery, ops.visibility_timeout):  # "still mine: renewed"
        return
    with ops.transaction():
        ops.apply(delivery)
        ops.ack(delivery)


def work_then_two_commits(delivery, ops):
    ops.work(ops.work_left)
    ops.apply(delivery)
    ops.ack(delivery)


# -- late-worker: correct --------------------------------------------------------------------
def ack_decides_first(delivery, ops):
    ops.work(ops.work_left)
    with ops.transaction():
        if not ops.ack(delivery):  # the delete finds no row of ours: someone took over
            raise ops.Rollback
        ops.apply(delivery)


def give_up_a_lost_lease(delivery, ops):
    ops.work(ops.work_left)
    if not ops.extend(delivery, ops.visibility_timeout):
        return  # another delivery holds the message: leave it the work
    with ops.transaction():
        ops.apply(delivery)
        if not ops.ack(delivery):
            raise ops.Rollback


# -- predict-faults: wrong -------------------------------------------------------------------
def forgets_lost_messages(mode, fault):
    return "correct" if fault == "lose_message" else predict_solution(mode, fault)


def both_halves_alike(mode, fault):
    return predict_solution(mode, "ack_fail" if fault == "ack_answer_lost" else fault)


def every_commit_crash_duplicates(mode, fault):
    if fault == "crash_after_commit" and mode != "transactional":
        return "duplicated" if mode != "at-most-once" else "correct"
    return predict_solution(mode, fault)


def errors_are_retried(mode, fault):
    return "correct" if fault == "process_error" else predict_solution(mode, fault)


# -- predict-faults: correct -----------------------------------------------------------------
TABLE = {
    "at-most-once": {"ack_answer_lost": "lost", "crash_after_receive": "lost",
                     "process_error": "lost", "lose_message": "lost"},
    "at-least-once": {"ack_fail": "duplicated", "crash_after_commit": "duplicated",
                      "lose_message": "lost"},
}


def lookup_table(mode, fault):
    if fault == "lose_message":
        return "lost"
    return TABLE.get(mode, {}).get(fault, "correct")


def by_the_step_it_hits(mode, fault):
    before_effect = {"crash_after_receive", "process_error", "ack_answer_lost"}
    after_effect = {"ack_fail", "crash_after_commit"}
    if fault == "lose_message":
        return "lost"
    if mode == "at-most-once" and fault in before_effect:
        return "lost"
    if mode == "at-least-once" and fault in after_effect:
        return "duplicated"
    return "correct"


WRONG = [
    ("tx-ack", separate_commits, "duplicated", "lost-message"),
    ("tx-ack", ack_outside, "duplicated", "lost-message"),
    ("tx-ack", ack_then_commit, "lost", "stopped"),
    ("tx-ack", two_transactions, "duplicated", "stopped"),
    ("late-worker", late_ignores_ack, "duplicated", "past-range"),
    ("late-worker", late_skips_work, "work left", "baseline"),
    ("late-worker", lease_checked_then_two_commits, "duplicated", "lost-message"),
    ("late-worker", lease_renewed_then_commit, "duplicated", "interleaving"),
    ("late-worker", lease_edge_counts_as_held, "duplicated", "past-range"),
    ("late-worker", work_then_two_commits, "duplicated", "lost-message"),
    ("predict-faults", predict_by_name, "wrong for", "baseline"),
    ("predict-faults", predict_all_correct, "wrong for", "baseline"),
    ("predict-faults", forgets_lost_messages, "under lose_message gave lost", "lost-message"),
    ("predict-faults", both_halves_alike, "under ack_answer_lost gave lost", "lost-message"),
    ("predict-faults", every_commit_crash_duplicates, "under crash_after_commit", "stopped"),
    ("predict-faults", errors_are_retried, "under process_error gave lost", "stopped"),
]

CORRECT = [
    ("tx-ack", ack_first_inside),
    ("tx-ack", checked_ack),
    ("tx-ack", ack_then_apply_inside),
    ("late-worker", ack_decides_first),
    ("late-worker", give_up_a_lost_lease),
    ("predict-faults", lookup_table),
    ("predict-faults", by_the_step_it_hits),
]
