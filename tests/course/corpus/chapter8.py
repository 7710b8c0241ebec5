"""Chapter 8: a fenced write, a retry budget, a batch settled per message, a compensation,
what to page on, and an MQTT subscriber that applies each order once."""

from __future__ import annotations

import sqlite3

from deliverylab.book.retries import Unavailable
from deliverylab.course.ex08 import (
    BURST,
    RATIO,
    TRIES,
    all_or_nothing,
    budget_without_deadline,
    check_then_write,
    compensate_delta,
    compensate_guarded,
    last_write_wins,
    mqtt_by_packet_id,
    mqtt_skip_dup,
    page_any_drift,
    page_any_redelivery,
    page_solution,
    skip_the_failures,
    strictly_newer,
    three_tries,
)
from deliverylab.engine.store import transaction
from deliverylab.engine.worker import apply_order_placed

CHAPTER = 8

_UPSERT = ("INSERT INTO documents (key, body, token) VALUES (?, ?, ?)"
           " ON CONFLICT (key) DO UPDATE SET body = excluded.body, token = excluded.token")


# -- fenced-write: wrong -------------------------------------------------------------------
def tokens_as_text(conn, key, body, token):
    with transaction(conn):
        row = conn.execute("SELECT token FROM documents WHERE key = ?", (key,)).fetchone()
        if row is not None and str(token) < str(row[0]):  # "2" > "10"
            return False
        conn.execute(_UPSERT, (key, body, token))
    return True


def failure_as_refusal(conn, key, body, token):
    try:
        with transaction(conn):
            row = conn.execute("SELECT token FROM documents WHERE key = ?", (key,)).fetchone()
            if row is not None and token < row[0]:
                return False
            conn.execute(_UPSERT, (key, body, token))
    except sqlite3.Error:
        return False  # "the store said no"
    return True


# -- fenced-write: correct -----------------------------------------------------------------
def one_conditional_upsert(conn, key, body, token):
    cur = conn.execute(_UPSERT + " WHERE excluded.token >= documents.token",
                       (key, body, token))
    return cur.rowcount == 1


def update_then_insert(conn, key, body, token):
    with transaction(conn):
        if conn.execute("UPDATE documents SET body = ?, token = ? WHERE key = ? AND token <= ?",
                        (body, token, key, token)).rowcount:
            return True
        return conn.execute("INSERT INTO documents (key, body, token) VALUES (?, ?, ?)"
                            " ON CONFLICT (key) DO NOTHING", (key, body, token)).rowcount == 1


# -- retry-budget: wrong -------------------------------------------------------------------
def deadline_without_budget(bank, order_id, deadline, budget):
    for _ in range(TRIES):
        if deadline - bank.clock.now() < bank.timeout_s:
            return False, budget
        try:
            bank.charge(order_id)
            return True, budget
        except Unavailable:
            continue
    return False, budget


def budget_per_order(bank, order_id, deadline, budget):
    tokens = float(BURST)  # a fresh bucket for every call: no cap across calls
    for attempt in range(TRIES):
        if deadline - bank.clock.now() < bank.timeout_s:
            return False, budget
        if attempt:
            if tokens < 1:
                return False, budget
            tokens -= 1
        try:
            bank.charge(order_id)
            return True, budget
        except Unavailable:
            continue
    return False, budget


def never_retry(bank, order_id, deadline, budget):
    if deadline - bank.clock.now() < bank.timeout_s:
        return False, budget
    try:
        bank.charge(order_id)
    except Unavailable:
        return False, budget
    return True, budget


def deadline_not_yet_passed(bank, order_id, deadline, budget):
    budget.setdefault("tokens", float(BURST))
    budget["tokens"] = min(float(BURST), budget["tokens"] + RATIO)
    for attempt in range(TRIES):
        if bank.clock.now() >= deadline:  # "still before the deadline": but not by enough
            return False, budget
        if attempt:
            if budget["tokens"] < 1:
                return False, budget
            budget["tokens"] -= 1
        try:
            bank.charge(order_id)
            return True, budget
        except Unavailable:
            continue
    return False, budget


