"""The ACK clamp on the master's packet path: iptables NFQUEUE + fnfqueue around segment.clamp_ack.

``AckClamp`` puts the master's outgoing TCP segments from VIP:port through an NFQUEUE queue and
lowers their ACK number (and SACK blocks) to ``limit(four_tuple)``, the point up to which the
backup holds the peer's bytes (``SyncSender.confirmed(conn)[0]``); ``None`` lets the segment pass
unchanged. The rule:

    iptables -I OUTPUT -p tcp -s VIP --sport PORT -m comment --comment nonstop-ackclamp:q<N>
             -j NFQUEUE --queue-num N --queue-bypass

With ``capture=``, the peer's segments to VIP:port pass through the same queue (an INPUT rule
with ``-d VIP --dport PORT``): ``capture(segment, payload)`` sees each one before TCP does (the
DATA(RCV) for the backup, the SYN options for the FULL record) and the segment is accepted as is.
With ``capture_out=``, ``capture_out(segment, payload)`` sees every outgoing segment of VIP:port
(the OUTPUT rule queues them anyway) before it is clamped, with its ACK as the kernel wrote it:
the SYN-ACK's options, DATA(SND), the service's windows. An exception in either hook is counted
(``stats.errors``, ``error``) and the segment goes on: the clamp keeps it safe, the backup may lag.

``--queue-bypass``: while no listener is bound the segments pass unclamped (the agent died; the
service keeps working, without the takeover guarantee). Segments the clamp cannot parse, and
truncated copies, are dropped and counted: TCP sends them again, and nothing unclamped escapes.

Threads, not asyncio: fnfqueue already runs its own reader thread and hands packets over through a
condition variable, so the verdict loop is one more plain thread (``nonstop-ackclamp-q<N>``).
``limit`` is called from that thread, once per segment: it must be quick and thread-safe (a dict
lookup). The namespace: every netlink socket and iptables call is made in the network namespace
that was current when the AckClamp was built (or ``netns=``, a name under /run/netns), whatever
thread calls ``open``/``close`` later.

GSO: the queue carries whole GSO packets (up to 64 KB, NFQA_CFG_F_GSO), which needs a 64 MB
netlink receive buffer; an ENOBUFS overflow is counted and the loop resets and carries on.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shlex
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fnfqueue

from nonstop.common import LocalProtocolError, RemoteProtocolError
from nonstop.session.segment import Segment, clamp_ack, parse

FourTuple = tuple[str, int, str, int]  # (VIP, port, peer address, peer port) of an outgoing segment
Limit = Callable[[FourTuple], int | None]
Capture = Callable[[Segment, bytes], None]

COMMENT = "nonstop-ackclamp"
CLONE_NEWNET = 0x40000000
SO_RCVBUFFORCE = 33
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(slots=True)
class ClampStats:
    """Counters of one AckClamp (written by its thread only)."""

    seen: int = 0  # segments through the queue
    passed: int = 0  # accepted unchanged (limit None, or nothing beyond the limit)
    clamped: int = 0  # ACK or SACK rewritten, checksum recomputed
    dropped: int = 0  # malformed or truncated: dropped so nothing unclamped escapes
    overflows: int = 0  # ENOBUFS on the netlink socket (the kernel dropped segments)
    captured: int = 0  # inbound segments handed to capture()
    captured_out: int = 0  # outbound segments handed to capture_out()
    errors: int = 0  # limit() raised (segment dropped) or a capture hook raised (segment goes
    # on); the error is kept in AckClamp.error


def _iptables(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


def _in_ns(ns_fd: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args) in a short-lived thread that joined the namespace behind ``ns_fd``."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
            box["result"] = fn(*args)
        except BaseException as e:  # handed back to the caller
            box["error"] = e

    t = threading.Thread(target=body, name="nonstop-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def remove_rules(family: int = 4, *, netns_fd: int | None = None) -> int:
    """Delete every nonstop ACK-clamp rule from OUTPUT/INPUT (a crashed agent's leftovers); how
    many. Runs in the current namespace, or the one behind ``netns_fd``."""

    def body() -> int:
        ipt = _iptables(family)
        out = subprocess.run([ipt, "-w", "-S"], capture_output=True, text=True, check=True)
        n = 0
        for line in out.stdout.splitlines():
            if line.startswith("-A ") and COMMENT in line:
                spec = shlex.split(line)[1:]  # -S quotes the comment
                subprocess.run([ipt, "-w", "-D", *spec], capture_output=True, check=True)
                n += 1
        return n

    return body() if netns_fd is None else _in_ns(netns_fd, body)


class AckClamp:
    """Clamp the ACK of every segment leaving ``vip``:``port`` to ``limit(four_tuple)``.

    Use as a context manager (rules and queue removed on exit, also on exceptions), or call
    ``open()`` / ``close()``. ``stats`` counts what happened.
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
        maxlen: int = 4096,
    ) -> None:
        if family not in (4, 6):
            raise LocalProtocolError(f"family must be 4 or 6, not {family}")
        self.queue_num = queue_num
        self.vip = str(ipaddress.ip_address(vip))  # the form parse() gives
        self.port = port
        self.family = family
        self.limit = limit
        self.capture = capture
        self.capture_out = capture_out
        self.rcvbuf = rcvbuf
        self.maxlen = maxlen
        self.stats = ClampStats()
        path = f"/run/netns/{netns}" if netns is not None else "/proc/thread-self/ns/net"
        self._ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._conn: fnfqueue.Connection | None = None
        self._thread: threading.Thread | None = None
        self._chains: list[str] = []  # chains our rule is in
        self._error: BaseException | None = None

    def rule(self, chain: str = "OUTPUT") -> list[str]:
        """The iptables rule spec for ``chain`` (OUTPUT: our segments, INPUT: the peer's)."""
        match = ["-s", self.vip, "--sport"] if chain == "OUTPUT" else ["-d", self.vip, "--dport"]
        return [
            "-p", "tcp", *match, str(self.port),
            "-m", "comment", "--comment", f"{COMMENT}:q{self.queue_num}",
            "-j", "NFQUEUE", "--queue-num", str(self.queue_num), "--queue-bypass",
        ]  # fmt: skip

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> AckClamp:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Bind the queue, start the verdict thread, then insert the rule (in that order, so no
        segment is queued before someone listens)."""
        if self._conn is not None:
            raise LocalProtocolError("AckClamp already open")
        try:
            _in_ns(self._ns_fd, self._bind)
            self._thread = threading.Thread(
                target=self._loop, name=f"nonstop-ackclamp-q{self.queue_num}", daemon=True
            )
            self._thread.start()
            for chain in ("OUTPUT", "INPUT") if self.capture is not None else ("OUTPUT",):
                _in_ns(self._ns_fd, self._iptables, "-I", chain)
                self._chains.append(chain)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the rule, unbind, stop the thread. Safe to call twice and after a failed open."""
        try:
            while self._chains:
                _in_ns(self._ns_fd, self._iptables, "-D", self._chains.pop())
        finally:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
            if self._thread is not None:
                self._thread.join(timeout=5)
                self._thread = None
            if self._ns_fd >= 0:
                os.close(self._ns_fd)
                self._ns_fd = -1

    @property
    def error(self) -> BaseException | None:
        """The last error of the verdict thread: what stopped it, or what limit(), capture() or
        capture_out() raised (also counted in ``stats.errors``)."""
        return self._error

    # -- inside the namespace -------------------------------------------------------------------

    def _iptables(self, op: str, chain: str) -> None:
        argv = [_iptables(self.family), "-w", op, chain, *self.rule(chain)]
        res = subprocess.run(argv, capture_output=True, text=True)
        if res.returncode != 0:
            raise OSError(f"{' '.join(argv)}: {res.stderr.strip()}")

    def _bind(self) -> None:
        conn = fnfqueue.Connection()
        try:
            with socket.socket(fileno=os.dup(conn._conn.fd)) as s:  # the netlink socket
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
            q = conn.bind(self.queue_num)
            q.set_mode(fnfqueue.MAX_PAYLOAD, fnfqueue.COPY_PACKET)
            q.set_maxlen(self.maxlen)
            q.gso = True
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # -- the verdict loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            while self._conn is conn:
                try:
                    for pkt in conn:
                        self._verdict(pkt)
                    return  # closed
                except fnfqueue.BufferOverflowException:
                    self.stats.overflows += 1
                    conn.reset()
        except BaseException as e:  # a closed connection mid-verdict is a normal end
            if self._conn is conn:
                self._error = e

    def _verdict(self, pkt: fnfqueue.Packet) -> None:
        st = self.stats
        st.seen += 1
        buf = bytearray(pkt.payload)
        try:
            # A truncated copy fails parse (IP length beyond the bytes). fnfqueue's own
            # Packet.truncated is always True (it compares a cdata pointer with `is`).
            seg = parse(buf)
            if seg.dport == self.port and seg.dst == self.vip:  # inbound: capture only
                self._capture(seg, buf, inbound=True)
                pkt.accept()
                st.passed += 1
                return
            self._capture(seg, buf, inbound=False)  # as the kernel wrote it, before the clamp
            try:
                limit = self.limit(seg.four_tuple)
            except Exception as e:  # a bug in the caller's limit: fail closed, keep going
                st.errors += 1
                self._error = e
                pkt.drop()
                return
            if limit is not None and clamp_ack(buf, limit):
                pkt.payload = bytes(buf)
                pkt.mangle()
                st.clamped += 1
                return
        except RemoteProtocolError:
            st.dropped += 1
            pkt.drop()
            return
        pkt.accept()
        st.passed += 1

    def _capture(self, seg: Segment, buf: bytearray, *, inbound: bool) -> None:
        hook = self.capture if inbound else self.capture_out
        if hook is None:
            return
        try:
            hook(seg, bytes(buf[seg.payload_offset :]))
            if inbound:
                self.stats.captured += 1
            else:
                self.stats.captured_out += 1
        except Exception as e:  # the segment still goes on: the ACK clamp keeps us safe
            self.stats.errors += 1
            self._error = e
