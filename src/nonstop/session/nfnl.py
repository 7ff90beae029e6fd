"""nfnetlink_queue on the wire, the clamp's iptables rules and namespace hopping: the plumbing
under ``nonstop.session.nfq.AckClamp`` (constants from linux/netfilter/nfnetlink_queue.h)."""

from __future__ import annotations

import ctypes
import os
import shlex
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nonstop.common import joined_chunks

COMMENT = "nonstop-ackclamp"
KICK_MARK = 0x6E6B  # SO_MARK of session.kick's crafted segments: the clamp's queue lets them by
CLONE_NEWNET = 0x40000000
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
_libc = ctypes.CDLL(None, use_errno=True)


# nfnetlink_queue (linux/netfilter/nfnetlink_queue.h)
NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
QUEUE = 3 << 8  # NFNL_SUBSYS_QUEUE
MSG_PACKET, MSG_VERDICT, MSG_CONFIG, MSG_VERDICT_BATCH = (
    QUEUE | 0, QUEUE | 1, QUEUE | 2, QUEUE | 3,
)  # fmt: skip
CFG_CMD, CFG_PARAMS, CFG_QUEUE_MAXLEN, CFG_MASK, CFG_FLAGS = 1, 2, 3, 4, 5
CMD_BIND, CMD_UNBIND = 1, 2
COPY_PACKET = 2
F_GSO = 4
A_PACKET_HDR, A_VERDICT_HDR, A_PAYLOAD, A_CAP_LEN = 1, 2, 10, 13
NF_DROP, NF_ACCEPT = 0, 1
NF_INET_LOCAL_IN = 1
NLMSGHDR = struct.Struct("=IHHII")
ATTR = struct.Struct("=HH")
U32BE = struct.Struct("!I")
TCP_ACK = struct.Struct("!I")
PORTS = struct.Struct("!HH")
HALF = 1 << 31
MAX_PAYLOAD = 0xFFFF
HEADER_COPY = 192  # bytes copied without capture: IPv4/IPv6 + TCP headers with options


# Classic BPF for ``iptables -m bpf``: does a TCP segment (from its IP header on) carry payload,
# or SYN, FIN or RST? Without an ACK clamp the master's own pure ACKs need not be queued (they
# acknowledge only what the kernel received, and the hold let only confirmed bytes in): half the
# segments of a request/response load never reach Python. Anything the program cannot read
# safely (an IPv4 fragment, an IPv6 extension header) is queued.
_BPF_RET_QUEUE = (0x06, 0, 0, 1)
_BPF_RET_SKIP = (0x06, 0, 0, 0)
_DATA_OR_CONTROL = {
    4: [
        (0x28, 0, 0, 6),  # ldh [6]: flags and fragment offset
        (0x45, 10, 0, 0x3FFF),  # jset MF|offset: a fragment -> queue
        (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf): X = IP header length
        (0x50, 0, 0, 13),  # ldb [x+13]: TCP flags
        (0x45, 7, 0, 0x07),  # jset FIN|SYN|RST -> queue
        (0x50, 0, 0, 12),  # ldb [x+12]: data offset
        (0x74, 0, 0, 2),  # rsh #2
        (0x54, 0, 0, 0x3C),  # and #0x3c: A = TCP header length
        (0x0C, 0, 0, 0),  # add x: A = IP + TCP header length
        (0x07, 0, 0, 0),  # tax
        (0x28, 0, 0, 2),  # ldh [2]: total length
        (0x2D, 0, 1, 0),  # jgt x: payload -> queue, else skip
        _BPF_RET_QUEUE,
        _BPF_RET_SKIP,
    ],
    6: [
        (0x30, 0, 0, 6),  # ldb [6]: next header
        (0x15, 0, 8, 6),  # jeq #6 (TCP), else (an extension header) -> queue
        (0x30, 0, 0, 53),  # ldb [53]: TCP flags
        (0x45, 6, 0, 0x07),  # jset FIN|SYN|RST -> queue
        (0x30, 0, 0, 52),  # ldb [52]: data offset
        (0x74, 0, 0, 2),  # rsh #2
        (0x54, 0, 0, 0x3C),  # and #0x3c: A = TCP header length
        (0x07, 0, 0, 0),  # tax
        (0x28, 0, 0, 4),  # ldh [4]: payload length (TCP header and data)
        (0x2D, 0, 1, 0),  # jgt x: payload -> queue, else skip
        _BPF_RET_QUEUE,
        _BPF_RET_SKIP,
    ],
}


def data_or_control_bpf(family: int) -> str:
    """``--bytecode`` for ``iptables -m bpf``: matches segments with payload or SYN/FIN/RST."""
    prog = _DATA_OR_CONTROL[family]
    return ",".join([str(len(prog)), *(f"{c} {t} {f} {k}" for c, t, f, k in prog)])


