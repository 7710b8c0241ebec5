"""``deliverylab cleanup``: remove a lab's data, on any engine, and say what was removed.

A walkthrough names its store (a SQLite file or a PostgreSQL schema) and its broker (the
store's own queue table, another file or schema, or a queue or stream on an engine of the
broker registry). Each engine's module finds what its value names, describes it, and says how
to remove it (``removal_of``, reached through :func:`deliverylab.brokers.registry.removal_of`):
a SQLite file goes with its ``-wal``, ``-shm`` and ``-journal``, a PostgreSQL schema is dropped
(never ``public``), a queue or stream goes with its dead letters.

Everything is found first, then removed: a bad value (a URL that does not parse, a server that
does not answer, a file that is not a deliverylab database) is refused naming its flag and
value, and nothing at all is removed. What is already gone is said, not an error, so a
clean-up can run twice. Nothing here opens a broker the way a worker does: a stream whose
consumer was made with other settings is removed all the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Target:
    """One thing to remove: the flag that named it, what it is, in words, and how (None:
    nothing is there)."""

    flag: str
    what: str
    remove: Callable[[], object] | None = None
    parts: list[str] = field(default_factory=list)


def find(flag: str, value: str) -> Target:
    """What ``value`` (given to ``flag``) names, described, with how to remove it. Reads only;
    a bad value is ``InvalidInput`` naming ``flag``."""
    from ..brokers.registry import removal_of

    found = removal_of(value, field=flag)
    return Target(flag, found.what, found.remove, found.parts)
