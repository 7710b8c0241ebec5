"""What a submission's SQL may do to the grader's database: an SQLite authorizer.

A submission that is handed a connection (a handler, a repair, a cleanup) runs its SQL on
the grader's real database, because its effect is what the grader judges. It may read every
table, and write the tables its exercise is about (the projection, the inbox, the fence,
the status table, the dead letters' expiry). It may not write the grader's record of what
happened, nor anything the checker reads as the truth:

* the delivery log (every receive, ACK and applied effect), the orders and their events, the
  queue's messages, the producer's idempotency keys, the outbox, the payment provider's
  ledger, the status changes that really happened;
* the schema: no trigger, no DROP or ALTER of a table it did not create, no ATTACH, no
  PRAGMA that sets a value;
* the transaction it runs in, when it runs inside the worker's (a handler): no COMMIT, no
  ROLLBACK, no RELEASE of a savepoint it did not open.

SQLite asks the authorizer while it prepares each statement
(https://www.sqlite.org/c3ref/set_authorizer.html); setting it expires every prepared
statement, so a statement the grader prepared earlier is checked again before the
submission can run it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

# table -> why a submission may not write it
PROTECTED: dict[str, str] = {
    "delivery_log": "the grader's record of every delivery",
    "orders": "the orders, the truth the projection is judged against",
    "queue_messages": "the queue's own messages",
    "idempotency_keys": "the producer's idempotency keys",
    "outbox": "the events the orders produced",
    "payment_charges": "the payment provider's ledger",
    "payment_idempotency": "the payment provider's own keys",
    "order_status_changes": "the status changes that really happened",
    "sqlite_sequence": "the schema's counters",
    "stale_expected": "the grader's own note of the changes that arrive late",
    "status_held": "the grader's own note of the change in place",
}
# table -> the only write a submission may make to it
ONLY: dict[str, int] = {"dead_letters": sqlite3.SQLITE_DELETE}

_WRITES = {sqlite3.SQLITE_INSERT: "INSERT into", sqlite3.SQLITE_UPDATE: "UPDATE of",
           sqlite3.SQLITE_DELETE: "DELETE from"}
_SCHEMA = {sqlite3.SQLITE_DROP_TABLE: "DROP TABLE", sqlite3.SQLITE_DROP_TEMP_TABLE: "DROP TABLE",
           sqlite3.SQLITE_ALTER_TABLE: "ALTER TABLE", sqlite3.SQLITE_DROP_INDEX: "DROP INDEX",
           sqlite3.SQLITE_CREATE_TRIGGER: "CREATE TRIGGER",
           sqlite3.SQLITE_CREATE_TEMP_TRIGGER: "CREATE TRIGGER",
           sqlite3.SQLITE_DROP_TRIGGER: "DROP TRIGGER",
           sqlite3.SQLITE_DROP_TEMP_TRIGGER: "DROP TRIGGER",
           sqlite3.SQLITE_CREATE_VTABLE: "CREATE VIRTUAL TABLE",
           sqlite3.SQLITE_ATTACH: "ATTACH", sqlite3.SQLITE_DETACH: "DETACH"}


class Guard:
    """The authorizer for one call of a submission. ``inside`` says whether the call runs
    inside a transaction it does not own (a handler, in the worker's). ``refused`` holds
    the first statement refused, in words."""

    def __init__(self, *, inside: bool, created: set[str] | None = None) -> None:
        self.inside = inside
        self.savepoints: list[str] = []
        self.created = created if created is not None else set()
        self.refused: str = ""

    def _deny(self, text: str) -> int:
        self.refused = text
        return sqlite3.SQLITE_DENY

    def __call__(self, action: int, arg1: str | None, arg2: str | None, db: str | None,
                 source: str | None) -> int:
        if action in _WRITES and arg1 is not None:
            table = arg1.lower()
            if table in self.created:
                return sqlite3.SQLITE_OK
            if table in PROTECTED:  # the grader's temporary tables too
                return self._deny(f"{_WRITES[action]} {arg1} ({PROTECTED[table]}: your code"
                                  " may read it, not change it)")
            if db == "temp":
                return sqlite3.SQLITE_OK
            if table in ONLY and ONLY[table] != action:
                return self._deny(f"{_WRITES[action]} {arg1} (your code may only delete"
                                  " from it)")
            return sqlite3.SQLITE_OK
        if action in (sqlite3.SQLITE_CREATE_TABLE, sqlite3.SQLITE_CREATE_TEMP_TABLE) and arg1:
            self.created.add(arg1.lower())
            return sqlite3.SQLITE_OK
        if action in _SCHEMA:
            name = (arg1 or "").lower()
            if action in (sqlite3.SQLITE_DROP_TABLE, sqlite3.SQLITE_DROP_TEMP_TABLE) \
                    and name in self.created:
                return sqlite3.SQLITE_OK
            return self._deny(f"{_SCHEMA[action]} {arg1 or ''}".rstrip()
                              + " (the grader's schema is not your code's to change)")
        if action == sqlite3.SQLITE_PRAGMA and arg2 is not None:
            return self._deny(f"PRAGMA {arg1} = {arg2} (your code may read a pragma, not"
                              " set one)")
        if action == sqlite3.SQLITE_TRANSACTION and self.inside:
            return self._deny(f"{arg1} inside the worker's transaction: your handler runs"
                              " inside it, and the worker commits it once your handler"
                              " returns (raise an exception to undo your effect)")
        if action == sqlite3.SQLITE_SAVEPOINT and self.inside:
            op, name = (arg1 or "").upper(), (arg2 or "")
            if op == "BEGIN":
                self.savepoints.append(name.lower())
                return sqlite3.SQLITE_OK
            if name.lower() not in self.savepoints:
                return self._deny(f"{op} {name}: a savepoint your code did not open (the"
                                  " worker's transaction is not your code's to end)")
            if op == "RELEASE":
                self.savepoints.remove(name.lower())
        return sqlite3.SQLITE_OK


class Gate:
    """The authorizer installed once on a connection: it asks ``guard`` while one is set
    (the submission's statement is being prepared) and allows everything otherwise (the
    grader's own statements). The submission's statements must never reuse a statement
    the grader prepared: :class:`Gate` users give each of them a text of its own."""

    def __init__(self) -> None:
        self.guard: Guard | None = None

    def __call__(self, action: int, arg1: str | None, arg2: str | None, db: str | None,
                 source: str | None) -> int:
        guard = self.guard
        if guard is None:
            return sqlite3.SQLITE_OK
        return guard(action, arg1, arg2, db, source)


@contextmanager
def guarded(conn: sqlite3.Connection, guard: Guard) -> Iterator[Guard]:
    """Run the statements of the ``with`` block under ``guard``."""
    guard.refused = ""
    conn.set_authorizer(guard)
    try:
        yield guard
    finally:
        conn.set_authorizer(None)
