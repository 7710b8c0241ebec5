"""Tables that a module adds beside the engine's schema, and a clear error when they are missing.

The engine's own tables live in ``schema.sql``. A module that needs tables of its own (the
payment service, the outbound outbox, the status projection) keeps them in its own ``SCHEMA``
and creates them with its ``install(conn)``, so the shared schema stays as it is.
"""

from __future__ import annotations

from ..engine.errors import InvalidInput
from ..engine.store import Store, transaction


def install_schema(conn: Store, schema: str) -> None:
    """Run each ``CREATE … IF NOT EXISTS`` statement of ``schema`` in one transaction."""
    with transaction(conn):
        for statement in schema.split(";"):
            if statement.strip():
                conn.execute(statement)


def require_tables(conn: Store, tables: list[str], install: str) -> None:
    """:class:`InvalidInput` naming the missing tables, rather than SQLite's "no such table"
    from deep inside a statement."""
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = [t for t in tables if t not in have]
    if missing:
        raise InvalidInput("conn", f"a database without {', '.join(missing)}",
                           f"a database with {', '.join(missing)} (run {install}(conn))")
