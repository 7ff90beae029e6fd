"""The prefixed socket API, blocking flavour (see the package docstring for the design)."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import struct
import threading
import time

from nonstop.app.channel import (
    Adopt,
    AdoptDone,
    AdoptRequest,
    Close,
    Commit,
    CommitRecord,
    FrameDecoder,
    Hello,
    Register,
    recv_msgs,
    send_msg,
)
from nonstop.common import LocalProtocolError, RemoteProtocolError, reserve_fds

# TCP states (include/net/tcp_states.h) in which the peer has sent its FIN or the socket is gone.
_PEER_DONE = {6, 7, 8, 9, 11}  # TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING
_IP_FREEBIND, _IPV6_FREEBIND = 15, 78
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets


def _addr(sa: tuple) -> tuple[str, int]:
    return (str(sa[0]), int(sa[1]))


def peer_closed(sock: socket.socket) -> bool:
    """True once the peer's FIN arrived (or the connection is gone): TCP_INFO's state byte."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] in _PEER_DONE


ADOPT_FD_ROOM = 4096  # fds a service's table holds before it asks for its connections (32 KB);
# a service that takes over more calls nonstop.common.reserve_fds(n) itself, or pays a grace
# period per doubling past this
AGENT_WAIT = 10.0  # seconds a service waits for its agent's endpoint (agent starting too)


def _connect_agent(path: str, wait: float) -> socket.socket:
    """Connect to the agent's endpoint at ``path``, waiting up to ``wait`` seconds while it is
    absent or refuses (an agent restarting: its old socket file is still there for a moment;
    a service started beside it used to die at once, and its connections waited unserved)."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)
        except BaseException:
            sock.close()
            raise


class AgentLink:
    """The library's end of the channel to the agent (blocking, thread safe sends)."""

    def __init__(self, path: str, wait: float = AGENT_WAIT) -> None:
        self.sock = _connect_agent(path, wait)
        self._lock = threading.Lock()
        self._dec = FrameDecoder()
        self.send(Hello(os.getpid()))

    def send(self, msg, fd: int | None = None) -> None:
        with self._lock:
            send_msg(self.sock, msg, fd)

    def adopt(self, port: int) -> list[tuple[Adopt, socket.socket]]:
        """Ask for the orphans on ``port``; block until the agent's ADOPT_DONE. The fd table is
        grown first (``ADOPT_FD_ROOM``): a standby that takes over hundreds of connections
        would otherwise wait an RCU grace period at every doubling (common.reserve_fds)."""
        reserve_fds(ADOPT_FD_ROOM)
        self.send(AdoptRequest(port))
        out: list[tuple[Adopt, socket.socket]] = []
        while True:
            msgs = recv_msgs(self.sock, self._dec)
            if msgs is None:
                raise RemoteProtocolError("agent closed the channel during adoption")
            for msg, fds in msgs:
                if isinstance(msg, Adopt):
                    out.append((msg, socket.socket(fileno=fds[0])))
                elif isinstance(msg, AdoptDone):
                    return out
                else:
                    for fd in fds:
                        os.close(fd)
                    raise RemoteProtocolError(f"unexpected {type(msg).__name__} from the agent")

    def close(self) -> None:
        self._dec.close()
        self.sock.close()


