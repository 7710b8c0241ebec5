"""Chapter 7's corpus: answers on the broker contract, wrong and right.

``WRONG``: (exercise id, answer, a substring its FAIL reason must hold, the nemesis class
that catches it). ``CORRECT``: (exercise id, answer) for correct designs other than the
model solution, which must PASS.
"""

from __future__ import annotations

import json
import sqlite3

from deliverylab.course import apply_order_placed, transaction
from deliverylab.course.ex07 import (
    consume_ack_then_apply,
    consume_apply_then_ack,
    consume_swallows_inbox_errors,
    park_row,
    relay_marks_first,
    relay_marks_on_timeout,
    relay_skips_the_bad_row,
    relay_without_dedup_id,
    triage_acks_every_error,
    triage_never_parks,
    triage_parks_every_error,
)
from deliverylab.engine.errors import BrokerUnavailable
from deliverylab.engine.worker import PoisonMessage

CHAPTER = 7

# -- external-inbox ------------------------------------------------------------------------


def consume_checks_then_inserts(store, broker, delivery):
    seen = store.execute("SELECT 1 FROM inbox_processed WHERE consumer = 'inventory'"
                         " AND event_id = ?", (delivery.event_id,)).fetchone()
    if seen is None:  # checked outside the transaction that writes
        with transaction(store):
            store.execute("INSERT OR IGNORE INTO inbox_processed"
                          " (consumer, event_id, processed_at)"
                          " VALUES ('inventory', ?, clock_now())", (delivery.event_id,))
            apply_order_placed(store, delivery)
    try:
        broker.ack(delivery)
    except BrokerUnavailable:
        pass


def consume_acks_inside_the_transaction(store, broker, delivery):
    with transaction(store):
        fresh = store.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                              " VALUES ('inventory', ?, clock_now()) ON CONFLICT DO NOTHING",
                              (delivery.event_id,)).rowcount
        if fresh:
            apply_order_placed(store, delivery)
        broker.ack(delivery)  # "atomic" with the effect... in another system


def consume_without_a_transaction(store, broker, delivery):
    fresh = store.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                          " VALUES ('inventory', ?, clock_now()) ON CONFLICT DO NOTHING",
                          (delivery.event_id,)).rowcount
    if fresh:  # the inbox row is committed already: a death here loses the order
        apply_order_placed(store, delivery)
    try:
        broker.ack(delivery)
    except BrokerUnavailable:
        pass


def consume_select_inside_immediate(store, broker, delivery):
    with transaction(store):  # BEGIN IMMEDIATE: no one writes between the read and the write
        seen = store.execute("SELECT 1 FROM inbox_processed WHERE consumer = 'inventory'"
                             " AND event_id = ?", (delivery.event_id,)).fetchone()
        if seen is None:
            store.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                          " VALUES ('inventory', ?, clock_now())", (delivery.event_id,))
            apply_order_placed(store, delivery)
    try:
        broker.ack(delivery)
    except BrokerUnavailable:
        pass


def consume_catches_only_the_duplicate(store, broker, delivery):
    with transaction(store):
        store.execute("SAVEPOINT inbox")
        try:
            store.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                          " VALUES ('inventory', ?, clock_now())", (delivery.event_id,))
        except sqlite3.IntegrityError:  # the primary key: a duplicate, nothing else
            store.execute("ROLLBACK TO inbox")
            duplicate = True
        else:
            duplicate = False
        store.execute("RELEASE inbox")
        if not duplicate:
            apply_order_placed(store, delivery)
    broker.ack(delivery)  # a lost ACK propagates: the message may come back, harmlessly


# -- relay-publish --------------------------------------------------------------------------


def relay_fresh_dedup_id_per_attempt(store, broker):
    rows = store.execute("SELECT outbox_seq, event_id, type, payload, correlation_id,"
                         " attempts FROM outbox WHERE sent_at IS NULL ORDER BY outbox_seq")
    for seq, event_id, type_, payload, corr, attempts in rows.fetchall():
        with transaction(store):
            store.execute("UPDATE outbox SET attempts = attempts + 1 WHERE outbox_seq = ?",
                          (seq,))
        try:
            broker.send(event_id, type_, json.loads(payload), correlation_id=corr,
                        dedup_id=f"{event_id}-{attempts + 1}")
        except BrokerUnavailable:
            return
        except ValueError as exc:
            park_row(store, seq, exc)
            continue
        with transaction(store):
            store.execute("UPDATE outbox SET sent_at = clock_now() WHERE outbox_seq = ?",
                          (seq,))


