"""The wire between the app library and the node agent: a unix stream socket.

A frame is ``length u32 | nfds u8 | msgpack body`` (big endian; ``length`` counts the body).
``nfds`` is the number of file descriptors passed with the frame via SCM_RIGHTS. On a unix stream
socket the kernel attaches the fds to the first byte of the sendmsg() that carried them, so by the
time a frame's last byte is read its fds have arrived; the decoder keeps received fds in a FIFO and
hands each frame the ``nfds`` oldest ones. REGISTER and ADOPT carry exactly one fd, every other
message none. An adoption sends its ADOPTs ``FDS_PER_MSG`` frames (and fds) to a sendmsg(), and a
reader takes that many fds per recvmsg() (the kernel ends a read after the first message that
carried fds): thousands of connections change hands in a few dozen syscalls.

Messages (msgspec tagged structs):

- library -> agent: HELLO(pid), REGISTER(conn_id, local, remote) + fd, COMMIT(conn_id, read_pos,
  write_pos, state <= 255 bytes), CLOSE(conn_id, deliberate), ADOPT_REQUEST(port);
- agent -> library: ADOPT(conn_id, local, remote, record) + fd, ADOPT_DONE(count).

``FrameDecoder`` trusts nothing and raises RemoteProtocolError only. ``AgentEndpoint`` is the
agent side: it accepts library connections, keeps a duplicate of every registered socket (so a
crashing service never closes a connection in the kernel) and the last commit of each, closes a
connection for real on a deliberate CLOSE, and hands orphaned connections back (``adopt_all``).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import msgspec

from nonstop.common import LocalProtocolError, RemoteProtocolError, readable

STATE_MAX = 255
MAX_BODY = 4096
_HEAD = struct.Struct("!IB")
# fds one sendmsg() may carry (the kernel's SCM_MAX_FD is 253); a reader takes as many per
# recvmsg(), as the kernel stops a read after the first message that carried fds
FDS_PER_MSG = 64
HEAD_LEN = _HEAD.size
_TCP_INFO_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in struct tcp_info
_TCP_INFO_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in struct tcp_info
_TCP_INFO_LEN = 136
_FIN_RECEIVED = {6, 8, 9, 11}  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING

U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Host = Annotated[str, msgspec.Meta(max_length=64)]
State = Annotated[bytes, msgspec.Meta(max_length=STATE_MAX)]


class CommitRecord(msgspec.Struct, frozen=True):
    """What the app last committed on a connection: byte counts since the connection opened."""

    read_pos: U63 = 0
    write_pos: U63 = 0
    state: State = b""


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    pid: U63


class Register(msgspec.Struct, frozen=True, tag="register"):
    conn_id: U63
    local: tuple[Host, Port]
    remote: tuple[Host, Port]


class Commit(msgspec.Struct, frozen=True, tag="commit"):
    conn_id: U63
    read_pos: U63
    write_pos: U63
    state: State = b""


class Close(msgspec.Struct, frozen=True, tag="close"):
    conn_id: U63
    deliberate: bool = True


class AdoptRequest(msgspec.Struct, frozen=True, tag="adopt_request"):
    port: Port  # hand back the orphans whose local port is this one (0: all)


class Adopt(msgspec.Struct, frozen=True, tag="adopt"):
    conn_id: U63
    local: tuple[Host, Port]
    remote: tuple[Host, Port]
    record: CommitRecord
    # Bytes the kernel took from the app(s) on this socket since it opened. Above
    # record.write_pos after a crash: the dead owner wrote past its commit, and the adopter
    # (which replays from the commit) must not send those bytes again (ConnCore skips them).
    sent: U63 = 0


class AdoptDone(msgspec.Struct, frozen=True, tag="adopt_done"):
    count: U63


Message = Hello | Register | Commit | Close | AdoptRequest | Adopt | AdoptDone
Received = tuple[Message, list[int]]
_FDS = {Register: 1, Adopt: 1}
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    body = _encoder.encode(msg)
    if len(body) > MAX_BODY:
        raise LocalProtocolError(f"channel message too long: {len(body)} bytes")
    return _HEAD.pack(len(body), _FDS.get(type(msg), 0)) + body


def send_msg(sock: socket.socket, msg: Message, fd: int | None = None) -> None:
    """Send one frame (blocking), with ``fd`` passed via SCM_RIGHTS when the message needs it."""
    frame = encode(msg)
    if fd is None:
        sock.sendall(frame)
        return
    sent = socket.send_fds(sock, [frame], [fd])
    if sent < len(frame):
        sock.sendall(frame[sent:])


class FrameDecoder:
    """Bytes and fds in, (message, fds) out. Raises RemoteProtocolError on anything malformed."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Received]:
        self._buf += data
        self._fds.extend(fds)
        out: list[Received] = []
        try:
            while len(self._buf) >= HEAD_LEN:
                length, nfds = _HEAD.unpack_from(self._buf)
                if length > MAX_BODY:
                    raise RemoteProtocolError(f"channel frame of {length} bytes")
                if len(self._buf) < HEAD_LEN + length:
                    break
                body = bytes(self._buf[HEAD_LEN : HEAD_LEN + length])
                del self._buf[: HEAD_LEN + length]
                try:
                    msg = _decoder.decode(body)
                except (msgspec.MsgspecError, ValueError) as exc:  # UnicodeDecodeError too
                    raise RemoteProtocolError(f"bad channel message: {exc}") from None
                if nfds != _FDS.get(type(msg), 0):
                    raise RemoteProtocolError(f"{type(msg).__name__} with {nfds} fds")
                if len(self._fds) < nfds:
                    raise RemoteProtocolError(f"{type(msg).__name__}: its fd did not arrive")
                out.append((msg, [self._fds.popleft() for _ in range(nfds)]))
        except RemoteProtocolError:
            for _, got in out:
                for fd in got:
                    os.close(fd)
            self.close()
            raise
        return out

    def close(self) -> None:
        """Close every fd received but not handed out."""
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.popleft())
        self._buf.clear()


