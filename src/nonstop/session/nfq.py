"""The master's packet path for VIP:port: iptables NFQUEUE + nfnetlink, the hold (and the older
ACK clamp around ``segment.clamp_ack``).

``AckClamp`` puts TCP segments of VIP:port through an NFQUEUE queue, in one plain thread
(``nonstop-ackclamp-q<N>``) speaking nfnetlink on one AF_NETLINK socket, no library between.

**The hold** (what ``MasterSession`` uses): nothing acknowledged that could be lost, nothing
sent that the backup lacks. ``hold_in(four_tuple)`` is how far the peer's stream may reach this
node's TCP (the backup's confirmed end of it): a peer's data segment (or FIN) past it waits in
the queue, unanswered, and TCP never sees it, so the kernel never acknowledges a byte the backup
does not hold. ``hold(four_tuple)`` is the same for our own stream: the peer never holds a byte
of ours the backup lacks, so a restored send queue always reaches the peer's ACK. ``kick(fts)``
(the backup confirmed more) re-checks the held segments of those connections. The segments are
never changed, so our own pure ACKs need not be queued at all (the OUTPUT rule matches payload,
SYN, FIN or RST with ``-m bpf``, ``nfnl.data_or_control_bpf``). The peer's pure ACKs still
are: they move snd_una in the mirror (a stale one made a restore resend bytes the peer had).

**The ACK clamp** (``limit=``, kept for the tests and benches that compare): every outgoing
segment's ACK number and SACK blocks are lowered to ``limit(four_tuple)`` (None: unchanged),
re-signed with the peer's TCP-MD5 key (``md5``) when signed; one with no key is dropped.

Hooks: ``capture(segment, payload)`` sees each of the peer's segments before TCP does,
``capture_out`` each of ours before it leaves (as the kernel wrote it). With ``hooks_hold`` they
return their connection's hold, so the hold costs no second call. An exception in a hook is
counted (``stats.errors``, ``error``) and the segment goes on: the hold keeps it safe.

Verdicts: segments that go unchanged are answered together, one ``NFQNL_MSG_VERDICT_BATCH``
(accept every queued id up to N) per drain or ``batch`` segments. A batch cannot reach past a
held segment, so from the first held one on every segment waits in a fifo in the kernel's id
order and the prefix that may go leaves in one batch; behind a head held longer than
``_STUCK`` the others are answered one by one.

Fail closed: no ``--queue-bypass``. While the rules are in and nothing is bound (the agent and
its worker were killed) the kernel drops every segment of VIP:port (a killed master's kernel
used to acknowledge, in the moments before the peer moved, bytes the backup never got). The
rules go in after the bind and out before the unbind (one ``iptables-restore`` each way); a
crashed worker's rules are removed by the next one (``remove_rules``). Malformed segments and
truncated copies are dropped and counted: TCP sends them again. GSO: the queue carries whole
GSO packets (up to 64 KB), hence a 64 MB receive buffer; an ENOBUFS overflow is counted.

``limit``, ``hold``, ``hold_in`` are called from the verdict thread: quick and thread-safe. The
namespace: the socket and the rules are made in the namespace current when the AckClamp was
built (or ``netns=``, a name under /run/netns), whatever thread calls ``open`` / ``close``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping

from nonstop.common import LocalProtocolError, RemoteProtocolError, normal_priority, readable
from nonstop.session.nfnl import (
    A_CAP_LEN,
    A_PACKET_HDR,
    A_PAYLOAD,
    A_VERDICT_HDR,
    ATTR,
    CFG_CMD,
    CFG_FLAGS,
    CFG_MASK,
    CFG_PARAMS,
    CFG_QUEUE_MAXLEN,
    CMD_BIND,
    COMMENT,
    COPY_PACKET,
    F_GSO,
    HALF,
    HEADER_COPY,
    MAX_PAYLOAD,
    MSG_CONFIG,
    MSG_PACKET,
    MSG_VERDICT,
    MSG_VERDICT_BATCH,
    NETLINK_NETFILTER,
    NF_ACCEPT,
    NF_DROP,
    NF_INET_LOCAL_IN,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSGHDR,
    SO_RCVBUFFORCE,
    U32BE,
    ClampStats,
    attr,
    in_ns,
    nlmsg,
    queue_rule,
    remove_rules,
    restore_rules,
    send_packed,
)
from nonstop.session.segment import (
    FIN,
    Md5KeyMissing,
    Segment,
    clamp_ack,
    md5_option,
    parse,
    plain_ack,
)

__all__ = ["COMMENT", "HEADER_COPY", "MAX_PAYLOAD", "AckClamp", "ClampStats", "FourTuple",
           "remove_rules"]

FourTuple = tuple[str, int, str, int]  # (VIP, port, peer address, peer port) of an outgoing segment
Limit = Callable[[FourTuple], int | None]
Capture = Callable[[Segment, bytes], "int | None"]  # with hooks_hold: the connection's hold


class AckClamp:
    """Clamp the ACK of every segment leaving ``vip``:``port`` to ``limit(four_tuple)``.

    Use as a context manager (rules and queue removed on exit, also on exceptions), or call
    ``open()`` / ``close()``. ``stats`` counts what happened. ``batch``: at most this many passed
    segments wait for one batch verdict; ``header_copy``: bytes copied per segment when no
    capture hook needs payloads (0: always the whole packet).
    """

    def __init__(
        self,
        queue_num: int,
        *,
        vip: str,
        port: int,
        family: int = 4,
        limit: Limit | None = None,
        capture: Capture | None = None,
        capture_out: Capture | None = None,
        netns: str | None = None,
        rcvbuf: int = 64 << 20,
        maxlen: int = 16384,
        batch: int = 32,
        header_copy: int = HEADER_COPY,
        md5: Mapping[str, bytes] | None = None,
        hold: Limit | None = None,
        hold_in: Limit | None = None,
        hooks_hold: bool = False,
    ) -> None:
        if family not in (4, 6):
            raise LocalProtocolError(f"family must be 4 or 6, not {family}")
        if batch < 1 or not (header_copy == 0 or 80 <= header_copy <= MAX_PAYLOAD):
            raise LocalProtocolError(f"batch {batch} < 1 or header_copy {header_copy} not 0/80..")
        self.queue_num = queue_num
        self.vip = str(ipaddress.ip_address(vip))  # the form parse() gives
        self.port = port
        self.family = family
        self.limit = limit
        # peer address (as parse() writes it) -> TCP-MD5 key
        self.md5 = {str(ipaddress.ip_address(a)): k for a, k in (md5 or {}).items()}
        self.capture = capture
        self.capture_out = capture_out
        self.hold = hold
        self.hold_in = hold_in
        self.hooks_hold = hooks_hold
        self.rcvbuf = rcvbuf
        self.maxlen = maxlen
        self.batch = batch
        full = capture is not None or capture_out is not None or hold is not None or \
            hold_in is not None or header_copy == 0
        self.copy_range = MAX_PAYLOAD if full else header_copy
        self.stats = ClampStats()
        path = f"/run/netns/{netns}" if netns is not None else "/proc/thread-self/ns/net"
        self._ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._sock: socket.socket | None = None
        self._wake: tuple[int, int] | None = None  # pipe: a byte on [1] stops the loop
        self._thread: threading.Thread | None = None
        self._chains: list[str] = []  # our rules in place: OUTPUT, INPUT
        self._error: BaseException | None = None
        self._seq = 0
        self._pending = -1  # highest packet id passed but not yet answered (-1: none)
        self._waiting = 0  # how many passed segments wait for the batch verdict
        # From the first held segment on, every segment not answered yet, in id order (the
        # kernel's): [packet id, state, sequence after the payload, packet, (four-tuple, the
        # peer's)]. The prefix that may go leaves in one batch verdict.
        self._fifo: collections.deque[list] = collections.deque()
        self._head: tuple[int, float] = (-1, 0.0)  # the held head's id, since when
        # the held ones (in the fifo or laggards) by (four-tuple, the peer's: True), oldest first
        self._held: dict[tuple[FourTuple, bool], list[list]] = {}
        self._nheld = 0
        self._due: set[FourTuple] = set()  # kicked connections whose held ones to re-check
        self._due_all = False  # re-check every held one
        self._due_lock = threading.Lock()
        self._kick: tuple[int, int] | None = None  # pipe: a byte on [1] re-checks the held ones
        # set with each kick: the loop re-checks the held ones after the datagram in hand, so
        # they go out while the queue never drains (the pipe only wakes an idle loop)
        self._kicked = False

    def rule(self, chain: str = "OUTPUT") -> list[str]:
        """The iptables rule spec for ``chain``: OUTPUT (ours), INPUT (the peer's); see
        ``nfnl.queue_rule``."""
        return queue_rule(chain, vip=self.vip, port=self.port, family=self.family,
                          queue_num=self.queue_num, clamp=self.limit is not None)

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> AckClamp:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Bind the queue, start the verdict thread, then insert the rule (in that order, so no
        segment is queued before someone listens)."""
        if self._sock is not None:
            raise LocalProtocolError("AckClamp already open")
        try:
            self._sock = in_ns(self._ns_fd, self._bind)
            self._wake = os.pipe()
            self._kick = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._thread = threading.Thread(
                target=self._loop, name=f"nonstop-ackclamp-q{self.queue_num}", daemon=True
            )
            self._thread.start()
            names = ["OUTPUT"]
            if self.capture is not None or self.hold_in is not None:
                names.append("INPUT")
            in_ns(self._ns_fd, self._iptables, "-I", names)  # one iptables-restore, atomic
            self._chains = names
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the rule, stop the thread, unbind. Safe to call twice and after a failed open.
        Passed segments still waiting for their batch verdict are released; any other segment
        still queued at the unbind is dropped by the kernel (TCP sends it again)."""
        try:
            if self._chains:
                try:
                    in_ns(self._ns_fd, self._iptables, "-D", self._chains)
                except OSError:  # one is gone (removed by hand?): the others one by one, so
                    for name in self._chains:  # no rule is left queueing to nobody
                        with contextlib.suppress(OSError):
                            in_ns(self._ns_fd, self._iptables, "-D", [name])
                self._chains = []
        finally:
            if self._wake is not None:
                os.write(self._wake[1], b"x")
            if self._thread is not None:
                self._thread.join(timeout=5)
                self._thread = None
            for pipe in (self._wake, self._kick):
                if pipe is not None:
                    os.close(pipe[0])
                    os.close(pipe[1])
            self._wake = self._kick = None
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()  # the kernel unbinds the queue with the socket
            if self._ns_fd >= 0:
                os.close(self._ns_fd)
                self._ns_fd = -1

    @property
    def error(self) -> BaseException | None:
        """The last error of the verdict thread: what stopped it, or what limit(), capture() or
        capture_out() raised (also counted in ``stats.errors``)."""
        return self._error

    def kick(self, fts: list[FourTuple] | None = None) -> None:
        """The hold may have moved (the backup confirmed more, or is gone): re-check the held
        segments of ``fts`` (None: all). Thread-safe, cheap; a no-op when closed."""
        with self._due_lock:
            if fts is None:
                self._due_all = True
            else:
                self._due.update(fts)
        self._kicked = True
        kick = self._kick  # always written: a segment held right after a check must not wait
        if kick is not None:
            with contextlib.suppress(OSError):  # full (a check is due anyway) or closing
                os.write(kick[1], b"k")

    # -- inside the namespace -------------------------------------------------------------------

    def _iptables(self, op: str, names: list[str]) -> None:
        restore_rules(op, self.family, [(n.partition(":")[0], self.rule(n)) for n in names])

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
            sock.bind((0, 0))
            cmd = struct.pack("!BxH", CMD_BIND, socket.AF_UNSPEC)
            self._config(sock, attr(CFG_CMD, cmd))
            self._config(sock, self._params())
            self._config(sock, attr(CFG_QUEUE_MAXLEN, U32BE.pack(self.maxlen)))
            flags = U32BE.pack(F_GSO)
            self._config(sock, attr(CFG_FLAGS, flags) + attr(CFG_MASK, flags))
        except BaseException:
            sock.close()
            raise
        return sock

    def _params(self) -> bytes:
        return attr(CFG_PARAMS, struct.pack("!IB", self.copy_range, COPY_PACKET))

    def _config(self, sock: socket.socket, attrs: bytes) -> None:
        """Send one NFQNL_MSG_CONFIG and wait for the kernel's answer (before the loop runs)."""
        self._seq += 1
        flags = NLM_F_REQUEST | NLM_F_ACK
        sock.send(nlmsg(MSG_CONFIG, flags, self._seq, self.queue_num, attrs))
        while True:
            data = sock.recv(65536)
            _, kind, _, seq, _ = NLMSGHDR.unpack_from(data)
            if kind == NLMSG_ERROR and seq == self._seq:
                err = -struct.unpack_from("=i", data, 16)[0]
                if err:
                    raise OSError(err, f"nfqueue config: {os.strerror(err)}")
                return

    # -- the verdict loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        sock, wake, kick = self._sock, self._wake, self._kick
        normal_priority()  # never real-time, whoever started this thread
        assert sock is not None and wake is not None and kick is not None
        buf = bytearray(MAX_PAYLOAD + 4096)
        mv = memoryview(buf)
        recv_into, dontwait = sock.recv_into, socket.MSG_DONTWAIT
        try:
            while True:
                try:
                    n = recv_into(buf, len(buf), dontwait)
                except BlockingIOError:  # drained: answer what waits, then sleep
                    self._release(sock)
                    ready = readable([sock, wake[0], kick[0]])
                    if wake[0] in ready:  # closing: the rules are gone already
                        self._release(sock)
                        send_packed(sock, [self._verdict_msg(e[0]) for e in self._fifo
                                           if e[1] == _READY])
                        return  # the held ones are dropped at the unbind: TCP resends them
                    if kick[0] in ready:
                        with contextlib.suppress(BlockingIOError):
                            os.read(kick[0], 4096)
                        self._kicked = False
                        self._unhold(sock)
                    continue
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    self.stats.overflows += 1
                    continue
                self._messages(sock, buf, mv, n)
                if self._kicked:  # the queue may never drain under load: not only when idle
                    self._kicked = False
                    self._unhold(sock)
                if self._waiting >= self.batch:
                    self._release(sock)
        except BaseException as e:
            if self._sock is sock:
                self._error = e

    def _messages(self, sock: socket.socket, buf: bytearray, mv: memoryview, n: int) -> None:
        off = 0
        while off + 16 <= n:
            length, kind = NLMSGHDR.unpack_from(buf, off)[:2]
            if length < 16 or off + length > n:
                return  # a truncated datagram: nothing more to read in it
            if kind == MSG_PACKET:
                self._packet(sock, buf, mv, off + 20, off + length)
            off += (length + 3) & ~3

    def _release(self, sock: socket.socket) -> None:
        """Accept every passed segment still waiting, with one batch verdict (or two): those
        before the first held one, and the fifo's prefix that may go (a batch verdict accepts
        every queued id up to its own, so it cannot reach past a held one). While a held head
        waits longer than ``_STUCK`` (its connection's bytes past a gap, say) those behind it
        that may go are answered one by one, so it does not keep them waiting."""
        last = -1
        fifo = self._fifo
        while fifo and fifo[0][1] != _HELD:
            e = fifo.popleft()
            if e[1] == _READY:
                last = e[0]
        if fifo:
            now = time.monotonic()
            if self._head[0] != fifo[0][0]:
                self._head = (fifo[0][0], now)
            elif now - self._head[1] > _STUCK:
                alone = [e for e in fifo if e[1] == _READY]
                for e in alone:
                    e[1] = _DONE
                send_packed(sock, [self._verdict_msg(e[0]) for e in alone])
        for top in (self._pending, last):
            if top >= 0:
                attrs = attr(A_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, top))
                sock.send(nlmsg(MSG_VERDICT_BATCH, NLM_F_REQUEST, 0, self.queue_num, attrs))
                self.stats.batches += 1
        self._pending, self._waiting = -1, 0

    def _verdict_msg(self, pid: int, verdict: int = NF_ACCEPT, payload: bytes = b"") -> bytes:
        """One NFQNL_MSG_VERDICT for packet ``pid`` (``payload``: the packet as changed)."""
        attrs = attr(A_VERDICT_HDR, struct.pack("!II", verdict, pid))
        if payload:
            attrs += attr(A_PAYLOAD, payload)
        return nlmsg(MSG_VERDICT, NLM_F_REQUEST, 0, self.queue_num, attrs)

    def _unhold(self, sock: socket.socket) -> None:
        """Let out the held segments of the kicked connections that the hold now covers (their
        ACK clamped as of now)."""
        with self._due_lock:
            due, self._due = self._due, set()
            every, self._due_all = self._due_all, False
        if every:
            keys = list(self._held)
        else:
            keys = [k for ft in due for k in ((ft, False), (ft, True)) if k in self._held]
        out: list[bytes] = []
        freed = 0
        for key in keys:
            held = self._held[key]
            ft, inbound = key
            try:
                lim = self._holding(ft, inbound)
            except _LimitFailed:  # fail closed: TCP sends them again
                lim, fail = None, True
            else:
                fail = False
            keep = []
            for e in held:
                if not fail and lim is not None and 0 < (e[2] - lim) % (1 << 32) < HALF:
                    keep.append(e)
                elif fail:
                    out.append(self._verdict_msg(e[0], NF_DROP))
                    e[1] = _DONE
                elif not (inbound or self.limit is None):
                    out.append(self._let_go(e[0], ft, e[3]))  # alone, its ACK clamped as of now
                    e[1] = _DONE
                else:
                    e[1] = _READY  # as it came, with the next batch
            if len(keep) == len(held):
                continue
            freed += len(held) - len(keep)
            if keep:
                self._held[key] = keep
            else:
                del self._held[key]
        if freed:
            self._nheld -= freed
            self.stats.held_now = self._nheld
            self._release(sock)
            send_packed(sock, out)

    def _let_go(self, pid: int, ft: FourTuple, raw: bytes) -> bytes:
        """The verdict of a held segment the hold now covers, answered alone."""
        if self.limit is None:
            return self._verdict_msg(pid)
        try:
            pkt = bytearray(raw)
            limit = self._limit(ft)
            key = self.md5.get(ft[2]) if self.md5 else None
            changed = limit is not None and clamp_ack(pkt, limit, key)
            self.stats.clamped += changed
            return self._verdict_msg(pid, NF_ACCEPT, bytes(pkt) if changed else b"")
        except (_LimitFailed, Md5KeyMissing):
            return self._verdict_msg(pid, NF_DROP)

    def _holding(self, ft: FourTuple, inbound: bool = False) -> int | None:
        hold = self.hold_in if inbound else self.hold
        try:
            return hold(ft) if hold is not None else None
        except Exception as e:
            self.stats.errors += 1
            self._error = e
            raise _LimitFailed from e

    def _verdict(self, sock: socket.socket, pid: int, verdict: int, payload: bytes = b"") -> None:
        self._release(sock)  # those before it leave first: nothing is reordered (but held ones)
        sock.send(self._verdict_msg(pid, verdict, payload))

    def _packet(
        self, sock: socket.socket, buf: bytearray, mv: memoryview, a: int, end: int
    ) -> None:
        """One queued packet: attributes from ``a`` to ``end`` in ``buf``."""
        pid = hook = p = plen = -1
        truncated = False
        while a + 4 <= end:
            alen, kind = ATTR.unpack_from(buf, a)
            kind &= 0x3FFF
            if kind == A_PACKET_HDR:
                pid = U32BE.unpack_from(buf, a + 4)[0]
                hook = buf[a + 10]
            elif kind == A_PAYLOAD:
                p, plen = a + 4, alen - 4
            elif kind == A_CAP_LEN:
                truncated = True
            if alen < 4:
                break
            a += (alen + 3) & ~3
        if pid < 0:
            return  # no id: nothing to answer
        st = self.stats
        st.seen += 1
        try:
            if p < 0:
                raise RemoteProtocolError("queued packet without payload", counter="nfq_empty")
            seg, lim = None, _ASK
            if hook == NF_INET_LOCAL_IN:  # the peer's segment: capture, the hold
                if self.capture is not None:
                    seg, lim = self._capture(mv[p : p + plen], inbound=True)
                if self.hold_in is None or not self._must_hold(
                        pid, seg, mv[p : p + plen], truncated, lim, inbound=True):
                    self._pass(pid)
                return
            if self.capture_out is not None:  # as the kernel wrote it, before the clamp
                seg, lim = self._capture(mv[p : p + plen], inbound=False)
            if self.hold is not None and self._must_hold(
                    pid, seg, mv[p : p + plen], truncated, lim):
                return
            if self.limit is None or self._fast_pass(buf, p, plen):
                self._pass(pid)
                return
            if truncated:  # a header copy: the clamp cannot rewrite what it does not hold
                st.truncated += 1
                self.copy_range = MAX_PAYLOAD
                self._seq += 1
                msg = nlmsg(MSG_CONFIG, NLM_F_REQUEST, self._seq, self.queue_num, self._params())
                sock.send(msg)
                self._verdict(sock, pid, NF_DROP)
                return
            pkt = bytearray(mv[p : p + plen])
            seg = parse(pkt)
            limit = self._limit(seg.four_tuple)
            key = self.md5.get(seg.dst) if self.md5 else None
            if limit is None or not clamp_ack(pkt, limit, key):
                self._pass(pid)
                return
            self._verdict(sock, pid, NF_ACCEPT, bytes(pkt))
            st.clamped += 1
            if key is not None and md5_option(pkt) is not None:
                st.resigned += 1
        except _LimitFailed:  # a bug in the caller's limit: fail closed, keep going
            self._verdict(sock, pid, NF_DROP)
        except Md5KeyMissing:
            st.unsigned += 1
            self._verdict(sock, pid, NF_DROP)
        except RemoteProtocolError:
            st.dropped += 1
            self._verdict(sock, pid, NF_DROP)

    def _pass(self, pid: int) -> None:
        if self._fifo:  # behind a held one: a batch verdict would let it out too
            self._fifo.append([pid, _READY, 0, b"", None])
        else:
            self._pending = pid
        self._waiting += 1
        self.stats.passed += 1

    def _must_hold(
        self, pid: int, seg: Segment | None, pkt: memoryview, truncated: bool,
        lim: int | object | None = None, *, inbound: bool = False,
    ) -> bool:
        """Hold this segment (True) if its payload reaches past the hold (``hold``, or for the
        peer's segments ``hold_in``). ``lim``: the hold as the capture hook returned it
        (``hooks_hold``), or ``_ASK``. A FIN waits for the bytes before it: the kernel must not
        take a FIN (and acknowledge it) ahead of bytes the backup may still lack."""
        if seg is None:
            seg = parse(pkt)
        if not seg.payload_length and not seg.flags & FIN:
            return False
        if truncated:  # cannot be let out later as it was: TCP sends it again
            raise RemoteProtocolError("truncated data segment", counter="nfq_truncated")
        ft = (seg.dst, seg.dport, seg.src, seg.sport) if inbound else seg.four_tuple
        if lim is _ASK or not self.hooks_hold:
            lim = self._holding(ft, inbound)
        end = (seg.seq + seg.payload_length) % (1 << 32)
        if lim is None or not 0 < (end - lim) % (1 << 32) < HALF:  # type: ignore[operator]
            return False
        key = (ft, inbound)
        e = [pid, _HELD, end, b"" if inbound or self.limit is None else bytes(pkt), key]
        self._fifo.append(e)
        self._held.setdefault(key, []).append(e)
        self._nheld += 1
        if inbound:
            self.stats.held_in += 1
        else:
            self.stats.held += 1
        self.stats.held_now = self._nheld
        return True

    def _fast_pass(self, buf: bytearray, p: int, plen: int) -> bool:
        """True when the outgoing segment at ``buf[p:p+plen]`` surely needs no change: read in
        place, no copy (``segment.plain_ack``). False sends it to the full check."""
        got = plain_ack(buf, p, plen)
        if got is None:
            return False
        limit = self._limit(got[0])
        return limit is None or got[1] is None or not 0 < (got[1] - limit) % (1 << 32) < HALF

    def _limit(self, ft: FourTuple) -> int | None:
        try:
            return self.limit(ft)
        except Exception as e:
            self.stats.errors += 1
            self._error = e
            raise _LimitFailed from e

    def _capture(self, pkt: memoryview, *, inbound: bool) -> tuple[Segment, int | object | None]:
        """Hand the segment to its hook: (the segment, what the hook returned: the hold of its
        connection with ``hooks_hold``; ``_ASK`` if the hook failed)."""
        hook = self.capture if inbound else self.capture_out
        assert hook is not None
        seg = parse(pkt)  # malformed: RemoteProtocolError, the segment is dropped
        try:
            o = seg.payload_offset
            lim = hook(seg, bytes(pkt[o : o + seg.payload_length]))
            if inbound:
                self.stats.captured += 1
            else:
                self.stats.captured_out += 1
        except Exception as e:  # the segment still goes on: the hold keeps us safe
            self.stats.errors += 1
            self._error = e
            return seg, _ASK
        return seg, lim


_HELD, _READY, _DONE = range(3)  # a fifo entry's state: held, may go (next batch), answered
_STUCK = 0.02  # s: behind a held head waiting longer, the others are answered one by one
_ASK = object()  # no hold from the capture hook: ask hold() / hold_in()


class _LimitFailed(Exception):
    """limit() raised: the segment is dropped (the error is in AckClamp.error)."""
