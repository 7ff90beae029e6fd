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
from collections.abc import Callable, Collection
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
HOLD_ACKS_MAX = 4096  # held segments past which pure ACKs are lowered instead of held


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
    held_acks: int = 0  # pure ACKs held until the backup confirmed what they acknowledge
    held_now: int = 0  # of those, still waiting (both kinds)
    hushed: int = 0  # dropped, both ways, while hushed (AckClamp.hushed)


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


def restore_rules(op: str, family: int, rules: list[tuple[str, list[str]]]) -> None:
    """Insert (``-I``) or delete (``-D``) every (chain, rule spec) of ``rules`` with one
    ``iptables-restore --noflush`` run: one process and one atomic change, where a run of
    ``iptables`` each cost ~4-9 ms (a promotion opens the clamp on its critical path). OSError
    (with iptables' message) if it fails; then nothing changed."""
    lines = [f"{op} {chain} {' '.join(map(_restore_arg, spec))}" for chain, spec in rules]
    argv = [iptables_cmd(family) + "-restore", "-w", "--noflush"]
    res = subprocess.run(argv, input="*filter\n" + "\n".join(lines) + "\nCOMMIT\n",
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise OSError(f"{' '.join(argv)} {lines}: {res.stderr.strip()}")


def _restore_arg(arg: str) -> str:
    """One argument as iptables-restore reads it: double quotes, and only where needed (it does
    not take a shell's single quotes)."""
    return f'"{arg}"' if not arg or any(c in arg for c in ' "\'') else arg


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


def listed_rules(family: int) -> list[tuple[str, list[str]]]:
    """Every nonstop ACK-clamp rule in this namespace: (its comment, its spec from the chain
    on, as ``iptables -D`` takes it). One ``iptables -S``."""
    out = subprocess.run([iptables_cmd(family), "-w", "-S"], capture_output=True, text=True,
                         check=True)  # fmt: skip
    rules = []
    for line in out.stdout.splitlines():
        if line.startswith("-A ") and COMMENT in line:
            spec = shlex.split(line)[1:]  # -S quotes the comment
            comment = spec[spec.index("--comment") + 1] if "--comment" in spec else ""
            rules.append((comment, spec))
    return rules


def remove_rules(family: int = 4, *, netns_fd: int | None = None,
                 keep: Collection[str] = (), only: str | None = None) -> int:  # fmt: skip
    """Delete every nonstop ACK-clamp rule (a crashed agent's leftovers) but those whose comment
    is in ``keep`` (the standing rules of this worker's own queues, ``session.quiet``), or with
    ``only`` just those whose comment it is; how many. Runs in the current namespace, or the
    one behind ``netns_fd``."""

    def body() -> int:
        n = 0
        for comment, spec in listed_rules(family):
            if comment in keep or (only is not None and comment != only):
                continue
            subprocess.run([iptables_cmd(family), "-w", "-D", *spec], capture_output=True,
                           check=True)  # fmt: skip
            n += 1
        return n

    return body() if netns_fd is None else in_ns(netns_fd, body)


def send_packed(sock: socket.socket, msgs: list[bytes], most: int = 96 << 10) -> None:
    """Send netlink messages packed into datagrams of up to ``most`` bytes (one bigger message
    goes alone): one syscall per drain, not one per verdict."""
    for datagram in joined_chunks(msgs, most):
        sock.send(datagram)
