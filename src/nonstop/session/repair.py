"""TCP_REPAIR dump and restore of established TCP connections (Linux only).

``dump(sock)`` reads everything needed to rebuild a connection: the 4-tuple, the sequence numbers
of both queues, the negotiated options, the TCP timestamp, the window and the bytes of both queues.
``restore(state)`` builds a socket that the kernel treats as the same established connection: no
SYN is sent, the peer sees at most a window probe. CRIU's libsoccr (soccr/soccr.c) is the reference
for the steps; the order below is the one verified on this machine kind (shared/DESIGN.md):

restore: repair on; IP(V6)_TRANSPARENT (bind the VIP before this node owns it); TCP_QUEUE_SEQ
of the send and receive queues; bind; connect (no SYN in repair mode); TCP_REPAIR_OPTIONS;
TCP_TIMESTAMP (saved + elapsed); refill the receive queue and the sent-but-unacknowledged part of
the send queue; TCP_REPAIR_WINDOW; repair off (one window probe); SO_REUSEADDR; then the
never-sent tail of the send queue is sent normally, so it really goes out.

``resend`` (default): when the unacknowledged bytes fit in the initial congestion window (10
segments) they are not refilled in repair mode but sent normally with the tail, as if never sent
(snd_nxt = snd_una at repair off): bytes lost in flight reach the peer at once instead of after a
~1 s tail-loss probe and a 3 s retransmit timer (no RTT estimate on a restored socket); bytes the
peer already had are dropped there as duplicates. Larger flights stay in flight: an ACK beyond
snd_nxt would be dropped and stall the connection for good. See docs/tcp-repair.md.

TCP-MD5 (RFC 2385): ``md5`` maps a peer address to its key; a connection to that peer gets
TCP_MD5SIG right after connect, in repair mode, so the window probe at repair off and every
segment after it are signed, and the peer's signed segments are accepted. (Without the key the
peer drops every segment of ours and we drop every one of its: the connection is dead.)

Sequence numbers are unsigned 32-bit: the kernel hands them back through a signed int.

The restore's 15-20 system calls per connection are made from C (``_repair.c``, built by
``pip install``) when it was built: from Python each call cost more than the kernel's work. The
decisions (queues, options, what to resend) stay here; ``engine()`` says which one runs.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping

import msgspec

from nonstop.common import reserve_fds

try:  # the restore's system calls made from C (setup.py builds it; optional)
    from nonstop.session import _repair as _native
except ImportError:  # no compiler at install time: the same calls from Python, ~2x slower
    _native = None

__all__ = [
    "RepairError",
    "TcpState",
    "close_silently",
    "dump",
    "dump_many",
    "md5sig",
    "restore",
    "restore_many",
]

# linux/tcp.h
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_MD5SIG = 14
TCP_MD5SIG_MAXKEYLEN = 80
_MD5_OPT_LEN = 20  # TCPOLEN_MD5SIG_ALIGNED: taken from every signed segment's payload
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2
TCPOPT_MSS = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4
TCP_ESTABLISHED = 1
# linux/in.h, linux/in6.h
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
# asm-generic/ioctls.h, linux/sockios.h
SIOCINQ = 0x541B
SIOCOUTQ = 0x5411
SIOCOUTQNSD = 0x894B

_TCP = socket.IPPROTO_TCP
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_WINDOW = struct.Struct("5I")
_U32 = struct.Struct("I")
_I32 = struct.Struct("i")
_ZERO4 = bytes(4)
_SEQ_MASK = 0xFFFFFFFF
_NONBLOCK = socket.SOCK_NONBLOCK
_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33
# queues up to these sizes fit in a new socket's default buffers (net.ipv4.tcp_wmem/tcp_rmem
# defaults are 16 KiB and 128 KiB); larger ones get buffers set explicitly (this stops the
# kernel's autotuning of that buffer for the restored socket, as it does for any SO_*BUF)
_SNDBUF_DEFAULT = 8 << 10
_INIT_CWND = 10  # TCP_INIT_CWND (include/net/tcp.h), unless a route sets initcwnd
_TS_OPT_LEN = 12  # the timestamps option, aligned: taken from every segment's payload
_RCVBUF_DEFAULT = 48 << 10


class RepairError(OSError):
    """A TCP_REPAIR step failed; ``step`` names it (``str()`` starts with it)."""

    def __init__(self, step: str, cause: BaseException | str) -> None:
        errno = cause.errno if isinstance(cause, OSError) else None
        super().__init__(errno, f"{step}: {cause}")
        self.step = step

    def __str__(self) -> str:
        return str(self.strerror)


class TcpState(msgspec.Struct, frozen=True, gc=False):
    """Everything needed to rebuild one established TCP connection.

    ``src:sport`` is the local end (the VIP), ``dst:dport`` the peer. ``snd_seq`` and ``rcv_seq``
    are TCP_QUEUE_SEQ of the send and receive queues as dumped: the sequence number just past the
    last byte queued for sending (write_seq) and just past the last byte received (rcv_nxt).
    ``send_queue`` holds the unacknowledged and unsent bytes, its last ``unsent_len`` bytes never
    sent; ``recv_queue`` the bytes received and not yet read. ``window`` is TCP_REPAIR_WINDOW
    (snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup). ``dumped_at`` is time.monotonic().

    A msgspec Struct, not a frozen dataclass: a promotion builds one per connection, and a
    frozen dataclass takes ~2.7 us to build here (one ``object.__setattr__`` per field), a
    Struct ~0.1 us. Not tracked by the GC: it holds no containers of its own kind.
    """

    family: int
    src: str
    sport: int
    dst: str
    dport: int
    snd_seq: int
    rcv_seq: int
    mss: int
    snd_wscale: int
    rcv_wscale: int
    sack: bool
    timestamps: bool
    ts_val: int | None
    window: tuple[int, int, int, int, int] | None
    send_queue: bytes
    recv_queue: bytes
    unsent_len: int
    dumped_at: float


def _ioctl_int(fd: int, req: int) -> int:
    return _I32.unpack(fcntl.ioctl(fd, req, _ZERO4))[0]


def _peek(sock: socket.socket, n: int) -> bytes:
    if n == 0:
        return b""
    data = sock.recv(n, _PEEK)
    if len(data) != n:  # recv peeks across skbs; a short read means the queue changed under us
        raise RepairError("peek queue", f"read {len(data)} of {n} bytes")
    return data


def _dump_one(sock: socket.socket, keep_repair: bool, now: float) -> TcpState:
    so = sock.setsockopt
    go = sock.getsockopt
    step = "repair on"
    try:
        # leaving repair mode clears SO_REUSEADDR (sk_reuse); remember it to put it back
        reuse = 0 if keep_repair else go(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        so(_TCP, TCP_REPAIR, 1)
        try:
            step = "TCP_INFO"
            info = go(_TCP, socket.TCP_INFO, 8)
            if info[0] != TCP_ESTABLISHED:
                raise RepairError(step, f"connection is in TCP state {info[0]}, not ESTABLISHED")
            opts = info[5]
            fd = sock.fileno()
            step = "SIOCOUTQ"
            outq = _ioctl_int(fd, SIOCOUTQ)
            step = "SIOCOUTQNSD"
            unsent = _ioctl_int(fd, SIOCOUTQNSD) if outq else 0
            step = "SIOCINQ"
            inq = _ioctl_int(fd, SIOCINQ)
            step = "send queue"
            so(_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            snd_seq = go(_TCP, TCP_QUEUE_SEQ) & _SEQ_MASK
            send_q = _peek(sock, outq)
            step = "recv queue"
            so(_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            rcv_seq = go(_TCP, TCP_QUEUE_SEQ) & _SEQ_MASK
            recv_q = _peek(sock, inq)
            step = "TCP_MAXSEG"
            mss = go(_TCP, socket.TCP_MAXSEG)  # mss_clamp (the peer's MSS) in repair mode
            ts = opts & TCPI_OPT_TIMESTAMPS
            step = "TCP_TIMESTAMP"
            ts_val = go(_TCP, TCP_TIMESTAMP) & _SEQ_MASK if ts else None
            step = "TCP_REPAIR_WINDOW"
            window = _WINDOW.unpack(go(_TCP, TCP_REPAIR_WINDOW, 20))
            step = "addresses"
            local = sock.getsockname()
            peer = sock.getpeername()
        except BaseException:
            if not keep_repair:
                so(_TCP, TCP_REPAIR, 0)
            raise
        if not keep_repair:
            step = "repair off"  # the queue selector only matters in repair mode: left as is
            so(_TCP, TCP_REPAIR, 0)
            if reuse:
                so(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except RepairError:
        raise
    except OSError as e:
        raise RepairError(step, e) from e
    wscale = opts & TCPI_OPT_WSCALE
    return TcpState(
        sock.family, local[0], local[1], peer[0], peer[1], snd_seq, rcv_seq, mss,
        info[6] & 0xF if wscale else 0, info[6] >> 4 if wscale else 0,
        bool(opts & TCPI_OPT_SACK), bool(ts), ts_val, window, send_q, recv_q,
        unsent, now,
    )  # fmt: skip


def dump(sock: socket.socket, *, keep_repair: bool = False) -> TcpState:
    """Read an established connection's state. The socket goes into repair mode and leaves it
    again unless ``keep_repair`` (then closing it sends nothing to the peer)."""
    return _dump_one(sock, keep_repair, time.monotonic())


def dump_many(socks: Iterable[socket.socket], *, keep_repair: bool = False) -> list[TcpState]:
    """``dump`` for many sockets, with one clock read for the batch."""
    now = time.monotonic()
    return [_dump_one(s, keep_repair, now) for s in socks]


def close_silently(sock: socket.socket) -> None:
    """Close without a FIN or RST reaching the peer: a socket closed in repair mode is dropped."""
    try:
        sock.setsockopt(_TCP, TCP_REPAIR, 1)
    except OSError as e:
        sock.close()
        raise RepairError("repair on (close_silently)", e) from e
    sock.close()


_libc = ctypes.CDLL(None, use_errno=True)


def disconnect_silently(sock: socket.socket) -> None:
    """Kill the connection for every process that holds it, with nothing sent to the peer, then
    close ``sock``: repair mode, then connect(AF_UNSPEC) (tcp_disconnect sends no RST in repair
    mode; the socket leaves the established table, so its 4-tuple can be restored again, and
    other holders of the socket get ECONNABORTED)."""
    try:
        sock.setsockopt(_TCP, TCP_REPAIR, 1)
        unspec = struct.pack("=H14x", socket.AF_UNSPEC)
        if _libc.connect(sock.fileno(), unspec, len(unspec)) != 0:
            err = ctypes.get_errno()
            raise RepairError("disconnect", os.strerror(err))
    except OSError as e:
        raise RepairError("repair on (disconnect_silently)", e) from e
    finally:
        sock.close()


_OPTS_CACHE: dict[tuple[int, int, int, bool, bool], bytes] = {}


def _repair_options(mss: int, snd_wscale: int, rcv_wscale: int, sack: bool, ts: bool) -> bytes:
    """struct tcp_repair_opt[] for TCP_REPAIR_OPTIONS (few distinct values: cached by caller)."""
    opts = [TCPOPT_MSS, mss]
    if snd_wscale or rcv_wscale:
        opts += (TCPOPT_WINDOW, snd_wscale | (rcv_wscale << 16))
    if sack:
        opts += (TCPOPT_SACK_PERM, 0)
    if ts:
        opts += (TCPOPT_TIMESTAMP, 0)
    return struct.pack(f"{len(opts)}I", *opts)


def ts_later(ts_val: int, elapsed: float) -> int:
    """TCP_TIMESTAMP ``elapsed`` seconds after it read ``ts_val``. Since Linux 6.7 the low bit is a
    flag, not part of the clock: set, the connection uses microsecond timestamps. Keep the flag
    and advance in the connection's unit."""
    usec = ts_val & 1
    ticks = max(0, int(elapsed * (1_000_000 if usec else 1000)))
    return (((ts_val + ticks) & ~1) | usec) & _SEQ_MASK


