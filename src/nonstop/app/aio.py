"""The prefixed socket API, asyncio flavour: the same positions and channel as ``api``, over
non-blocking sockets with ``loop.add_reader`` / ``loop.sock_*``.

Channel messages to the agent (REGISTER, COMMIT, CLOSE) are small sends on a local unix socket and
are written synchronously (they block only if the agent stops reading); adoption runs in a thread.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from nonstop.app.api import AgentLink, ConnCore, listen_after_adoption, open_listener, register
from nonstop.app.channel import Adopt, CommitRecord
from nonstop.common import wait_readable


class AsyncNsConn(ConnCore):
    """A protected TCP connection (asyncio)."""

    def __init__(self, sock: socket.socket, conn_id: int, agent: AgentLink | None,
                 record: CommitRecord | None = None, sent: int = 0,
                 stream_pos: int | None = None) -> None:  # fmt: skip
        sock.setblocking(False)
        super().__init__(sock, conn_id, agent, record, sent, stream_pos)

    async def ns_recv(self, n: int) -> bytes:
        """Up to ``n`` new bytes (peeked, kept in the kernel until commit); b"" at EOF."""
        while True:
            self._set_lowat()  # poll() honours SO_RCVLOWAT: readable once a new byte is queued
            try:
                data = self.sock.recv(self.delivered - self.read_pos + n, socket.MSG_PEEK)
            except BlockingIOError:
                await wait_readable(self.sock)
                continue
            new = self._take_peek(data)
            if new is not None:
                return new
            await wait_readable(self.sock)

    async def ns_send(self, data: bytes) -> None:
        rest = self._to_send(data)
        if rest:
            await asyncio.get_running_loop().sock_sendall(self.sock, rest)
        self.write_pos += len(data)

    async def commit(self, state: bytes = b"", *, upto: int | None = None) -> None:
        """Report the commit to the agent, then consume the input up to ``upto`` (default: all
        delivered). The bytes are in the queue already, so this never waits on the network."""
        upto = self._commit_target(upto)
        self._report(upto, state)
        self._consume(upto - self.read_pos)

    async def ns_close(self) -> None:
        self._close()

    def ns_abort(self) -> None:
        """The peer sees a RST (see ``NsConn.ns_abort``)."""
        self._close(abort=True)

    def getpeername(self) -> tuple[str, int]:
        host, port = self.sock.getpeername()[:2]
        return (host, port)


class AsyncNsListener:
    def __init__(self, sock: socket.socket, agent: AgentLink | None,
                 adopted: list[tuple[Adopt, socket.socket]] | None = None,
                 replay: bool = False) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.agent = agent
        self.port: int = sock.getsockname()[1]
        self._adopted = adopted  # a standby's: adopted before it could listen
        self.replay = replay


    async def ns_accept(self) -> AsyncNsConn:
        sock, _ = await asyncio.get_running_loop().sock_accept(self.sock)
        return AsyncNsConn(sock, register(self.agent, sock), self.agent)

    async def adopted(self) -> list[tuple[AsyncNsConn, CommitRecord]]:
        if self.agent is None:
            return []
        got = self._adopted
        self._adopted = None
        if got is None:
            got = await asyncio.to_thread(self.agent.adopt, self.port)
        return [(AsyncNsConn(s, a.conn_id, self.agent, a.record, a.sent if self.replay else 0,
                             a.sent), a.record) for a, s in got]  # fmt: skip

    def close(self) -> None:
        self.sock.close()
        if self.agent is not None:
            self.agent.close()


async def ns_listen(addr: str, port: int, *, agent: str | None = None,
                    backlog: int = 128, replay: bool = False) -> AsyncNsListener:
    """asyncio twin of ``api.ns_listen`` (a warm standby waits here, in a thread)."""
    if agent is None:
        return AsyncNsListener(open_listener(addr, port, backlog), None, replay=replay)
    link = await asyncio.to_thread(AgentLink, agent)
    try:
        return AsyncNsListener(open_listener(addr, port, backlog), link, replay=replay)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            link.close()
            raise
    got = await asyncio.to_thread(link.adopt, port)
    sock = await asyncio.to_thread(listen_after_adoption, addr, port, backlog)
    return AsyncNsListener(sock, link, got, replay)
