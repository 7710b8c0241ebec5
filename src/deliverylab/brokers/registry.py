"""Brokers by URL: what ``--broker`` names when the broker is not a database.

A SQLite file or a ``postgresql://`` URL is a database, and its broker is the queue table in
it (``deliverylab.app.cli.broker_on``). Any other engine is reached by a URL whose scheme names
it; each engine's module provides ``open_url(url, *, clock, ids, max_receives, worker)``, which
validates the URL (naming the bad part) and connects. The modules are imported only when their
scheme is used, so their client libraries are needed only by those who use them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..engine.errors import InvalidInput

if TYPE_CHECKING:
    from .base import Broker

# scheme -> the module that opens it
ENGINES: dict[str, str] = {
    "amqp": "deliverylab.brokers.rabbitmq",
    "nats": "deliverylab.brokers.jetstream",
}


def scheme_of(text: object) -> str | None:
    """The engine scheme ``text`` starts with (``amqp``, ``nats``), None for anything else."""
    if not isinstance(text, str) or "://" not in text:
        return None
    scheme = urlsplit(text).scheme.lower()
    return scheme if scheme in ENGINES else None


def is_broker_url(text: object) -> bool:
    """Whether ``text`` is the URL of a broker that is not a database."""
    return scheme_of(text) is not None


def open_broker(url: str, *, field: str = "broker", **kw: Any) -> Broker:
    """Connect to the broker ``url`` names. ``kw`` (clock, ids, max_receives, …) goes to the
    engine's ``open_url``. A URL of no known engine is ``InvalidInput`` naming ``field``."""
    scheme = scheme_of(url)
    if scheme is None:
        known = ", ".join(f"{s}://" for s in ENGINES)
        raise InvalidInput(field, url, f"a broker URL ({known})")
    module = importlib.import_module(ENGINES[scheme])
    return module.open_url(url, field=field, **kw)
