"""PostgreSQL for the tests: each test gets its own schema on the shared server, dropped after.

The server is the one ``make services`` brings up on 127.0.0.1:5432. When it does not answer,
the tests that need it fail with that message: they are never skipped.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from deliverylab.engine import store_postgres as pgstore

SERVER = os.environ.get("DELIVERYLAB_PG", "postgresql://127.0.0.1:5432/test")


def new_url() -> str:
    """A URL for a schema no other test uses (random: tests of several runs share a server)."""
    return pgstore.url_for(SERVER, f"dl_test_{secrets.token_hex(6)}")


@contextmanager
def schema() -> Iterator[str]:
    """A fresh deliverylab schema on the server, as a URL; dropped on exit."""
    url = new_url()
    try:
        pgstore.init_db(url).close()
    except Exception as exc:
        raise AssertionError(f"PostgreSQL at {SERVER} is needed here and did not answer"
                             f" ({exc}); run 'make services'") from exc
    try:
        yield url
    finally:
        pgstore.drop_schema(url)
