"""Chapter 6: one charge per order, the newer status wins, the nightly inbox cleanup."""

from __future__ import annotations

from deliverylab.course import retention
from deliverylab.course.ex06 import (
    charge_keyed_by_attempt,
    charge_keyed_by_receipt,
    charge_without_key,
    cleanup_keeps_dead_letters,
    cleanup_nothing,
    cleanup_redelivery_only,
    status_cancel_wins_if_newer,
    status_compared_as_text,
    status_final_is_sticky,
    status_last_write_wins,
    status_newer_by_arrival,
    status_newer_wins_only,
    status_stale_includes_redelivery,
    status_upsert_where_newer,
)

CHAPTER = 6


# -- charge-once: wrong ---------------------------------------------------------------------
def charge_swallows_timeout(service, delivery):
    order = delivery.payload
    try:
        service.charge(order_id=order["orderId"], amount=order["qty"] * 500)
    except TimeoutError:
        pass  # it probably went through; a retry would charge twice


def charge_checks_the_ledger(service, delivery):
    order = delivery.payload
    if not service.find_charges(order["orderId"]):  # not charged yet: charge it
        service.charge(order_id=order["orderId"], amount=order["qty"] * 500)


def charge_keyed_but_swallows_timeout(service, delivery):
    order = delivery.payload
    try:
        service.charge(order_id=order["orderId"], amount=order["qty"] * 500,
                       idempotency_key=delivery.event_id)
    except TimeoutError:
        pass  # keyed: a retry would be safe, but it surely went through


# -- charge-once: correct -------------------------------------------------------------------
def charge_retries_with_the_same_key(service, delivery):
    order = delivery.payload
    for attempt in range(3):  # the same key every time: a retry is never a new charge
        try:
            service.charge(order_id=order["orderId"], amount=order["qty"] * 500,
                           idempotency_key=f"order-{order['orderId']}")
            return
        except TimeoutError:
            if attempt == 2:
                raise


def charge_checks_the_ledger_then_keys(service, delivery):
    order = delivery.payload
    key = delivery.event_id
    if any(c["idempotency_key"] == key for c in service.find_charges(order["orderId"])):
        return  # the provider has it: nothing to do
    service.charge(order_id=order["orderId"], amount=order["qty"] * 500, idempotency_key=key)


# -- newer-wins: wrong ----------------------------------------------------------------------
def _newer_wins(conn, order_id, status, version, now):
    """The status UPSERT alone (the cancellation stands, otherwise the newer change wins); the
    wrong answers below differ in their audit."""
    conn.execute(
        "INSERT INTO order_status (order_id, status, version, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (order_id) DO UPDATE SET status = excluded.status,"
        " version = excluded.version, updated_at = excluded.updated_at"
        " WHERE order_status.status <> 'cancelled'"
        " AND (excluded.status = 'cancelled' OR excluded.version > order_status.version)",
        (order_id, status, version, now))


def _loses(conn, order_id, status, version):
    """Whether the change in place beats this one (read before the UPSERT)."""
    row = conn.execute("SELECT status, version FROM order_status WHERE order_id = ?",
                       (order_id,)).fetchone()
    return row is not None and row[1] != version and (
        row[0] == "cancelled" or (status != "cancelled" and row[1] > version))


def stale_plain_insert(conn, order_id, status, version, now):
    if _loses(conn, order_id, status, version):  # a stale change delivered twice: a second row
        conn.execute("INSERT INTO status_stale (order_id, version, status, seen_at)"
                     " VALUES (?, ?, ?, ?)", (order_id, version, status, now))
    _newer_wins(conn, order_id, status, version, now)


def stale_means_replaced(conn, order_id, status, version, now):
    # "Stale" as in "superseded": the change a newer one replaces, not one that came late.
    conn.execute("INSERT INTO status_stale (order_id, version, status, seen_at)"
                 " SELECT order_id, version, status, ? FROM order_status"
                 " WHERE order_id = ? AND version < ? ON CONFLICT DO NOTHING",
                 (now, order_id, version))
    _newer_wins(conn, order_id, status, version, now)


def stale_compared_as_text(conn, order_id, status, version, now):
    _newer_wins(conn, order_id, status, version, now)
    conn.execute("INSERT INTO status_stale (order_id, version, status, seen_at)"
                 " SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM order_status WHERE order_id = ?"
                 "  AND ((status = 'cancelled' AND version <> ?)"
                 "   OR CAST(version AS TEXT) > CAST(? AS TEXT))) ON CONFLICT DO NOTHING",
                 (order_id, version, status, now, order_id, version, version))


