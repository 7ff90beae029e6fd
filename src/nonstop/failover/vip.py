"""The VIP adapter: add and remove virtual IPs with netlink, announce them on the link.

Runs in the node's own network namespace (the agent is started there). One rtnetlink socket
(:class:`nonstop.failover.netlink.AddrSocket`) is kept open for the life of the manager; it is
synchronous and safe to call from inside a running asyncio loop, which pyroute2 0.9's sync
IPRoute is not (see that module).

Announcements (``announce()``) are sent for every VIP, ``garp_count`` times, ``garp_interval``
apart, the first one at once:

- IPv4: a gratuitous ARP *request* (sender IP = target IP = VIP, sender MAC = ours, Ethernet
  broadcast) from an AF_PACKET socket bound to the VIP's interface. Linux neighbours update an
  existing entry on it regardless of arp locktime.
- IPv6: an unsolicited Neighbor Advertisement (RFC 4861 section 7.2.6) to ff02::1 with the
  override flag and the target link-layer address option, from a raw ICMPv6 socket with hop limit
  255 (receivers drop NDP with any other hop limit); the kernel fills in the checksum.

IPv6 VIPs are added with IFA_F_NODAD so they are usable at once (no tentative period).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from nonstop.failover.netlink import IFA_F_NODAD, AddrSocket

log = logging.getLogger("nonstop.vip")

SIOCGIFHWADDR = 0x8927
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ALL_NODES = "ff02::1"
ND_NEIGHBOR_ADVERT = 136
NA_FLAG_OVERRIDE = 0x20000000
BROADCAST_MAC = b"\xff" * 6


@dataclass(frozen=True, slots=True)
class VipSpec:
    address: str  # with prefix length: "10.77.0.100/24" or "fd77::100/64"
    interface: str
    garp_count: int = 3
    garp_interval: float = 0.01

    @property
    def ip(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return ipaddress.ip_interface(self.address)


def read_mac(ifname: str) -> bytes:
    """The interface's hardware address via SIOCGIFHWADDR (works right after setns())."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16s16x", ifname.encode()[:15])
        res = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, req)
    return res[18:24]