def relay_batch_marks_everything(store, broker):
    rows = store.execute("SELECT outbox_seq, event_id, type, payload, correlation_id"
                         " FROM outbox WHERE sent_at IS NULL ORDER BY outbox_seq").fetchall()
    bad = []
    for seq, event_id, type_, payload, corr in rows:  # send them all, then mark them all
        try:
            broker.send(event_id, type_, json.loads(payload), correlation_id=corr,
                        dedup_id=event_id)
        except BrokerUnavailable:
            continue  # retried by the broker client, surely
        except ValueError as exc:
            bad.append((seq, exc))
    for seq, exc in bad:
        park_row(store, seq, exc)
    with transaction(store):
        store.execute("UPDATE outbox SET sent_at = clock_now() WHERE sent_at IS NULL")


def relay_parks_without_a_transaction(store, broker):
    rows = store.execute("SELECT outbox_seq, event_id, type, payload, correlation_id,"
                         " created_at FROM outbox WHERE sent_at IS NULL ORDER BY outbox_seq")
    for seq, event_id, type_, payload, corr, created in rows.fetchall():
        try:
            broker.send(event_id, type_, json.loads(payload), correlation_id=corr,
                        dedup_id=event_id)
        except BrokerUnavailable:
            return
        except ValueError as exc:
            # Out of the outbox first, then into the dead letters: two statements, no
            # transaction, so a crash between them loses the row.
            store.execute("DELETE FROM outbox WHERE outbox_seq = ?", (seq,))
            store.execute("INSERT INTO dead_letters (message_id, event_id, type, payload,"
                          " correlation_id, delivery_count, last_error, created_at, dead_at)"
                          " VALUES (?, ?, ?, ?, ?, 1, ?, ?, clock_now())",
                          (event_id, event_id, type_, payload, corr, str(exc), created))
            continue
        with transaction(store):
            store.execute("UPDATE outbox SET sent_at = clock_now() WHERE outbox_seq = ?",
                          (seq,))


def relay_parks_on_any_error(store, broker):
    rows = store.execute("SELECT outbox_seq, event_id, type, payload, correlation_id"
                         " FROM outbox WHERE sent_at IS NULL ORDER BY outbox_seq").fetchall()
    for seq, event_id, type_, payload, corr in rows:
        try:
            broker.send(event_id, type_, json.loads(payload), correlation_id=corr,
                        dedup_id=event_id)
        except Exception as exc:  # "whatever failed, get it out of the way"
            park_row(store, seq, exc)
            continue
        with transaction(store):
            store.execute("UPDATE outbox SET sent_at = clock_now() WHERE outbox_seq = ?",
                          (seq,))


def relay_marks_the_bad_row_sent(store, broker):
    rows = store.execute("SELECT outbox_seq, event_id, type, payload, correlation_id"
                         " FROM outbox WHERE sent_at IS NULL ORDER BY outbox_seq").fetchall()
    for seq, event_id, type_, payload, corr in rows:
        try:
            broker.send(event_id, type_, json.loads(payload), correlation_id=corr,
                        dedup_id=event_id)
        except BrokerUnavailable:
            return
        except ValueError:
            pass  # "done with it": it will never go, so call it sent
        with transaction(store):
            store.execute("UPDATE outbox SET sent_at = clock_now() WHERE outbox_seq = ?",
                          (seq,))


def relay_send_inside_the_mark(store, broker):
    rows = store.execute("SELECT outbox_seq, event_id, type, payload, correlation_id"
                         " FROM outbox WHERE sent_at IS NULL ORDER BY outbox_seq").fetchall()
    for seq, event_id, type_, payload, corr in rows:
        try:
            # The mark and the send in one store transaction: a failed send rolls the mark
            # back.
            with transaction(store):
                store.execute("UPDATE outbox SET sent_at = clock_now(),"
                              " attempts = attempts + 1 WHERE outbox_seq = ?", (seq,))
                broker.send(event_id, type_, json.loads(payload), correlation_id=corr,
                            dedup_id=event_id)
        except ValueError as exc:
            # The mark rolled back. Parked by one statement pair in one transaction, the
            # DELETE handing its row to the INSERT.
            with transaction(store):
                gone = store.execute("DELETE FROM outbox WHERE outbox_seq = ? RETURNING"
                                     " event_id, type, payload, correlation_id, attempts,"
                                     " created_at", (seq,)).fetchone()
                store.execute("INSERT INTO dead_letters (message_id, event_id, type,"
                              " payload, correlation_id, delivery_count, last_error,"
                              " created_at, dead_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
                              " clock_now())", (gone[0], *gone[:5], str(exc), gone[5]))