def retry_ratio_counter(bank, order_id, deadline, budget):
    """Count first attempts and retries for ever; retry while retries stay under RATIO of
    first attempts plus BURST: quiet hours save up retries for the outage."""
    budget["first"] = budget.get("first", 0) + 1
    budget.setdefault("retries", 0)
    for attempt in range(TRIES):
        if deadline - bank.clock.now() < bank.timeout_s:
            return False, budget
        if attempt:
            if budget["retries"] + 1 > RATIO * budget["first"] + BURST:
                return False, budget
            budget["retries"] += 1
        try:
            bank.charge(order_id)
            return True, budget
        except Unavailable:
            pass
    return False, budget


# -- retry-budget: correct -----------------------------------------------------------------
def sliding_window(bank, order_id, deadline, budget):
    """Of the last 60 calls to the bank, at most 6 may be retries."""
    recent = budget.setdefault("recent", [])
    for attempt in range(TRIES):
        if deadline - bank.clock.now() < bank.timeout_s:
            return False, budget
        if attempt and sum(recent[-60:]) >= 6:
            return False, budget
        recent.append(attempt > 0)
        del recent[:-60]
        try:
            bank.charge(order_id)
            return True, budget
        except Unavailable:
            continue
    return False, budget


def circuit_breaker(bank, order_id, deadline, budget):
    """After three failed calls in a row, only first attempts until a call succeeds."""
    for attempt in range(TRIES):
        if deadline - bank.clock.now() < bank.timeout_s:
            return False, budget
        if attempt and budget.get("failed_in_a_row", 0) >= 3:
            return False, budget
        try:
            bank.charge(order_id)
        except Unavailable:
            budget["failed_in_a_row"] = budget.get("failed_in_a_row", 0) + 1
            continue
        budget["failed_in_a_row"] = 0
        return True, budget
    return False, budget


def time_refilled_bucket(bank, order_id, deadline, budget):
    """A bucket of BURST tokens refilled by one every ten seconds of the clock: after the
    outage it takes a minute and more to allow a retry again."""
    now = bank.clock.now()
    last = budget.get("at", now)
    budget["tokens"] = min(float(BURST), budget.get("tokens", float(BURST)) + (now - last) / 10)
    budget["at"] = now
    tries = 0
    while tries < TRIES and deadline - bank.clock.now() >= bank.timeout_s:
        if tries:
            if budget["tokens"] < 1:
                break
            budget["tokens"] -= 1
        tries += 1
        try:
            bank.charge(order_id)
            return True, budget
        except Unavailable:
            continue
    return False, budget


# -- settle-batch: wrong -------------------------------------------------------------------
def failure_as_duplicate(conn, batch, handle):
    failed = []
    with transaction(conn):
        for d in batch:
            conn.execute("SAVEPOINT one")
            try:
                handle(conn, d)
            except sqlite3.Error:
                conn.execute("ROLLBACK TO one")  # "a store error: the row is there already"
            except Exception:
                conn.execute("ROLLBACK TO one")
                failed.append(d.message_id)
            conn.execute("RELEASE one")
    return failed


def only_the_poison_fails(conn, batch, handle):
    from deliverylab.engine.worker import PoisonMessage

    failed = []
    with transaction(conn):
        for d in batch:
            conn.execute("SAVEPOINT one")
            try:
                handle(conn, d)
            except PoisonMessage:
                conn.execute("ROLLBACK TO one")
                failed.append(d.message_id)
            conn.execute("RELEASE one")
    return failed


def nothing_to_redeliver(conn, batch, handle):
    with transaction(conn):
        for d in batch:
            conn.execute("SAVEPOINT one")
            try:
                handle(conn, d)
            except Exception:
                conn.execute("ROLLBACK TO one")  # logged, moving on
            conn.execute("RELEASE one")
    return []


def stop_at_the_first_failure(conn, batch, handle):
    with transaction(conn):
        for d in batch:
            conn.execute("SAVEPOINT one")
            try:
                handle(conn, d)
            except Exception:
                conn.execute("ROLLBACK TO one")
                conn.execute("RELEASE one")
                return [d.message_id]  # the rest was never tried, and is acked
            conn.execute("RELEASE one")
    return []


def event_ids_for_failures(conn, batch, handle):
    failed = []
    with transaction(conn):
        for d in batch:
            conn.execute("SAVEPOINT one")
            try:
                handle(conn, d)
            except Exception:
                conn.execute("ROLLBACK TO one")
                failed.append(d.event_id)
            conn.execute("RELEASE one")
    return failed


