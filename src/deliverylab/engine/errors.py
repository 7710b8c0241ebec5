"""Errors the engine raises on purpose, each naming what was wrong."""

from __future__ import annotations

import sqlite3
import unicodedata
from typing import Any


class InvalidInput(ValueError):
    """A bad argument: ``field`` names it, ``value`` is what was given. Nothing was written."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"{field} must be {expected}, got {value!r}")


class StoreError(Exception):
    """A failure of the store's database, from a driver that is not sqlite3 (PostgreSQL's
    ``store_postgres.PgError``). The engine tells a database failure (re-raised, never retried
    as the handler's own) from a handler failure by catching :data:`STORE_ERRORS`."""


class StoreUnavailable(StoreError):
    """The store's database cannot be reached: its connection was terminated (a server
    restarting, a failover, an administrator) or cannot be opened again yet. The statement
    did not run; a transaction that was open when the connection went is gone (rolled back by
    the server), except a ``COMMIT`` whose answer was lost, which may have committed. The
    connection reconnects on a later statement, with backoff; a worker or a relay says so in
    one line, backs off and carries on, and the API answers 503."""


# What a store's database raises: sqlite3's errors, and every other driver's as StoreError.
STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, StoreError)


class OrderConflict(ValueError):
    """The order id (or idempotency key) was used before with a different request."""

    def __init__(self, key_name: str, key: str) -> None:
        self.key_name = key_name
        self.key = key
        super().__init__(f"{key_name} {key!r} was already used with a different request")


class BrokerUnavailable(Exception):
    """A broker verb could not reach the broker (a server restarting, a cluster electing a
    leader, a connection lost), and the engine expects it back: try again later.

    ``verb`` names what was asked, ``reason`` what went wrong. The verb changed nothing the
    broker knows of, except a settlement (ack, nack, extend, dead-letter) that may have reached
    the server before its answer was lost: its effect is then in place although the caller
    was told otherwise. A worker backs off and tries again (``broker_waits``); a message whose
    ack is in doubt may come back, and the inbox skips it."""

    def __init__(self, verb: str, reason: str) -> None:
        self.verb = verb
        self.reason = reason
        super().__init__(f"broker unavailable during {verb}: {reason}")

    def __reduce__(self) -> tuple[type[BrokerUnavailable], tuple[str, str]]:
        # Pickled as its two fields, so it crosses a process boundary as itself (the
        # course's sandbox hands it to the reader's code, which catches it by class).
        return (type(self), (self.verb, self.reason))


class SimulatedCrash(Exception):
    """Raised at a fault point to stand for the worker process dying there."""

    def __init__(self, point: str) -> None:
        self.point = point
        super().__init__(f"simulated crash at {point}")


def check_int(field: str, value: Any, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """An int (never a bool or float) within bounds, or :class:`InvalidInput`."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        raise InvalidInput(field, value, "an integer" + (" " + " and ".join(bounds) if bounds else ""))
    checked: int = value
    return checked


def check_number(field: str, value: Any, *, minimum: float | None = None,
                 maximum: float | None = None) -> float:
    """A real number (not a bool, not NaN) within bounds, or :class:`InvalidInput`."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        if minimum is not None and maximum is not None:
            expected = f"a number in [{minimum:g}, {maximum:g}]"
        elif minimum is not None:
            expected = f"a number >= {minimum:g}"
        else:
            expected = "a number"
        raise InvalidInput(field, value, expected)
    return float(value)


def check_text(field: str, value: Any, *, max_length: int = 100) -> str:
    """A non-empty string of at most ``max_length`` characters, or :class:`InvalidInput`."""
    if not isinstance(value, str) or not value.strip() or len(value) > max_length:
        raise InvalidInput(field, value, f"a non-empty string of at most {max_length} characters")
    return value


# Characters an id may not contain. Cc: control characters (a newline forges a log line, ESC
# starts a terminal escape sequence, C1 controls such as U+009B do the same on some terminals).
# Cs: lone UTF-16 surrogates, which are not Unicode text and cannot be stored as UTF-8. Cf:
# invisible format characters, among them the bidi overrides (U+202E reverses what follows on
# screen, CVE-2021-42574) and zero-width spaces, which make two ids print the same and differ.
# Zl, Zp: U+2028 and U+2029 break lines in editors, browsers and some terminals.
FORBIDDEN_IN_IDS = frozenset({"Cc", "Cs", "Cf", "Zl", "Zp"})


def first_forbidden(text: str) -> int | None:
    """The index of the first character an id may not contain, or None."""
    for i, ch in enumerate(text):
        # Printable ASCII is the common case; skip the table lookup for it.
        if not ("\x20" <= ch <= "\x7e") and unicodedata.category(ch) in FORBIDDEN_IN_IDS:
            return i
    return None


def check_id(field: str, value: Any, *, max_length: int = 100) -> str:
    """An identifier: a non-empty string of at most ``max_length`` characters, with no control,
    format or line-separator character and no lone surrogate, or :class:`InvalidInput`.

    Every id that enters the engine (order, item, event, correlation, idempotency key) goes
    through here, so whatever later prints or logs an id never prints a control sequence.
    """
    text = check_text(field, value, max_length=max_length)
    at = first_forbidden(text)
    if at is not None:
        code = f"U+{ord(text[at]):04X}"
        raise InvalidInput(field, text, f"an id without control or invisible characters"
                                        f" ({code} at index {at})")
    return text
