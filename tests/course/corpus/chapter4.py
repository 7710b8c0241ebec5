"""Chapter 4: run until really empty, an inbox that survives a redrive, what is missing."""

from __future__ import annotations

import sqlite3

from deliverylab.course import apply_order_placed
from deliverylab.course.ex04 import (
    drain_until_nothing_visible,
    drain_with_patience,
    drain_without_time,
    inbox_by_message_id,
    inbox_by_receipt,
    missing_dead_letters,
    missing_dead_letters_with_error,
    missing_not_in_inbox,
)

CHAPTER = 4
INBOX = ("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
         " VALUES ('inventory', ?, clock_now())")


# -- drain: wrong ----------------------------------------------------------------------------
def drain_to_the_second(workers, queue, clock):
    while True:
        if sum(w.step() for w in workers):
            continue
        nxt = queue.next_visible_at()
        if nxt is None:
            return
        clock.sleep_until(int(nxt))  # whole seconds are precise enough


def drain_while_anything_visible(workers, queue, clock):
    while queue.depth()["visible"]:
        for w in workers:
            w.step()


# -- drain: correct --------------------------------------------------------------------------
def all_workers_per_round(workers, queue, clock):
    while True:
        if sum(w.step() for w in workers):
            continue
        nxt = queue.next_visible_at()
        if nxt is None:
            return
        clock.sleep_until(max(nxt, clock.now()))


def by_depth_in_small_ticks(workers, queue, clock):
    while True:
        moved = 0
        for w in workers:
            moved += w.step()
        if moved:
            continue
        depth = queue.depth()
        if depth["visible"] == 0 and depth["in_flight"] == 0:
            return
        clock.advance(0.125)  # fine enough: the loop never sleeps past a message


# -- redrive-inbox: wrong --------------------------------------------------------------------
def redrive_check_then_act(conn, delivery):
    if conn.execute("SELECT 1 FROM inbox_processed WHERE consumer = 'inventory'"
                    " AND event_id = ?", (delivery.event_id,)).fetchone():
        return
    apply_order_placed(conn, delivery)  # nobody has it: do it, then note it
    conn.execute(INBOX + " ON CONFLICT DO NOTHING", (delivery.event_id,))


def redrive_swallows_errors(conn, delivery):
    try:
        conn.execute(INBOX, (delivery.event_id,))
    except Exception:
        return  # already processed
    apply_order_placed(conn, delivery)


def redrive_plain_effect(conn, delivery):
    apply_order_placed(conn, delivery)


# -- redrive-inbox: correct ------------------------------------------------------------------
def redrive_insert_or_ignore(conn, delivery):
    if conn.execute("INSERT OR IGNORE INTO inbox_processed (consumer, event_id,"
                    " processed_at) VALUES ('inventory', ?, clock_now())",
                    (delivery.event_id,)).rowcount:
        apply_order_placed(conn, delivery)


def redrive_unique_violation_only(conn, delivery):
    try:
        conn.execute(INBOX, (delivery.event_id,))
    except sqlite3.IntegrityError as exc:
        if "UNIQUE constraint failed" in str(exc):
            return
        raise
    apply_order_placed(conn, delivery)


def redrive_check_then_claim(conn, delivery):
    # The SELECT saves work; a peer that commits the event in between makes the INSERT
    # fail on the unique key, and the rolled-back delivery comes again.
    if conn.execute("SELECT 1 FROM inbox_processed WHERE consumer = 'inventory'"
                    " AND event_id = ?", (delivery.event_id,)).fetchone():
        return
    conn.execute(INBOX, (delivery.event_id,))
    apply_order_placed(conn, delivery)


# -- really-missing: wrong -------------------------------------------------------------------
def missing_unless_leased(conn):
    # "A leased message is being worked on; a message merely waiting is as good as gone."
    return {o for (o,) in conn.execute(
        "SELECT order_id FROM orders AS o WHERE event_id NOT IN"
        " (SELECT event_id FROM inbox_processed WHERE consumer = 'inventory')"
        " AND NOT EXISTS (SELECT 1 FROM queue_messages AS q WHERE q.event_id = o.event_id"
        "                 AND q.lease_until IS NOT NULL)")}


def missing_by_the_log(conn):
    return {o for (o,) in conn.execute(
        "SELECT DISTINCT correlation_id FROM delivery_log"
        " WHERE outcome IN ('lost', 'dead_lettered')")}


# -- really-missing: correct -----------------------------------------------------------------
def missing_by_left_joins(conn):
    return {o for (o,) in conn.execute(
        "SELECT o.order_id FROM orders AS o"
        " LEFT JOIN inbox_processed AS i ON i.event_id = o.event_id"
        "  AND i.consumer = 'inventory'"
        " LEFT JOIN queue_messages AS q ON q.event_id = o.event_id"
        " WHERE i.event_id IS NULL AND q.event_id IS NULL")}


def missing_by_sets(conn):
    events = dict(conn.execute("SELECT event_id, order_id FROM orders"))
    applied = {e for (e,) in conn.execute(
        "SELECT event_id FROM inbox_processed WHERE consumer = 'inventory'")}
    queued = {e for (e,) in conn.execute("SELECT event_id FROM queue_messages")}
    return {o for e, o in events.items() if e not in applied and e not in queued}


WRONG = [
    ("drain", drain_until_nothing_visible, "still in the queue", "lost-message"),
    ("drain", drain_without_time, "clock never moved", "baseline"),
    ("drain", drain_with_patience, "still in the queue", "past-range"),
    ("drain", drain_to_the_second, "clock never moved", "past-range"),
    ("drain", drain_while_anything_visible, "still in the queue", "lost-message"),
    ("redrive-inbox", inbox_by_message_id, "duplicated", "lost-message"),
    ("redrive-inbox", inbox_by_receipt, "duplicated", "lost-message"),
    ("redrive-inbox", redrive_check_then_act, "duplicated", "interleaving"),
    ("redrive-inbox", redrive_swallows_errors, "lost", "store-failure"),
    ("redrive-inbox", redrive_plain_effect, "duplicated", "baseline"),
    ("really-missing", missing_dead_letters, "already applied", "lost-message"),
    ("really-missing", missing_not_in_inbox, "still in the queue", "stopped"),
    ("really-missing", missing_dead_letters_with_error, "already applied", "lost-message"),
    ("really-missing", missing_unless_leased, "still in the queue", "stopped"),
    ("really-missing", missing_by_the_log, "already applied", "lost-message"),
]

CORRECT = [
    ("drain", all_workers_per_round),
    ("drain", by_depth_in_small_ticks),
    ("redrive-inbox", redrive_insert_or_ignore),
    ("redrive-inbox", redrive_unique_violation_only),
    ("redrive-inbox", redrive_check_then_claim),
    ("really-missing", missing_by_left_joins),
    ("really-missing", missing_by_sets),
]
