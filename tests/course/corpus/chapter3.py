"""Chapter 3: the idempotent handler, the heartbeat, the producer that retries."""

from __future__ import annotations

import random
import sqlite3
import uuid

from deliverylab.course import apply_order_placed
from deliverylab.course.ex03 import (
    beat_at_the_lease_edge,
    beat_then_separate_commits,
    extend_once,
    inbox_swallows_errors,
    keyed_by_receipt,
    no_retry,
    plain_handler,
    retry_fresh_key,
    retry_refusals,
    retry_without_key,
)

CHAPTER = 3
INBOX = ("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
         " VALUES ('inventory', ?, clock_now())")


# -- idempotent-handler: wrong ---------------------------------------------------------------
def check_then_act(conn, delivery):
    seen = conn.execute("SELECT 1 FROM inbox_processed WHERE consumer = 'inventory'"
                        " AND event_id = ?", (delivery.event_id,)).fetchone()
    if seen:
        return
    apply_order_placed(conn, delivery)
    conn.execute(INBOX + " ON CONFLICT DO NOTHING", (delivery.event_id,))


def integrity_error_means_seen(conn, delivery):
    try:
        conn.execute(INBOX, (delivery.event_id,))
    except sqlite3.IntegrityError:  # a CHECK or a foreign key fails as IntegrityError too
        return
    apply_order_placed(conn, delivery)


def inbox_after_effect(conn, delivery):
    apply_order_placed(conn, delivery)
    try:
        conn.execute(INBOX, (delivery.event_id,))
    except sqlite3.IntegrityError:
        pass


# -- idempotent-handler: correct -------------------------------------------------------------
def insert_or_ignore(conn, delivery):
    cur = conn.execute("INSERT OR IGNORE INTO inbox_processed (consumer, event_id,"
                       " processed_at) VALUES ('inventory', ?, clock_now())",
                       (delivery.event_id,))
    if cur.rowcount == 1:
        apply_order_placed(conn, delivery)


def unique_violation_only(conn, delivery):
    try:
        conn.execute(INBOX, (delivery.event_id,))
    except sqlite3.IntegrityError as exc:
        if "UNIQUE" not in str(exc):
            raise  # not a repeat: let the transaction roll back
        return
    apply_order_placed(conn, delivery)


def look_then_insert_by_key(conn, delivery):
    # The SELECT only saves work; the unique key still decides.
    if conn.execute("SELECT 1 FROM inbox_processed WHERE consumer = 'inventory'"
                    " AND event_id = ?", (delivery.event_id,)).fetchone():
        return
    row = conn.execute(INBOX + " ON CONFLICT DO NOTHING RETURNING event_id",
                       (delivery.event_id,)).fetchone()
    if row is not None:
        apply_order_placed(conn, delivery)


def check_then_claim(conn, delivery):
    # A peer that commits the event between the SELECT and the INSERT makes the INSERT fail
    # on the unique key: the work rolls back and the peer's commit stands.
    if conn.execute("SELECT 1 FROM inbox_processed WHERE consumer = 'inventory'"
                    " AND event_id = ?", (delivery.event_id,)).fetchone():
        return
    conn.execute(INBOX, (delivery.event_id,))
    apply_order_placed(conn, delivery)


# -- heartbeat: wrong ------------------------------------------------------------------------
def beat_then_commit_blindly(delivery, ops):
    while ops.work_left > 0:
        ops.extend(delivery, ops.visibility_timeout)
        ops.work(min(1.0, ops.work_left))
    with ops.transaction():  # "the lease was renewed a second ago"
        ops.apply(delivery)
        ops.ack(delivery)


def ignore_lost_lease(delivery, ops):
    while ops.work_left > 0:
        ops.extend(delivery, ops.visibility_timeout)
        ops.work(min(1.0, ops.work_left))
    ops.apply(delivery)
    if not ops.ack(delivery):
        ops.nack(delivery)


def beat_at_the_edge_checked(delivery, ops):
    # Renews when the lease is up, by the whole lease: the renewal reaches the queue after
    # the lease ran out, and an idle peer takes the message first, every time.
    while ops.work_left > 0:
        if not ops.extend(delivery, ops.visibility_timeout):
            return
        ops.work(min(ops.visibility_timeout, ops.work_left))
    with ops.transaction():
        ops.apply(delivery)
        if not ops.ack(delivery):
            raise ops.Rollback


