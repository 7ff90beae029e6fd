"""HTTP/1.1 reverse proxy over a :class:`Pool`: keep-alive pools to workers, retry on failure.

A request is read whole from the client, sent to a worker picked by the pool, and the worker's
whole response is returned. When the worker fails before a complete response (connect refused,
reset, EOF, garbage, timeout), the failure is reported to the pool (passive ejection) and an
idempotent request (GET, HEAD, PUT, DELETE, OPTIONS, TRACE, or marked ``X-Nonstop-Idempotent: 1``)
is sent to another worker, like nginx's ``proxy_next_upstream error timeout``. A non-idempotent
request that may have reached the worker gets a 502 that says so; one that never left the front
(connect failed) is retried too. Malformed requests get a 400 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from nonstop.common import RemoteProtocolError
from nonstop.vs.http import (
    Request,
    RequestParser,
    Response,
    ResponseParser,
    encode_request,
    encode_response,
    error_response,
)
from nonstop.vs.pool import Policy, Pool, Worker

log = logging.getLogger("nonstop.vs.proxy")


async def requests(parser: RequestParser, read: Callable[[int], Awaitable[bytes]],
                   reject: Callable[[bytes], Awaitable[None]],
                   counters: Counter[str]) -> AsyncIterator[Request]:  # fmt: skip
    """The requests of one client connection, each counted: ``parser`` fed from ``read`` until
    EOF. A malformed request is counted (``bad_request``), answered 400 through ``reject`` and
    ends the stream (its framing cannot be trusted any more)."""
    while True:
        try:
            req = parser.next_request()
        except RemoteProtocolError as e:
            counters["bad_request"] += 1
            await reject(error_response(400, e.reason))
            return
        if req is None:
            data = await read(65536)
            if not data:
                return
            parser.feed(data)
            continue
        counters["requests"] += 1
        yield req


class UpstreamError(Exception):
    def __init__(self, reason: str, *, sent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent  # the request may have reached the worker


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parser: ResponseParser
    addr: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    retries: int = 3
    connect_timeout: float = 0.5
    response_timeout: float = 10.0
    idle_per_worker: int = 64
    worker_port: int | None = None
    policy: Policy | None = None


class HttpProxy:
    def __init__(self, pool: Pool, settings: ProxySettings | None = None) -> None:
        self.pool = pool
        self.s = settings or ProxySettings()
        self.idle: dict[str, list[_Conn]] = {}
        self.counters: Counter[str] = Counter()

    # -- client side ----------------------------------------------------------------------------
    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = peer[0].encode() if peer else b""
        async def reject(data: bytes) -> None:
            writer.write(data)

        try:
            async with contextlib.aclosing(
                requests(RequestParser(), reader.read, reject, self.counters)
            ) as reqs:
                async for req in reqs:
                    out, keep = await self.handle(req, client)
                    writer.write(out)
                    if not keep:
                        break
                    if writer.transport.get_write_buffer_size() > 1 << 20:
                        await writer.drain()
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(self, req: Request, client: bytes) -> tuple[bytes, bool]:
        """Forward one request; return the bytes for the client and whether to keep the
        connection."""
        tried: list[str] = []
        last = "no worker available"
        extra = ((b"x-forwarded-for", client),) if client else ()
        wire = encode_request(req, extra=extra)
        for _attempt in range(self.s.retries + 1):
            w = self.pool.pick(key=client, exclude=tried, policy=self.s.policy)
            if w is None:
                break
            self.pool.acquire(w)
            try:
                resp = await self._exchange(w, req, wire)
            except UpstreamError as e:
                now = time.monotonic()
                self.pool.report_failure(w.id, now, e.reason)
                tried.append(w.id)
                last = f"worker {w.id}: {e.reason}"
                self.counters["upstream_failures"] += 1
                if e.sent and not req.idempotent:
                    self.counters["failed_non_idempotent"] += 1
                    msg = f"{last}; {req.method.decode()} is not idempotent, not retried"
                    return error_response(502, msg, keep_alive=req.keep_alive), req.keep_alive
                self.counters["retries"] += 1
                continue
            finally:
                self.pool.release(w, time.monotonic())
            self.pool.report_success(w.id)
            keep = req.keep_alive
            return encode_response(resp, keep_alive=keep, head=req.method == b"HEAD"), keep
        self.counters["failed"] += 1
        status = 503 if not tried else 502
        detail = last if tried else "no worker available"
        return error_response(status, detail, keep_alive=req.keep_alive), req.keep_alive

    # -- worker side ----------------------------------------------------------------------------
    async def _connect(self, w: Worker) -> _Conn:
        addr = self.pool.address(w, time.monotonic())
        port = self.s.worker_port or w.spec.port
        try:
            async with asyncio.timeout(self.s.connect_timeout):
                reader, writer = await asyncio.open_connection(addr, port)
        except (OSError, TimeoutError) as e:
            raise UpstreamError(f"connect {addr}:{port}: {e or 'timeout'}", sent=False) from e
        return _Conn(reader, writer, ResponseParser(), addr)

    def _idle_conn(self, w: Worker) -> _Conn | None:
        stack = self.idle.get(w.id)
        addr = self.pool.address(w, time.monotonic())
        while stack:
            c = stack.pop()
            if c.reader.at_eof() or c.writer.is_closing() or c.addr != addr:
                c.writer.close()
                continue
            return c
        return None

    async def _exchange(self, w: Worker, req: Request, wire: bytes) -> Response:
        c = self._idle_conn(w) or await self._connect(w)
        ok = False
        try:
            c.parser.expect(req.method)
            c.writer.write(wire)
            async with asyncio.timeout(self.s.response_timeout):
                while True:
                    resp = c.parser.next_response()
                    if resp is not None:
                        break
                    data = await c.reader.read(65536)
                    if not data:
                        c.parser.eof()
                        resp = c.parser.next_response()
                        if resp is None:
                            raise UpstreamError("closed before a complete response", sent=True)
                        break
                    c.parser.feed(data)
            ok = resp.keep_alive and not c.parser.started
            return resp
        except TimeoutError as e:
            raise UpstreamError("response timeout", sent=True) from e
        except (OSError, ConnectionError) as e:
            raise UpstreamError(f"{type(e).__name__}: {e}", sent=True) from e
        except RemoteProtocolError as e:
            self.counters["bad_response"] += 1
            raise UpstreamError(f"bad response: {e.reason}", sent=True) from e
        finally:
            if ok and len(self.idle.setdefault(w.id, [])) < self.s.idle_per_worker:
                self.idle[w.id].append(c)
            else:
                c.writer.close()

    def drop_worker(self, worker_id: str) -> None:
        for c in self.idle.pop(worker_id, []):
            with contextlib.suppress(Exception):
                c.writer.close()

    def close(self) -> None:
        for wid in list(self.idle):
            self.drop_worker(wid)
