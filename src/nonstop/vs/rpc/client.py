"""An RPC connection: calls with ids multiplexed over one TCP connection, replies matched to
futures. The client library (``RpcClient``, to the front) and the front's links to workers are
this same class.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Callable
from typing import Any

from nonstop.common import RemoteProtocolError
from nonstop.vs.rpc.frame import Call, FrameDecoder, Reply, encode


class RpcError(Exception):
    """The call failed: ``reply`` is the error Reply when there was one (it says why and which
    mode was used), None when the connection itself failed."""

    def __init__(self, reason: str, reply: Reply | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class ConnectionLost(RpcError):
    pass


class RpcConnection:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 1.0,
        socket_factory: Callable[[], socket.socket] | None = None,
    ) -> None:
        """``socket_factory`` makes the (unconnected) socket, e.g. one in another netns."""
        self.host, self.port = host, port
        self.socket_factory = socket_factory
        self.connect_timeout = connect_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.closed_reason = ""

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        async with self._lock:
            if self.connected:
                return
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if self.socket_factory is None:
                        reader, writer = await asyncio.open_connection(self.host, self.port)
                    else:
                        sock = self.socket_factory()
                        sock.setblocking(False)
                        try:
                            loop = asyncio.get_running_loop()
                            await loop.sock_connect(sock, (self.host, self.port))
                        except BaseException:
                            sock.close()
                            raise
                        reader, writer = await asyncio.open_connection(sock=sock)
            except (OSError, TimeoutError) as e:
                raise ConnectionLost(f"connect {self.host}:{self.port}: {e or 'timeout'}") from e
            self._writer = writer
            self._reader_task = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        dec = FrameDecoder()
        reason = "connection closed"
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                dec.feed(data)
                while (f := dec.next_frame()) is not None:
                    if not isinstance(f, Reply):
                        raise RemoteProtocolError("peer sent a call", counter="bad_frame")
                    if f.id == 0 and not f.ok:  # the peer could not read our stream
                        reason = f.error
                        raise RemoteProtocolError(f.error, counter="bad_frame")
                    fut = self._pending.pop(f.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(f)
        except RemoteProtocolError as e:
            reason = e.reason
        except OSError as e:
            reason = f"{type(e).__name__}: {e}"
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        self.closed_reason = reason
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(f"{self.host}:{self.port}: {reason}"))

    async def call(
        self,
        method: str,
        *args: Any,
        mode: str = "auto",
        reliability: int = 1,
        deadline_ms: int = 0,
        variant: str = "primary",
        timeout: float | None = 10.0,
    ) -> Reply:
        """Send one call, wait for its Reply (ok or not). Raises ConnectionLost or TimeoutError."""
        await self.connect()
        cid = next(self._ids)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        call = Call(cid, method, list(args), mode, reliability, deadline_ms, variant)
        assert self._writer is not None
        try:
            self._writer.write(encode(call))
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._pending.pop(cid, None)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
        self._fail_all("closed by us")


class RpcClient(RpcConnection):
    """A client of the front's RPC listener."""

    async def invoke(
        self,
        method: str,
        *args: Any,
        mode: str = "auto",
        reliability: int = 1,
        deadline_ms: int = 0,
    ) -> Reply:
        """Call and return the ok Reply (``.value``, ``.mode``, ``.reason``); raise RpcError
        with the error Reply otherwise."""
        timeout = deadline_ms / 1000 + 1.0 if deadline_ms else 30.0
        reply = await self.call(
            method,
            *args,
            mode=mode,
            reliability=reliability,
            deadline_ms=deadline_ms,
            timeout=timeout,
        )
        if not reply.ok:
            raise RpcError(reply.error, reply)
        return reply