# -- settle-batch: correct -----------------------------------------------------------------
def retry_once_inline(conn, batch, handle):
    """Each message in a transaction of its own, tried twice before it is given back."""
    failed = []
    for d in batch:
        for attempt in (1, 2):
            try:
                with transaction(conn):
                    handle(conn, d)
                break
            except Exception:
                if attempt == 2:
                    failed.append(d.message_id)
    return failed


def one_transaction_per_message(conn, batch, handle):
    failed = []
    for d in batch:
        try:
            with transaction(conn):
                handle(conn, d)
        except Exception:
            failed.append(d.message_id)
    return failed


def first_failure_and_the_rest(conn, batch, handle):
    """Kafka's way: settle up to the first failure; it and everything after come back, and
    each comes back counting a receive, until the poison's last one takes them along."""
    with transaction(conn):
        for i, d in enumerate(batch):
            conn.execute("SAVEPOINT one")
            try:
                handle(conn, d)
            except Exception:
                conn.execute("ROLLBACK TO one")
                conn.execute("RELEASE one")
                return [x.message_id for x in batch[i:]]
            conn.execute("RELEASE one")
    return []


# -- compensate: wrong ---------------------------------------------------------------------
def _state(conn, order):
    row = conn.execute("SELECT state FROM saga_reservations WHERE order_id = ?",
                       (order,)).fetchone()
    return None if row is None else row[0]


def _release(conn, d):
    conn.execute("UPDATE inventory_projection SET reserved_qty = reserved_qty - ?"
                 " WHERE item_id = ?", (d.payload["qty"], d.payload["itemId"]))


def tombstone_not_checked(conn, delivery):
    order = delivery.payload["orderId"]
    state = _state(conn, order)
    if delivery.type == "OrderPlaced":
        apply_order_placed(conn, delivery)  # the tombstone is written, never read
        conn.execute("INSERT INTO saga_reservations VALUES (?, 'reserved')"
                     " ON CONFLICT (order_id) DO NOTHING", (order,))
    elif state == "reserved":
        _release(conn, delivery)
        conn.execute("UPDATE saga_reservations SET state = 'released' WHERE order_id = ?",
                     (order,))
    elif state is None:
        conn.execute("INSERT INTO saga_reservations VALUES (?, 'cancelled')", (order,))


def release_without_marking(conn, delivery):
    order = delivery.payload["orderId"]
    state = _state(conn, order)
    if delivery.type == "OrderPlaced":
        if state == "cancelled":
            return
        apply_order_placed(conn, delivery)
        conn.execute("INSERT INTO saga_reservations VALUES (?, 'reserved')"
                     " ON CONFLICT (order_id) DO NOTHING", (order,))
    elif state == "reserved":
        _release(conn, delivery)  # the state stays 'reserved': a second decline releases again
    elif state is None:
        conn.execute("INSERT INTO saga_reservations VALUES (?, 'cancelled')", (order,))


# -- compensate: correct -------------------------------------------------------------------
def compare_and_set(conn, delivery):
    order = delivery.payload["orderId"]
    if delivery.type == "OrderPlaced":
        if conn.execute("INSERT INTO saga_reservations VALUES (?, 'reserved')"
                        " ON CONFLICT (order_id) DO NOTHING", (order,)).rowcount:
            apply_order_placed(conn, delivery)
    elif delivery.type == "PaymentDeclined":
        if conn.execute("UPDATE saga_reservations SET state = 'released'"
                        " WHERE order_id = ? AND state = 'reserved'", (order,)).rowcount:
            _release(conn, delivery)
        else:
            conn.execute("INSERT INTO saga_reservations VALUES (?, 'cancelled')"
                         " ON CONFLICT (order_id) DO NOTHING", (order,))


