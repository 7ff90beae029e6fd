"""A host of a running lab: addresses, processes, sockets and commands inside its namespace."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute

from nonstop.common import NonstopError
from nonstop.lab import nsops
from nonstop.lab.process import LabProcess

if TYPE_CHECKING:
    from nonstop.lab.lab import Lab


def _icmp_echo(kind: int, seq: int, payload: bytes) -> bytes:
    """An ICMP(v6) echo request; the kernel fills the id (and the ICMPv6 checksum)."""
    head = bytes([kind, 0, 0, 0, 0, 0]) + seq.to_bytes(2, "big")
    if kind == 128:
        return head + payload
    data = head + payload
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return data[:2] + (~total & 0xFFFF).to_bytes(2, "big") + data[4:]


class LabError(NonstopError):
    """The lab could not be built or was used wrongly."""


class LabHost:
    """One host of a running lab: a network namespace with one interface per channel."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name
        self.ns = f"{lab.prefix}-{name}"
        self.workdir = lab.workdir / name
        self.channels: dict[str, int] = dict(lab.topology.hosts[name].channels)
        self._ipr: IPRoute | None = None

    def __repr__(self) -> str:
        return f"LabHost({self.name!r}, ns={self.ns!r})"

    # -- addresses ------------------------------------------------------------------------------

    def _check(self, channel: str) -> None:
        if channel not in self.channels:
            raise LabError(f"host {self.name} is not on channel {channel!r}")

    def addr(self, channel: str) -> str:
        self._check(channel)
        a = self.lab.topology.addr(self.name, channel)
        if a is None:
            raise LabError(f"channel {channel} has no IPv4 network")
        return a

    def addr6(self, channel: str) -> str | None:
        self._check(channel)
        return self.lab.topology.addr6(self.name, channel)

    def ifname(self, channel: str) -> str:
        self._check(channel)
        return channel

    def prefixlen(self, channel: str, family: int = 4) -> int:
        ch = self.lab.topology.channels[channel]
        net = ch.v4 if family == 4 else ch.v6
        if net is None:
            raise LabError(f"channel {channel} has no IPv{family} network")
        return net.prefixlen

    def mac(self, channel: str) -> str:
        """The interface's current MAC, read from the kernel."""
        self._check(channel)
        ipr = self.iproute()
        (link,) = ipr.link("get", index=self._index(channel))
        return str(link.get("address"))

    def _index(self, channel: str) -> int:
        try:
            (link,) = self.iproute().link("get", ifname=channel)
        except Exception as e:  # NetlinkError(19) when the interface is not there
            raise LabError(f"{self.ns} has no interface {channel}: {e}") from None
        return int(link["index"])

    # -- handles into the namespace -------------------------------------------------------------

    def iproute(self) -> IPRoute:
        """An IPRoute bound to this host's namespace, kept open until the lab goes down."""
        if self._ipr is None:
            self._ipr = nsops.open_iproute(self.ns)
        return self._ipr

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A socket created inside this host's namespace (usable from any thread)."""
        return nsops.in_netns(self.ns, socket.socket, family, type, proto)

    def ping(self, dst: str, *, count: int = 1, timeout: float = 1.0) -> bool:
        """ICMP echo to ``dst`` (v4 or v6) from this host: True if any of ``count`` requests got
        its reply within ``timeout`` seconds each. (iputils ping is not installed here.)"""
        v6 = ":" in dst
        fam = socket.AF_INET6 if v6 else socket.AF_INET
        proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
        reply = bytes([129 if v6 else 0])
        with self.socket(fam, socket.SOCK_DGRAM, proto) as s:
            s.settimeout(timeout)
            for seq in range(1, count + 1):
                payload = os.urandom(16)
                try:
                    s.sendto(_icmp_echo(128 if v6 else 8, seq, payload), (dst, 0))
                except OSError:  # EPERM from an OUTPUT DROP rule, unreachable network...
                    continue
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    s.settimeout(left)
                    try:
                        data = s.recv(2048)
                    except TimeoutError:
                        break
                    ours = data[6:8] == seq.to_bytes(2, "big") and data[8:] == payload
                    if data[:1] == reply and ours:
                        return True
        return False

    def ns_argv(self, argv: list[str]) -> list[str]:
        """argv running ``argv`` in this host (for asyncio subprocesses; those are not tracked,
        but down() still kills every pid left in the lab's namespaces)."""
        return nsops.ns_argv(self.ns, [str(a) for a in argv])

    # -- processes ------------------------------------------------------------------------------

    def run(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        stdout: Any = None,
        stderr: Any = None,
        name: str | None = None,
        cwd: str | Path | None = None,
    ) -> LabProcess:
        """Start ``argv`` in this host, tracked and killed on down().

        ``env`` is added to the current environment. With ``stdout=None`` both output streams go
        to ``<host workdir>/<name>.log`` (``LabProcess.output()`` reads it); pass
        ``subprocess.PIPE`` or a file to choose otherwise. The process leads its own session.
        """
        return self.lab._start(self, [str(a) for a in argv], env, stdout, stderr, name, cwd)

    def sh(
        self, cmd: str | list[str], check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command (or an argv list) in this host and wait for it."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        return nsops.ns_run(self.ns, argv, check=check, timeout=timeout)

    def close(self) -> None:
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None
