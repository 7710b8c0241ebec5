"""Brokers by URL: what ``--broker`` names when the broker is not a database.

A SQLite file or a ``postgresql://`` URL is a database, and its broker is the queue table in
it (:func:`table_broker`). Any other engine is reached by a URL whose scheme names
it, and :data:`ENGINES` is the one place that lists them: the CLI, chapter 7, the benchmark and
the contract tests all read it, so an engine added here runs everywhere.

Each engine's module provides:

- ``open_url(url, *, field, clock, ids, max_receives, worker)``: validate the URL (naming the
  bad part) and connect;
- ``DEFAULT_URL``: where its server is on a development machine (``make services``);
- ``scratch_url(server, name, *, lease, dedup_window)``: the URL of a throwaway queue or
  stream called ``name`` on ``server`` (for tests, chapters and benchmarks, removed with the
  broker's ``destroy()``);
- ``BROKER``: the broker class, whose ``capabilities`` say what the engine can do.

The modules are imported only when their engine is used, so their client libraries are needed
only by those who use them.
"""

from __future__ import annotations

import importlib
import os
import uuid
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..engine.errors import InvalidInput

if TYPE_CHECKING:
    from ..engine.broker import Broker, Capabilities
    from ..engine.store import Store
    from .sqlite import SQLiteBroker


@dataclass(frozen=True)
class Engine:
    """A broker engine reached by URL: the URL scheme that names it, the module that opens
    it, and the environment variable that points at another server than ``DEFAULT_URL``."""

    scheme: str
    module: str
    server_env: str


# Every engine reached by URL, by name: one line each.
ENGINES: dict[str, Engine] = {
    "rabbitmq": Engine("amqp", "deliverylab.brokers.rabbitmq", "DELIVERYLAB_AMQP_URL"),
    "jetstream": Engine("nats", "deliverylab.brokers.jetstream", "DELIVERYLAB_NATS"),
    "redis": Engine("redis", "deliverylab.brokers.redis", "DELIVERYLAB_REDIS_URL"),
}
_BY_SCHEME = {e.scheme: name for name, e in ENGINES.items()}


def scheme_of(text: object) -> str | None:
    """The engine scheme ``text`` starts with (``amqp``, ``nats``, …), None for anything
    else."""
    if not isinstance(text, str) or "://" not in text:
        return None
    scheme = urlsplit(text).scheme.lower()
    return scheme if scheme in _BY_SCHEME else None


def is_broker_url(text: object) -> bool:
    """Whether ``text`` is the URL of a broker that is not a database."""
    return scheme_of(text) is not None


def known_urls() -> str:
    """The URL forms ``--broker`` takes, for help texts and refusals: ``amqp://, nats://, …``."""
    return ", ".join(f"{e.scheme}://" for e in ENGINES.values())


def _module(name: str) -> ModuleType:
    if name not in ENGINES:
        raise InvalidInput("engine", name, "one of " + ", ".join(ENGINES))
    return importlib.import_module(ENGINES[name].module)


def capabilities(name: str) -> Capabilities:
    """What engine ``name`` can do, without connecting (its broker class's capabilities; an
    open broker may refine them, e.g. JetStream's lease is its stream's AckWait)."""
    caps: Capabilities = _module(name).BROKER.capabilities
    return caps


def server_url(name: str) -> str:
    """Where engine ``name``'s server is: its environment variable, else ``DEFAULT_URL``."""
    default: str = _module(name).DEFAULT_URL
    return os.environ.get(ENGINES[name].server_env) or default


def open_broker(url: str, *, field: str = "broker", **kw: Any) -> Broker:
    """Connect to the broker ``url`` names. ``kw`` (clock, ids, max_receives, …) goes to the
    engine's ``open_url``. A URL of no known engine is ``InvalidInput`` naming ``field``."""
    scheme = scheme_of(url)
    if scheme is None:
        raise InvalidInput(field, url, f"a broker URL ({known_urls()})")
    broker: Broker = _module(_BY_SCHEME[scheme]).open_url(url, field=field, **kw)
    return broker


def table_broker(conn: Store, **kw: Any) -> SQLiteBroker:
    """The queue table in the store ``conn`` opens, with the broker written for its database:
    each names its dialect, and a claim is safe only on its own (SQLite's would hand one
    message to two workers on PostgreSQL). ``kw``: clock, ids, max_receives, trace."""
    from ..engine.store import dialect_of
    from .postgres import PostgresBroker
    from .sqlite import SQLiteBroker

    dialect = dialect_of(conn)
    brokers: tuple[type[SQLiteBroker], ...] = (SQLiteBroker, PostgresBroker)
    return next(b for b in brokers if b.dialect is dialect)(conn, **kw)


def scratch_url(name: str, *, lease: float = 1.0, dedup_window: float | None = None,
                prefix: str = "dl") -> str:
    """The URL of a fresh, uniquely named queue or stream of engine ``name`` on its server,
    with ``lease`` seconds where the engine fixes the lease per queue (JetStream's AckWait,
    Redis's idle time) and ``dedup_window`` where it has producer dedup."""
    unique = f"{prefix}-{uuid.uuid4().hex[:12]}"
    scratch: str = _module(name).scratch_url(server_url(name), unique, lease=lease,
                                             dedup_window=dedup_window)
    return scratch


def open_scratch(name: str, *, lease: float = 1.0, dedup_window: float | None = None,
                 prefix: str = "dl", **kw: Any) -> Broker:
    """A broker of engine ``name`` on a fresh queue or stream (:func:`scratch_url`),
    connected; ``kw`` as for :func:`open_broker`. Its ``destroy()`` removes it."""
    return open_broker(scratch_url(name, lease=lease, dedup_window=dedup_window,
                                   prefix=prefix), **kw)