def stale_only_if_older(conn, order_id, status, version, now):
    # The status is right, the audit is the old one: a payment reported after the
    # cancellation is refused, but being newer it is never recorded.
    _newer_wins(conn, order_id, status, version, now)
    conn.execute("INSERT INTO status_stale (order_id, version, status, seen_at)"
                 " SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM order_status"
                 "  WHERE order_id = ? AND version > ?) ON CONFLICT DO NOTHING",
                 (order_id, version, status, now, order_id, version))


def stale_cancel_that_came_late(conn, order_id, status, version, now):
    # Records what came after a newer change or after the cancellation: but a cancellation
    # that arrives after a newer change wins; it is not stale.
    row = conn.execute("SELECT status, version FROM order_status WHERE order_id = ?",
                       (order_id,)).fetchone()
    if row is not None and row[1] != version and (row[0] == "cancelled" or row[1] > version):
        conn.execute("INSERT INTO status_stale (order_id, version, status, seen_at)"
                     " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                     (order_id, version, status, now))
    _newer_wins(conn, order_id, status, version, now)


def status_cancel_keeps_the_higher_version(conn, order_id, status, version, now):
    # The cancellation wins, but the row keeps the higher version "so that older changes stay
    # refused": the cancellation delivered again then looks older than the row, and stale.
    row = conn.execute("SELECT status, version FROM order_status WHERE order_id = ?",
                       (order_id,)).fetchone()
    if row is None:
        conn.execute("INSERT INTO order_status VALUES (?, ?, ?, ?)",
                     (order_id, status, version, now))
    elif row[1] == version:
        pass  # the change in place, delivered again
    elif row[0] != "cancelled" and (status == "cancelled" or version > row[1]):
        conn.execute("UPDATE order_status SET status = ?, version = ?, updated_at = ?"
                     " WHERE order_id = ?", (status, max(version, row[1]), now, order_id))
    else:
        conn.execute("INSERT OR IGNORE INTO status_stale VALUES (?, ?, ?, ?)",
                     (order_id, version, status, now))


# -- newer-wins: correct --------------------------------------------------------------------
def status_replace_unless_beaten(conn, order_id, status, version, now):
    seen = conn.execute("SELECT status, version FROM order_status WHERE order_id = ?",
                        (order_id,)).fetchone()
    # Replace the row unless it holds this change, the cancellation, or a newer change (a
    # cancellation is beaten by nothing newer).
    conn.execute("INSERT OR REPLACE INTO order_status (order_id, status, version, updated_at)"
                 " SELECT ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM order_status"
                 "  WHERE order_id = ? AND (version = ? OR status = 'cancelled'"
                 "   OR (? <> 'cancelled' AND version > ?)))",
                 (order_id, status, version, now, order_id, version, status, version))
    after = conn.execute("SELECT version FROM order_status WHERE order_id = ?",
                         (order_id,)).fetchone()
    if seen is not None and after[0] != version:  # it arrived and lost
        exists = conn.execute("SELECT 1 FROM status_stale WHERE order_id = ? AND version = ?",
                              (order_id, version)).fetchone()
        if exists is None:
            conn.execute("INSERT INTO status_stale VALUES (?, ?, ?, ?)",
                         (order_id, version, status, now))


def status_ranked(conn, order_id, status, version, now):
    # A maximum again, under another order: (is it the cancellation?, version). Two changes
    # of an order never tie, so an equal rank is the change in place delivered again.
    rank = (status == "cancelled", version)
    held = conn.execute("SELECT status = 'cancelled', version FROM order_status"
                        " WHERE order_id = ?", (order_id,)).fetchone()
    if held is None or rank > (bool(held[0]), held[1]):
        conn.execute("INSERT INTO order_status (order_id, status, version, updated_at)"
                     " VALUES (?, ?, ?, ?) ON CONFLICT (order_id) DO UPDATE SET"
                     " status = excluded.status, version = excluded.version,"
                     " updated_at = excluded.updated_at", (order_id, status, version, now))
    elif rank < (bool(held[0]), held[1]):
        conn.execute("INSERT OR IGNORE INTO status_stale VALUES (?, ?, ?, ?)",
                     (order_id, version, status, now))


# -- inbox-cleanup --------------------------------------------------------------------------
def cleanup_halves_the_window(conn, clock, policy):
    horizon = retention.dedup_horizon(
        visibility_timeout=policy.visibility_timeout, max_receives=policy.max_receives,
        backoff_cap=policy.backoff_cap, redrive_window=policy.redrive_window)
    # Half the window is plenty: nobody redrives after a day.
    retention.expire_dead_letters(conn, older_than=policy.redrive_window / 2, clock=clock)
    retention.prune_inbox(conn, older_than=horizon.total, horizon=horizon, clock=clock)


def cleanup_forces_the_lease(conn, clock, policy):
    horizon = retention.dedup_horizon(
        visibility_timeout=policy.visibility_timeout, max_receives=policy.max_receives,
        backoff_cap=policy.backoff_cap, redrive_window=policy.redrive_window)
    retention.expire_dead_letters(conn, older_than=policy.redrive_window, clock=clock)
    # A row older than a lease cannot come back... the helper is too careful.
    retention.prune_inbox(conn, older_than=policy.visibility_timeout * policy.max_receives,
                          horizon=horizon, clock=clock, force=True)


def cleanup_in_sql(conn, clock, policy):
    now = clock.now()
    redelivery = policy.max_receives * (policy.visibility_timeout + policy.backoff_cap)
    keep = redelivery + policy.redrive_window
    with retention_tx(conn):
        conn.execute("DELETE FROM dead_letters WHERE dead_at < ?",
                     (now - policy.redrive_window,))
        conn.execute("DELETE FROM inbox_processed WHERE processed_at < ?", (now - keep,))


def retention_tx(conn):
    from deliverylab.course import transaction

    return transaction(conn)


def cleanup_with_margin(conn, clock, policy):
    horizon = retention.dedup_horizon(
        visibility_timeout=policy.visibility_timeout, max_receives=policy.max_receives,
        backoff_cap=policy.backoff_cap, redrive_window=policy.redrive_window)
    retention.expire_dead_letters(conn, older_than=policy.redrive_window + 3600, clock=clock)
    retention.prune_inbox(conn, older_than=horizon.total + 3 * 3600, horizon=horizon,
                          clock=clock)


WRONG = [
    ("charge-once", charge_without_key, "charged more than once", "lost-message"),
    ("charge-once", charge_keyed_by_receipt, "charged more than once", "lost-message"),
    ("charge-once", charge_keyed_by_attempt, "charged more than once", "lost-message"),
    ("charge-once", charge_swallows_timeout, "never charged", "lost-message"),
    ("charge-once", charge_keyed_but_swallows_timeout, "never charged", "lost-message"),
    ("charge-once", charge_checks_the_ledger, "charged more than once", "interleaving"),
    ("newer-wins", status_last_write_wins, "wrong status", "lost-message"),
    ("newer-wins", status_newer_by_arrival, "wrong status", "interleaving"),
    ("newer-wins", status_final_is_sticky, "wrong status", "interleaving"),
    ("newer-wins", status_newer_wins_only, "its cancellation stands", "baseline"),
    ("newer-wins", status_cancel_wins_if_newer, "wrong status", "interleaving"),
    ("newer-wins", stale_only_if_older, "not in status_stale", "baseline"),
    ("newer-wins", stale_cancel_that_came_late, "recorded as stale that were not",
     "interleaving"),
    ("newer-wins", status_cancel_keeps_the_higher_version, "recorded as stale that were not",
     "lost-message"),
    ("newer-wins", status_stale_includes_redelivery, "recorded as stale that were not",
     "lost-message"),
    ("newer-wins", stale_plain_insert, "UNIQUE constraint failed", "lost-message"),
    ("newer-wins", stale_means_replaced, "recorded as stale that were not", "baseline"),
    ("newer-wins", stale_compared_as_text, "not in status_stale", "past-range"),
    ("newer-wins", status_compared_as_text, "wrong status", "past-range"),
    ("inbox-cleanup", cleanup_redelivery_only, "duplicated", "lost-message"),
    ("inbox-cleanup", cleanup_keeps_dead_letters, "duplicated", "past-range"),
    ("inbox-cleanup", cleanup_nothing, "grows for ever", "baseline"),
    ("inbox-cleanup", cleanup_halves_the_window, "inside the", "past-range"),
    ("inbox-cleanup", cleanup_forces_the_lease, "duplicated", "lost-message"),
]
CORRECT = [
    ("charge-once", charge_retries_with_the_same_key),
    ("charge-once", charge_checks_the_ledger_then_keys),
    ("newer-wins", status_upsert_where_newer),
    ("newer-wins", status_replace_unless_beaten),
    ("newer-wins", status_ranked),
    ("inbox-cleanup", cleanup_in_sql),
    ("inbox-cleanup", cleanup_with_margin),
]
