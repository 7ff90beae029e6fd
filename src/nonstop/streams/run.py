"""asyncio server and client of the stream checker (``python -m nonstop.streams``).

Each connection carries two streams: the client's (direction 0) and the server's (direction 1),
``--rate`` messages of ``--size`` bytes per second each. When the client's ``--duration`` is up it
sends a zero-length trailer and shuts its side down; the server answers with its own trailer and
closes. So every message of both streams is accounted for, the last ones included.
Both sides write a JSON report: per direction, messages, bytes, lost, duplicated, corrupted, and
the longest silence of each connection (the interruption a fault caused).

The client times what it receives by the kernel's clock (``SO_TIMESTAMPNS``: when the segment
that completed a message reached the socket; it reads a message at a time for that), not by when
its Python loop got to the read: in a lab the
client shares the CPUs with both nodes, and a takeover's burst of work there delayed its reads by
tens of milliseconds, which the silences it measured then included. The report gives that delay
(``read_lag_ms``), and ``arrival="app"`` goes back to the read's own time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import struct
import time
from typing import Any

from nonstop.common import raise_fd_limit, wait_readable
from nonstop.streams.check import HEADER, StreamError, StreamVerifier, make_message

CLIENT, SERVER = 0, 1


CONNECT_TRIES = 3  # a connection that cannot be set up is tried again, then counted
SO_TIMESTAMPNS = 35  # = SCM_TIMESTAMPNS (Linux, the old struct timespec form); not in socket
_TIMESPEC = struct.Struct("@qq")


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    v = sorted(values)

    def rank(q: float) -> float:
        return v[max(0, min(len(v) - 1, -(-int(q * len(v) * 100) // 100) - 1))]

    return {"p50": round(rank(0.50), 3), "p99": round(rank(0.99), 3), "max": round(v[-1], 3)}


def summarize(verifiers: list[StreamVerifier], errors: dict[str, int]) -> dict[str, Any]:
    reps = [v.report for v in verifiers]
    return {
        "connections": len(verifiers),
        "messages": sum(r.messages for r in reps),
        "bytes": sum(r.bytes for r in reps),
        "lost": sum(r.lost for r in reps),
        "duplicated": sum(r.duplicated for r in reps),
        "corrupted": sum(r.corrupted for r in reps),
        "max_gap_ms": _pcts([r.max_gap * 1000 for r in reps]),
        "errors": dict(errors),
    }


async def _pace(writer: asyncio.StreamWriter, direction: int, conn: int, rate: float,
                size: int, stop: asyncio.Event) -> int:  # fmt: skip
    """Send messages at ``rate`` per second until ``stop``; then the trailer. Returns the count."""
    seq, start = 0, time.monotonic()
    while not stop.is_set():
        writer.write(make_message(direction, conn, seq, size))
        seq += 1
        await writer.drain()
        delay = start + seq / rate - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    writer.write(make_message(direction, conn, seq, 0))  # the trailer: its seq is the count
    await writer.drain()
    return seq


async def _read_into(reader: asyncio.StreamReader, verifier: StreamVerifier) -> bool:
    """Read until EOF; True if the stream ended with its trailer (a zero-length message)."""
    while True:
        data = await reader.read(65536)
        if not data:
            return _complete(verifier)
        verifier.feed(data, time.monotonic())


def _complete(verifier: StreamVerifier) -> bool:
    return verifier.pending == 0 and verifier.report.messages > 0 and verifier.last_len == 0


class _SockWriter:
    """The StreamWriter calls the client makes, on a plain non-blocking socket that
    ``_read_stamped`` reads with recvmsg: one fd per connection (a transport's fd cannot be
    read beside it, and a duplicate each ran 10,000 connections into the fd limit, EMFILE)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.transport = self  # writer.transport.abort(), as with a StreamWriter
        self._out = bytearray()

    def write(self, data: bytes) -> None:
        self._out += data

    async def drain(self) -> None:
        if self._out:
            data, self._out = bytes(self._out), bytearray()
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def write_eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def get_extra_info(self, name: str) -> Any:
        with contextlib.suppress(OSError):
            return self.sock.getsockname() if name == "sockname" else None
        return None

    def abort(self) -> None:
        self.sock.close()