def garp_frame(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    """Ethernet + ARP request announcing ``ip`` at ``mac`` (sender IP = target IP)."""
    eth = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip.packed + b"\x00" * 6 + ip.packed
    return eth + arp


def na_message(mac: bytes, ip: ipaddress.IPv6Address) -> bytes:
    """ICMPv6 unsolicited Neighbor Advertisement (checksum left 0: the kernel computes it)."""
    header = struct.pack("!BBHI", ND_NEIGHBOR_ADVERT, 0, 0, NA_FLAG_OVERRIDE)
    option = struct.pack("!BB", 2, 1) + mac  # target link-layer address, 8 bytes
    return header + ip.packed + option


class VipManager:
    def __init__(self, vips: list[VipSpec]) -> None:
        self.specs = list(vips)
        self._nl: AddrSocket | None = None
        self._index: dict[str, int] = {}
        self._sockets: dict[tuple[int, str, str], socket.socket] = {}

    # -- netlink ----------------------------------------------------------------------------
    @property
    def nl(self) -> AddrSocket:
        if self._nl is None:
            self._nl = AddrSocket()
        return self._nl

    def _ifindex(self, ifname: str) -> int:
        idx = self._index.get(ifname)
        if idx is None:
            try:
                idx = self._index[ifname] = socket.if_nametoindex(ifname)
            except OSError as e:
                raise OSError(errno.ENODEV, f"no interface named {ifname!r}") from e
        return idx

    def acquire(self) -> None:
        """Add every VIP; one that is already there is fine."""
        for spec in self.specs:
            ip = spec.ip
            flags = IFA_F_NODAD if ip.version == 6 else 0
            with contextlib.suppress(FileExistsError):
                self.nl.add(self._ifindex(spec.interface), str(ip.ip), ip.network.prefixlen, flags)

    def release(self) -> None:
        """Remove every VIP; one that is already gone (or whose interface is gone) is fine."""
        for key in [k for k in self._sockets if k[0] == 6]:  # bound to the VIP: reopen later
            self._sockets.pop(key).close()
        for spec in self.specs:
            ip = spec.ip
            try:
                self.nl.delete(self._ifindex(spec.interface), str(ip.ip), ip.network.prefixlen)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EADDRNOTAVAIL, errno.ENODEV):
                    raise
                if e.errno == errno.ENODEV:
                    self._index.pop(spec.interface, None)

    release_all_sync = release

    def held(self) -> list[str]:
        """The VIPs (as configured, with prefix) that are on their interface now."""
        present = {(a.index, a.address, a.prefixlen) for a in self.nl.dump()}
        out = []
        for spec in self.specs:
            ip = spec.ip
            try:
                idx = self._ifindex(spec.interface)
            except OSError:
                continue
            if (idx, ip.ip.compressed, ip.network.prefixlen) in present:
                out.append(spec.address)
        return out

    def close(self) -> None:
        for s in self._sockets.values():
            s.close()
        self._sockets.clear()
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    # -- announcements ----------------------------------------------------------------------
    def _socket(self, spec: VipSpec) -> socket.socket:
        ip = spec.ip.ip
        key = (ip.version, spec.interface, ip.compressed if ip.version == 6 else "")
        s = self._sockets.get(key)
        if s is not None:
            return s
        if ip.version == 4:
            # Protocol 0: a send-only socket. With ETH_P_ARP the kernel would hook it into the
            # receive path (queueing every ARP frame we never read) and bind() would wait for an
            # RCU grace period: 12-16 ms measured, on the failover's critical path.
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            s.bind((spec.interface, 0))
        else:
            idx = self._ifindex(spec.interface)
            s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            try:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
                s.bind((ip.compressed, 0, 0, idx))  # source = the VIP (usable at once: NODAD)
            except OSError:
                s.close()
                raise
        s.setblocking(False)
        self._sockets[key] = s
        return s

    def prepare(self) -> None:
        """Open the AF_PACKET sockets of the IPv4 VIPs now. Call it before opening any socket
        whose close must be prompt when the process dies: closing an AF_PACKET socket waits for an
        RCU grace period (packet_release -> synchronize_net, several ms), and a dying process
        releases its files last-opened first. Opened first, they are released last, so a
        SIGKILLed agent's links send their FIN (the backup's instant crash detection) and its
        guard sees EOF before that wait, not after it. (IPv6 sockets bind the VIP itself, so
        they are opened when it is held; their close does not wait.)"""
        for spec in self.specs:
            if isinstance(spec.ip.ip, ipaddress.IPv4Address):
                try:
                    self._socket(spec)
                except OSError as e:
                    log.warning("cannot open the GARP socket on %s: %s", spec.interface, e)

    def _frames(self) -> list[tuple[VipSpec, socket.socket, bytes, tuple[object, ...] | None]]:
        out: list[tuple[VipSpec, socket.socket, bytes, tuple[object, ...] | None]] = []
        macs: dict[str, bytes] = {}
        for spec in self.specs:
            ip = spec.ip.ip
            try:
                mac = macs.get(spec.interface) or macs.setdefault(
                    spec.interface, read_mac(spec.interface)
                )
                sock = self._socket(spec)
            except OSError as e:
                log.warning("cannot announce %s on %s: %s", spec.address, spec.interface, e)
                continue
            if isinstance(ip, ipaddress.IPv4Address):
                out.append((spec, sock, garp_frame(mac, ip), None))
            else:
                dest = (ALL_NODES, 0, 0, self._ifindex(spec.interface))
                out.append((spec, sock, na_message(mac, ip), dest))
        return out

    async def announce(self, after_first: Callable[[], None] | None = None) -> None:
        """``garp_count`` announcements per VIP, ``garp_interval`` apart; the first at once.
        ``after_first`` runs once the first round is out (the peers know where the VIPs are)."""
        frames = self._frames()
        if not frames:
            return
        rounds = max(spec.garp_count for spec, *_ in frames)
        for n in range(rounds):
            if n:
                await asyncio.sleep(
                    min(spec.garp_interval for spec, *_ in frames if spec.garp_count > n)
                )
            for spec, sock, frame, dest in frames:
                if n >= spec.garp_count:
                    continue
                try:
                    if dest is None:
                        sock.send(frame)
                    else:
                        sock.sendto(frame, dest)
                except OSError as e:  # ENOBUFS, interface down: the next round may pass
                    log.warning("announce %s: %s", spec.address, e)
            if n == 0 and after_first is not None:
                after_first()
