"""The stream checker's server on the prefixed socket API: a protected service for tests, the
demo and benchmarks (``python -m nonstop.streams protected-server --agent PATH``).

It speaks the same protocol as ``nonstop.streams.run.Server`` (so ``client()`` drives it), but
everything it does is reproducible from its last commit, as seed 001's application model needs:

- the client's stream is verified message by message; the commit's read position is the end of
  the last whole message, so a successor reads on from a message boundary;
- its own stream is message ``tx`` after message ``tx - 1``, each payload a function of
  (direction, connection, seq, size): a successor that starts from the committed ``tx`` writes
  the very bytes the dead process may already have sent after that commit, and the peer's TCP
  drops what it already has;
- the state blob is ``conn id, rx next seq, tx next seq, size, flags, epoch`` (32 bytes); the
  epoch is the wall-clock time its message 0 was due: a successor sends at once the messages that
  fell due while no process served the connection (a fixed-rate producer's backlog), then paces
  on, so the peer's silence measures the takeover, not the pacing.

A loss, duplicate or corruption in the client's stream is counted in the report and aborts the
connection (a reset the client counts): a takeover that skipped or repeated bytes cannot pass
unseen, even in a process that is later killed.

Without ``--agent`` it runs as a plain server (commit only consumes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import struct
import time
from typing import Any

from nonstop.app.aio import AsyncNsConn, AsyncNsListener, ns_listen
from nonstop.common import raise_fd_limit
from nonstop.streams.check import HEADER, StreamError, StreamVerifier, make_message
from nonstop.streams.run import CLIENT, SERVER, summarize

STATE = struct.Struct("!IQQHBd")  # conn, rx next, tx next, size, flags, epoch (wall clock)
RX_DONE = 1  # the client's trailer was read
EXIT_DROPPED = 3  # the agent dropped this service: restart it as a standby


class ProtectedServer:
    def __init__(self, listener: AsyncNsListener, *, rate: float, size: int) -> None:
        self.listener, self.rate, self.size = listener, rate, size
        self.verifiers: list[StreamVerifier] = []
        self.errors: dict[str, int] = {}
        self.adopted = 0
        self.dropped = asyncio.Event()  # the agent closed our channel (its node stepped down)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            # adopted connections send what fell due first, all of them, and only then read
            # what the peer sent meanwhile: 256 backlogs read first held the first byte back
            # by 70-190 ms on a loaded box
            resumed = asyncio.Event()
            for conn, record in await self.listener.adopted():
                self.adopted += 1
                tg.create_task(self.serve_conn(conn, record.state, resumed))
            await asyncio.sleep(0)  # each adopted connection starts its sender
            resumed.set()
            print(f"serving: adopted {self.adopted}", flush=True)
            self._watch_agent()
            while True:
                conn = await self.listener.ns_accept()
                tg.create_task(self.serve_conn(conn, b""))

    def _watch_agent(self) -> None:
        """After adoption the agent sends nothing: EOF on the channel means this node stepped
        down and its connections were silenced; the process must go (and be restarted as a
        standby by its supervisor), not linger with dead connections."""
        agent = self.listener.agent
        if agent is None:
            return
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = agent.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(agent.sock)
                self.dropped.set()

        loop.add_reader(agent.sock, readable)

    async def serve_conn(self, conn: AsyncNsConn, state: bytes,
                         resumed: asyncio.Event | None = None) -> None:  # fmt: skip
        try:
            await _Conn(self, conn, state).run(resumed)
        except (ConnectionError, OSError, StreamError) as e:
            if type(e).__name__ not in self.errors:  # logged once per kind, all counted
                print(f"conn {conn.conn_id}: {type(e).__name__}: {e}", flush=True)
            self._count(type(e).__name__)
            conn.ns_abort()  # a reset the client sees (and the agent drops its copy)

    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class _Conn:
    def __init__(self, srv: ProtectedServer, conn: AsyncNsConn, state: bytes) -> None:
        self.srv, self.conn = srv, conn
        if state:
            cid, self.rx, self.tx, self.size, self.flags, self.epoch = STATE.unpack(state)
            self.cid: int | None = cid
        else:
            self.cid, self.rx, self.tx, self.size, self.flags = None, 0, 0, srv.size, 0
            self.epoch = time.time()
        self.boundary = conn.read_pos  # absolute read position after the last whole message
        self.v: StreamVerifier | None = None
        self.stop = asyncio.Event()

    async def commit(self) -> None:
        if self.cid is None:
            return
        state = STATE.pack(self.cid, self.rx, self.tx, self.size, self.flags, self.epoch)
        await self.conn.commit(state, upto=self.boundary)

    async def run(self, resumed: asyncio.Event | None = None) -> None:
        if self.cid is None:  # a new connection: its first header names it
            head = b""
            while len(head) < HEADER.size:
                data = await self.conn.ns_recv(HEADER.size - len(head))
                if not data:
                    return
                head += data
            self.cid = HEADER.unpack(head)[2]
            self._verifier().feed(head, time.monotonic())
            self._account()
        else:
            self._verifier()
        sender = asyncio.create_task(self._send())
        try:
            if resumed is not None:
                await resumed.wait()
            if not self.flags & RX_DONE:
                await self._receive()
        finally:
            self.stop.set()
            await sender
        await self.conn.ns_close()

    def _verifier(self) -> StreamVerifier:
        assert self.cid is not None
        self.v = StreamVerifier(CLIENT, self.cid)
        self.v.next_seq = self.rx
        self.srv.verifiers.append(self.v)
        return self.v

    def _account(self) -> None:
        """After feeding: check the stream, move the boundary past whole messages."""
        v = self.v
        assert v is not None
        r = v.report
        if r.lost or r.duplicated or r.corrupted:
            raise StreamError(f"conn {self.cid}: lost {r.lost} dup {r.duplicated} "
                              f"corrupt {r.corrupted}")  # fmt: skip
        self.rx = v.next_seq
        self.boundary = self.conn.delivered - v.pending
        if v.last_len == 0 and v.pending == 0:
            self.flags |= RX_DONE

    async def _receive(self) -> None:
        assert self.v is not None
        while True:
            data = await self.conn.ns_recv(65536)
            if not data:
                if not self.flags & RX_DONE:
                    self.srv._count("eof_without_trailer")
                return
            self.v.feed(data, time.monotonic())
            self._account()
            await self.commit()

    async def _send(self) -> None:
        """Messages at the rate, then the trailer once the client's trailer was read. After an
        adoption it first writes again what the dead process sent past the commit (the library
        drops those bytes): whole messages, or its trailer, which it wrote only once the
        client's trailer was in (so stop comes). A remainder of exactly one header is taken for
        that trailer (a message cut right after its header would be misread: rare, not seen)."""
        assert self.cid is not None
        whole = HEADER.size + self.size
        first = True
        while True:
            left = self.conn.replaying
            if left == HEADER.size != whole:  # the dead process's trailer
                await self.stop.wait()
                break
            if self.stop.is_set() and not left:
                break
            await self.conn.ns_send(make_message(SERVER, self.cid, self.tx, self.size))
            self.tx += 1
            if first:  # a byte on every connection before any catches up and commits: 256
                first = False  # adopted ones used to wait for each other's whole backlog
                await asyncio.sleep(0)
            if left:
                continue  # written before: no pacing
            delay = self.epoch + self.tx / self.srv.rate - time.time()
            if delay < -1.0:  # more than a second behind: catch up one second's worth, no more
                self.epoch -= delay + 1.0
            if delay > 0:  # one commit per burst: a successor replays the rest (same bytes)
                await self.commit()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
        await self.conn.ns_send(make_message(SERVER, self.cid, self.tx, 0))  # the trailer


async def serve(host: str, port: int, *, agent: str | None, rate: float, size: int,
                report: str | None) -> int:  # fmt: skip
    """Serve until SIGTERM (0) or until the agent drops this service (EXIT_DROPPED)."""
    raise_fd_limit()  # it may be handed thousands of connections
    # replay: after a local restart it writes again from its commit; the library drops what
    # the dead process had already written (a TCP_REPAIR takeover does the same with seqs)
    listener = await ns_listen(host, port, agent=agent, backlog=4096, replay=True)
    srv = ProtectedServer(listener, rate=rate, size=size)
    print(f"listening {port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(srv.run())
    waiter = asyncio.create_task(stop.wait())
    dropped = asyncio.create_task(srv.dropped.wait())
    await asyncio.wait({task, waiter, dropped}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if srv.dropped.is_set() and not stop.is_set():
        print("the agent dropped this service (its node stepped down): exiting", flush=True)
        code = EXIT_DROPPED
    for t in (task, waiter, dropped):
        t.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    if report:
        out: dict[str, Any] = summarize(srv.verifiers, srv.errors)
        out["adopted"] = srv.adopted
        with open(report, "w") as f:
            json.dump(out, f)
    listener.close()
    return code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", help="the agent's app socket (the service's endpoint)")
    p.add_argument("--report", help="write the server's JSON report here on SIGTERM")