def send_batch(sock: socket.socket, frames: list[bytes], fds: list[int]) -> None:
    """Send encoded frames and their fds (in frame order) with one sendmsg() (blocking): an
    adoption hands over thousands of connections, and one syscall each on both ends was most
    of its time. At most ``FDS_PER_MSG`` fds."""
    data = b"".join(frames)
    sent = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_msgs(sock: socket.socket, dec: FrameDecoder) -> list[Received] | None:
    """One recvmsg() into ``dec``; None on EOF."""
    data, fds, _flags, _addr = socket.recv_fds(sock, 65536, FDS_PER_MSG)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return dec.feed(data, fds)


def _queue_len(sock: socket.socket, request: int) -> int:
    import fcntl

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]


def _stable_counters(sock: socket.socket) -> tuple[bytes, int, int]:
    """(TCP_INFO, receive queue length, send queue length), read so that they describe the same
    moment: TCP_INFO is read before and after the queues, and again until its byte counters did
    not move (a segment or an ACK that lands between two unlocked syscalls would otherwise skew
    a position by a whole segment)."""
    for _ in range(1000):
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        inq = _queue_len(sock, _SIOCINQ)
        outq = _queue_len(sock, _SIOCOUTQ)
        again = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        if info[0] == again[0] and info[_TCP_INFO_BYTES_ACKED:] == again[_TCP_INFO_BYTES_ACKED:]:
            return info, inq, outq
    raise OSError("TCP counters kept moving while reading a queue position")


_SIOCINQ, _SIOCOUTQ = 0x541B, 0x5411  # FIONREAD, TIOCOUTQ


def kernel_positions(sock: socket.socket) -> tuple[int, int]:
    """(read, written): bytes the application side has read from ``sock`` since it opened
    (received - queued; the peer's FIN takes one sequence number and is counted in received,
    not queued), and bytes it has written (acked + queued)."""
    info, inq, outq = _stable_counters(sock)
    (acked,) = struct.unpack_from("=Q", info, _TCP_INFO_BYTES_ACKED)
    (received,) = struct.unpack_from("=Q", info, _TCP_INFO_BYTES_RECEIVED)
    return received - (1 if info[0] in _FIN_RECEIVED else 0) - inq, acked + outq