def ledger_rebuilds_the_item(conn, delivery):
    """Every order's hold in a ledger of its own; the item's reservation is recomputed from
    the ledger after each event, so a repeat changes nothing."""
    conn.execute("CREATE TABLE IF NOT EXISTS holds (order_id TEXT PRIMARY KEY, item_id TEXT,"
                 " qty INTEGER, state TEXT)")
    p = delivery.payload
    if delivery.type == "OrderPlaced":
        conn.execute("INSERT INTO holds VALUES (?, ?, ?, 'held') ON CONFLICT DO NOTHING",
                     (p["orderId"], p["itemId"], p["qty"]))
    elif delivery.type == "PaymentDeclined":
        conn.execute("INSERT INTO holds VALUES (?, ?, ?, 'cancelled') ON CONFLICT (order_id)"
                     " DO UPDATE SET state = 'cancelled'", (p["orderId"], p["itemId"], p["qty"]))
    conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                 " SELECT ?, coalesce(sum(qty), 0) FROM holds WHERE item_id = ? AND state = 'held'"
                 " ON CONFLICT (item_id) DO UPDATE SET reserved_qty = excluded.reserved_qty",
                 (p["itemId"], p["itemId"]))



# -- page-on: wrong ------------------------------------------------------------------------
def zombie_by_refused_acks_only(before, after):
    pages = page_solution(before, after) - {"zombie"}
    if after.acks_refused_total > before.acks_refused_total:
        pages.add("zombie")  # a fenced effect is a zombie too
    return pages


def impatient_age(before, after):
    pages = page_solution(before, after)
    if after.oldest_message_age_seconds > 5:
        pages.add("stalled")
    return pages


def any_relay_backlog(before, after):
    pages = page_solution(before, after)
    if after.relay_backlog > 0:
        pages.add("relay")
    return pages


# -- page-on: correct ----------------------------------------------------------------------
def page_by_increases(before, after):
    """Counters by how much they grew; drift only when nothing is queued or unsent."""
    def grew(name):
        return getattr(after, name) - getattr(before, name)

    pages = set()
    if after.oldest_message_age_seconds >= 30:
        pages.add("stalled")
    if grew("dead_lettered_total") > 0:
        pages.add("poison")
    if grew("redeliveries_total") > 0.25 * max(1, grew("deliveries_total")):
        pages.add("redeliveries")
    if grew("acks_refused_total") + grew("effects_fenced_total") > 0:
        pages.add("zombie")
    if after.reconcile_drift_items and not (after.queue_visible or after.queue_in_flight
                                            or after.relay_backlog):
        pages.add("drift")
    if after.relay_oldest_unsent_age_seconds >= 30:
        pages.add("relay")
    return pages


def page_from_rules(before, after):
    """The chapter's own Prometheus rules, evaluated on the two readings."""
    from deliverylab.book.alerts import RULES, evaluate

    names = {"MessagesWaitingTooLong": "stalled", "DeadLettersWaiting": "poison",
             "DeadLettersGrowing": "poison", "RedeliveriesHigh": "redeliveries",
             "AcksRefused": "zombie", "EffectsFenced": "zombie", "RelayBehind": "relay"}
    pages = {names[r.alert] for r in RULES
             if r.alert in names and evaluate(r, before, after) > r.threshold}
    if after.reconcile_drift_qty > 0 and after.queue_visible + after.queue_in_flight == 0:
        pages.add("drift")  # the rule's `for: 10m` is what keeps in-flight work out
    return pages



# -- mqtt-once: wrong ----------------------------------------------------------------------
def _reserve(conn, message):
    p = message.payload
    conn.execute("INSERT INTO stock_reserved (order_id, item_id, qty) VALUES (?, ?, ?)",
                 (p["orderId"], p["itemId"], p["qty"]))


def mqtt_no_dedup(conn, message):
    _reserve(conn, message)  # QoS 1 "delivers": it delivers at least once


def mqtt_inbox_only_for_dups(conn, message):
    if message.dup and conn.execute("SELECT 1 FROM mqtt_inbox WHERE key = ?",
                                    (message.payload["orderId"],)).fetchone():
        return
    conn.execute("INSERT INTO mqtt_inbox (key) VALUES (?) ON CONFLICT DO NOTHING",
                 (message.payload["orderId"],))
    _reserve(conn, message)


def mqtt_by_packet_and_order(conn, message):
    key = f"{message.packet_id}:{message.payload['orderId']}"
    if conn.execute("INSERT INTO mqtt_inbox (key) VALUES (?) ON CONFLICT DO NOTHING",
                    (key,)).rowcount:
        _reserve(conn, message)


