"""A worker process: a small fast HTTP server, an RPC server, and the announcer that registers it
with the fronts and sends its heartbeats on every channel (``nonstop vs worker``).

HTTP: ``GET /`` -> ``hello from <id>``; ``/health`` -> 200; ``/echo`` returns the body;
``/slow?ms=N`` answers after N ms; ``/bytes?n=N`` returns N bytes. Every response carries
``x-worker: <id>``, ``x-seq: <n>`` (this worker's response counter), a ``date`` and an
``x-nonce`` of random length: no two responses are alike, nor of one length, as with dynamic
pages; ``GET /`` says ``hello from <id> #<n>`` (the load
generator checks the body against the headers, so a spliced or corrupt stream is caught).
RPC methods: ``add(a, b)``, ``whoami()``, ``sleep(ms)``, ``sqrt(x)`` (with an
alternate version and an acceptance test, for DRB). ``wrong=True`` makes ``add`` answer a + b + 1
(NVP must outvote it); ``bad_primary=True`` makes the primary ``sqrt`` fail its acceptance test.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import os
import random
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nonstop.common import RemoteProtocolError
from nonstop.vs.control import Announcer, RegType
from nonstop.vs.http import Request, RequestParser, error_response
from nonstop.vs.rpc.worker import RpcWorker

log = logging.getLogger("nonstop.vs.worker")


_SEQ = [0]
_DATE: list[Any] = [0, b""]


def _date() -> bytes:
    now = int(time.time())
    if _DATE[0] != now:
        _DATE[0], _DATE[1] = now, email.utils.formatdate(now, usegmt=True).encode()
    return _DATE[1]


class _HttpWorker(asyncio.Protocol):
    def __init__(self, ident: bytes) -> None:
        self.ident = ident
        self.parser = RequestParser()
        self.t: asyncio.Transport | None = None
        self.busy = False
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        if not self.busy:
            self._drain()

    def _drain(self) -> None:
        assert self.t is not None
        while True:
            try:
                req = self.parser.next_request()
            except RemoteProtocolError as e:
                self.t.write(error_response(400, e.reason))
                self.t.close()
                return
            if req is None:
                return
            if req.target.startswith(b"/slow"):
                self.busy = True
                self.task = asyncio.ensure_future(self._slow(req))
                return
            self.t.write(self._answer(req))
            if not req.keep_alive:
                self.t.close()
                return

    async def _slow(self, req: Request) -> None:
        q = parse_qs(urlsplit(req.target.decode()).query)
        await asyncio.sleep(int(q.get("ms", ["100"])[0]) / 1000)
        assert self.t is not None
        if self.t.is_closing():
            return
        self.t.write(self._answer(req))
        self.busy = False
        if not req.keep_alive:
            self.t.close()
        else:
            self._drain()

    def _answer(self, req: Request) -> bytes:
        path = req.target.split(b"?", 1)[0]
        _SEQ[0] += 1
        seq = str(_SEQ[0]).encode()
        nonce = os.urandom(random.randrange(1, 9)).hex().encode()
        if path == b"/echo":
            body = req.body
        elif path == b"/bytes":
            q = parse_qs(urlsplit(req.target.decode()).query)
            body = b"x" * int(q.get("n", ["0"])[0])
        elif path == b"/health":
            body = b"ok\n"
        else:
            body = b"hello from " + self.ident + b" #" + seq + b"\n"
        head = (
            b"HTTP/1.1 200 OK\r\nx-worker: "
            + self.ident
            + b"\r\nx-seq: "
            + seq
            + b"\r\ndate: "
            + _date()
            + b"\r\nx-nonce: "
            + nonce
            + b"\r\ncontent-type: text/plain\r\ncontent-length: "
            + str(len(body)).encode()
            + (b"\r\n\r\n" if req.keep_alive else b"\r\nconnection: close\r\n\r\n")
        )
        return head + (b"" if req.method == b"HEAD" else body)


async def _sink_serve(lsock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def one(c: socket.socket) -> None:
        buf = bytearray(1 << 20)
        try:
            while await loop.sock_recv_into(c, buf):
                pass
        except OSError:
            pass
        finally:
            c.close()

    while True:
        c, _ = await loop.sock_accept(lsock)
        t = asyncio.ensure_future(one(c))
        tasks.add(t)
        t.add_done_callback(tasks.discard)


def demo_methods(name: str, *, wrong: bool = False, bad_primary: bool = False) -> RpcWorker:
    rpc = RpcWorker(name)

    @rpc.method()
    def add(a: float, b: float) -> float:
        return a + b + (1 if wrong else 0)

    @rpc.method()
    def whoami() -> str:
        return name

    @rpc.method()
    async def sleep(ms: int) -> str:
        await asyncio.sleep(ms / 1000)
        return name

    def sqrt_alternate(x: float) -> float:  # bisection: slow, simple, independent
        lo, hi = 0.0, max(1.0, float(x))
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mid * mid < x else (lo, mid)
        return (lo + hi) / 2

    def accept(args: list[float], r: float) -> bool:
        return isinstance(r, float) and abs(r * r - args[0]) <= 1e-6 * max(1.0, args[0])

    @rpc.method(alternate=sqrt_alternate, accept=accept)
    def sqrt(x: float) -> float:
        return math.sqrt(x) + (0.5 if bad_primary else 0.0)

    return rpc


@dataclass
class WorkerOptions:
    id: str
    http: tuple[str, int] | None  # listen address, port
    channels: dict[str, str]  # channel -> this worker's address (sources of heartbeats)
    fronts: list[dict[str, str]] = field(default_factory=list)  # per front: channel -> address
    control_port: int = 7800
    key: bytes = b""
    rpc_port: int | None = None
    sink_port: int | None = None  # TCP sink (reads and discards): the L4 benchmark's target
    interval: float = 0.02
    weight: int = 1
    wrong: bool = False
    bad_primary: bool = False


async def run_worker(o: WorkerOptions, stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    servers: list[asyncio.AbstractServer] = []
    sink_task: asyncio.Task[None] | None = None
    if o.http:
        servers.append(
            await loop.create_server(
                lambda: _HttpWorker(o.id.encode()), o.http[0], o.http[1], reuse_address=True
            )
        )
    if o.rpc_port:
        rpc = demo_methods(o.id, wrong=o.wrong, bad_primary=o.bad_primary)
        host = o.http[0] if o.http else "0.0.0.0"
        servers.append(await rpc.serve(host, o.rpc_port))
    if o.sink_port:
        host = o.http[0] if o.http else "0.0.0.0"
        ls = socket.create_server((host, o.sink_port), reuse_port=True, backlog=1024)
        ls.setblocking(False)
        sink_task = asyncio.ensure_future(_sink_serve(ls))
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    ann = None
    socks: dict[str, socket.socket] = {}
    if o.fronts and o.key:
        port = o.http[1] if o.http else (o.rpc_port or 1)
        ann = Announcer(
            o.key,
            worker=o.id,
            addresses=o.channels,
            port=port,
            incarnation=time.time_ns() // 1000,  # goes up at every restart
            weight=o.weight,
            rpc_port=o.rpc_port,
        )
        for ch, addr in o.channels.items():
            s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind((addr, 0))
            socks[ch] = s
    print(f"worker {o.id} ready", flush=True)

    def send(ch: str, data: bytes) -> None:
        for f in o.fronts:
            if ch in f:
                with contextlib.suppress(OSError):  # channel down: that is what heartbeats show
                    socks[ch].sendto(data, (f[ch], o.control_port))

    tick = 0
    try:
        while not stop.is_set():
            if ann is not None:
                now = time.monotonic()
                if tick % 25 == 0:
                    reg = ann.registration(RegType.JOIN, now)
                    for ch in socks:
                        send(ch, reg)
                for ch, data in ann.heartbeats(now):
                    send(ch, data)
            tick += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(o.interval):
                    await stop.wait()
    finally:
        if ann is not None:  # leave: the fronts drain us
            reg = ann.registration(RegType.LEAVE, time.monotonic())
            for ch in socks:
                send(ch, reg)
            await asyncio.sleep(0.2)  # requests already routed here still finish
        for srv in servers:
            srv.close()
        if sink_task is not None:
            sink_task.cancel()
        for s in socks.values():
            s.close()
        log.info("worker %s stopped (pid %d)", o.id, os.getpid())
