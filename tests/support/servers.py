"""Servers a test runs itself: a ``nats-server`` of its own, and a TCP proxy that can hold or
cut a link."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from deliverylab.clusters.nats_cluster import DEBIAN_BINARY, free_base_port


class OwnServer:
    """A single ``nats-server`` with JetStream of this test's own, on a free port and its own
    store directory: SIGKILLed and started again on the same storage."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_base_port(offsets=(0,))
        self.url = f"nats://127.0.0.1:{self.port}"
        self.binary = shutil.which("nats-server") or DEBIAN_BINARY
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-js", "-sd", str(self.directory), "-a", "127.0.0.1",
             "-p", str(self.port), "-l", str(self.directory / "server.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 10
        while True:  # JetStream answers once the server logs that it is ready
            assert self.proc.poll() is None, (self.directory / "server.log").read_text()
            log = self.directory / "server.log"
            if log.exists() and "Server is ready" in log.read_text():
                return
            assert time.monotonic() < deadline, "nats-server did not start within 10 s"
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL
        (self.directory / "server.log").unlink()  # so start() waits for the new one

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class HoldingProxy:
    """A TCP proxy in front of the NATS server, in a thread of its own. ``hold()``: what the
    client sends stays in the proxy (the server hears nothing, the client notices nothing);
    ``cut()``: every connection closes and what was held is dropped, as when a network
    fails or a process dies with its socket buffers; ``cut(listen=True)`` as when it comes
    back."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 4222)) -> None:
        self.upstream, self.holding, self.held = upstream, False, 0
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._call(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(5)

    async def _client(self, reader, writer) -> None:
        self.tasks.append(asyncio.current_task())
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self.writers += [writer, up_writer]
        await asyncio.gather(self._pump(reader, up_writer, holdable=True),
                             self._pump(up_reader, writer, holdable=False),
                             return_exceptions=True)

    async def _pump(self, reader, writer, *, holdable: bool) -> None:
        while data := await reader.read(65536):
            if holdable and self.holding:
                self.held += len(data)
                continue
            writer.write(data)
            await writer.drain()

    def hold(self) -> None:
        self.holding = True

    def cut(self, *, listen: bool = False) -> None:
        """Close every connection; with ``listen``, keep accepting new ones (a link that
        failed and came back), else stop listening too."""
        async def close() -> None:
            if not listen:
                self.server.close()
            for w in self.writers:
                w.close()
            if self.tasks:  # the pumps end on their own once their sockets close
                await asyncio.wait(self.tasks, timeout=2)
            self.writers.clear()
            self.tasks.clear()
        self._call(close())

    def stop(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