# -- heartbeat: correct ----------------------------------------------------------------------
def beat_just_inside_the_lease(delivery, ops):
    # The lease-edge answer with chunks a little shorter than the lease, and the ACK checked.
    while ops.work_left > 0:
        if not ops.extend(delivery, ops.visibility_timeout):
            return
        ops.work(min(0.9 * ops.visibility_timeout, ops.work_left))
    with ops.transaction():
        ops.apply(delivery)
        if not ops.ack(delivery):
            raise ops.Rollback



def one_long_extension(delivery, ops):
    # Ask for the whole job's lease up front, with a lease to spare.
    if not ops.extend(delivery, ops.work_left + ops.visibility_timeout):
        return
    ops.work(ops.work_left)
    with ops.transaction():
        ops.apply(delivery)
        if not ops.ack(delivery):
            raise ops.Rollback


def ack_first_in_the_transaction(delivery, ops):
    while ops.work_left > 0:
        ops.extend(delivery, ops.visibility_timeout)
        ops.work(min(ops.visibility_timeout / 4, ops.work_left))
    with ops.transaction():
        if not ops.ack(delivery):  # the delete and the effect commit together
            raise ops.Rollback
        ops.apply(delivery)


# -- producer-retries: wrong -----------------------------------------------------------------
def key_per_call(send, request, clock):
    key = str(uuid.uuid4())  # the same on every retry of this call, new after a restart
    reached = False
    while clock.now() < request["deadline"] - 1.0:
        try:
            return "placed", send(request["item_id"], request["qty"], idempotency_key=key)
        except ConnectionError:
            clock.sleep(1.0)
        except TimeoutError:
            reached = True
            clock.sleep(1.0)
        except ValueError as refusal:
            return "refused", str(refusal)
    return ("unknown" if reached else "failed"), None


def key_from_content(send, request, clock):
    key = f"{request['item_id']}:{request['qty']}"
    while clock.now() < request["deadline"] - 1.0:
        try:
            return "placed", send(request["item_id"], request["qty"], idempotency_key=key)
        except (TimeoutError, ConnectionError):
            clock.sleep(1.0)
        except ValueError as refusal:
            return "refused", str(refusal)
    return "unknown", None


def three_attempts(send, request, clock):
    for _ in range(3):
        try:
            return "placed", send(request["item_id"], request["qty"],
                                  idempotency_key=request["request_id"])
        except (TimeoutError, ConnectionError):
            clock.sleep(0.5)
        except ValueError as refusal:
            return "refused", str(refusal)
    return "unknown", None


def retry_at_once(send, request, clock):
    while clock.now() < request["deadline"]:  # no pause: a down server gets hammered
        try:
            return "placed", send(request["item_id"], request["qty"],
                                  idempotency_key=request["request_id"])
        except (TimeoutError, ConnectionError):
            continue
        except ValueError as refusal:
            return "refused", str(refusal)
    return "unknown", None


def failed_at_the_deadline(send, request, clock):
    pause = 0.2
    while clock.now() + pause < request["deadline"]:
        try:
            return "placed", send(request["item_id"], request["qty"],
                                  idempotency_key=request["request_id"])
        except (TimeoutError, ConnectionError):
            clock.sleep(pause)
            pause = min(pause * 2, 2.0)
        except ValueError as refusal:
            return "refused", str(refusal)
    return "failed", None  # no answer is not a no: the order may exist


def backoff_without_deadline(send, request, clock):
    pause = 0.5
    while True:
        try:
            return "placed", send(request["item_id"], request["qty"],
                                  idempotency_key=request["request_id"])
        except (TimeoutError, ConnectionError):
            clock.sleep(pause)
            pause = min(pause * 2, 4.0)
        except ValueError as refusal:
            return "refused", str(refusal)


def every_error_is_a_refusal(send, request, clock):
    pause = 0.2
    while clock.now() + pause < request["deadline"]:
        try:
            return "placed", send(request["item_id"], request["qty"],
                                  idempotency_key=request["request_id"])
        except TimeoutError:
            clock.sleep(pause)
            pause = min(pause * 2, 2.0)
        except Exception as exc:  # noqa: BLE001 - the mistake: a down server is no refusal
            return "refused", str(exc)
    return "unknown", None