def _force_buf(sock: socket.socket, force_opt: int, opt: int, size: int) -> None:
    if size == 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)  # beyond wmem_max/rmem_max: needs root
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)


def _fill(sock: socket.socket, data: bytes | memoryview, flags: int = 0) -> None:
    view = memoryview(data)
    while view:
        n = sock.send(view, flags)
        view = view[n:]


def md5sig(address: str, key: bytes) -> bytes:
    """struct tcp_md5sig for TCP_MD5SIG: ``key`` (1..80 bytes) for the peer ``address``."""
    if not 1 <= len(key) <= TCP_MD5SIG_MAXKEYLEN:
        raise ValueError(f"TCP-MD5 key of {len(key)} bytes (1..{TCP_MD5SIG_MAXKEYLEN})")
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        ss = struct.pack("=H", socket.AF_INET) + b"\0\0" + ip.packed
    else:  # sockaddr_in6: family, port, flowinfo, address
        ss = struct.pack("=H", socket.AF_INET6) + b"\0\0" + b"\0" * 4 + ip.packed
    return struct.pack("=128sBBHI80s", ss, 0, 0, len(key), 0, key)


def _resend_limit(state: TcpState, signed: bool = False) -> int:
    """Most unacknowledged bytes that are safe to resend as new data: what the restored socket's
    initial congestion window sends at once. The peer may already hold all of them (its ACKs lost
    in the takeover); an ACK beyond snd_nxt is dropped by the kernel, so snd_nxt must reach the
    old one in the first flight or the connection stalls for good."""
    opts = (_TS_OPT_LEN if state.timestamps else 0) + (_MD5_OPT_LEN if signed else 0)
    return _INIT_CWND * (state.mss - opts)