async def _connect_sock(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _read_stamped(sock: socket.socket, verifier: StreamVerifier, lags: list[float]) -> bool:
    """``_read_into`` on the connection's socket, each read timed by the kernel's receive
    timestamp, on the monotonic clock; the read's own lag behind it goes to ``lags`` (s)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    space = socket.CMSG_SPACE(_TIMESPEC.size)
    while True:
        try:  # a message at a time: the stamp is that of the segment that completed it
            data, anc, _, _ = sock.recvmsg(max(1, verifier.wanted()), space)
        except (BlockingIOError, InterruptedError):
            await wait_readable(sock)
            continue
        if not data:
            return _complete(verifier)
        now = time.monotonic()
        at = now
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = _TIMESPEC.unpack_from(raw)
                # the clocks' offset taken now: a step of the wall clock moves it too
                at = min(now, sec + nsec / 1e9 - (time.time() - time.monotonic()))
        lags.append(now - at)
        verifier.feed(data, at)


class Server:
    def __init__(self, *, rate: float, size: int) -> None:
        self.rate, self.size = rate, size
        self.verifiers: list[StreamVerifier] = []
        self.errors: dict[str, int] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stop = asyncio.Event()
        try:
            head = await reader.readexactly(HEADER.size)
            conn = HEADER.unpack(head)[2]
            v = StreamVerifier(CLIENT, conn)
            self.verifiers.append(v)
            v.feed(head, time.monotonic())
            sender = asyncio.create_task(_pace(writer, SERVER, conn, self.rate, self.size, stop))
            try:
                complete = await _read_into(reader, v)
                if not complete:
                    self._count("eof_without_trailer")
            finally:
                stop.set()
                await sender
            writer.close()
        except (ConnectionError, OSError, asyncio.IncompleteReadError, StreamError) as e:
            stop.set()
            self._count(type(e).__name__)
            writer.transport.abort()

    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def serve(host: str, port: int, *, rate: float, size: int, report: str | None) -> None:
    raise_fd_limit()
    srv = Server(rate=rate, size=size)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: the VIP may not be ours yet
    sock.bind((host, port))
    sock.listen(4096)
    server = await asyncio.start_server(srv.handle, sock=sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    if report:
        with open(report, "w") as f:
            json.dump(summarize(srv.verifiers, srv.errors), f)


async def client(host: str, port: int, *, conns: int, duration: float, rate: float, size: int,
                 connect_timeout: float = 5.0, long_gap: float | None = None,
                 samples: str | None = None, record_arrivals: bool = False,
                 sample_every: float = 0.05,
                 arrival: str = "kernel") -> dict[str, Any]:  # fmt: skip
    """Stream on ``conns`` connections for ``duration`` seconds, or until SIGTERM (then every
    connection ends cleanly with its trailer, and the report is complete).

    ``long_gap``: the report's ``long_gaps`` lists, per connection, every silence of the server's
    stream longer than that (monotonic (from, to): a benchmark finds the one around its fault).
    ``samples``: write ``[[conn, t, bytes], ...]`` there at the end (bytes received so far on
    each connection every ``sample_every`` s, monotonic t), the data of a timeline picture.
    ``record_arrivals``: the report's ``arrivals`` lists every message's arrival (monotonic), per
    connection. ``arrival``: "kernel" (the receive timestamp, see the module doc) or "app" (when
    the read returned)."""
    raise_fd_limit(conns + 256)
    if arrival not in ("kernel", "app"):
        raise ValueError(f"arrival must be kernel or app, not {arrival!r}")
    lags: list[float] = []
    verifiers: list[StreamVerifier] = []
    errors: dict[str, int] = {}
    kept = 0
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.call_later(duration, stop.set)
    with contextlib.suppress(RuntimeError, ValueError):  # not in the main thread: no signal
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    rows: list[tuple[int, float, int]] = []
    opening = asyncio.Semaphore(128)
    unclean: list[dict[str, Any]] = []  # connections that did not end cleanly (diagnostics)

    async def sample() -> None:
        last: dict[int, int] = {}
        while True:
            now = time.monotonic()
            for v in verifiers:
                b = v.report.bytes
                if last.get(v.conn) != b:
                    last[v.conn] = b
                    rows.append((v.conn, round(now, 4), b))
            await asyncio.sleep(sample_every)

    async def one(conn: int) -> None:
        nonlocal kept
        v = StreamVerifier(SERVER, conn, long_gap=long_gap, record_arrivals=record_arrivals)
        verifiers.append(v)
        for attempt in range(CONNECT_TRIES):  # a loaded server drops SYNs: try again
            try:
                async with opening:  # thousands at once would overflow the server's accept queue
                    if arrival == "kernel":
                        sock = await asyncio.wait_for(_connect_sock(host, port), connect_timeout)
                        writer: asyncio.StreamWriter | _SockWriter = _SockWriter(sock)
                    else:
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection(host, port), connect_timeout
                        )
                break
            except (OSError, TimeoutError) as e:
                kind = f"connect_{type(e).__name__}"
                if attempt + 1 < CONNECT_TRIES:
                    kind = "connect_retried"
                errors[kind] = errors.get(kind, 0) + 1
        else:
            return
        # read while sending: the verifier's gaps are then the real silences of the server's
        # stream (a takeover's interruption), not an artefact of reading at the end
        receiving = asyncio.create_task(
            _read_stamped(sock, v, lags) if arrival == "kernel" else _read_into(reader, v))
        try:
            sender = asyncio.create_task(_pace(writer, CLIENT, conn, rate, size, stop))
            await sender
            writer.write_eof()
            complete = await asyncio.wait_for(receiving, 30)
            if complete:
                kept += 1
            else:
                errors["eof_without_trailer"] = errors.get("eof_without_trailer", 0) + 1
        except (ConnectionError, OSError, TimeoutError, StreamError) as e:
            kind = type(e).__name__
            errors[kind] = errors.get(kind, 0) + 1
            sockname = writer.get_extra_info("sockname") or ("", 0)
            unclean.append({"conn": conn, "port": sockname[1], "error": kind,
                            "detail": str(e)[:160], "rx_messages": v.report.messages,
                            "rx_pending": v.pending, "last_rx": v.report.last_at})  # fmt: skip
        finally:
            receiving.cancel()
            with contextlib.suppress(BaseException):
                await receiving
            writer.transport.abort()

    sampler = asyncio.create_task(sample()) if samples else None
    await asyncio.gather(*(one(i) for i in range(conns)))
    out = summarize(verifiers, errors)
    out["kept"] = kept
    out["resets"] = errors.get("ConnectionResetError", 0)
    out["arrival"] = arrival
    if lags:  # how late the reads were, behind the kernel's receive timestamps
        out["read_lag_ms"] = {k: None if x is None else round(x * 1000, 2)
                              for k, x in _pcts(lags).items()}
    if unclean:
        out["unclean"] = sorted(unclean, key=lambda u: u["conn"])[:32]
    if record_arrivals:
        out["arrivals"] = [[round(t, 5) for t in v.report.arrivals] for v in verifiers]
    if long_gap is not None:
        out["long_gaps"] = {v.conn: v.report.long_gaps for v in verifiers if v.report.long_gaps}
    if sampler is not None and samples:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        with open(samples, "w") as f:
            json.dump(rows, f)
    return out
