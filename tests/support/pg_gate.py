"""A gate between the lab's processes and the shared PostgreSQL server, to take the database
away from them and give it back without touching the server itself.

The gate is a TCP proxy on a port of its own. Every connection through it carries an
``application_name`` of its own, so :meth:`Gate.terminate` ends exactly those backends with
``pg_terminate_backend``, as a server restart or a failover ends them, and no other test's.
:meth:`Gate.hold` makes a silent server: requests vanish, connections stay open.
:meth:`Gate.close` is an outage: the gate stops listening (a connection attempt is refused, as
when the server is down) and the backends are terminated; :meth:`Gate.open` brings it back on
the same port.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from urllib.parse import urlsplit

import psycopg

from deliverylab.engine import store_postgres as pgstore
from support.pg import SERVER


class Gate:
    def __init__(self) -> None:
        parts = urlsplit(SERVER)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.name = f"dl_gate_{secrets.token_hex(6)}"
        self.writers: list[asyncio.StreamWriter] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.holding = False
        self.open()

    def _call(self, coro):  # noqa: ANN001, ANN202 - a coroutine, its result
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def url(self, url: str) -> str:
        """``url`` (a store URL on the shared server) through the gate, named for it."""
        return pgstore.url_for(f"postgresql://127.0.0.1:{self.port}{urlsplit(url).path}",
                               pgstore.schema_of(url)) + f"&application_name={self.name}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self.writers += [writer, up_writer]
        await asyncio.gather(self._pump(reader, up_writer, holdable=True),
                             self._pump(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    holdable: bool = False) -> None:
        while data := await reader.read(65536):
            if holdable and self.holding:
                continue  # dropped: the server never hears it, the client is not told
            writer.write(data)
            await writer.drain()
        writer.close()

    def hold(self, on: bool = True) -> None:
        """A silent server: from now on what the clients send is dropped, their connections
        stay open, and nothing comes back (``hold(False)`` ends it)."""
        self.holding = on

    def open(self) -> None:
        async def start() -> asyncio.Server:
            return await asyncio.start_server(self._client, "127.0.0.1", self.port,
                                              reuse_address=True)
        self.server = self._call(start())
        self.port = self.server.sockets[0].getsockname()[1]

    def terminate(self) -> int:
        """End every backend opened through the gate, server side; how many there were.
        The gate then closes its side of those connections too, as the server's end of
        each does: the proxy's relaying of that close is not what the tests test."""
        with psycopg.connect(SERVER, autocommit=True) as conn:
            ended = len(conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND pid <> pg_backend_pid()",
                (self.name,)).fetchall())
        self._call(self._drop())
        return ended

    async def _drop(self) -> None:
        for w in self.writers:
            w.close()
        self.writers.clear()

    def backends(self) -> int:
        with psycopg.connect(SERVER, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                                " application_name = %s", (self.name,)).fetchone()[0]

    def close(self) -> int:
        """The outage: refuse new connections and terminate the open ones."""
        async def stop() -> None:
            assert self.server is not None
            self.server.close()
        self._call(stop())
        return self.terminate()

    def stop(self) -> None:
        if self.server is not None and self.server.is_serving():
            self.close()
        self.terminate()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