def relay_send_all_then_mark_the_sent(store, broker):
    rows = store.execute("SELECT outbox_seq, event_id, type, payload, correlation_id"
                         " FROM outbox WHERE sent_at IS NULL ORDER BY outbox_seq").fetchall()
    sent, bad = [], []
    try:
        for seq, event_id, type_, payload, corr in rows:
            try:
                broker.send(event_id, type_, json.loads(payload), correlation_id=corr,
                            dedup_id=event_id)
            except ValueError as exc:
                bad.append((str(exc), seq))
                continue
            sent.append(seq)
    except BrokerUnavailable:
        pass  # the rest waits for the next run
    if sent or bad:
        with transaction(store):  # the marks and the parking commit together
            store.executemany("UPDATE outbox SET sent_at = clock_now() WHERE outbox_seq = ?",
                              [(s,) for s in sent])
            store.executemany(
                "INSERT INTO dead_letters (message_id, event_id, type, payload,"
                " correlation_id, delivery_count, last_error, created_at, dead_at)"
                " SELECT event_id, event_id, type, payload, correlation_id, attempts + 1, ?,"
                " created_at, clock_now() FROM outbox WHERE outbox_seq = ?", bad)
            store.executemany("DELETE FROM outbox WHERE outbox_seq = ?",
                              [(seq,) for _, seq in bad])


def relay_parks_idempotently(store, broker):
    # No transaction needed: the dead letter goes in first and only once (its key is the
    # event id), then the row leaves the outbox; a crash between them is repaired by the
    # next run doing both again.
    rows = store.execute("SELECT outbox_seq, event_id, type, payload, correlation_id"
                         " FROM outbox WHERE sent_at IS NULL ORDER BY outbox_seq").fetchall()
    for seq, event_id, type_, payload, corr in rows:
        try:
            broker.send(event_id, type_, json.loads(payload), correlation_id=corr,
                        dedup_id=event_id)
        except BrokerUnavailable:
            return
        except ValueError as exc:
            store.execute("INSERT OR IGNORE INTO dead_letters (message_id, event_id, type,"
                          " payload, correlation_id, delivery_count, last_error, created_at,"
                          " dead_at) SELECT event_id, event_id, type, payload,"
                          " correlation_id, attempts + 1, ?, created_at, clock_now()"
                          " FROM outbox WHERE outbox_seq = ?", (str(exc), seq))
            store.execute("DELETE FROM outbox WHERE outbox_seq = ?", (seq,))
            continue
        store.execute("UPDATE outbox SET sent_at = clock_now() WHERE outbox_seq = ?", (seq,))


# -- poison-or-retry ----------------------------------------------------------------------


def triage_parks_after_three_failures(store, broker, delivery):
    try:
        with transaction(store):
            fresh = store.execute(
                "INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                " VALUES ('inventory', ?, clock_now()) ON CONFLICT DO NOTHING",
                (delivery.event_id,)).rowcount
            if fresh:
                apply_order_placed(store, delivery)
    except Exception as exc:
        if delivery.delivery_count >= 3:  # three strikes, whatever the error
            broker.dead_letter(delivery, str(exc))
        else:
            broker.nack(delivery, delay=1.0)
        return
    try:
        broker.ack(delivery)
    except BrokerUnavailable:
        pass


def triage_without_inbox(store, broker, delivery):
    try:
        with transaction(store):
            apply_order_placed(store, delivery)
    except PoisonMessage as exc:
        broker.dead_letter(delivery, str(exc))
        return
    except sqlite3.OperationalError:
        broker.nack(delivery, delay=0.5)
        return
    try:
        broker.ack(delivery)
    except BrokerUnavailable:
        pass