class ConnCore:
    """Position bookkeeping shared by the sync and asyncio connections.

    ``read_pos``: bytes consumed from the kernel (= committed) since the connection opened;
    ``delivered``: bytes handed to the app by ns_recv (>= read_pos; the rest is only peeked);
    ``write_pos``: bytes sent since the connection opened.
    """

    def __init__(self, sock: socket.socket, conn_id: int, agent: AgentLink | None,
                 record: CommitRecord | None = None, sent: int = 0,
                 stream_pos: int | None = None) -> None:  # fmt: skip
        self.sock = sock
        self.conn_id = conn_id
        self.agent = agent
        self.read_pos = self.delivered = self.write_pos = 0
        self.closed = False
        # Adopted after a crash, ``sent``: what the kernel took from the dead owner. An app
        # that replays its output from its commit (ns_listen(replay=True)) writes the bytes in
        # ``[write_pos, sent)`` again; they are not sent twice (_to_send). Pass 0 otherwise.
        self.sent = sent
        # where the kernel's outgoing stream is (bytes since the connection opened) when it was
        # handed over: past ``write_pos`` when the dead owner wrote after its commit. An app
        # without replay that keeps its own output (a journal) sends on from here.
        self._skip = 0
        self._lowat = 1
        if record is not None:
            self.read_pos = self.delivered = record.read_pos
            self.write_pos = record.write_pos
            self._skip = max(0, sent - record.write_pos)
            self._lowat = 0  # a dead owner's SO_RCVLOWAT may still be set: set ours at once
        self.stream_pos = max(self.write_pos, stream_pos or 0)

    @property
    def replaying(self) -> int:
        """Bytes the dead owner wrote past this connection's commit that the app has not
        written again yet (replay=True): its next writes are dropped up to there."""
        return self._skip

    def _set_lowat(self) -> None:
        want = self.delivered - self.read_pos + 1
        if want != self._lowat:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            self._lowat = want

    def _take_peek(self, data: bytes) -> bytes | None:
        """New bytes from a peek of the whole queue; b"" on EOF; None: nothing new yet."""
        pending = self.delivered - self.read_pos
        if len(data) > pending:
            new = data[pending:]
            self.delivered += len(new)
            return new
        if not data and pending == 0:
            return b""
        return b"" if peer_closed(self.sock) else None

    def _to_send(self, data: bytes) -> bytes:
        """What of ``data`` the kernel has not had yet (after an adoption). The caller adds
        ``len(data)`` to write_pos once the rest is sent (a COMMIT meanwhile must not count
        bytes the kernel does not hold yet)."""
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            return data[n:]
        return data

    def _commit_target(self, upto: int | None) -> int:
        upto = self.delivered if upto is None else upto
        if not self.read_pos <= upto <= self.delivered:
            raise LocalProtocolError(
                f"commit upto {upto} outside [{self.read_pos}, {self.delivered}]")
        return upto

    def _report(self, upto: int, state: bytes) -> None:
        # The agent learns the commit before the bytes leave the kernel queue: if we die in
        # between, the agent discards them (AgentEndpoint._trim), so none is delivered twice.
        if self.agent is not None:
            self.agent.send(Commit(self.conn_id, upto, self.write_pos, bytes(state)))

    def _consume(self, count: int) -> None:
        while count > 0:
            got = self.sock.recv(min(count, 1 << 20), socket.MSG_DONTWAIT)
            if not got:
                raise LocalProtocolError("peeked bytes vanished from the receive queue")
            count -= len(got)
            self.read_pos += len(got)

    def _close(self, *, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if abort:  # linger 0: whichever close of the socket is the last (ours or the agent's
            # duplicate) sends a RST instead of a FIN
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        if self.agent is not None:
            with contextlib.suppress(OSError) if abort else contextlib.nullcontext():
                self.agent.send(Close(self.conn_id, deliberate=True))
        self.sock.close()


class NsConn(ConnCore):
    """A protected TCP connection (blocking)."""

    def ns_recv(self, n: int) -> bytes:
        """Up to ``n`` bytes after those already delivered; b"" at EOF. Bytes stay in the kernel
        receive queue (read with MSG_PEEK) until commit() consumes them."""
        while True:
            self._set_lowat()
            data = self.sock.recv(self.delivered - self.read_pos + n, socket.MSG_PEEK)
            new = self._take_peek(data)
            if new is not None:
                return new

    def ns_send(self, data: bytes) -> None:
        self.sock.sendall(self._to_send(data))
        self.write_pos += len(data)

    def commit(self, state: bytes = b"", *, upto: int | None = None) -> None:
        """Tell the agent the app has processed the input up to ``upto`` (absolute read position;
        default: all delivered) and holds ``state`` (<= 255 bytes); then consume those bytes."""
        upto = self._commit_target(upto)
        self._report(upto, state)
        self._consume(upto - self.read_pos)

    def ns_close(self) -> None:
        """Deliberate close: the agent drops its duplicate, the peer sees a FIN."""
        self._close()

    def ns_abort(self) -> None:
        """Give up on the connection: the agent drops its duplicate, the peer sees a RST. (A
        plain ``sock.close()`` would not reach the peer: the agent still holds the socket.)"""
        self._close(abort=True)

    def fileno(self) -> int:
        return self.sock.fileno()

    def getpeername(self) -> tuple[str, int]:
        return _addr(self.sock.getpeername())


def open_listener(addr: str, port: int, backlog: int) -> socket.socket:
    family, type_, proto, _, sa = socket.getaddrinfo(
        addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # FREEBIND: a standby on the backup listens on the VIP before its node holds it
    if family == socket.AF_INET:
        sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_FREEBIND, 1)
    sock.bind(sa)
    sock.listen(backlog)
    return sock


def register(agent: AgentLink | None, sock: socket.socket) -> int:
    conn_id = secrets.randbits(63)
    if agent is not None:
        msg = Register(conn_id, _addr(sock.getsockname()), _addr(sock.getpeername()))
        agent.send(msg, sock.fileno())
    return conn_id


class NsListener:
    """A listening socket whose accepted connections the agent protects."""

    def __init__(self, sock: socket.socket, agent: AgentLink | None,
                 adopted: list[tuple[Adopt, socket.socket]] | None = None,
                 replay: bool = False) -> None:
        self.sock = sock
        self.agent = agent
        self.port: int = sock.getsockname()[1]
        self._adopted = adopted  # a standby's: adopted before it could listen
        self.replay = replay


    def ns_accept(self) -> NsConn:
        sock, _ = self.sock.accept()
        return NsConn(sock, register(self.agent, sock), self.agent)

    def adopted(self) -> list[tuple[NsConn, CommitRecord]]:
        """Connections the agent hands over (after a failover or a restart) with their last
        commit; their receive queues start at ``record.read_pos``. Empty without an agent."""
        if self.agent is None:
            return []
        got = self._adopted if self._adopted is not None else self.agent.adopt(self.port)
        self._adopted = None
        return [(NsConn(s, a.conn_id, self.agent, a.record, a.sent if self.replay else 0,
                        a.sent), a.record) for a, s in got]  # fmt: skip

    def close(self) -> None:
        self.sock.close()
        if self.agent is not None:
            self.agent.close()


def ns_listen(addr: str, port: int, *, agent: str | None = None, backlog: int = 128,
              replay: bool = False) -> NsListener:
    """Listen on ``addr:port``; ``agent`` is the agent's unix socket path (None: no agent,
    plain sockets, commit only consumes). ``replay``: the app writes, after an adoption, the
    same bytes as from its last commit on (seed 001's model, like a TCP_REPAIR takeover that
    resumes at the committed sequence number); the bytes a crashed predecessor already wrote
    past its commit are then dropped, not sent twice.

    With an agent, when another instance of the service listens there already (EADDRINUSE),
    this one is its warm standby: it asks for adoption first (the agent answers when the active
    instance dies, with its connections), then listens; ``adopted()`` returns them."""
    if agent is None:
        return NsListener(open_listener(addr, port, backlog), None, replay=replay)
    link = AgentLink(agent)
    try:
        return NsListener(open_listener(addr, port, backlog), link, replay=replay)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            link.close()
            raise
    got = link.adopt(port)
    return NsListener(listen_after_adoption(addr, port, backlog), link, got, replay)


def listen_after_adoption(
    addr: str, port: int, backlog: int, timeout: float = 2.0
) -> socket.socket:
    """A standby that was handed the connections: the dead instance's listener may take a
    moment to go (its process is still exiting); retry the bind until then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return open_listener(addr, port, backlog)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.002)
