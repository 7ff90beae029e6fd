"""Provoke both ends of every restored connection once the VIP answers here.

A restored socket's window probe and resent bytes leave at repair off, before the VIP is added:
the peer's answers go to the old master's MAC and die there (a process kill) or wait in the
peer's neighbour queue (a node death). Meanwhile both ends back off: the peer retransmits what
the dead master never acknowledged after its RTO (200 ms, then 400, 800...), and the restored
socket, whose resent bytes were acknowledged into the void, after its own (1 s with no RTT
estimate, then 2, 4...). At 10,000 connections, whose promotion takes over a second, streams
stalled for 5-20 s this way.

So, right after the first gratuitous ARP, the new master sends the peer of each connection that
was restored with bytes in flight, from a raw socket, with the connection's own sequence numbers,
window and TCP timestamp (and its TCP-MD5 signature, if it has one):

- a flight of up to ``FLIGHT_SEGMENTS`` segments: the whole flight again, the bytes the peer
  has not acknowledged as far as this node saw. The restored socket's own copy of them died in
  the clamp's standing rules (``session.quiet``: its queue is bound only later), and bytes the
  backup held but the dead master never let out (its send hold) reached the peer after ~0.6 s,
  on the restored socket's retransmission timer: a SACK of the probe below covers a part of one
  of its segments, which Linux does not mark, so no fast retransmit followed. Bytes the peer
  has already are dropped there as duplicates; its ACK for all of them reaches this node;
- a longer flight: one probe, the last byte this node sent, again (sequence number ``end - 1``,
  one byte). The peer holds it already (a duplicate: an immediate ACK with a D-SACK) or is
  missing bytes before it (out of order: an immediate ACK too). Either way its ACK, now reaching
  this node, tells the restored socket what the peer holds, and the stream moves.

(The kernel's own probe, an empty segment at ``snd_una - 1``, is out of the peer's window once
the peer acknowledged more than we saw: its answer is rate-limited to one per 500 ms per
connection.)

Not done: duplicate ACKs to make the peer resend what the dead master never acknowledged. Linux
with SACK counts SACKed segments, not bare duplicates, so for such a peer they change nothing
(only its own timeout resends), and at 10,000 connections they were 30,000 more segments at the
busiest moment. Connections with nothing in flight are not probed either: their next segment,
either way, carries everything.

The kernel's sockets are not touched: nothing races the service, which has them already. What
the segments carry comes from the master's tracking (``MasterSession``): the highest ACK that
left this node, the end and last byte of the stream it sent, the last window, and the socket's
current TSval (``TCP_TIMESTAMP``: never behind what the peer saw, or PAWS would drop them).
They leave marked (``SO_MARK`` ``KICK_MARK``), which the clamp's queue rule lets by: they carry
nothing the clamp has not seen, and thousands of them after a big takeover would each cost the
queue's Python path. The quiet rule is that same rule with nobody bound, so it lets them by
too: only a master sends them (the worker answers the agent's kick and demote one after the
other, never both at once).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from nonstop.session.nfnl import KICK_MARK
from nonstop.session.segment import ACK, FIN, PSH, md5_sign, set_checksum

__all__ = ["FLIGHT_SEGMENTS", "FinTarget", "KickTarget", "deliver_fins", "fin_segment",
           "kick_segments", "send_kicks"]

FLIGHT_SEGMENTS = 10  # a flight up to this many segments is sent again whole (the initial cwnd)

_TS = struct.Struct("!BBBBII")  # NOP NOP kind=8 len=10 TSval TSecr
_U32 = 0xFFFFFFFF
_MD5_OPT = bytes([1, 1, 19, 18]) + bytes(16)  # NOP NOP MD5 (RFC 2385), digest filled by md5_sign


@dataclass(frozen=True, slots=True)
class KickTarget:
    family: int  # 4 or 6
    local: tuple[str, int]  # the VIP and port
    peer: tuple[str, int]
    end: int  # after the last byte of our stream this node holds
    flight: bytes  # the bytes before ``end`` the peer has not acknowledged (as this node saw)
    ack: int  # the highest ACK that left this node
    window: int  # the raw (unscaled) window field of our last segment
    tsval: int | None  # the socket's current TCP timestamp; None: no timestamps
    mss: int = 536  # the connection's MSS: the most payload and options per segment
    md5_key: bytes | None = None  # the connection's TCP-MD5 key, if it is signed


def _packet(family: int, src: tuple[str, int], dst: tuple[str, int], seq: int, ack: int,
            flags: int, window: int, opts: bytes, payload: bytes,
            md5_key: bytes | None = None) -> bytes:
    """A whole IP packet from ``src`` to ``dst`` with a valid checksum (and, given ``md5_key``,
    a TCP-MD5 signature)."""
    if md5_key is not None:
        opts += _MD5_OPT
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq & _U32, ack & _U32,
                      (20 + len(opts)) // 4 << 4, flags, min(window, 0xFFFF), 0, 0)
    tcp += opts + payload
    if family == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP,
                         0, socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64,
                         socket.inet_pton(socket.AF_INET6, src[0]),
                         socket.inet_pton(socket.AF_INET6, dst[0]))
    pkt = bytearray(ip + tcp)
    if md5_key is not None:
        md5_sign(pkt, md5_key)
    set_checksum(pkt)
    return bytes(pkt)


def kick_segments(t: KickTarget) -> list[bytes]:
    """What the kick sends on one connection, as whole IP packets: the flight again, in
    segments of at most the MSS (options counted), if it takes ``FLIGHT_SEGMENTS`` at most;
    else (or with nothing in flight) the probe, our last byte again (sequence number
    ``end - 1``; with everything acknowledged any byte will do)."""
    opts = _TS.pack(1, 1, 8, 10, t.tsval & _U32, 0) if t.tsval is not None else b""
    room = max(1, t.mss - len(opts) - (len(_MD5_OPT) if t.md5_key is not None else 0))
    flight = t.flight
    if not flight or len(flight) > FLIGHT_SEGMENTS * room:
        return [_packet(t.family, t.local, t.peer, t.end - 1, t.ack, ACK, t.window, opts,
                        flight[-1:] or b"\0", t.md5_key)]  # fmt: skip
    start = t.end - len(flight)
    out = []
    for off in range(0, len(flight), room):
        chunk = flight[off : off + room]
        flags = ACK | (PSH if off + len(chunk) == len(flight) else 0)
        out.append(_packet(t.family, t.local, t.peer, start + off, t.ack, flags, t.window,
                           opts, chunk, t.md5_key))  # fmt: skip
    return out


@dataclass(frozen=True, slots=True)
class FinTarget:
    """A restored connection whose peer half-closed: its FIN, as the peer sent it."""

    family: int  # 4 or 6
    local: tuple[str, int]  # the VIP and port
    peer: tuple[str, int]
    seq: int  # the FIN's sequence number (the restored socket's rcv_nxt)
    ack: int  # what the peer last acknowledged of our stream
    window: int  # the peer's last raw (unscaled) window field
    md5_key: bytes | None = None  # the connection's TCP-MD5 key, if it is signed


def fin_segment(t: FinTarget) -> bytes:
    """The peer's FIN again, from the peer's address to the VIP, as a whole IP packet. No
    timestamps option: Linux takes a segment without one (PAWS checks only those that carry
    one), and the peer's clock is not known here."""
    return _packet(t.family, t.peer, t.local, t.seq, t.ack, FIN | ACK, t.window, b"", b"",
                   t.md5_key)