# -- mqtt-once: correct --------------------------------------------------------------------
def mqtt_reserve_if_absent(conn, message):
    p = message.payload
    conn.execute("INSERT INTO stock_reserved (order_id, item_id, qty) SELECT ?, ?, ?"
                 " WHERE NOT EXISTS (SELECT 1 FROM stock_reserved WHERE order_id = ?)",
                 (p["orderId"], p["itemId"], p["qty"], p["orderId"]))


def mqtt_inbox_by_topic_and_order(conn, message):
    key = f"{message.topic}/{message.payload['orderId']}"
    if conn.execute("SELECT 1 FROM mqtt_inbox WHERE key = ?", (key,)).fetchone() is None:
        conn.execute("INSERT INTO mqtt_inbox (key) VALUES (?)", (key,))
        _reserve(conn, message)


WRONG = [
    ("fenced-write", last_write_wins, "should have refused", "stopped"),
    ("fenced-write", check_then_write, "stale write landed last", "interleaving"),
    ("fenced-write", strictly_newer, "should have taken", "past-range"),
    ("fenced-write", tokens_as_text, "the store should have", "past-range"),
    ("fenced-write", failure_as_refusal, "a failure is not a refusal", "store-failure"),
    ("retry-budget", three_tries, "cannot finish in time", "past-range"),
    ("retry-budget", budget_without_deadline, "cannot finish in time", "past-range"),
    ("retry-budget", deadline_without_budget, "retries multiplied", "lost-message"),
    ("retry-budget", budget_per_order, "retries multiplied", "lost-message"),
    ("retry-budget", never_retry, "was not retried", "lost-message"),
    ("retry-budget", deadline_not_yet_passed, "cannot finish in time", "past-range"),
    ("retry-budget", retry_ratio_counter, "retries multiplied", "lost-message"),
    ("retry-budget", time_refilled_bucket, "was not retried", "lost-message"),
    ("settle-batch", all_or_nothing, "dead-lettered with the poison", "baseline"),
    ("settle-batch", skip_the_failures, "acknowledged as if processed", "lost-message"),
    ("settle-batch", failure_as_duplicate, "projection differs", "store-failure"),
    ("settle-batch", only_the_poison_fails, "your code raised", "lost-message"),
    ("settle-batch", nothing_to_redeliver, "acknowledged as if processed", "baseline"),
    ("settle-batch", stop_at_the_first_failure, "acknowledged as if processed", "baseline"),
    ("settle-batch", first_failure_and_the_rest, "dead-lettered with the poison", "baseline"),
    ("settle-batch", event_ids_for_failures, "not a list of the batch's message ids",
     "baseline"),
    ("compensate", compensate_delta, "should hold 0", "lost-message"),
    ("compensate", compensate_guarded, "a leak", "stopped"),
    ("compensate", tombstone_not_checked, "a leak", "stopped"),
    ("compensate", release_without_marking, "released twice", "lost-message"),
    ("page-on", page_any_drift, "a false alarm", "stopped"),
    ("page-on", page_any_redelivery, "a false alarm", "lost-message"),
    ("page-on", zombie_by_refused_acks_only, "did not page for zombie", "stopped"),
    ("page-on", impatient_age, "a false alarm", "past-range"),
    ("page-on", any_relay_backlog, "a false alarm", "past-range"),
    ("mqtt-once", mqtt_by_packet_id, "lost", "past-range"),
    ("mqtt-once", mqtt_skip_dup, "lost", "lost-message"),
    ("mqtt-once", mqtt_no_dedup, "duplicated", "stopped"),
    ("mqtt-once", mqtt_inbox_only_for_dups, "duplicated", "lost-message"),
    ("mqtt-once", mqtt_by_packet_and_order, "duplicated", "lost-message"),
]

CORRECT = [
    ("fenced-write", one_conditional_upsert),
    ("fenced-write", update_then_insert),
    ("retry-budget", sliding_window),
    ("retry-budget", circuit_breaker),
    ("settle-batch", one_transaction_per_message),
    ("settle-batch", retry_once_inline),
    ("compensate", compare_and_set),
    ("compensate", ledger_rebuilds_the_item),
    ("page-on", page_by_increases),
    ("page-on", page_from_rules),
    ("mqtt-once", mqtt_reserve_if_absent),
    ("mqtt-once", mqtt_inbox_by_topic_and_order),
]
