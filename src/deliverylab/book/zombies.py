"""Chapter 8, "Leases lie": a worker paused past its lease, and the fencing token that stops it.

A lease is a promise on the broker's clock, not on the worker's. A worker that stalls (a GC
pause, a stalled disk, a laptop lid) for longer than its lease still believes it holds the
message when it wakes; meanwhile the broker has handed the message to another worker. The
sleeper is a *zombie*: whatever it writes next, it writes without a lease.

The consumer here makes a shipping label for each order. Its order of work is the usual one
for a write to another system: read what the label needs (the address), write the label to
the **document store** (a system of its own: a separate SQLite database, its own commits),
then commit the inbox row and the reservation in the store's transaction, then ACK. The inbox
keeps the reservation single, whoever commits second; the label is written before the inbox
is asked, so nothing on the consumer's side keeps the zombie's stale label from landing last.

The cure is Kleppmann's fencing token (https://martin.kleppmann.com/2016/02/08/how-to-do-
distributed-locking.html): a number that grows with every lease, sent with every write, and
checked by the store, which refuses a write whose token is below the highest it has seen for
that key. Here the token is the delivery count: the broker counts every lease of a message,
so a later lease always carries a larger one. (That holds for a key only one message writes;
a key several messages write needs a counter of its own per key, such as chapter 6's version.)
The receipt check every engine but JetStream makes on an ACK is the same idea applied to the
ACK: only the current lease may settle the message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..brokers.base import Broker, Delivery
from ..engine.check import check
from ..engine.clock import Clock
from ..engine.errors import InvalidInput, check_id, check_int, check_text
from ..engine.store import Store, connect, transaction
from ..engine.trace import Outcome, log_delivery
from ..engine.worker import CONSUMER, apply_order_placed
from .tables import install_schema

if TYPE_CHECKING:
    import pandas as pd

DOCUMENTS = """
CREATE TABLE IF NOT EXISTS documents (
    key        TEXT PRIMARY KEY,
    body       TEXT NOT NULL,
    token      INTEGER,
    writer     TEXT NOT NULL,
    written_at REAL NOT NULL
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS document_writes (
    seq        INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    key        TEXT NOT NULL,
    body       TEXT NOT NULL,
    token      INTEGER,
    writer     TEXT NOT NULL,
    accepted   INTEGER NOT NULL
) STRICT;
"""
ADDRESSES = """
CREATE TABLE IF NOT EXISTS shipping_addresses (
    order_id   TEXT PRIMARY KEY,
    address    TEXT NOT NULL,
    changed_at REAL NOT NULL
) STRICT, WITHOUT ROWID;
"""
_INBOX = ("INSERT INTO inbox_processed (consumer, event_id, processed_at) VALUES (?, ?, ?)"
          " ON CONFLICT (consumer, event_id) DO NOTHING")


class DocumentStore:
    """A store in another system: one document per key, last write wins, unless ``fenced``.

    ``fenced=True``: every write carries a token and the store keeps, per key, the highest
    token it accepted; a write with a lower one is refused (False), with nothing changed. The
    compare and the write are one statement, so two writers cannot both pass the check.
    Every write attempt, accepted or not, is kept in ``document_writes`` for the book."""

    def __init__(self, path: str | Path = ":memory:", *, clock: Clock,
                 fenced: bool = False) -> None:
        if not isinstance(fenced, bool):
            raise InvalidInput("fenced", fenced, "True or False")
        self.conn = connect(path, must_exist=False)
        install_schema(self.conn, DOCUMENTS)
        self.clock, self.fenced = clock, fenced

    def put(self, key: str, body: str, *, token: int | None, writer: str) -> bool:
        """Write ``body`` under ``key``; True if the store took it. A fenced store needs a
        ``token`` (an int >= 1) and refuses one below the key's highest."""
        check_id("key", key)
        check_text("body", body)
        check_id("writer", writer)
        if token is not None or self.fenced:
            check_int("token", token, minimum=1)
        now = self.clock.now()
        guard = " WHERE excluded.token >= documents.token" if self.fenced else ""
        with transaction(self.conn):
            accepted = self.conn.execute(
                "INSERT INTO documents (key, body, token, writer, written_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET body = excluded.body,"
                " token = excluded.token, writer = excluded.writer,"
                " written_at = excluded.written_at" + guard,
                (key, body, token, writer, now)).rowcount == 1
            self.conn.execute("INSERT INTO document_writes (at, key, body, token, writer,"
                              " accepted) VALUES (?, ?, ?, ?, ?, ?)",
                              (now, key, body, token, writer, int(accepted)))
        return accepted

    def get(self, key: str) -> str | None:
        row = self.conn.execute("SELECT body FROM documents WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def writes(self) -> pd.DataFrame:
        """Every write attempt in order: when, which key, what, with which token, by whom,
        and whether the store took it."""
        import pandas as pd

        cur = self.conn.execute("SELECT at, key, body, token, writer, accepted"
                                " FROM document_writes ORDER BY seq")
        frame = pd.DataFrame([tuple(r) for r in cur], columns=[c[0] for c in cur.description])
        frame["accepted"] = frame["accepted"].astype(bool)
        return frame

    def close(self) -> None:
        self.conn.close()


def install_addresses(conn: Store) -> None:
    """The store's table of shipping addresses (idempotent)."""
    install_schema(conn, ADDRESSES)


def set_address(conn: Store, order_id: str, address: str, *, now: float) -> None:
    """The customer sets (or changes) the order's shipping address."""
    check_id("order_id", order_id)
    check_text("address", address)
    with transaction(conn):
        conn.execute("INSERT INTO shipping_addresses (order_id, address, changed_at)"
                     " VALUES (?, ?, ?) ON CONFLICT (order_id) DO UPDATE"
                     " SET address = excluded.address, changed_at = excluded.changed_at",
                     (order_id, address, now))


@dataclass
class LabelAttempt:
    """One worker's attempt at one delivery, in the consumer's four steps, each a method so a
    run can stop a worker between any two of them (the pause). ``fence``: send the delivery
    count as the token, and skip the ACK once the store has refused it."""

    store: Store
    broker: Broker
    docs: DocumentStore
    clock: Clock
    worker: str
    fence: bool = False
    delivery: Delivery | None = None
    label: str | None = None
    refused: bool = False
    steps: list[dict[str, Any]] = field(default_factory=list)

    def _step(self, step: str, result: str) -> None:
        self.steps.append({"t": self.clock.now(), "worker": self.worker, "step": step,
                           "result": result})

    def receive(self, visibility_timeout: float = 2.0) -> Delivery | None:
        got = self.broker.receive(visibility_timeout, 1, worker=self.worker)
        self.delivery = got[0] if got else None
        if self.delivery is not None:
            d = self.delivery
            self._step("receive", f"delivery {d.delivery_count}, lease until"
                                  f" {d.lease_until:g}" if not _wall(self.clock)
                       else f"delivery {d.delivery_count}")
        return self.delivery

    def read(self) -> str:
        """Read what the label needs, now: the order's address."""
        d = self._held()
        order = d.payload.get("orderId", d.correlation_id)
        row = self.store.execute("SELECT address FROM shipping_addresses WHERE order_id = ?",
                                 (order,)).fetchone()
        self.label = f"{order}: {d.payload.get('qty')} x {d.payload.get('itemId')}" \
                     f" to {row[0] if row else '(no address)'}"
        self._step("read address", self.label)
        return self.label

    def write_label(self) -> bool:
        """Write the label to the document store (with the token, if fenced)."""
        d = self._held()
        token = d.delivery_count if self.fence else None
        ok = self.docs.put(d.correlation_id or d.event_id, self.label or "", token=token,
                           writer=self.worker)
        self.refused = not ok
        if self.refused:
            with transaction(self.store):  # the refused effect, in the trace (the metrics count it)
                log_delivery(self.store, d, at=self.clock.now(), worker=self.worker,
                             outcome=Outcome.FENCED, detail=f"stale fencing token {token}")
        self._step("write label", ("token " + str(token) + ": " if token else "")
                   + ("written" if ok else "refused by the store"))
        return ok

    def commit(self) -> str:
        """The inbox row and the reservation, in one transaction of the store."""
        d = self._held()
        now = self.clock.now()
        with transaction(self.store):
            fresh = self.store.execute(_INBOX, (CONSUMER, d.event_id, now)).rowcount == 1
            if fresh:
                apply_order_placed(self.store, d)
            log_delivery(self.store, d, at=now, worker=self.worker,
                         outcome=Outcome.APPLIED if fresh else Outcome.DUPLICATE_SKIPPED,
                         detail="label consumer")
        result = "reserved" if fresh else "inbox: duplicate skipped"
        self._step("commit", result)
        return result

    def ack(self) -> bool | None:
        """ACK, unless fenced and the store refused this lease's write (None: not sent)."""
        d = self._held()
        if self.fence and self.refused:
            self._step("ack", "not sent: a newer lease wrote")
            return None
        ok = self.broker.ack(d, worker=self.worker)
        self._step("ack", "accepted" if ok else "refused: this lease no longer holds it")
        return ok

    def _held(self) -> Delivery:
        if self.delivery is None:
            raise InvalidInput("delivery", None, "a delivery: call receive() first")
        return self.delivery


def _wall(clock: Clock) -> bool:
    return not hasattr(clock, "advance")


@dataclass
class ZombieRun:
    """What a zombie run left: every step in order, the document store's write log, the
    label the store holds at the end, and the checker's verdict on the reservation."""

    steps: pd.DataFrame
    writes: pd.DataFrame
    final_label: str | None
    verdict: str
    acks: dict[str, bool | None]


def zombie_story(store: Store, broker: Broker, clock: Clock, *,
                 fence: bool, pause: Callable[[float], object], lease: float = 2.0,
                 pause_s: float = 5.0, ack_b_before_a: bool = True) -> ZombieRun:
    """The story, on any engine: order ``o-001`` to 12 Old Street; worker A receives it,
    reads the address, and stalls for ``pause_s`` seconds (``pause`` moves time: a fake clock
    advances, a real one sleeps). One second in, the customer moves to 7 New Road. When A's
    lease has run out, worker B receives the message, reads, writes the label, commits and (if
    ``ack_b_before_a``) ACKs. Then A wakes and carries on: write, commit, ACK; B's ACK last
    otherwise. ``store`` must hold the order's message in ``broker`` and no other."""
    import pandas as pd

    install_addresses(store)
    docs = DocumentStore(clock=clock, fenced=fence)
    try:
        set_address(store, "o-001", "12 Old Street", now=clock.now())
        a = LabelAttempt(store, broker, docs, clock, "worker-A", fence)
        b = LabelAttempt(store, broker, docs, clock, "worker-B", fence)
        if a.receive(lease) is None:
            raise RuntimeError("worker-A received nothing: is the order's message queued?")
        a.read()
        a._step("pause", f"stalls for {pause_s:g} s (a GC pause)")
        pause(1.0)
        set_address(store, "o-001", "7 New Road", now=clock.now())
        b.steps.append({"t": clock.now(), "worker": "customer", "step": "change address",
                        "result": "7 New Road"})
        pause(lease - 1.0 + 0.1)
        waited = 0.0
        while b.receive(lease) is None:  # the broker hands it out once the lease has run out
            pause(0.1)
            waited += 0.1
            if waited > 10 * lease:
                raise RuntimeError("the message never came back after the lease")
        b.read()
        b.write_label()
        b.commit()
        acks: dict[str, bool | None] = {}
        if ack_b_before_a:
            acks["worker-B"] = b.ack()
        rest = pause_s - (1.0 + lease - 1.0 + 0.1 + waited)
        if rest > 0:
            pause(rest)
        a._step("wake", "carries on as if it still held the lease")
        a.write_label()
        a.commit()
        acks["worker-A"] = a.ack()
        if not ack_b_before_a:
            acks["worker-B"] = b.ack()
        in_order = sorted(a.steps + b.steps, key=lambda s: s["t"])
        steps = pd.DataFrame(in_order)
        steps["t"] = steps["t"] - steps["t"].iloc[0]
        steps["t"] = steps["t"].round(1)
        return ZombieRun(steps=steps, writes=docs.writes(), final_label=docs.get("o-001"),
                         verdict=check(store, None if broker.joins(store) else broker).verdict,
                         acks=acks)
    finally:
        docs.close()


def sqlite_story(*, fence: bool, seed: int = 8) -> ZombieRun:
    """:func:`zombie_story` on the lab's SQLite engine, on a FakeClock: reproducible to the
    digit."""
    from .lab import Lab

    lab = Lab(seed=seed)
    lab.place_order("coffee-beans", 1, order_id="o-001")
    return zombie_story(lab.store, lab.broker, lab.clock, fence=fence, pause=lab.clock.advance)


def jetstream_story(*, fence: bool, seed: int = 8) -> ZombieRun:
    """:func:`zombie_story` on a real JetStream stream (AckWait 1 s, timed by the server; the
    pause is a real 2.5 s sleep). B ACKs last, so A's stale ACK meets B's lease."""
    from ..engine.orders import place_order
    from ..engine.relay import Relay
    from .beyond import LEASE_S, open_engine

    with open_engine("jetstream", seed=seed) as e:
        place_order(e.broker, item_id="coffee-beans", qty=1, order_id="o-001", store=e.store)
        Relay(e.store, e.broker, clock=e.clock).run_until_idle()
        return zombie_story(e.store, e.broker, e.clock, fence=fence, pause=e.clock.sleep,
                            lease=LEASE_S, pause_s=2.5, ack_b_before_a=False)
