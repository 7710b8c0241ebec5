"""Every broker engine the contract suite (``tests/brokers/test_broker_contract.py``) and the
worker's broker tests run against, by name (the ``make_broker`` and ``broker`` fixtures of
``tests/conftest.py`` open them)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deliverylab.brokers import registry
from deliverylab.brokers.base import Broker, Capabilities
from deliverylab.brokers.sqlite import SQLiteBroker
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.ids import Ids

AMQP_URL = registry.server_url("rabbitmq")
"""The RabbitMQ server the tests use (``DELIVERYLAB_AMQP_URL``, else the engine's default)."""


def rabbitmq_declared(name: str, kind: str = "queue") -> bool:
    """Whether the RabbitMQ queue (``kind="queue"``) or exchange (``"exchange"``) ``name``
    exists: a passive declare, which creates nothing."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = conn.channel()
        if kind == "exchange":
            channel.exchange_declare(name, passive=True)
        else:
            channel.queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404, exc
        return False
    finally:
        if conn.is_open:
            conn.close()


@contextmanager
def rabbitmq_queue() -> Iterator[str]:
    """A fresh queue name for one test; the queue, its dead letters (``NAME.dlq``) and its
    exchange (``NAME.dlx``) are deleted after it, whatever the test left."""
    import pika

    name = f"test-{uuid.uuid4().hex}"
    try:
        yield name
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        ch = conn.channel()
        for queue in (name, f"{name}.dlq"):
            ch.queue_delete(queue)
        ch.exchange_delete(f"{name}.dlx")
        conn.close()


# An engine is a function (directory, clock, ids, max_receives) -> (broker, close); add one to
# BROKER_ENGINES and every contract case runs against it. Each opens a store and its broker
# with the opener, from URLs.
def _opened(store_url: str | Path, broker_url: str | None, clock: FakeClock, ids: Ids,
            max_receives: int, *, scratch: bool = False) -> tuple[Broker, Callable[[], None]]:
    opened = registry.open_store_and_broker(store_url, broker_url, clock=clock, ids=ids,
                                            max_receives=max_receives, init=True,
                                            worker="pytest")

    def close() -> None:
        if scratch:
            opened.broker.destroy()
        opened.close()
    return opened.broker, close


def _sqlite_memory(where: Path, clock: FakeClock, ids: Ids,
                   max_receives: int) -> tuple[Broker, Callable[[], None]]:
    """The lab's broker: the queue table on the connection it shares with the store."""
    return _opened(":memory:", None, clock, ids, max_receives)


def _sqlite_file(where: Path, clock: FakeClock, ids: Ids,
                 max_receives: int) -> tuple[Broker, Callable[[], None]]:
    """A broker in its own SQLite file, apart from the store; it writes no trace."""
    return _opened(":memory:", str(where / "broker.db"), clock, ids, max_receives)


def _postgres(where: Path, clock: FakeClock, ids: Ids,
              max_receives: int) -> tuple[Broker, Callable[[], None]]:
    """The PostgreSQL queue table, in a schema of its own on the shared server (see
    tests/support/pg.py), dropped on close; it writes its trace in its own schema, as the
    lab's does."""
    from contextlib import ExitStack

    from support.pg import schema

    stack = ExitStack()
    broker, close = _opened(stack.enter_context(schema()), None, clock, ids, max_receives)
    stack.callback(close)
    return broker, stack.close


def _by_url(name: str) -> Callable[..., tuple[Broker, Callable[[], None]]]:
    """Engine ``name`` of the registry (``deliverylab.brokers.registry``) on its shared server
    (``make services`` starts it; its environment variable points elsewhere): a queue or
    stream of its own, deleted on close, with a 1-second lease where the engine fixes the
    lease per queue. Fails, never skips, when the server does not answer."""
    def open_it(where: Path, clock: FakeClock, ids: Ids,
                max_receives: int) -> tuple[Broker, Callable[[], None]]:
        return _opened(":memory:", registry.scratch_url(name, lease=1.0), clock, ids,
                       max_receives, scratch=True)
    return open_it


BROKER_ENGINES: dict[str, Callable[..., tuple[Broker, Callable[[], None]]]] = {
    "sqlite-memory": _sqlite_memory,
    "sqlite-file": _sqlite_file,
    "postgresql": _postgres,
    **{name: _by_url(name) for name in registry.ENGINES},
}


def capabilities_of(engine: str) -> Capabilities:
    """What engine ``engine`` (a key of :data:`BROKER_ENGINES`) can do, before opening one:
    for choosing the engines of a test that needs a capability."""
    if engine in registry.ENGINES:
        return registry.capabilities(engine)
    return SQLiteBroker.capabilities  # the queue table, on SQLite or PostgreSQL