def _restore_one(
    state: TcpState, freebind: bool, with_queues: bool, resend: bool, now: float,
    md5: Mapping[str, bytes] | None = None,
) -> socket.socket:
    sock, sent = _prepare(state, freebind, with_queues, resend, now, md5)
    _go_live(sock, state, sent, with_queues)
    return sock


def engine() -> str:
    """``"c"`` when the restore's system calls are made from C, ``"python"`` otherwise."""
    return "python" if _native is None else "c"


def _prepare(
    state: TcpState, freebind: bool, with_queues: bool, resend: bool, now: float,
    md5: Mapping[str, bytes] | None = None,
) -> tuple[socket.socket, int]:
    """Every step up to repair off: a socket that sends nothing yet, and how many bytes of its
    send queue were refilled as sent (the rest goes out as new data at ``_go_live``)."""
    fam = state.family
    send_q = state.send_queue if with_queues else b""
    recv_q = state.recv_queue if with_queues else b""
    # room for the queues, and for the receive window already promised to the peer, plus
    # per-skb overhead (the kernel doubles the value again)
    rcv_need = len(recv_q) + (state.window[3] if state.window is not None else 0)
    sndbuf = 2 * len(send_q) if len(send_q) > _SNDBUF_DEFAULT else 0
    rcvbuf = 2 * rcv_need if rcv_need > _RCVBUF_DEFAULT else 0
    key = md5.get(state.dst) if md5 else None
    ok = (state.mss, state.snd_wscale, state.rcv_wscale, state.sack, state.timestamps)
    opts = _OPTS_CACHE.get(ok)
    if opts is None:
        opts = _OPTS_CACHE[ok] = _repair_options(*ok)
    ts = (ts_later(state.ts_val, now - state.dumped_at)
          if state.timestamps and state.ts_val is not None else None)
    sent = len(send_q) - state.unsent_len if send_q else 0
    if resend and 0 < sent <= _resend_limit(state, key is not None):
        sent = 0  # the unacknowledged part counts as never sent: snd_nxt = snd_una
    # with queues to refill, non-blocking: a full buffer is an error (EAGAIN), never a hang
    stype = socket.SOCK_STREAM | (_NONBLOCK if send_q or recv_q else 0)
    send_seq = (state.snd_seq - len(send_q)) & _SEQ_MASK
    recv_seq = (state.rcv_seq - len(recv_q)) & _SEQ_MASK
    if _native is not None:
        r = _native.prepare(
            fam, state.src, state.sport, state.dst, state.dport, bool(send_q or recv_q),
            sndbuf, rcvbuf, freebind, send_seq, recv_seq, state.mss,
            None if key is None else md5sig(state.dst, key), opts, ts is not None,
            0 if ts is None else ts, recv_q, memoryview(send_q)[:sent], state.window,
        )  # fmt: skip
        if type(r) is int:
            return socket.socket(fam, stype, _TCP, r), sent
        if r[0] != "address":
            raise RepairError(r[0], OSError(r[1], os.strerror(r[1])))
        # an address C's inet_pton does not read (an IPv6 scope id): the Python steps
    sock = socket.socket(fam, stype)
    so = sock.setsockopt
    step = "repair on"
    try:
        so(_TCP, TCP_REPAIR, 1)
        if sndbuf or rcvbuf:
            step = "socket buffers"
            _force_buf(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
            _force_buf(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
        if freebind:
            step = "IP_TRANSPARENT"
            if fam == socket.AF_INET6:
                so(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                so(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        step = "send queue seq"
        so(_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        so(_TCP, TCP_QUEUE_SEQ, _U32.pack(send_seq))
        step = "recv queue seq"
        so(_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        so(_TCP, TCP_QUEUE_SEQ, _U32.pack(recv_seq))
        # the peer's MSS as TCP_MAXSEG before connect: connect sizes segments from it
        # (TCP_REPAIR_OPTIONS alone sets the clamp too late, leaving 536-byte segments)
        step = "TCP_MAXSEG"
        so(_TCP, socket.TCP_MAXSEG, state.mss)
        step = "bind"
        sock.bind((state.src, state.sport))
        step = "connect"
        sock.connect((state.dst, state.dport))
        if key is not None:
            step = "TCP_MD5SIG"  # in repair mode: nothing leaves unsigned
            so(_TCP, TCP_MD5SIG, md5sig(state.dst, key))
        step = "TCP_REPAIR_OPTIONS"
        so(_TCP, TCP_REPAIR_OPTIONS, opts)
        if ts is not None:
            step = "TCP_TIMESTAMP"
            so(_TCP, TCP_TIMESTAMP, _U32.pack(ts))
        if recv_q:
            step = "refill recv queue"  # still TCP_RECV_QUEUE
            _fill(sock, recv_q)
        if sent > 0:
            step = "refill send queue"
            so(_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            _fill(sock, memoryview(send_q)[:sent])
        if state.window is not None:
            step = "TCP_REPAIR_WINDOW"
            so(_TCP, TCP_REPAIR_WINDOW, _WINDOW.pack(*state.window))
    except BaseException as e:
        sock.close()  # in repair mode: nothing reaches the peer
        if isinstance(e, OSError):
            raise RepairError(step, e) from e
        raise
    return sock, sent


def _go_live(sock: socket.socket, state: TcpState, sent: int, with_queues: bool) -> None:
    """Repair off (the kernel's window probe leaves), then the never-sent part of the queue."""
    send_q = state.send_queue if with_queues else b""
    recv_q = state.recv_queue if with_queues else b""
    unsent = memoryview(send_q)[sent:]
    # no Nagle hold-back: a resent part (sent == 0) must leave now, up to the old snd_nxt
    nodelay = sent == 0 < len(send_q) - state.unsent_len
    if _native is not None:
        r = _native.go_live(sock.fileno(), unsent, nodelay)
        if r is not None:
            sock.close()
            raise RepairError(r[0], OSError(r[1], os.strerror(r[1])))
        if send_q or recv_q:
            sock.setblocking(True)
        return
    so = sock.setsockopt
    step = "repair off"
    try:
        so(_TCP, TCP_REPAIR, 0)
        step = "SO_REUSEADDR"  # in repair mode it would undo the forced reuse and break bind
        so(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if unsent:
            step = "send unsent tail"
            if nodelay:
                so(_TCP, socket.TCP_NODELAY, 1)
                _fill(sock, unsent)
                so(_TCP, socket.TCP_NODELAY, 0)
            else:
                _fill(sock, unsent)
        if send_q or recv_q:
            sock.setblocking(True)
    except BaseException as e:
        sock.close()
        if isinstance(e, OSError):
            raise RepairError(step, e) from e
        raise


def restore(
    state: TcpState, *, freebind: bool = True, with_queues: bool = True, resend: bool = True,
    md5: Mapping[str, bytes] | None = None,
) -> socket.socket:
    """A connected, established socket with ``state``'s 4-tuple, sequence numbers and queues, out
    of repair mode. ``freebind`` sets IP(V6)_TRANSPARENT so the local address need not be
    configured yet (add the VIP after restoring: no RST can escape meanwhile). ``resend`` sends
    an unacknowledged part of up to 10 segments again at once (module docstring). ``md5``: peer
    address (as ``state.dst`` writes it) -> TCP-MD5 key, set before repair off."""
    return _restore_one(state, freebind, with_queues, resend, time.monotonic(), md5)


def restore_many(
    states: Iterable[TcpState],
    *,
    freebind: bool = True,
    with_queues: bool = True,
    resend: bool = True,
    md5: Mapping[str, bytes] | None = None,
    before_live: Callable[[], None] | None = None,
) -> list[socket.socket]:
    """``restore`` for many states, with one clock read for the batch. Every socket is built in
    repair mode first, then ``before_live()`` runs (the last moment before anything is sent),
    then each leaves repair mode: its first segments leave then. On a failure the sockets
    restored so far are closed silently and the RepairError propagates."""
    states = list(states)
    reserve_fds(len(states) + 256)  # one table growth at most, not one per doubling
    now = time.monotonic()
    ready: list[tuple[socket.socket, int]] = []
    out: list[socket.socket] = []
    try:
        for st in states:
            ready.append(_prepare(st, freebind, with_queues, resend, now, md5))
        if before_live is not None:
            before_live()
        for st, (sock, sent) in zip(states, ready, strict=True):
            _go_live(sock, st, sent, with_queues)
            out.append(sock)
    except BaseException:
        for s, _ in ready:
            if s.fileno() >= 0:
                close_silently(s)
        raise
    return out
