"""Types shared by every nonstop package: roles and the error hierarchy.

Errors follow h11's split: a RemoteProtocolError means the network sent us something wrong (count
it, log it once, drop it, carry on); a LocalProtocolError means our own code misused a protocol
object (a bug).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import gc
import os
import resource
import select
from collections.abc import Iterable, Iterator
from typing import Any


class Role(enum.IntEnum):
    """A node's role in an HA group. The integer values go on the wire: never renumber."""

    INIT = 0  # just started, listening before it decides
    BACKUP = 1
    MASTER = 2
    FAULT = 3  # cannot serve (local fault, fenced, lost quorum)
    STOPPING = 4  # graceful stop under way: VIPs released, handing over

    def __str__(self) -> str:
        return self.name.lower()


class NonstopError(Exception):
    """Base of every error nonstop raises on purpose."""


class ProtocolError(NonstopError):
    """Base of protocol errors."""


class RemoteProtocolError(ProtocolError):
    """The peer (or an attacker, or a broken link) sent bytes we refuse. Counted, never fatal."""

    def __init__(self, reason: str, *, counter: str = "malformed") -> None:
        super().__init__(reason)
        self.reason = reason
        # Name of the counter this error increments: malformed, bad_auth, replay, ...
        self.counter = counter


class LocalProtocolError(ProtocolError):
    """Our own code misused a protocol object: a bug in nonstop."""


class ConfigError(NonstopError):
    """A configuration is wrong. Carries the file, the field (dotted path) and the reason."""

    def __init__(self, file: str, field: str, reason: str) -> None:
        super().__init__(f"{file}: {field}: {reason}")
        self.file = file
        self.field = field
        self.reason = reason


def readable(objs: list[Any], timeout: float | None = None) -> list[Any]:
    """Those of ``objs`` (sockets or fds) that are readable within ``timeout`` seconds (None:
    wait). poll(), not select(): a process holding 10,000 connections has fds past 1024, which
    select() refuses (a clamp thread died of that, and its queue dropped every segment)."""
    p = select.poll()
    by_fd = {}
    for o in objs:
        fd = o if isinstance(o, int) else o.fileno()
        by_fd[fd] = o
        p.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return [by_fd[fd] for fd, _ in p.poll(ms)]


async def wait_readable(sock: Any) -> None:
    """Until ``sock`` (a socket or an fd) is readable, on the running loop. By fd, not the
    socket object: the selector looks a new reader up first, and the KeyError it raises for a
    socket object formats repr(sock), two syscalls (getsockname, getpeername); a standby taking
    over 256 connections spent a tenth of its CPU there."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(fd)


def normal_priority() -> None:
    """Put the calling thread back on normal scheduling if it inherited a real-time policy: a
    thread started during a promotion (which runs SCHED_FIFO) inherits it, and a packet path at
    real-time priority would let a traffic flood starve the node, the services included."""
    with contextlib.suppress(OSError, AttributeError):
        if os.sched_getscheduler(0) not in (os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_IDLE):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


_fd_room = 0  # this process's fd table holds at least this many fds (reserve_fds)


def raise_fd_limit(want: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to ``want`` fds (None: to the hard limit),
    and the hard limit too where ``want`` is past it and we may (root: up to fs.nr_open).
    Returns the soft limit now. Thousands of protected connections hold an fd each in the
    service, its agent's endpoint and the session worker (a peer's stream client: two), and the
    usual soft limit is 1024: a connection past it fails with EMFILE (a 10,000-connection bench
    lost 6 of them so). Never lowers a limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    target = hard if want is None else want
    if soft == inf or (target != inf and soft >= target):
        return soft
    if target == inf or (hard != inf and target > hard):
        try:
            with open("/proc/sys/fs/nr_open") as f:
                cap = int(f.read())
        except (OSError, ValueError):
            cap = 1 << 20
        target = cap if target == inf else min(target, cap)
        if hard != inf and target > hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
                return target
            except (ValueError, OSError):  # not root: as far as the hard limit goes
                target = hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (a promotion): it allocates several objects per
    connection, and each allocation count past the threshold walks the young generations, or
    the whole heap of a worker holding 10,000 connections (~8% of a restore's time in a
    profile). Reference counting still frees what is dropped; the next pass after this finds
    the cycles. Nests: only the outermost turns the collector back on."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def reserve_fds(n: int) -> int:
    """Grow this process's fd table now to hold ``n`` fds (at most the RLIMIT_NOFILE soft limit);
    returns the room there is. The kernel grows the table by doubling when an fd past it is
    allocated, and in a threaded process each growth waits for an RCU grace period: 5-20 ms on a
    busy node. A takeover that opens 256 sockets met three of those mid-restore (35 of its 45
    ms). Grown ahead of time, the table only costs its memory (8 bytes per fd); the call is free
    when the room is there already."""
    global _fd_room
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    n = min(n, soft) if soft != resource.RLIM_INFINITY else n
    if n <= _fd_room:
        return _fd_room
    try:
        base = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return _fd_room
    try:
        os.close(fcntl.fcntl(base, fcntl.F_DUPFD_CLOEXEC, n - 1))  # the lowest free fd >= n-1
        _fd_room = n
    except OSError:
        pass  # no room for that fd: the table grows on demand, as without this
    finally:
        os.close(base)
    return _fd_room


def joined_chunks(parts: Iterable[bytes], most: int) -> list[bytes]:
    """``parts`` joined, in order, into chunks of at most ``most`` bytes (a part bigger than
    ``most`` is a chunk of its own): the prefixes of one UPDATE, the verdicts of one datagram."""
    out: list[bytes] = []
    cur: list[bytes] = []
    size = 0
    for p in parts:
        if cur and size + len(p) > most:
            out.append(b"".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p)
    if cur:
        out.append(b"".join(cur))
    return out