def unknown_whatever_happened(send, request, clock):
    pause = 0.2
    while True:
        try:
            return "placed", send(request["item_id"], request["qty"],
                                  idempotency_key=request["request_id"])
        except ValueError as refusal:
            return "refused", str(refusal)
        except (TimeoutError, ConnectionError):
            pass
        if clock.now() + pause >= request["deadline"]:
            return "unknown", None  # even when no attempt ever reached the server
        clock.sleep(pause)
        pause = min(pause * 2, 2.0)


# -- producer-retries: correct ---------------------------------------------------------------
def fixed_pause(send, request, clock):
    maybe_placed = False
    for _ in range(12):
        try:
            return "placed", send(request["item_id"], request["qty"],
                                  idempotency_key=request["request_id"])
        except ConnectionError:
            pass
        except TimeoutError:
            maybe_placed = True
        except ValueError as refusal:
            return "refused", str(refusal)
        if clock.now() + 1.0 >= request["deadline"]:
            break
        clock.sleep(1.0)
    return ("unknown" if maybe_placed else "failed"), None


def jittered_backoff_to_the_deadline(send, request, clock, attempt=0, reached=False):
    try:
        return "placed", send(request["item_id"], request["qty"],
                              idempotency_key=request["request_id"])
    except ValueError as refusal:
        return "refused", str(refusal)
    except (TimeoutError, ConnectionError) as exc:
        reached = reached or isinstance(exc, TimeoutError)
        left = request["deadline"] - clock.now()
        if left < 0.6:
            return ("unknown" if reached else "failed"), None
        base = min(0.25 * 2 ** attempt, 3.0)
        clock.sleep(min(base * (0.5 + random.random() / 2), left - 0.5))
        return jittered_backoff_to_the_deadline(send, request, clock, attempt + 1, reached)


WRONG = [
    ("idempotent-handler", plain_handler, "duplicated", "lost-message"),
    ("idempotent-handler", keyed_by_receipt, "duplicated", "lost-message"),
    ("idempotent-handler", inbox_swallows_errors, "lost", "store-failure"),
    ("idempotent-handler", integrity_error_means_seen, "lost", "store-failure"),
    ("idempotent-handler", check_then_act, "duplicated", "interleaving"),
    ("idempotent-handler", inbox_after_effect, "duplicated", "lost-message"),
    ("heartbeat", beat_then_separate_commits, "duplicated", "lost-message"),
    ("heartbeat", beat_then_commit_blindly, "duplicated", "interleaving"),
    ("heartbeat", beat_at_the_lease_edge, "duplicated", "past-range"),
    ("heartbeat", extend_once, "duplicated", "baseline"),
    ("heartbeat", ignore_lost_lease, "duplicated", "lost-message"),
    ("heartbeat", beat_at_the_edge_checked, "lost", "past-range"),
    ("producer-retries", retry_without_key, "placed more than once", "lost-message"),
    ("producer-retries", retry_fresh_key, "placed more than once", "lost-message"),
    ("producer-retries", no_retry, "never placed", "lost-message"),
    ("producer-retries", three_attempts, "never placed", "lost-message"),
    ("producer-retries", key_per_call, "placed more than once", "stopped"),
    ("producer-retries", key_from_content, "never placed", "baseline"),
    ("producer-retries", retry_refusals, "retried a refusal", "past-range"),
    ("producer-retries", every_error_is_a_refusal, "answered 'refused' to a request the"
                                                   " server never refused", "lost-message"),
    ("producer-retries", retry_at_once, "retry storm", "lost-message"),
    ("producer-retries", failed_at_the_deadline, "answered 'failed' after an attempt got"
                                                 " through", "lost-message"),
    ("producer-retries", unknown_whatever_happened, "answered 'unknown' when every attempt"
                                                    " was refused a connection",
     "lost-message"),
    ("producer-retries", backoff_without_deadline, "sent after their deadline",
     "lost-message"),
]

CORRECT = [
    ("idempotent-handler", insert_or_ignore),
    ("idempotent-handler", unique_violation_only),
    ("idempotent-handler", look_then_insert_by_key),
    ("idempotent-handler", check_then_claim),
    ("heartbeat", one_long_extension),
    ("heartbeat", beat_just_inside_the_lease),
    ("heartbeat", ack_first_in_the_transaction),
    ("producer-retries", fixed_pause),
    ("producer-retries", jittered_backoff_to_the_deadline),
]
