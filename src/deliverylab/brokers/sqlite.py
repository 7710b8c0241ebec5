"""The queue: send / receive / extend / ack / nack / dead-letter / redrive on one SQLite table.

The verbs map onto Amazon SQS (SendMessage / ReceiveMessage / ChangeMessageVisibility /
DeleteMessage / redrive policy) and pgmq (send / read / set_vt / delete / archive).

Three rules keep it correct with several processes on one file:

* one statement claims messages (``UPDATE … WHERE seq IN (SELECT … LIMIT ?) RETURNING …``), so
  two workers can never lease the same message;
* every delivery gets a fresh receipt, and ack / extend / nack only act while the receipt still
  matches, so a worker whose lease expired cannot delete the message another worker now holds
  (SQS: "you must use the most recent receipt handle");
* after ``max_receives`` deliveries a message moves to ``dead_letters`` instead of looping.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from ..engine.clock import Clock
from ..engine.dialect import Dialect
from ..engine.errors import InvalidInput, check_int, check_number, check_text
from ..engine.ids import Ids
from ..engine.settings import DEFAULT_MAX_RECEIVES
from ..engine.store import SQLITE, Store, names_dialect, transaction
from ..engine.trace import Outcome, lease_detail, log, log_delivery, log_many
from .base import (
    MAX_VISIBILITY_TIMEOUT_S,
    Broker,
    Capabilities,
    Delivery,
    Received,
    Removal,
    check_delivery,
    check_send,
)

# The claim's RETURNING columns, in Delivery's field order.
_DELIVERY_COLUMNS = ("seq, message_id, event_id, type, payload, correlation_id, receipt,"
                     " delivery_count, lease_until, last_error")


def _deliveries(rows: list[tuple[Any, ...]]) -> list[Delivery]:
    """Deliveries from claimed rows (tuples in Delivery's field order), payloads decoded with
    one ``json.loads`` for the whole batch."""
    payloads = json.loads("[" + ",".join(r[4] for r in rows) + "]")
    return [Delivery(r[0], r[1], r[2], r[3], payload, *r[5:])
            for r, payload in zip(rows, payloads, strict=True)]


class SQLiteBroker(Broker):
    """The SQLite broker: the ``queue_messages`` and ``dead_letters`` tables on ``conn``.

    On the consumer's own connection (the lab, the chapters, the four terminals) it
    :meth:`joins` the store: ``send`` joins the caller's transaction (the outbox) and a verb
    can commit with an effect. On another database file it is an external broker like any
    other. ``max_receives`` is the redrive policy's ``maxReceiveCount``. ``trace=True`` writes
    each verb's trace rows into ``delivery_log`` on ``conn`` in the verb's transaction;
    ``trace=False`` leaves them to the worker (for a broker that is not the store).
    """

    # The database this broker's SQL is written for. Its claim is safe with SQLite's single
    # writer only: on a PostgreSQL connection it would hand one message to two workers, so a
    # connection of another database is refused (brokers/postgres.py is PostgreSQL's broker).
    dialect: Dialect = SQLITE
    # Leases are rows compared with the injected clock; on the store's own connection a verb
    # can commit with the effect.
    capabilities = Capabilities(joins_store=True)

    def __init__(self, conn: Store, *, clock: Clock, ids: Ids,
                 max_receives: int = DEFAULT_MAX_RECEIVES, trace: bool = True) -> None:
        found = names_dialect(conn)
        if found is None:
            raise InvalidInput("conn", conn, "a sqlite3 connection (deliverylab.engine.store)")
        if found is not self.dialect:
            raise InvalidInput("conn", f"a {found.name} connection",
                               f"a {self.dialect.name} connection for {type(self).__name__}"
                               f" (a {found.name} store takes its own broker)")
        if not isinstance(trace, bool):
            raise InvalidInput("trace", trace, "True or False")
        self.conn = conn
        self.clock = clock
        self.ids = ids
        self.max_receives = check_int("max_receives", max_receives, minimum=1)
        self.writes_trace = trace
        # (delivery, reason) for each message the last receive moved to dead_letters.
        self.parked: list[tuple[Delivery, str]] = []

    # -- send ------------------------------------------------------------------------------
    def send(self, event_id: str, type: str, payload: dict[str, Any], *,
             correlation_id: str | None = None, delay: float = 0.0,
             dedup_id: str | None = None) -> str:
        """Enqueue one message and return its id.

        Joins the caller's open transaction if there is one: that is the transactional outbox,
        the event commits with the state change that caused it, or neither does. The queue
        table has no producer dedup (``dedup_window`` is None): ``dedup_id`` is checked, then
        a second send with it is a second message, as the contract says.
        """
        body, delay = check_send(event_id, type, payload, correlation_id, delay, dedup_id)
        now = self.clock.now()
        message_id = self.ids.message_id()
        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO queue_messages (message_id, event_id, type, payload, correlation_id,"
                " visible_at, delivery_count, created_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                (message_id, event_id, type, body, correlation_id, now + delay, now),
            )
        return message_id

    # -- receive ---------------------------------------------------------------------------
    _CLAIM = f"""
        UPDATE queue_messages
           SET visible_at = :lease_until,
               lease_until = :lease_until,
               receipt = :token || '.' || (delivery_count + 1),
               delivery_count = delivery_count + 1
         WHERE seq IN (SELECT seq FROM queue_messages
                        WHERE visible_at <= :now
                        ORDER BY visible_at, seq
                        LIMIT :n)
        RETURNING {_DELIVERY_COLUMNS}
    """
    # The same claim for one message: a scalar subquery instead of an IN list, which SQLite
    # runs without building a temporary list (about a third cheaper per call, measured).
    _CLAIM_ONE = _CLAIM.replace("WHERE seq IN (SELECT", "WHERE seq = (SELECT")

    def receive(self, visibility_timeout: float, max_messages: int = 1, *,
                worker: str = "worker") -> Received:
        """Lease up to ``max_messages`` visible messages for ``visibility_timeout`` seconds.

        One statement claims them, so concurrent receivers never get the same message. The
        receipt is a fresh token plus the delivery count: unique for every delivery even when
        two processes share a seed. A message received more than ``max_receives`` times goes to
        ``dead_letters`` in the same transaction instead of being returned.
        """
        vt = check_number("visibility_timeout", visibility_timeout, minimum=0,
                          maximum=MAX_VISIBILITY_TIMEOUT_S)
        n = check_int("max_messages", max_messages, minimum=1, maximum=1000)
        return self._claim(self.clock.now(), vt, n, self.ids.receipt(), worker)

    def _claim(self, now: float, vt: float, n: int, token: str, worker: str) -> Received:
        """:meth:`receive` once its arguments are checked: the claim, in one transaction
        with the dead-letter moves and the ``received`` rows."""
        with transaction(self.conn):
            cur = self.conn.cursor()
            cur.row_factory = None  # plain tuples, in Delivery's field order
            rows = cur.execute(
                self._CLAIM_ONE if n == 1 else self._CLAIM,
                {"lease_until": now + vt, "token": token, "now": now, "n": n}).fetchall()
            if not rows:
                self.parked = []
                return Received()
            rows.sort()  # by seq: RETURNING promises no order
            out: list[Delivery] = []
            parked: list[tuple[Delivery, str]] = []
            for d in _deliveries(rows):
                if d.delivery_count > self.max_receives:
                    # The claim counted one more receive, but this one is never handed out:
                    # record the deliveries that really happened, as the nack path does.
                    d = d._replace(delivery_count=d.delivery_count - 1)
                    times = "once" if d.delivery_count == 1 else f"{d.delivery_count} times"
                    reason = (f"received {times} (max_receives={self.max_receives});"
                              f" last error: {d.last_error or 'none'}")
                    self._move_to_dead_letters(d, reason, worker)
                    parked.append((d, reason))
                else:
                    out.append(d)
            if self.writes_trace:
                detail = lease_detail(now + vt)
                log_many(self.conn, [(now, worker, d.correlation_id, d.event_id, d.message_id,
                                      d.delivery_count, Outcome.RECEIVED, detail)
                                     for d in out])
        # Only once the move has committed: what this receive parked, for the caller to report
        # (the worker never holds these, so without this a message would silently vanish).
        self.parked = parked
        return Received(out, parked)

    # -- settle ----------------------------------------------------------------------------
    def ack(self, delivery: Delivery, *, worker: str = "worker") -> bool:
        """Delete the message if ``delivery`` still holds its lease. False when the receipt is
        stale (the lease ran out and someone else received it, or it was already acked)."""
        return self.ack_many([delivery], worker=worker)[0]

    # The deliveries come as one JSON list of [seq, receipt] pairs: one statement, one lookup
    # by rowid for each, whatever the batch size.
    _ACK_MANY = """
        DELETE FROM queue_messages
         WHERE seq IN (SELECT q.seq FROM json_each(:pairs) AS j
                         JOIN queue_messages AS q
                           ON q.seq = j.value ->> 0 AND q.receipt = j.value ->> 1)
        RETURNING seq, receipt
    """

    def ack_many(self, deliveries: list[Delivery], *, worker: str = "worker") -> list[bool]:
        """Ack several deliveries in one transaction (one DELETE); one bool per delivery."""
        if not isinstance(deliveries, list | tuple):
            raise InvalidInput("deliveries", deliveries, "a list of deliveries")
        for d in deliveries:
            check_delivery(d)
        now = self.clock.now()
        with transaction(self.conn):
            # gone: {seq: receipt} of each row deleted, the receipt that matched.
            if len(deliveries) == 1:  # the common case, without json_each (~10% faster)
                d = deliveries[0]
                gone = {d.seq: d.receipt} if self.conn.execute(
                    "DELETE FROM queue_messages WHERE seq = ? AND receipt = ?",
                    (d.seq, d.receipt)).rowcount == 1 else {}
            else:
                pairs = json.dumps([[d.seq, d.receipt] for d in deliveries])
                cur = self.conn.cursor()
                cur.row_factory = None  # plain (seq, receipt) tuples, straight into the dict
                gone = dict(cur.execute(self._ACK_MANY, {"pairs": pairs}))
            results, logs = [], []
            for d in deliveries:
                # By row and receipt, as ack does one by one: a stale delivery of a message
                # acked in the same batch by its current receipt did not ack anything.
                ok = gone.get(d.seq) == d.receipt
                if ok:
                    del gone[d.seq]  # the same delivery twice: only the first acks
                results.append(ok)
                logs.append((now, worker, d.correlation_id, d.event_id, d.message_id,
                             d.delivery_count, Outcome.ACKED if ok else Outcome.ACK_REJECTED,
                             "" if ok else "receipt is no longer current"))
            if self.writes_trace:
                log_many(self.conn, logs)
        return results

    def extend(self, delivery: Delivery, seconds: float, *, worker: str = "worker") -> bool:
        """Push the lease ``seconds`` past now (SQS ChangeMessageVisibility). False if stale."""
        check_delivery(delivery)
        s = check_number("seconds", seconds, minimum=0, maximum=MAX_VISIBILITY_TIMEOUT_S)
        now = self.clock.now()
        with transaction(self.conn):
            cur = self.conn.execute(
                "UPDATE queue_messages SET visible_at = ?, lease_until = ?"
                " WHERE seq = ? AND receipt = ?",
                (now + s, now + s, delivery.seq, delivery.receipt))
            ok = cur.rowcount == 1
            if ok and self.writes_trace:
                log_delivery(self.conn, delivery, at=now, worker=worker,
                             outcome=Outcome.EXTENDED, detail=lease_detail(now + s))
        return ok

    def nack(self, delivery: Delivery, delay: float = 0.0, *, error: str | None = None,
             worker: str = "worker") -> bool:
        """Give the message back, visible again after ``delay`` seconds. False if stale."""
        check_delivery(delivery)
        d = check_number("delay", delay, minimum=0, maximum=MAX_VISIBILITY_TIMEOUT_S)
        now = self.clock.now()
        with transaction(self.conn):
            cur = self.conn.execute(
                "UPDATE queue_messages SET visible_at = ?, lease_until = NULL, receipt = NULL,"
                " last_error = coalesce(?, last_error) WHERE seq = ? AND receipt = ?",
                (now + d, error, delivery.seq, delivery.receipt))
            ok = cur.rowcount == 1
            if ok and self.writes_trace:
                log_delivery(self.conn, delivery, at=now, worker=worker,
                             outcome=Outcome.NACKED,
                             detail=f"retry in {d:g}s" + (f"; error: {error}" if error else ""))
        return ok

    def dead_letter(self, delivery: Delivery, error: str, *, worker: str = "worker") -> bool:
        """Move the message to ``dead_letters`` now, with ``error``. False if stale."""
        check_delivery(delivery)
        check_text("error", error, max_length=10_000)  # as every engine: a reason, not nothing
        with transaction(self.conn):
            held = self.conn.execute(
                "UPDATE queue_messages SET last_error = ? WHERE seq = ? AND receipt = ?",
                (error, delivery.seq, delivery.receipt)).rowcount == 1
            if held:
                self._move_to_dead_letters(delivery, error, worker)
        return held

    def _move_to_dead_letters(self, d: Delivery, reason: str, worker: str) -> None:
        now = self.clock.now()
        self.conn.execute(
            "INSERT INTO dead_letters (message_id, event_id, type, payload, correlation_id,"
            " delivery_count, last_error, created_at, dead_at)"
            " SELECT message_id, event_id, type, payload, correlation_id, ?,"
            " coalesce(last_error, ?), created_at, ? FROM queue_messages WHERE seq = ?",
            (d.delivery_count, reason, now, d.seq))
        self.conn.execute("DELETE FROM queue_messages WHERE seq = ?", (d.seq,))
        if self.writes_trace:
            log_delivery(self.conn, d, at=now, worker=worker,
                         outcome=Outcome.DEAD_LETTERED, detail=reason)

    def redrive(self, message_ids: list[str] | None = None, *, worker: str = "operator") -> int:
        """Move dead letters (all, or the given ids) back to the queue as new messages with a
        fresh delivery count. Returns how many moved."""
        now = self.clock.now()
        with transaction(self.conn):
            if message_ids is None:
                rows = self.conn.execute(
                    "SELECT * FROM dead_letters ORDER BY dead_at, message_id").fetchall()
            else:
                if not isinstance(message_ids, list | tuple) or not all(
                        isinstance(m, str) for m in message_ids):
                    raise InvalidInput("message_ids", message_ids, "a list of message ids or None")
                rows = []
                # dict.fromkeys: an id named twice must not become two messages.
                for mid in dict.fromkeys(message_ids):
                    row = self.conn.execute(
                        "SELECT * FROM dead_letters WHERE message_id = ?", (mid,)).fetchone()
                    if row is None:
                        raise InvalidInput("message_ids", mid, "the id of a dead letter")
                    rows.append(row)
            for row in rows:
                new_id = self.ids.message_id()
                self.conn.execute(
                    "INSERT INTO queue_messages (message_id, event_id, type, payload,"
                    " correlation_id, visible_at, delivery_count, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                    (new_id, row["event_id"], row["type"], row["payload"],
                     row["correlation_id"], now, now))
                self.conn.execute("DELETE FROM dead_letters WHERE message_id = ?",
                                  (row["message_id"],))
                if self.writes_trace:
                    log(self.conn, at=now, worker=worker, event_id=row["event_id"],
                        correlation_id=row["correlation_id"], message_id=new_id,
                        delivery_count=0, outcome=Outcome.REDRIVEN,
                        detail=f"from dead letter {row['message_id']}")
        return len(rows)

    def drop(self, message_id: str, *, reason: str = "dropped", worker: str = "chaos") -> bool:
        """Delete a message whatever its lease, logging it as ``lost``: fault injection only
        (an auto-ack broker forgetting a message, an operator's mistake). False if absent.

        A lookup, not a new id: any non-empty text is accepted, so an operator can drop a
        message whose id holds characters that ``send`` refuses today (written by an older
        version, or by hand)."""
        check_text("message_id", message_id)
        with transaction(self.conn):
            row = self.conn.execute(
                "SELECT seq, event_id, correlation_id, delivery_count FROM queue_messages"
                " WHERE message_id = ?", (message_id,)).fetchone()
            if row is None:
                return False
            self._forget(row["seq"], row["event_id"], row["correlation_id"], message_id,
                         row["delivery_count"], reason, worker)
        return True

    def lose(self, delivery: Delivery, *, reason: str, worker: str = "chaos") -> bool:
        """:meth:`drop` for a message the caller has just received: found by its row, the
        lease not checked (the broker forgets the message, whoever holds it)."""
        check_delivery(delivery)
        with transaction(self.conn):
            return self._forget(delivery.seq, delivery.event_id, delivery.correlation_id,
                                delivery.message_id, delivery.delivery_count, reason, worker)

    def _forget(self, seq: int, event_id: str, correlation_id: str | None, message_id: str,
                delivery_count: int, reason: str, worker: str) -> bool:
        if self.conn.execute("DELETE FROM queue_messages WHERE seq = ?", (seq,)).rowcount == 0:
            return False
        if self.writes_trace:
            log(self.conn, at=self.clock.now(), worker=worker, event_id=event_id,
                correlation_id=correlation_id, message_id=message_id,
                delivery_count=delivery_count, outcome=Outcome.LOST, detail=reason)
        return True

    def joins(self, store: object) -> bool:
        """True when ``store`` is this broker's own connection: one SQLite transaction can
        then hold an effect and an ACK (another connection, even to the same file, cannot)."""
        return store is self.conn

    def destroy(self) -> None:
        """Delete every queued message and dead letter in this broker's tables. The
        connection stays open: its owner closes it."""
        with transaction(self.conn):
            self.conn.execute("DELETE FROM queue_messages")
            self.conn.execute("DELETE FROM dead_letters")

    # -- look ------------------------------------------------------------------------------
    def depth(self) -> dict[str, int]:
        """Messages visible now, in flight (leased or delayed), and dead-lettered."""
        now = self.clock.now()
        visible = self.conn.execute(
            "SELECT count(*) FROM queue_messages WHERE visible_at <= ?", (now,)).fetchone()[0]
        total = self.conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
        dead = self.conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        return {"visible": visible, "in_flight": total - visible, "dead_letters": dead}

    def next_visible_at(self) -> float | None:
        """When the next message becomes visible (None if the queue is empty)."""
        row = self.conn.execute("SELECT min(visible_at) FROM queue_messages").fetchone()
        at: float | None = row[0]
        return at

    def queued_event_ids(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT event_id FROM queue_messages")}

    def dead_lettered_event_ids(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT event_id FROM dead_letters")}


# The name the chapters and the lab have always used.
Queue = SQLiteBroker


# -- for the registry ---------------------------------------------------------------------------
_SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")
_LAB_TABLES = ("orders", "queue_messages")  # one of them makes a database a lab's


def removal_of(path: str, *, field: str = "store") -> Removal:
    """What ``deliverylab cleanup`` removes for the SQLite file ``path``: the file with its
    ``-wal``, ``-shm`` and ``-journal``. Reads only. A path that is not a regular file, or a
    file that is not a lab's database, is InvalidInput naming ``field``; a file already gone
    (its ``-wal`` or ``-shm`` perhaps left behind) is said, not refused."""
    import contextlib
    from pathlib import Path

    p = Path(path)

    def family() -> list[Path]:
        return [Path(f"{p}{s}") for s in _SQLITE_SUFFIXES if Path(f"{p}{s}").exists()]

    def unlink() -> None:
        for f in family():
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    if not p.exists():
        present = family()
        if not present:
            return Removal(f"file {path} (not there: nothing to remove)")
        # Only the -wal or -shm left behind: they are the database's, remove them.
        return Removal(f"file {path}", unlink, [f.name for f in present])
    if not p.is_file():
        raise InvalidInput(field, path, "a database file (a SQLite file or a postgresql://"
                                        " URL); that path is not a regular file")
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=5)
        try:
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            orders = conn.execute("SELECT count(*) FROM orders").fetchone()[0] \
                if "orders" in tables else None
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise InvalidInput(field, path, f"a deliverylab database, and this file is not one"
                                        f" ({exc}); remove it yourself if it is yours") from None
    if not tables & set(_LAB_TABLES):
        raise InvalidInput(field, path, "a deliverylab database, and this SQLite file has none"
                                        " of its tables; remove it yourself if it is yours")
    detail = "" if orders is None else f" ({orders} orders)"
    # Listed after the look inside: opening a WAL database makes its -shm.
    return Removal(f"file {path}{detail}", unlink, [f.name for f in family()])
