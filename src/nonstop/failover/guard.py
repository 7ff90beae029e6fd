"""The fence guard: a tiny process that drops this node's VIPs when the agent cannot.

The agent starts it with ``GuardClient.spawn()`` (``python -m nonstop.failover.guard --fd N``);
the two talk over a socketpair with newline-delimited ASCII lines.

agent -> guard::

    ARM <timeout_ms> <address/prefix> <interface> [<address/prefix> <interface> ...]
    FEED
    DISARM
    PING <token>

guard -> agent::

    READY <pid> <scheduling policy>      once, when it is listening
    FENCED <reason>                      it deleted the VIPs it was armed with
    PONG <token>                         every line before the PING was handled
    ERR <reason>                         a line it did not understand (nothing else happens)

Rules: while armed, a FEED (or a new ARM) restarts the timeout. When ``timeout_ms`` pass
without one, the guard deletes the VIPs with netlink, writes FENCED and is disarmed. PING is
answered in order: a FENCED before its PONG says the guard fenced before it read what came
before the PING (``GuardClient.confirm``: FEED, PING, and the agent knows whether it still
holds its VIPs). On EOF (the agent exited or was SIGKILLed) an armed guard deletes the VIPs at
once and exits; a disarmed one just exits. It sleeps in poll() with the deadline as timeout (no
busy loop), runs SCHED_FIFO above the agent when allowed, runs in its own session (a SIGKILL of
the agent's whole process group leaves it alive to fence), and ignores SIGINT (a Ctrl-C is the
agent's business: the guard acts on the agent's EOF instead).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

GUARD_PRIORITY = 60  # above the agent's SCHED_FIFO priority (nonstop.agent.realtime: 50)


# ---- the guard process ---------------------------------------------------------------------


def _realtime(priority: int) -> str:
    """SCHED_FIFO at ``priority`` with memory locked, as the agent does it (locked first)."""
    if priority <= 0:
        return "other"
    from nonstop.agent.realtime import make_realtime

    failed = make_realtime(priority, lock_memory=True)
    return "other" if any(f.startswith("SCHED_FIFO") for f in failed) else f"fifo:{priority}"


class Guard:
    def __init__(self, sock: socket.socket) -> None:
        from nonstop.failover.vip import VipManager

        self._manager_cls = VipManager
        self.sock = sock
        self.vips: VipManager | None = None
        self.timeout = 0.0
        self.deadline: float | None = None  # armed when not None

    def send(self, line: str) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(line.encode() + b"\n")

    def fence(self, reason: str) -> None:
        assert self.vips is not None
        try:
            self.vips.release()
        except OSError as e:  # keep going: report it, the agent decides
            reason = f"{reason}; deleting failed: {e}"
        self.deadline = None
        self.send(f"FENCED {reason}")

    def handle_line(self, line: str, now: float) -> None:
        from nonstop.failover.vip import VipSpec

        words = line.split()
        if not words:
            return
        cmd = words[0]
        if cmd == "FEED" and len(words) == 1:
            if self.deadline is not None:
                self.deadline = now + self.timeout
        elif cmd == "DISARM" and len(words) == 1:
            self.deadline = None
        elif cmd == "PING" and len(words) == 2:
            self.send(f"PONG {words[1]}")
        elif cmd == "ARM" and len(words) >= 2 and len(words) % 2 == 0 and words[1].isdigit():
            specs = [VipSpec(a, i) for a, i in zip(words[2::2], words[3::2], strict=True)]
            old = self.vips
            self.vips = self._manager_cls(specs)
            if old is not None:
                self.vips._nl, old._nl = old._nl, None  # keep the one netlink socket
                old.close()
            try:
                for spec in specs:  # resolve now, so fencing is one netlink call per VIP
                    self.vips._ifindex(spec.interface)
            except OSError as e:
                self.send(f"ERR {e}")
            self.timeout = int(words[1]) / 1000
            self.deadline = now + self.timeout
        else:
            self.send(f"ERR cannot parse {line[:80]!r}")

    def run(self, priority: int) -> int:
        # everything that costs CPU first: a process starting at real-time priority keeps the
        # agents (below it) off its CPU for as long as it takes (see agent.realtime)
        if self.vips is None:
            self.vips = self._manager_cls([])
            _ = self.vips.nl  # open the netlink socket before READY
        policy = _realtime(priority)
        self.send(f"READY {os.getpid()} {policy}")
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        buf = b""
        while True:
            if self.deadline is None:
                wait_ms = None
            else:
                wait_ms = max(0, math.ceil((self.deadline - time.monotonic()) * 1000))
            events = poller.poll(wait_ms)
            now = time.monotonic()
            if not events:
                if self.deadline is not None and now >= self.deadline:
                    self.fence(f"no FEED from the agent for {self.timeout * 1000:.0f} ms")
                continue
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                if self.deadline is not None:
                    self.fence("the agent is gone (EOF on the guard socket)")
                # Tearing down a locked address space takes ~10 ms: not at real-time priority.
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                return 0
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                self.handle_line(raw.decode("ascii", "replace"), now)
            if len(buf) > 65536:
                self.send("ERR line too long")
                buf = b""
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self.fence(f"no FEED from the agent for {self.timeout * 1000:.0f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nonstop.failover.guard")
    p.add_argument("--fd", type=int, required=True, help="our end of the socketpair")
    p.add_argument("--rt-priority", type=int, default=GUARD_PRIORITY, help="0: no SCHED_FIFO")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    return Guard(sock).run(args.rt_priority)


# ---- the agent's side ----------------------------------------------------------------------


class GuardClient:
    """The agent's handle on its guard process."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes], ready: str) -> None:
        self.sock = sock
        self.proc = proc
        self.ready = ready  # the READY line: "READY <pid> <policy>"
        self._buf = b""
        self._eof = False
        self._ping = 0  # the last PING token (confirm)

    @classmethod
    def spawn(
        cls,
        *,
        rt_priority: int = GUARD_PRIORITY,
        python: str = sys.executable,
        timeout: float = 10.0,
    ) -> GuardClient:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])  # the directory holding nonstop/
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        cmd = [python, "-m", "nonstop.failover.guard", "--fd", str(theirs.fileno())]
        cmd += ["--rt-priority", str(rt_priority)]
        try:
            # Own session: a kill of the agent's process group (kill -9 -PGID, a supervisor
            # killing the group) must not take the guard with it; the guard exits on EOF anyway.
            proc = subprocess.Popen(
                cmd,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        finally:
            theirs.close()
        ours.settimeout(timeout)
        buf = b""
        try:
            while b"\n" not in buf:
                chunk = ours.recv(4096)
                if not chunk:
                    raise RuntimeError(f"fence guard exited at start (status {proc.wait()})")
                buf += chunk
        except BaseException:
            ours.close()
            proc.kill()
            proc.wait()
            raise
        line, _, rest = buf.partition(b"\n")
        ours.setblocking(False)
        client = cls(ours, proc, line.decode())
        client._buf = rest
        return client

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fileno(self) -> int:
        return self.sock.fileno()

    def _send(self, line: str, *, must: bool) -> None:
        data = line.encode() + b"\n"
        deadline = time.monotonic() + 0.5
        while data:
            try:
                n = self.sock.send(data)
                data = data[n:]
            except BlockingIOError:
                if not must:
                    return  # a FEED lost to a full buffer: the guard is stuck anyway
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("fence guard does not read its socket") from None
                select.select([], [self.sock], [], left)
            except (BrokenPipeError, ConnectionResetError):
                return  # the guard died; read_notices() reports the EOF

    def arm(self, timeout: float, vips: Iterable[object]) -> None:
        """Arm with ``timeout`` seconds and the VIPs (VipSpec or (address, interface) pairs)."""
        words = [f"ARM {max(1, round(timeout * 1000))}"]
        for v in vips:
            addr, iface = (v.address, v.interface) if hasattr(v, "address") else v  # type: ignore[attr-defined,misc]
            if not addr or not iface or any(c.isspace() for c in addr + iface):
                raise ValueError(f"bad VIP for the guard: {addr!r} on {iface!r}")
            words.append(f"{addr} {iface}")
        self._send(" ".join(words), must=True)

    def feed(self) -> None:
        self._send("FEED", must=False)

    def confirm(self, timeout: float) -> tuple[bool, list[str]]:
        """FEED, then wait up to ``timeout`` for the guard to answer a PING after it: (True, the
        notices read before the PONG) when it answered; a FENCED among them says it fenced
        before it read the FEED. (False, notices) when it did not answer in time (or exited).
        Blocks: for the rare moment the agent must know before it goes on."""
        self._ping += 1
        token = str(self._ping)
        self._send(f"FEED\nPING {token}", must=False)
        deadline = time.monotonic() + timeout
        notices: list[str] = []
        while True:
            for n in self.read_notices():
                if n == f"PONG {token}":
                    return True, notices
                if not n.startswith("PONG "):  # an older PING's answer: a late one
                    notices.append(n)
            left = deadline - time.monotonic()
            if left <= 0 or self._eof:
                return False, notices
            select.select([self.sock], [], [], left)

    def disarm(self) -> None:
        self._send("DISARM", must=True)

    def read_notices(self) -> list[str]:
        """Lines the guard wrote ("FENCED <reason>", "ERR <reason>"), then "EOF" once it exits."""
        if self._eof:
            return []
        out: list[str] = []
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self._eof = True
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        out += [x.decode("ascii", "replace") for x in lines if x]
        if self._eof:
            out.append("EOF")
        return out

    def wait_notice(self, timeout: float) -> list[str]:
        """Block up to ``timeout`` for the next notices (for tests and simple callers)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.read_notices()
            left = deadline - time.monotonic()
            if got or left <= 0 or self._eof:
                return got
            select.select([self.sock], [], [], left)

    def close(self, timeout: float = 2.0) -> int | None:
        """Close our end (an armed guard fences on it) and wait for the guard to exit."""
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


if __name__ == "__main__":
    raise SystemExit(main())