def attr(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return ATTR.pack(n, kind) + data + bytes(-n & 3)


def nlmsg(kind: int, flags: int, seq: int, queue: int, attrs: bytes) -> bytes:
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attrs
    return NLMSGHDR.pack(16 + len(body), kind, flags, seq, 0) + body


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
    batches: int = 0  # batch verdicts sent (each accepts every passed segment before it)
    truncated: int = 0  # header-only copies that needed a clamp: dropped, full copy from then on
    resigned: int = 0  # clamped segments signed again with the peer's TCP-MD5 key
    unsigned: int = 0  # signed segments to clamp without a key for their peer: dropped
    held: int = 0  # outgoing data segments held until the backup confirmed their bytes
    held_in: int = 0  # the peer's data segments held until the backup confirmed their bytes
    held_now: int = 0  # of both, still waiting


PROC_QUEUES = "/proc/thread-self/net/netfilter/nfnetlink_queue"


def kernel_queue(queue_num: int, text: str | None = None) -> dict[str, int] | None:
    """The kernel's own figures for queue ``queue_num`` in this thread's network namespace
    (``/proc/net/netfilter/nfnetlink_queue``, or ``text`` read from it): ``waiting`` packets
    without a verdict (held ones included), ``dropped_full`` (the queue was at its maximum
    length: what a packet path too slow for its load looks like; the segments are lost and the
    peers' retransmission timers back off), ``dropped_user`` (could not be sent to us: our
    socket's buffer was full). None: no such queue is bound."""
    if text is None:
        try:
            with open(PROC_QUEUES) as f:
                text = f.read()
        except OSError:
            return None
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 8 and f[0] == str(queue_num):
            return {"waiting": int(f[2]), "dropped_full": int(f[5]), "dropped_user": int(f[6])}
    return None


def iptables_cmd(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


def in_ns(ns_fd: int, fn: Callable[..., Any], *args: Any) -> Any:
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


def remove_rules(family: int = 4, *, netns_fd: int | None = None, keep_quiet: bool = False) -> int:
    """Delete every nonstop ACK-clamp rule from OUTPUT/INPUT (a crashed agent's leftovers); how
    many. ``keep_quiet``: not the quiet rules (``session.quiet``). Runs in the current namespace,
    or the one behind ``netns_fd``."""

    def body() -> int:
        ipt = iptables_cmd(family)
        out = subprocess.run([ipt, "-w", "-S"], capture_output=True, text=True, check=True)
        n = 0
        for line in out.stdout.splitlines():
            if line.startswith("-A ") and COMMENT in line:
                if keep_quiet and f"{COMMENT}:quiet" in line:
                    continue
                spec = shlex.split(line)[1:]  # -S quotes the comment
                subprocess.run([ipt, "-w", "-D", *spec], capture_output=True, check=True)
                n += 1
        return n

    return body() if netns_fd is None else in_ns(netns_fd, body)


def queue_rule(
    name: str, *, vip: str, port: int, family: int, queue_num: int, clamp: bool
) -> list[str]:
    """The iptables rule spec queueing VIP:port's segments: ``OUTPUT`` (ours), ``INPUT`` (the
    peer's). Without an ACK ``clamp`` our pure ACKs are not queued.
    Our segments marked ``KICK_MARK`` pass by (``session.kick``'s crafted ACKs: they carry what
    the queue has seen already, and after a takeover of 10,000 connections they are 40,000
    segments the queue would copy to Python for nothing)."""
    if name == "OUTPUT":
        match = ["-s", vip, "--sport", str(port), "-m", "mark", "!", "--mark", f"{KICK_MARK:#x}"]
        if not clamp:
            match += ["-m", "bpf", "--bytecode", data_or_control_bpf(family)]
    else:
        match = ["-d", vip, "--dport", str(port)]
    return [
        "-p", "tcp", *match,
        "-m", "comment", "--comment", f"{COMMENT}:q{queue_num}",
        "-j", "NFQUEUE", "--queue-num", str(queue_num),
    ]  # fmt: skip


def restore_rules(op: str, family: int, rules: list[tuple[str, list[str]]]) -> None:
    """Insert (``-I``) or delete (``-D``) every (chain, spec) of ``rules`` in one
    iptables-restore run: one process, one atomic change. OSError if it fails."""
    lines = [f"{op} {chain} {' '.join(map(_quoted, spec))}" for chain, spec in rules]
    text = "*filter\n" + "\n".join(lines) + "\nCOMMIT\n"
    argv = [iptables_cmd(family) + "-restore", "-w", "--noflush"]
    res = subprocess.run(argv, input=text, capture_output=True, text=True)
    if res.returncode != 0:
        raise OSError(f"{' '.join(argv)} {lines}: {res.stderr.strip()}")


def _quoted(arg: str) -> str:
    """One argument as iptables-restore reads it."""
    return f'"{arg}"' if not arg or any(c in arg for c in ' "\'') else arg


def send_packed(sock: socket.socket, msgs: list[bytes], most: int = 96 << 10) -> None:
    """Send netlink messages packed into datagrams of up to ``most`` bytes (one bigger message
    goes alone): one syscall per drain, not one per verdict."""
    for datagram in joined_chunks(msgs, most):
        sock.send(datagram)
