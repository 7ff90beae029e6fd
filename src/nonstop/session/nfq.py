"""The ACK clamp on the master's packet path: iptables NFQUEUE + nfnetlink around segment.clamp_ack.

``AckClamp`` puts the master's outgoing TCP segments from VIP:port through an NFQUEUE queue and
lowers their ACK number (and SACK blocks) to ``limit(four_tuple)``, the point up to which the
backup holds the peer's bytes (``SyncSender.confirmed(conn)[0]``); ``None`` lets the segment pass
unchanged. The rule:

    iptables -I OUTPUT -p tcp -s VIP --sport PORT -m comment --comment nonstop-ackclamp:q<N>
             -j NFQUEUE --queue-num N

With ``capture=``, the peer's segments to VIP:port pass through the same queue (an INPUT rule
with ``-d VIP --dport PORT``): ``capture(segment, payload)`` sees each one before TCP does (the
DATA(RCV) for the backup, the SYN options for the FULL record) and the segment is accepted as is.
With ``capture_out=``, ``capture_out(segment, payload)`` sees every outgoing segment of VIP:port
(the OUTPUT rule queues them anyway) before it is clamped, with its ACK as the kernel wrote it:
the SYN-ACK's options, DATA(SND), the service's windows. An exception in either hook is counted
(``stats.errors``, ``error``) and the segment goes on: the clamp keeps it safe, the backup may lag.

The send-side hold (``hold=``): an outgoing segment with payload (or a FIN) whose end is past
``hold(four_tuple)`` (the backup's confirmed end of our stream, its FIN counted) waits in the
queue, unanswered, until ``kick()`` (the backup confirmed more) finds it covered; its ACK is
clamped when it leaves.
So the peer never holds a byte of ours that the backup lacks: a restored connection's send queue
always reaches the peer's ACK. Segments passed while some are held are answered one by one (a
batch verdict would release the held ones too), packed into one datagram per drain.

``hold_acks`` (the session manager's setting): an outgoing pure ACK past ``limit`` is held the
same way, and leaves as the kernel wrote it once the limit covers it, instead of lowered at once
(``_hold_ack``): a lowered ACK told the peer nothing new, and a service with nothing to answer
left the peer to resend on its timeout.

No ``--queue-bypass``: fail closed. While the rule is in place and nothing is bound to the queue
(the agent and its session worker were killed) the kernel drops every segment of VIP:port. It
used to let them pass, and a killed master's kernel then acknowledged, in the moments before the
peer moved to the new master, bytes the backup never got: the restored connection waited
forever for bytes the peer would not send again. The rule goes in after the bind and out before
the unbind, so a clean start or stop loses nothing. With ``own_rules=False`` (the session
worker) the rules are not the clamp's to add or remove: they stand for the worker's life, and
a node that is not master has nobody bound, which drops every segment of VIP:port: that is its
quiet rule (``session.quiet``). A promotion then only binds the queue, no ``iptables`` run.
Segments the clamp cannot parse, and truncated copies, are dropped and counted: TCP sends them
again, and nothing unclamped escapes.

The hot path (issue 3 wants a protected stream at >= 0.8x an unprotected one) speaks nfnetlink
directly on one AF_NETLINK socket, no library between: each ``recv_into`` lands one queued packet
in a preallocated buffer, its ACK and ports are read with ``struct`` in place, and the segments
that pass unchanged (nearly all) are not answered one by one: their verdicts are collected and
released with one ``NFQNL_MSG_VERDICT_BATCH`` (accept every queued id up to N) when the socket is
drained or ``batch`` segments wait. A segment that must be changed or dropped first releases the
batch before it (the kernel keeps the queue in order, so nothing is reordered), then gets its own
verdict. The copy range is the whole packet only when a capture hook needs payloads; without
capture only the headers are copied (``header_copy`` bytes), and a truncated segment that would
need a clamp is dropped (TCP sends it again) and switches the queue to full copies for good.

Threads, not asyncio: the verdict loop is one plain thread (``nonstop-ackclamp-q<N>``) that sleeps
in ``select`` only when the socket is empty. ``limit`` is called from that thread, once per
outgoing segment: it must be quick and thread-safe (a dict lookup). The namespace: the netlink
socket and every iptables call are made in the network namespace that was current when the
AckClamp was built (or ``netns=``, a name under /run/netns), whatever thread calls ``open`` /
``close`` later.

TCP-MD5 (RFC 2385): ``md5`` maps a peer address to its key. A signed segment the clamp
changes is signed again with the peer's key (``segment.clamp_ack(..., md5_key=)``), so the peer
accepts it; one with no key here is dropped and counted (``unsigned``): the peer would drop it
anyway, and letting it through unclamped would break the guarantee. Signed segments never take
the fast path (their options are not Linux's NOP NOP TS), and Linux never builds GSO packets for
a signed connection.

GSO: the queue carries whole GSO packets (up to 64 KB, NFQA_CFG_F_GSO), which needs a 64 MB
netlink receive buffer; an ENOBUFS overflow (the kernel dropped a queued segment: TCP resends it)
is counted and the loop carries on. No fail-open flag: a full queue drops, never lets a segment
pass unclamped.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
import threading
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
    HOLD_ACKS_MAX,
    KICK_MARK,
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
    PORTS,
    SO_RCVBUFFORCE,
    TCP_ACK,
    U32BE,
    ClampStats,
    attr,
    in_ns,
    nlmsg,
    remove_rules,
    restore_rules,
    send_packed,
)
from nonstop.session.segment import (
    ACK,
    FIN,
    RST,
    SYN,
    Md5KeyMissing,
    Segment,
    addr_str,
    clamp_ack,
    md5_option,
    parse,
)

__all__ = ["COMMENT", "HEADER_COPY", "MAX_PAYLOAD", "AckClamp", "ClampStats", "FourTuple",
           "remove_rules"]

FourTuple = tuple[str, int, str, int]  # (VIP, port, peer address, peer port) of an outgoing segment
Limit = Callable[[FourTuple], int | None]
Capture = Callable[[Segment, bytes], None]


def clamp_rule(vip: str, port: int, queue_num: int, chain: str = "OUTPUT") -> list[str]:
    """The iptables rule spec that queues VIP:port's segments in ``chain`` (OUTPUT: ours,
    INPUT: the peer's) to ``queue_num``. Our segments marked ``KICK_MARK`` pass by
    (``session.kick``'s crafted ACKs: they carry what the clamp has seen already, and after a
    takeover of 10,000 connections they are 40,000 segments the queue would copy to Python for
    nothing)."""
    if chain == "OUTPUT":
        match = ["-s", vip, "--sport", str(port),
                 "-m", "mark", "!", "--mark", f"{KICK_MARK:#x}"]  # fmt: skip
    else:
        match = ["-d", vip, "--dport", str(port)]
    return [
        "-p", "tcp", *match,
        "-m", "comment", "--comment", f"{COMMENT}:q{queue_num}",
        "-j", "NFQUEUE", "--queue-num", str(queue_num),
    ]  # fmt: skip


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
        limit: Limit,
        capture: Capture | None = None,
        capture_out: Capture | None = None,
        netns: str | None = None,
        rcvbuf: int = 64 << 20,
        maxlen: int = 16384,
        batch: int = 32,
        header_copy: int = HEADER_COPY,
        md5: Mapping[str, bytes] | None = None,
        hold: Limit | None = None,
        hold_acks: bool = False,
        own_rules: bool = True,
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
        self.hold_acks = hold_acks
        # False: the rules stand whoever is bound (``session.quiet``): open and close leave them
        self.own_rules = own_rules
        self.rcvbuf = rcvbuf
        self.maxlen = maxlen
        self.batch = batch
        full = capture is not None or capture_out is not None or hold is not None or \
            header_copy == 0
        self.copy_range = MAX_PAYLOAD if full else header_copy
        self.stats = ClampStats()
        path = f"/run/netns/{netns}" if netns is not None else "/proc/thread-self/ns/net"
        self._ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._sock: socket.socket | None = None
        self._wake: tuple[int, int] | None = None  # pipe: a byte on [1] stops the loop
        self._thread: threading.Thread | None = None
        self._chains: list[str] = []  # chains our rule is in
        self._error: BaseException | None = None
        self._seq = 0
        self._pending = -1  # highest packet id passed but not yet answered (-1: none)
        self._waiting = 0  # how many passed segments wait for the batch verdict
        # held segments, oldest first: (packet id, four-tuple, sequence after the payload or, for
        # a held pure ACK, its ACK number, packet, whether it is a pure ACK)
        self._held: list[tuple[int, FourTuple, int, bytes, bool]] = []
        self._loose: list[int] = []  # passed while some are held: answered one by one
        self._kick: tuple[int, int] | None = None  # pipe: a byte on [1] re-checks the held ones
        # set with each kick: the loop re-checks the held ones after the datagram in hand, so
        # they go out while the queue never drains (the pipe only wakes an idle loop)
        self._kicked = False
        # True: every segment is dropped, both ways, and nothing held goes out (a master whose
        # VIPs are down while the witness is asked: rule 9 of nonstop.failover.roles). The
        # connections live on; TCP sends it all again once this is False.
        self.hushed = False

    def rule(self, chain: str = "OUTPUT") -> list[str]:
        """The iptables rule spec for ``chain`` (``clamp_rule``)."""
        return clamp_rule(self.vip, self.port, self.queue_num, chain)

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> AckClamp:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Bind the queue, start the verdict thread, then insert the rule unless it stands
        (in that order, so no segment is queued before someone listens)."""
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
            if self.own_rules:
                chains = ["OUTPUT", "INPUT"] if self.capture is not None else ["OUTPUT"]
                in_ns(self._ns_fd, self._iptables, "-I", chains)  # one iptables-restore, atomic
                self._chains = chains
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the rule (if its own), stop the thread, unbind. Safe to call twice and after a
        failed open. Passed segments still waiting for their batch verdict are released; any
        other segment still queued at the unbind is dropped by the kernel (TCP sends it again),
        as is every later one the standing rules queue."""
        try:
            if self._chains:
                try:
                    in_ns(self._ns_fd, self._iptables, "-D", self._chains)
                except OSError:  # one is gone (deleted by hand?): the others one by one, so
                    for chain in self._chains:  # no rule is left queueing to nobody
                        with contextlib.suppress(OSError):
                            in_ns(self._ns_fd, self._iptables, "-D", [chain])
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

    def kick(self) -> None:
        """The hold may have moved (the backup confirmed more, or is gone): re-check the held
        segments. Thread-safe, cheap; a no-op when closed."""
        self._kicked = True
        kick = self._kick  # always written: a segment held right after a check must not wait
        if kick is not None:
            with contextlib.suppress(OSError):  # full (a check is due anyway) or closing
                os.write(kick[1], b"k")

    # -- inside the namespace -------------------------------------------------------------------

    def _iptables(self, op: str, chains: list[str]) -> None:
        restore_rules(op, self.family, [(c, self.rule(c)) for c in chains])

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
                    if self._held:
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
        """Accept every passed segment still waiting: one batch verdict, or (some are held)
        one verdict each, in one datagram."""
        if self._loose:
            send_packed(sock, [self._verdict_msg(pid) for pid in self._loose])
            self._loose.clear()
        if self._pending >= 0:
            attrs = attr(A_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, self._pending))
            sock.send(nlmsg(MSG_VERDICT_BATCH, NLM_F_REQUEST, 0, self.queue_num, attrs))
            self._pending, self._waiting = -1, 0
            self.stats.batches += 1

    def _verdict_msg(self, pid: int, verdict: int = NF_ACCEPT, payload: bytes = b"") -> bytes:
        """One NFQNL_MSG_VERDICT for packet ``pid`` (``payload``: the packet as changed)."""
        attrs = attr(A_VERDICT_HDR, struct.pack("!II", verdict, pid))
        if payload:
            attrs += attr(A_PAYLOAD, payload)
        return nlmsg(MSG_VERDICT, NLM_F_REQUEST, 0, self.queue_num, attrs)

    def _unhold(self, sock: socket.socket) -> None:
        """Let out the held segments the hold now covers (their ACK clamped as of now)."""
        if self.hushed:
            return
        out, keep = [], []
        for h in self._held:
            pid, ft, end, raw, pure_ack = h
            try:
                lim = self._limit(ft) if pure_ack else self._holding(ft)
                if lim is not None and 0 < (end - lim) % (1 << 32) < HALF:
                    keep.append(h)
                    continue
                pkt = bytearray(raw)
                limit = self._limit(ft)
                key = self.md5.get(ft[2]) if self.md5 else None
                changed = limit is not None and clamp_ack(pkt, limit, key)
                out.append(self._verdict_msg(pid, NF_ACCEPT, bytes(pkt) if changed else b""))
                self.stats.clamped += changed
            except (_LimitFailed, Md5KeyMissing):
                out.append(self._verdict_msg(pid, NF_DROP))
        if len(keep) != len(self._held):
            self._held = keep
            self.stats.held_now = len(keep)
            self._release(sock)  # passes first: with no hold left they go in one batch again
            send_packed(sock, out)

    def _holding(self, ft: FourTuple) -> int | None:
        try:
            return self.hold(ft) if self.hold is not None else None
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
        if self.hushed:
            st.hushed += 1
            self._verdict(sock, pid, NF_DROP)
            return
        try:
            if p < 0:
                raise RemoteProtocolError("queued packet without payload", counter="nfq_empty")
            if hook == NF_INET_LOCAL_IN:  # the peer's segment: capture only
                if self.capture is not None:
                    self._capture(mv[p : p + plen], inbound=True)
                self._pass(pid)
                return
            seg = None
            if self.capture_out is not None:  # as the kernel wrote it, before the clamp
                seg = self._capture(mv[p : p + plen], inbound=False)
            if self.hold is not None and self._must_hold(pid, seg, mv[p : p + plen], truncated):
                return
            if self._fast_pass(buf, p, plen):
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
            if limit is not None and self.hold_acks and self._hold_ack(pid, seg, pkt, limit):
                return
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
        if self._held:  # a batch verdict would let the held ones out too
            self._loose.append(pid)
        else:
            self._pending = pid
            self._waiting += 1
        self.stats.passed += 1

    def _must_hold(self, pid: int, seg: Segment | None, pkt: memoryview, truncated: bool) -> bool:
        """Hold this outgoing segment (True) if its payload, or its FIN (which takes a sequence
        number of its own), reaches past ``hold``."""
        if seg is None:
            seg = parse(pkt)
        n = seg.payload_length + (seg.flags & FIN)
        if not n:
            return False
        if truncated:  # cannot be let out later as it was: TCP sends it again
            raise RemoteProtocolError("truncated data segment", counter="nfq_truncated")
        lim = self._holding(seg.four_tuple)
        end = (seg.seq + n) % (1 << 32)
        if lim is None or not 0 < (end - lim) % (1 << 32) < HALF:
            return False
        self._hold_now(pid, seg.four_tuple, end, bytes(pkt), pure_ack=False)
        return True

    def _hold_ack(self, pid: int, seg: Segment, pkt: bytearray, limit: int) -> bool:
        """Hold this outgoing pure ACK (True) if it acknowledges past ``limit``: it leaves once
        the backup holds what it acknowledges, as the kernel wrote it, instead of lowered now.
        A lowered ACK tells the peer nothing new, and nothing else may follow it: a service that
        does not answer at once left the peer to resend on its timeout (200 ms or more, its
        congestion window cut to one segment), a half-closing peer to resend its FIN. Past
        ``HOLD_ACKS_MAX`` held segments (a backup that stopped confirming) ACKs are lowered."""
        if seg.payload_length or seg.flags & (SYN | FIN | RST) or not seg.flags & ACK:
            return False
        if not 0 < (seg.ack - limit) % (1 << 32) < HALF or len(self._held) >= HOLD_ACKS_MAX:
            return False
        self._hold_now(pid, seg.four_tuple, seg.ack, bytes(pkt), pure_ack=True)
        return True

    def _hold_now(self, pid: int, ft: FourTuple, end: int, pkt: bytes, *, pure_ack: bool) -> None:
        """Keep a segment unanswered until ``_unhold`` finds ``end`` covered (by the send hold,
        or for a pure ACK by the limit)."""
        self._held.append((pid, ft, end, pkt, pure_ack))
        if pure_ack:
            self.stats.held_acks += 1
        else:
            self.stats.held += 1
        self.stats.held_now = len(self._held)

    def _fast_pass(self, buf: bytearray, p: int, plen: int) -> bool:
        """True when the outgoing segment at ``buf[p:p+plen]`` surely needs no change: read in
        place, no copy. False sends it to the full check (parse + clamp_ack)."""
        if plen < 20:
            return False
        v = buf[p] >> 4
        if v == 4:
            t = p + (buf[p] & 0x0F) * 4
            if buf[p + 9] != 6 or buf[p + 6] & 0x3F or buf[p + 7]:
                return False  # not TCP, or a fragment: the full check refuses it
            src, dst = buf[p + 12 : p + 16], buf[p + 16 : p + 20]
        elif v == 6:
            t = p + 40
            if buf[p + 6] != 6:
                return False  # extension headers: the full check walks them
            src, dst = buf[p + 8 : p + 24], buf[p + 24 : p + 40]
        else:
            return False
        if t + 20 > p + plen:
            return False
        doff = buf[t + 12] >> 4
        if doff == 8:  # the only options taken here: Linux's NOP NOP TS
            if U32BE.unpack_from(buf, t + 20)[0] != 0x0101080A:
                return False
        elif doff != 5:
            return False  # other options (SACK?) or garbage: the full check
        sport, dport = PORTS.unpack_from(buf, t)
        limit = self._limit((addr_str(bytes(src)), sport, addr_str(bytes(dst)), dport))
        if limit is None:
            return True
        if not buf[t + 13] & ACK:
            return True
        ack = TCP_ACK.unpack_from(buf, t + 8)[0]
        return not 0 < (ack - limit) % (1 << 32) < HALF  # ack <= limit

    def _limit(self, ft: FourTuple) -> int | None:
        try:
            return self.limit(ft)
        except Exception as e:
            self.stats.errors += 1
            self._error = e
            raise _LimitFailed from e

    def _capture(self, pkt: memoryview, *, inbound: bool) -> Segment:
        hook = self.capture if inbound else self.capture_out
        assert hook is not None
        seg = parse(pkt)  # malformed: RemoteProtocolError, the segment is dropped
        try:
            hook(seg, bytes(pkt[seg.payload_offset : seg.payload_offset + seg.payload_length]))
            if inbound:
                self.stats.captured += 1
            else:
                self.stats.captured_out += 1
        except Exception as e:  # the segment still goes on: the ACK clamp keeps us safe
            self.stats.errors += 1
            self._error = e
        return seg


class _LimitFailed(Exception):
    """limit() raised: the segment is dropped (the error is in AckClamp.error)."""