def triage_retries_at_once(store, broker, delivery):
    try:
        with transaction(store):
            fresh = store.execute(
                "INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                " VALUES ('inventory', ?, clock_now()) ON CONFLICT DO NOTHING",
                (delivery.event_id,)).rowcount
            if fresh:
                apply_order_placed(store, delivery)
    except PoisonMessage as exc:
        broker.dead_letter(delivery, str(exc))
        return
    except sqlite3.OperationalError:
        broker.nack(delivery)  # "the lock is gone by the next try"
        return
    try:
        broker.ack(delivery)
    except BrokerUnavailable:
        pass


def triage_validates_first(store, broker, delivery):
    p = delivery.payload
    item, qty = p.get("itemId"), p.get("qty")
    if delivery.type != "OrderPlaced" or not isinstance(item, str) or not item \
            or not isinstance(qty, int) or isinstance(qty, bool) or qty < 1:
        broker.dead_letter(delivery, f"poison: bad payload {p!r}")
        return
    with transaction(store):  # a locked store raises out of here: the lease runs out
        if store.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                         " VALUES ('inventory', ?, clock_now()) ON CONFLICT DO NOTHING",
                         (delivery.event_id,)).rowcount:
            apply_order_placed(store, delivery)
    try:
        broker.ack(delivery)
    except BrokerUnavailable:
        pass


def triage_value_error_and_fixed_retry(store, broker, delivery):
    try:
        with transaction(store):
            seen = store.execute("SELECT 1 FROM inbox_processed WHERE consumer = 'inventory'"
                                 " AND event_id = ?", (delivery.event_id,)).fetchone()
            if seen is None:
                apply_order_placed(store, delivery)
                store.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                              " VALUES ('inventory', ?, clock_now())", (delivery.event_id,))
    except ValueError as exc:  # PoisonMessage is one
        broker.dead_letter(delivery, str(exc))
    except sqlite3.Error:
        broker.nack(delivery, delay=1.0)
    else:
        try:
            broker.ack(delivery)
        except BrokerUnavailable:
            pass


WRONG = [
    ("external-inbox", consume_apply_then_ack, "applied twice", "lost-message"),
    ("external-inbox", consume_ack_then_apply, "never applied", "stopped"),
    ("external-inbox", consume_swallows_inbox_errors, "never applied", "store-failure"),
    ("external-inbox", consume_checks_then_inserts, "applied twice", "interleaving"),
    ("external-inbox", consume_acks_inside_the_transaction, "never applied", "stopped"),
    ("external-inbox", consume_without_a_transaction, "never applied", "stopped"),
    ("relay-publish", relay_marks_first, "never applied", "stopped"),
    ("relay-publish", relay_marks_on_timeout, "never applied", "lost-message"),
    ("relay-publish", relay_without_dedup_id, "dedup id", "lost-message"),
    ("relay-publish", relay_fresh_dedup_id_per_attempt, "dedup id", "lost-message"),
    ("relay-publish", relay_batch_marks_everything, "never applied", "lost-message"),
    ("relay-publish", relay_skips_the_bad_row, "still in the outbox", "past-range"),
    ("relay-publish", relay_marks_the_bad_row_sent, "was marked sent", "past-range"),
    ("relay-publish", relay_parks_without_a_transaction, "vanished", "stopped"),
    ("relay-publish", relay_parks_on_any_error, "good rows parked", "lost-message"),
    ("poison-or-retry", triage_parks_every_error, "good orders parked", "store-failure"),
    ("poison-or-retry", triage_acks_every_error, "not in the dead letters", "store-failure"),
    ("poison-or-retry", triage_never_parks, "deliveries (at most 3)", "past-range"),
    ("poison-or-retry", triage_parks_after_three_failures, "good orders parked",
     "past-range"),
    ("poison-or-retry", triage_without_inbox, "applied twice", "lost-message"),
    ("poison-or-retry", triage_retries_at_once, "good orders parked", "store-failure"),
]
CORRECT = [
    ("external-inbox", consume_select_inside_immediate),
    ("external-inbox", consume_catches_only_the_duplicate),
    ("relay-publish", relay_send_inside_the_mark),
    ("relay-publish", relay_send_all_then_mark_the_sent),
    ("relay-publish", relay_parks_idempotently),
    ("poison-or-retry", triage_validates_first),
    ("poison-or-retry", triage_value_error_and_fixed_retry),
]
