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
window and TCP timestamp, one probe: the last byte this node sent, again (sequence number
``end - 1``, one byte). The peer holds it already (a duplicate: an immediate ACK with a D-SACK)
or is missing bytes before it (out of order: an immediate ACK too). Either way its ACK, now
reaching this node, tells the restored socket what the peer holds, and the stream moves. (The
kernel's own probe, an empty segment at ``snd_una - 1``, is out of the peer's window once the
peer acknowledged more than we saw: its answer is rate-limited to one per 500 ms per connection,
and the restore's own probe used that up.)

Not done: duplicate ACKs to make the peer resend what the dead master never acknowledged. Linux
with SACK counts SACKed segments, not bare duplicates, so for such a peer they change nothing
(only its own timeout resends), and at 10,000 connections they were 30,000 more segments at the
busiest moment. Connections with nothing in flight are not probed either: their next segment,
either way, carries everything.

The kernel's sockets are not touched: nothing races the service, which has them already. What
the segments carry comes from the master's tracking (``MasterSession``): the highest ACK that
left this node, the end and last byte of the stream it sent, the last window, and the socket's
current TSval (``TCP_TIMESTAMP``: never behind what the peer saw, or PAWS would drop them).
Connections signed with TCP-MD5 are left alone (an unsigned segment is dropped by the peer).
They leave marked (``SO_MARK`` ``KICK_MARK``), which the clamp's queue rule lets by: they carry
nothing the clamp has not seen, and thousands of them after a big takeover would each cost the
queue's Python path. The quiet rule has no such exception: a node that is
not master sends none.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from nonstop.session.nfnl import KICK_MARK
from nonstop.session.segment import ACK, set_checksum

__all__ = ["KickTarget", "kick_probe", "send_kicks"]

_TS = struct.Struct("!BBBBII")  # NOP NOP kind=8 len=10 TSval TSecr
_U32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class KickTarget:
    family: int  # 4 or 6
    local: tuple[str, int]  # the VIP and port
    peer: tuple[str, int]
    end: int  # after the last byte of our stream this node holds
    last: bytes  # that byte (b"": the peer acknowledged everything, any byte will do)
    ack: int  # the highest ACK that left this node
    window: int  # the raw (unscaled) window field of our last segment
    tsval: int | None  # the socket's current TCP timestamp; None: no timestamps


def kick_probe(t: KickTarget) -> bytes:
    """The probe, our last byte again (sequence number ``end - 1``), as a whole IP packet."""
    seq, payload = t.end - 1, t.last[-1:] or b"\0"
    opts = _TS.pack(1, 1, 8, 10, t.tsval & _U32, 0) if t.tsval is not None else b""
    tcp = struct.pack("!HHIIBBHHH", t.local[1], t.peer[1], seq & _U32, t.ack & _U32,
                      (20 + len(opts)) // 4 << 4, ACK, min(t.window, 0xFFFF), 0, 0)
    tcp += opts + payload
    if t.family == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP,
                         0, socket.inet_aton(t.local[0]), socket.inet_aton(t.peer[0]))
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64,
                         socket.inet_pton(socket.AF_INET6, t.local[0]),
                         socket.inet_pton(socket.AF_INET6, t.peer[0]))
    pkt = bytearray(ip + tcp)
    set_checksum(pkt)
    return bytes(pkt)


def send_kicks(targets: list[KickTarget]) -> int:
    """Send every target's probe from raw sockets in this network namespace; returns how many
    left (a full socket buffer or a route gone: that one is skipped)."""
    socks: dict[int, socket.socket] = {}
    sent = 0
    try:
        for t in targets:
            s = socks.get(t.family)
            if s is None:
                fam = socket.AF_INET if t.family == 4 else socket.AF_INET6
                s = socks[t.family] = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, KICK_MARK)  # past the clamp
            try:
                s.sendto(kick_probe(t), (t.peer[0], 0))
                sent += 1
            except OSError:
                continue
    finally:
        for s in socks.values():
            s.close()
    return sent