def kernel_read_pos(sock: socket.socket) -> int:
    """Bytes the application side has read from ``sock`` since it opened."""
    return kernel_positions(sock)[0]


def kernel_write_pos(sock: socket.socket) -> int:
    """Bytes the application side has written to ``sock`` since it opened."""
    return kernel_positions(sock)[1]


# -- the agent side ------------------------------------------------------------------------------


@dataclass(slots=True)
class HeldConn:
    """A protected connection the agent keeps a duplicate of."""

    conn_id: int
    sock: socket.socket
    local: tuple[str, int]
    remote: tuple[str, int]
    record: CommitRecord = field(default_factory=CommitRecord)
    owner: EndpointClient | None = None
    registered: bool = False  # a local service registered it (True) or add() restored it
    # absolute position = kernel counter + base: 0 for a socket opened here; for one restored
    # by add(), what makes the kernel's fresh counters match the record it was restored at
    read_base: int = 0
    write_base: int = 0


@dataclass(eq=False, slots=True)
class EndpointClient:
    """One library connection (one service process) to the agent."""

    sock: socket.socket
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    pid: int = 0
    serving: set[int] = field(default_factory=set)  # ports it was handed adoption for (active)


class AgentEndpoint:
    """The agent's end of the channel. Drive it with ``step(timeout)`` (selectors) or ``attach()``
    (asyncio add_reader); ``handle(client, msg, fds)`` is the decision logic and does no reads.

    Counters: ``counters["malformed"]`` etc. A malformed client is dropped; its connections stay
    held (orphans) for the next service to adopt.

    In a node agent: ``on_commit(helds)`` runs once per read from a client, with every connection
    whose COMMIT that read recorded (the session manager syncs them to the backup under one lock
    and in one batch: a service committing thousands of times a second made one call each, and
    the agent's worker spent its time convoying on its lock), ``on_close(held)`` after a
    deliberate CLOSE. With ``hold_adoption``
    set (a backup node) an ADOPT_REQUEST is answered only at ``release_adoptions()``: a standby
    service started on the backup waits there and wakes with the connections restored on
    promotion. ``lock`` serialises ``step`` with calls from other threads.

    Active and standby instances of a service on one node: the first client answered an
    ADOPT_REQUEST for a port is that port's active instance; a later request for the same port
    while the active lives is held (a warm standby) and answered with the active's connections
    the moment it goes (``drop``). Before answering, the endpoint reads what the other clients
    sent: a dead owner's last COMMITs and its EOF are handled first, so its connections are
    orphans (not still owned) when a successor asks.
    """

    def __init__(
        self,
        path: str,
        *,
        on_commit: Callable[[list[HeldConn]], None] | None = None,
        on_close: Callable[[HeldConn], None] | None = None,
        hold_adoption: bool = False,
    ) -> None:
        self.on_commit, self.on_close = on_commit, on_close
        self.hold_adoption = hold_adoption
        self.waiting: list[tuple[EndpointClient, int]] = []  # held ADOPT_REQUESTs (client, port)
        self.lock = threading.RLock()
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.clients: list[EndpointClient] = []
        self.conns: dict[int, HeldConn] = {}
        self.counters: dict[str, int] = {}
        self._sel: selectors.BaseSelector | None = None
        self._committed: list[HeldConn] = []  # COMMITs recorded, not yet passed to on_commit

    # -- I/O adapters --
    def accept(self) -> EndpointClient | None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return None
        sock.setblocking(True)  # reads happen only when readable; sends are small
        client = EndpointClient(sock)
        self.clients.append(client)
        if self._sel is not None:
            self._sel.register(sock, selectors.EVENT_READ, client)
        return client

    def readable(self, client: EndpointClient) -> None:
        """Read what ``client`` sent and act on it; drop the client on EOF or garbage."""
        try:
            msgs = recv_msgs(client.sock, client.decoder)
        except RemoteProtocolError as exc:
            self._count(exc.counter)
            self.drop(client)
            return
        except OSError:
            msgs = None
        if msgs is None:
            self.drop(client)
            return
        try:
            for i, (msg, fds) in enumerate(msgs):
                try:
                    self.handle(client, msg, fds)
                except RemoteProtocolError as exc:
                    self._count(exc.counter)
                    for _, rest in msgs[i + 1 :]:
                        for fd in rest:
                            os.close(fd)
                    self.drop(client)
                    return
        finally:  # the commits before a bad message count too
            self.flush_commits()

    def flush_commits(self) -> None:
        """Pass the COMMITs recorded since the last call to ``on_commit`` (``readable`` does it
        after each read; a caller of ``handle`` calls it itself)."""
        if self._committed:
            got, self._committed = self._committed, []
            if self.on_commit is not None:
                self.on_commit(got)

    def step(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for the listener or a client and serve what is ready."""
        if self._sel is None:
            self._sel = selectors.DefaultSelector()
            self._sel.register(self.listener, selectors.EVENT_READ, None)
            for c in self.clients:
                self._sel.register(c.sock, selectors.EVENT_READ, c)
        for key, _ in self._sel.select(timeout):
            with self.lock:
                if key.data is None:
                    self.accept()
                elif key.data in self.clients:
                    self.readable(key.data)

    def attach(self, loop) -> None:  # loop: asyncio.AbstractEventLoop
        """Serve from an asyncio loop with add_reader callbacks."""

        def on_accept() -> None:
            client = self.accept()
            if client is not None:
                loop.add_reader(client.sock, self.readable, client)

        self._on_drop = loop.remove_reader
        loop.add_reader(self.listener, on_accept)

    # -- the logic --
    def handle(self, client: EndpointClient, msg: Message, fds: list[int]) -> None:
        match msg:
            case Hello(pid=pid):
                client.pid = pid
            case Register(conn_id=cid, local=local, remote=remote):
                sock = socket.socket(fileno=fds[0])
                if sock.type != socket.SOCK_STREAM or cid in self.conns:
                    sock.close()
                    raise RemoteProtocolError(f"bad REGISTER of conn {cid}")
                self.conns[cid] = HeldConn(
                    cid, sock, tuple(local), tuple(remote), owner=client, registered=True
                )
            case Commit(conn_id=cid):
                held = self._owned(client, cid)
                held.record = CommitRecord(msg.read_pos, msg.write_pos, msg.state)
                if self.on_commit is not None:
                    self._committed.append(held)
            case Close(conn_id=cid, deliberate=deliberate):
                held = self._owned(client, cid)
                if deliberate:
                    del self.conns[cid]
                    held.sock.close()
                    if self.on_close is not None:
                        self.on_close(held)
                else:
                    held.owner = None
            case AdoptRequest(port=port):
                self._read_others(client)
                if self.hold_adoption or self._active_on(port, but=client):
                    self.waiting.append((client, port))
                else:
                    self.adopt_all(client, port=port)
            case _:
                raise RemoteProtocolError(f"{type(msg).__name__} is agent -> library only")

    def add(self, conn_id: int, sock: socket.socket, record: CommitRecord, *,
            sent_pos: int | None = None) -> None:  # fmt: skip
        """Hold a connection restored elsewhere (e.g. by TCP_REPAIR after a failover) as an orphan.
        Its receive queue must start at ``record.read_pos``; its send stream is at ``sent_pos``
        (default ``record.write_pos``; more when it holds bytes written after the commit)."""
        local, remote = sock.getsockname()[:2], sock.getpeername()[:2]
        held = HeldConn(conn_id, sock, local, remote, record)
        try:
            read, written = kernel_positions(sock)
            held.read_base = record.read_pos - read
            sent = record.write_pos if sent_pos is None else max(sent_pos, record.write_pos)
            held.write_base = sent - written
        except OSError:
            pass
        self.conns[conn_id] = held

    def adopt_all(self, client: EndpointClient, *, port: int = 0) -> int:
        """Hand every orphan (owner gone) on local ``port`` (0: any) to ``client``; then
        ADOPT_DONE. Bytes a crashed owner consumed after its COMMIT went out are discarded first,
        so the queue starts exactly at the committed read position. ADOPTs go ``FDS_PER_MSG`` to
        a sendmsg(); a connection is the client's once its batch was sent."""
        n = 0
        frames: list[bytes] = []
        batch: list[HeldConn] = []

        def flush() -> None:
            send_batch(client.sock, frames, [h.sock.fileno() for h in batch])
            for h in batch:
                h.owner = client
            frames.clear()
            batch.clear()

        for held in list(self.conns.values()):
            if held.owner is not None or (port and held.local[1] != port):
                continue
            try:
                read, written = kernel_positions(held.sock)
            except OSError:
                read, written = None, None
            if read is not None:
                self._trim(held, read)
            sent = held.record.write_pos
            if written is not None:
                sent = max(sent, written + held.write_base)
            frames.append(encode(Adopt(held.conn_id, held.local, held.remote, held.record, sent)))
            batch.append(held)
            n += 1
            if len(batch) == FDS_PER_MSG:
                flush()
        if batch:
            flush()
        send_msg(client.sock, AdoptDone(n))
        client.serving.add(port)
        return n

    def release_adoptions(self) -> int:
        """Stop holding ADOPT_REQUESTs; answer the first waiting one per port (the others stay
        waiting: standbys of the one answered). Returns the connections handed over."""
        self.hold_adoption = False
        return self._answer_waiting()

    def _answer_waiting(self) -> int:
        n = 0
        for client, port in list(self.waiting):
            if client not in self.clients or self._active_on(port, but=client):
                continue
            self.waiting.remove((client, port))
            try:
                n += self.adopt_all(client, port=port)
            except OSError:
                self.drop(client)
        return n

    def _active_on(self, port: int, *, but: EndpointClient) -> bool:
        """Another live client was handed the connections of ``port`` (0: of any port)."""
        return any(
            c is not but and c.serving and (port == 0 or 0 in c.serving or port in c.serving)
            for c in self.clients
        )

    def _read_others(self, client: EndpointClient) -> None:
        """Handle what the other clients already sent (a dead one's last COMMITs and EOF)."""
        for c in [c for c in self.clients if c is not client]:
            # until it has nothing more (its data and its EOF come in separate reads); bounded,
            # a live client may keep committing
            for _ in range(64):
                if c not in self.clients or not readable([c.sock], 0):
                    break
                self.readable(c)

    def drop(self, client: EndpointClient) -> None:
        """Forget a library connection; its connections become orphans (still held)."""
        if client in self.clients:
            self.clients.remove(client)
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(client.sock)
        on_drop = getattr(self, "_on_drop", None)
        if on_drop is not None:
            on_drop(client.sock)
        client.decoder.close()
        client.sock.close()
        self.waiting = [(c, p) for c, p in self.waiting if c is not client]
        for held in self.conns.values():
            if held.owner is client:
                held.owner = None
        if client.serving and not self.hold_adoption:
            self._answer_waiting()  # a warm standby takes over at once

    def close(self) -> None:
        for c in list(self.clients):
            self.drop(c)
        for held in self.conns.values():
            held.sock.close()
        self.conns.clear()
        self.listener.close()
        if self._sel is not None:
            self._sel.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _owned(self, client: EndpointClient, cid: int) -> HeldConn:
        held = self.conns.get(cid)
        if held is None or held.owner is not client:
            raise RemoteProtocolError(f"conn {cid} is not this client's", counter="unknown_conn")
        return held

    def _trim(self, held: HeldConn, kernel_read: int) -> None:
        """Discard what a dead owner consumed past its last COMMIT (``kernel_read``: the
        kernel's read position of ``held.sock``)."""
        lag = held.record.read_pos - kernel_read - held.read_base
        while lag > 0:
            got = held.sock.recv(min(lag, 65536), socket.MSG_DONTWAIT)
            if not got:
                break
            lag -= len(got)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

