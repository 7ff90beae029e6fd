"""Just enough rtnetlink for VIPs: add, delete and list interface addresses, synchronously.

Why not pyroute2's ``IPRoute``: in pyroute2 0.9 the synchronous IPRoute runs its own asyncio loop
with ``run_until_complete`` on every call, which raises "Cannot run the event loop while another
loop is running" when called from the agent's asyncio loop (measured with 0.9.7). The agent must
add or drop a VIP synchronously inside its decision cycle, and the fence guard must start cheaply,
so this module speaks the three messages it needs over one AF_NETLINK socket. Each call is one
request and its ACK (~30-60 us in a namespace).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_NODAD = 0x02

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # len, type


def _attr(kind: int, data: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


@dataclass(frozen=True, slots=True)
class Address:
    index: int
    address: str  # compressed form
    prefixlen: int
    flags: int


class AddrSocket:
    """One NETLINK_ROUTE socket in the current network namespace (blocking, short calls)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def _request(self, kind: int, flags: int, body: bytes) -> int:
        self._seq += 1
        msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, self._seq, 0) + body
        self.sock.send(msg)
        return self._seq

    def _messages(self, seq: int):  # -> Iterator[tuple[int, int, bytes]]
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, kind, flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    raise OSError(errno.EBADMSG, "truncated netlink message")
                body = data[off + _NLMSGHDR.size : off + length]
                off += (length + 3) & ~3
                if mseq != seq:
                    continue  # a late answer to an earlier request
                yield kind, flags, body

    def _ack(self, seq: int) -> None:
        for kind, _flags, body in self._messages(seq):
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", body)
                if code:
                    raise OSError(-code, os.strerror(-code))
                return

    def _addr_msg(self, index: int, address: str, prefixlen: int, flags: int = 0) -> bytes:
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        body = _IFADDRMSG.pack(family, prefixlen, flags & 0xFF, 0, index)
        body += _attr(IFA_LOCAL, ip.packed) if ip.version == 4 else b""
        return body + _attr(IFA_ADDRESS, ip.packed)

    def add(self, index: int, address: str, prefixlen: int, flags: int = 0) -> None:
        """Add an address; raises OSError (EEXIST if it is there already)."""
        body = self._addr_msg(index, address, prefixlen, flags)
        if flags > 0xFF:
            body += _attr(IFA_FLAGS, struct.pack("=I", flags))
        self._ack(
            self._request(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)
        )

    def delete(self, index: int, address: str, prefixlen: int) -> None:
        """Delete an address; raises OSError (EADDRNOTAVAIL / ENOENT if it is not there)."""
        body = self._addr_msg(index, address, prefixlen)
        self._ack(self._request(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, body))

    def dump(self) -> list[Address]:
        """Every address of every interface."""
        seq = self._request(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, _IFADDRMSG.pack(0, 0, 0, 0, 0))
        out: list[Address] = []
        for kind, _flags, body in self._messages(seq):
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", body)
                raise OSError(-code, os.strerror(-code))
            if kind != RTM_NEWADDR or len(body) < _IFADDRMSG.size:
                continue
            family, prefixlen, hflags, _scope, index = _IFADDRMSG.unpack_from(body)
            attrs: dict[int, bytes] = {}
            off = _IFADDRMSG.size
            while off + _RTATTR.size <= len(body):
                alen, atype = _RTATTR.unpack_from(body, off)
                if alen < _RTATTR.size:
                    break
                attrs[atype] = body[off + _RTATTR.size : off + alen]
                off += (alen + 3) & ~3
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            flags = struct.unpack("=I", attrs[IFA_FLAGS])[0] if IFA_FLAGS in attrs else hflags
            addr = ipaddress.ip_address(raw).compressed
            out.append(Address(index, addr, prefixlen, flags))
        return out