def deliver_fins(targets: list[FinTarget]) -> int:
    """Hand each restored socket its peer's FIN (sent on this node, to the VIP, which must be
    here by now: the packet loops back through ``lo``). The socket moves to CLOSE_WAIT, its
    reader gets EOF after the bytes before it, and its ACK tells the peer, which may not have
    heard it from the dead master. Returns how many were sent."""
    return _send_raw((t.family, fin_segment(t), t.local[0]) for t in targets)


def send_kicks(targets: list[KickTarget]) -> int:
    """Send every target's segments from raw sockets in this network namespace; returns how
    many left (a full socket buffer or a route gone: that one is skipped)."""
    return _send_raw((t.family, pkt, t.peer[0]) for t in targets for pkt in kick_segments(t))


def _send_raw(packets: Iterable[tuple[int, bytes, str]]) -> int:
    """Send whole IP packets (family, packet, destination) from raw sockets in this network
    namespace, marked ``KICK_MARK`` (past the clamp's queue rule); returns how many left (a
    full socket buffer or a route gone: that one is skipped)."""
    socks: dict[int, socket.socket] = {}
    sent = 0
    try:
        for family, pkt, dst in packets:
            s = socks.get(family)
            if s is None:
                fam = socket.AF_INET if family == 4 else socket.AF_INET6
                s = socks[family] = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, KICK_MARK)
            try:
                s.sendto(pkt, (dst, 0))
                sent += 1
            except OSError:
                continue
    finally:
        for s in socks.values():
            s.close()
    return sent
