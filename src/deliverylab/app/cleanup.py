"""``deliverylab cleanup``: remove a lab's data, on any engine, and say what was removed.

A walkthrough names its store (a SQLite file or a PostgreSQL schema) and its broker (the
store's own queue table, another file or schema, a RabbitMQ queue, a JetStream stream); this
module finds what each names, describes it, and removes it:

=====================  ==================================================================
a SQLite file          the file with its ``-wal``, ``-shm`` and ``-journal``
a PostgreSQL schema    ``DROP SCHEMA … CASCADE`` (never ``public``)
a RabbitMQ queue       the queue, its dead letters ``QUEUE.dlq`` and exchange ``QUEUE.dlx``
a JetStream stream     the stream, ``STREAM_DEAD`` and ``STREAM_ADVISORIES``
a Redis stream         the stream (its consumer group with it), ``STREAM:dead``, ``STREAM:delayed``
another engine         its module's ``remove_url(url, *, field)``, when it has one
=====================  ==================================================================

Everything is found first, then removed: a bad value (a URL that does not parse, a server that
does not answer, a file that is not a deliverylab database) is refused naming its flag and
value, and nothing at all is removed. What is already gone is said, not an error, so a
clean-up can run twice. Nothing here opens a broker the way a worker does: a stream whose
consumer was made with other settings is removed all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from ..engine.errors import InvalidInput
from .redact import hide_secrets

SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")
LAB_TABLES = ("orders", "queue_messages")  # one of them makes a database a lab's


@dataclass
class Target:
    """One thing to remove: what it is, in words, and how (None: nothing is there)."""

    flag: str
    what: str
    remove: Callable[[], object] | None = None
    parts: list[str] = field(default_factory=list)


def _bad(flag: str, value: str, expected: str) -> InvalidInput:
    return InvalidInput(flag, hide_secrets(value), expected)


# -- SQLite ------------------------------------------------------------------------------------
def _sqlite(flag: str, value: str) -> Target:
    path = Path(value)
    if not path.exists():
        present = _family(path)
        if not present:
            return Target(flag, f"file {value} (not there: nothing to remove)")
        # Only the -wal or -shm left behind: they are the database's, remove them.
        return Target(flag, f"file {value}", lambda: _unlink(path), [p.name for p in present])
    if not path.is_file():
        raise _bad(flag, value, "a database file (a SQLite file or a postgresql:// URL);"
                                " that path is not a regular file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            orders = conn.execute("SELECT count(*) FROM orders").fetchone()[0] \
                if "orders" in tables else None
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise _bad(flag, value, f"a deliverylab database, and this file is not one ({exc});"
                                f" remove it yourself if it is yours") from None
    if not tables & set(LAB_TABLES):
        raise _bad(flag, value, "a deliverylab database, and this SQLite file has none of its"
                                " tables; remove it yourself if it is yours")
    detail = "" if orders is None else f" ({orders} orders)"
    # Listed after the look inside: opening a WAL database makes its -shm.
    return Target(flag, f"file {value}{detail}", lambda: _unlink(path),
                  [p.name for p in _family(path)])


def _family(path: Path) -> list[Path]:
    """The database file and the files SQLite keeps beside it, those that exist."""
    return [Path(f"{path}{s}") for s in SQLITE_SUFFIXES if Path(f"{path}{s}").exists()]


def _unlink(path: Path) -> None:
    for p in _family(path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# -- PostgreSQL --------------------------------------------------------------------------------
def _postgres(flag: str, value: str) -> Target:
    import psycopg

    from ..engine.store_postgres import CONNECT_TIMEOUT_S, schema_of

    schema = schema_of(value, flag)
    if schema == "public":
        raise _bad(flag, value, "the URL of a lab's own schema: 'deliverylab cleanup' never"
                                " drops the schema 'public'")
    try:
        raw = psycopg.connect(value, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0].removeprefix("connection failed: ") if text else \
            type(exc).__name__
        raise _bad(flag, value, f"the URL of a reachable PostgreSQL server ({hide_secrets(reason)})"
                   ) from None
    try:
        found = raw.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                            (schema,)).fetchone()
        tables = {r[0] for r in raw.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema,))}
        counted = raw.execute(f'SELECT count(*) FROM "{schema}".orders').fetchone() \
            if "orders" in tables else None
        orders = None if counted is None else counted[0]
    finally:
        raw.close()
    if found is None:
        return Target(flag, f"PostgreSQL schema {schema} (not there: nothing to remove)")
    if tables and not tables & set(LAB_TABLES):
        raise _bad(flag, value, f"the URL of a deliverylab schema, and schema {schema!r} holds"
                                f" other tables ({', '.join(sorted(tables)[:5])}); drop it"
                                f" yourself if it is yours")

    def drop() -> None:
        with psycopg.connect(value, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    detail = "" if orders is None else f" ({orders} orders)"
    return Target(flag, f"PostgreSQL schema {schema}{detail}", drop,
                  [f"{len(tables)} tables"])


# -- RabbitMQ ----------------------------------------------------------------------------------
def _rabbitmq(flag: str, value: str) -> Target:
    import pika
    import pika.exceptions

    from ..brokers.rabbitmq import check_queue_name

    parts = urlsplit(value)
    query = parse_qsl(parts.query, keep_blank_values=True)
    queues = [v for k, v in query if k == "queue"]
    if len(queues) != 1 or not parts.hostname:
        raise _bad(flag, value, "an amqp:// URL with a host, naming one queue"
                                " (amqp://user:password@host:5672/%2F?queue=NAME)")
    queue = unquote(queues[0])
    try:
        check_queue_name("queue", queue)
    except InvalidInput as exc:
        raise _bad(flag, value, f"an amqp:// URL with a valid queue name ({exc})") from None
    rest = urlencode([(k, v) for k, v in query if k != "queue"], quote_via=quote)
    try:
        params = pika.URLParameters(urlunsplit(parts._replace(query=rest, fragment="")))
    except (ValueError, TypeError) as exc:
        raise _bad(flag, value, f"an amqp:// URL pika accepts ({exc})") from None
    params.connection_attempts, params.socket_timeout = 1, 5
    dlq, dlx = f"{queue}.dlq", f"{queue}.dlx"

    def connect() -> Any:
        try:
            return pika.BlockingConnection(params)
        except pika.exceptions.ProbableAuthenticationError:
            raise _bad(flag, value, "an amqp:// URL whose user and password the server"
                                    " accepts (login refused)") from None
        except pika.exceptions.AMQPConnectionError as exc:
            reason = "; ".join(str(a) or repr(a) for a in exc.args) or type(exc).__name__
            raise _bad(flag, value, f"the URL of a reachable RabbitMQ server ({reason})"
                       ) from None

    conn = connect()
    try:
        found: dict[str, int] = {}
        for name in (queue, dlq):
            channel = conn.channel()
            try:
                found[name] = channel.queue_declare(name, passive=True).method.message_count
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:  # 404: no such queue
                pass
        channel = conn.channel()
        try:
            channel.exchange_declare(dlx, passive=True)
            channel.close()
            exchange = True
        except pika.exceptions.ChannelClosedByBroker:
            exchange = False
    finally:
        conn.close()
    if not found and not exchange:
        return Target(flag, f"RabbitMQ queue {queue} (not there: nothing to remove)")
    parts_found = [f"queue {n} ({found[n]} messages)" for n in (queue, dlq) if n in found]
    if exchange:
        parts_found.append(f"exchange {dlx}")

    def remove() -> None:
        c = connect()
        try:
            ch = c.channel()
            for name in found:
                ch.queue_delete(name)
            if exchange:
                ch.exchange_delete(dlx)
        finally:
            c.close()

    return Target(flag, f"RabbitMQ queue {queue}", remove, parts_found)


# -- JetStream ---------------------------------------------------------------------------------
def _jetstream(flag: str, value: str) -> Target:
    from ..brokers.jetstream import parse_url

    servers, kw = parse_url(value, field=flag)
    stream = kw["stream"]
    names = (stream, f"{stream}_DEAD", f"{stream}_ADVISORIES")
    found = _run_nats(flag, value, servers, names, delete=False)
    if not found:
        return Target(flag, f"JetStream stream {stream} (not there: nothing to remove)")
    return Target(flag, f"JetStream stream {stream}",
                  lambda: _run_nats(flag, value, servers, tuple(found), delete=True),
                  [f"stream {n} ({found[n]} messages)" for n in names if n in found])


def _run_nats(flag: str, value: str, servers: list[str], names: tuple[str, ...], *,
              delete: bool) -> dict[str, int]:
    import nats
    from nats.js.errors import NotFoundError

    from ..brokers.jetstream import _reachable

    async def quiet(exc: Exception) -> None:  # nats-py logs every failed attempt otherwise
        pass

    async def go() -> dict[str, int]:
        if not any(await asyncio.gather(*(_reachable(s) for s in servers))):
            raise _bad(flag, value, f"the URL of a reachable NATS server with JetStream (no"
                                    f" server answers at {', '.join(servers)})")
        try:
            nc = await nats.connect(servers=servers, connect_timeout=2, allow_reconnect=False,
                                    max_reconnect_attempts=1, error_cb=quiet,
                                    name="deliverylab-cleanup")
        except Exception as exc:  # nats-py raises several kinds: none is a reason to go on
            raise _bad(flag, value, f"the URL of a reachable NATS server with JetStream"
                                    f" ({type(exc).__name__}: {exc})".rstrip(": ")) from None
        try:
            js = nc.jetstream(timeout=5)
            out: dict[str, int] = {}
            for name in names:
                try:
                    info = await js.stream_info(name)
                except NotFoundError:
                    continue
                out[name] = info.state.messages
                if delete:
                    await js.delete_stream(name)
            return out
        finally:
            await nc.close()

    return asyncio.run(go())


# -- Redis Streams -----------------------------------------------------------------------------
def _redis(flag: str, value: str) -> Target:
    import redis

    from ..brokers.redis import STREAM_NAME

    parts = urlsplit(value)
    options = parse_qsl(parts.query, keep_blank_values=True)
    streams = [v for k, v in options if k == "stream"]
    if not parts.hostname or len(streams) != 1 or not STREAM_NAME.match(streams[0]):
        raise _bad(flag, value, "a redis:// URL with a host, naming one stream"
                                " (redis://host:6379/0?stream=NAME)")
    stream = streams[0]
    names = (stream, f"{stream}:dead", f"{stream}:delayed")
    try:
        client = redis.Redis.from_url(urlunsplit(parts._replace(query="", fragment="")),
                                      decode_responses=True, socket_timeout=5,
                                      socket_connect_timeout=5)
        found = {n: client.xlen(n) if client.type(n) == "stream" else client.zcard(n)
                 for n in names if client.exists(n)}
    except (ValueError, redis.exceptions.RedisError) as exc:
        raise _bad(flag, value, f"the URL of a reachable Redis server"
                                f" ({type(exc).__name__}: {exc})") from None
    if not found:
        client.close()
        return Target(flag, f"Redis stream {stream} (not there: nothing to remove)")

    def remove() -> None:
        try:
            client.delete(*found)
        finally:
            client.close()

    return Target(flag, f"Redis stream {stream}", remove,
                  [f"{n} ({found[n]} entries)" for n in names if n in found])


# -- by flag value -----------------------------------------------------------------------------
def find(flag: str, value: str) -> Target:
    """What ``value`` (given to ``flag``) names, described, with how to remove it. Reads only;
    a bad value is ``InvalidInput`` naming ``flag``."""
    from ..brokers.registry import ENGINES, scheme_of
    from ..engine.store_postgres import is_url

    if is_url(value):
        return _postgres(flag, value)
    scheme = scheme_of(value)
    if scheme == "amqp":
        return _rabbitmq(flag, value)
    if scheme == "nats":
        return _jetstream(flag, value)
    if scheme == "redis":
        return _redis(flag, value)
    if scheme is not None:  # another engine: its module may know how to remove its data
        module = importlib.import_module(
            next(e.module for e in ENGINES.values() if e.scheme == scheme))
        remove_url = getattr(module, "remove_url", None)
        if remove_url is None:
            raise _bad(flag, value, f"a store or broker 'deliverylab cleanup' can remove (it"
                                    f" does not know how to remove a {scheme}:// broker's data)")
        return Target(flag, f"{scheme} broker {hide_secrets(value)}",
                      lambda: remove_url(value, field=flag))
    if "://" in value:
        raise _bad(flag, value, "a SQLite file path, or a postgresql://, amqp://, nats:// or"
                                " redis:// URL")
    return _sqlite(flag, value)
