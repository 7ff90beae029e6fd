"""The kick after a takeover (``nonstop.session.kick``): once the VIP answers on the new node, a
window probe from a raw socket makes the peer acknowledge at once what the restored socket holds
in flight, and the connection moves again without waiting for its first retransmit timeout.

One process plays every node (``nsops.in_netns``), as in test_repair.py. a sends 40 KB while
the peer's ACKs never reach it: its first flight reaches the peer, the rest waits in a's queue.
The socket moves to b the way a promotion does it: restored before the VIP is added (its
repair-off window probe is answered towards a and lost), then the VIP and the peer's neighbour
entry. b sends the flight again at repair off (a duplicate for the peer, whose ACKs go to a),
and its new bytes wait behind it (congestion window full) until the kick, or until b's first
retransmit timeout (~1 s).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import pytest
from movelab import movelab_lab  # noqa: F401  (the ``lab`` fixture)

from nonstop.lab import Lab
from nonstop.lab.nsops import in_netns
from nonstop.session import close_silently, dump, restore
from nonstop.session.kick import FLIGHT_SEGMENTS, KickTarget, kick_segments, send_kicks
from nonstop.session.segment import checksum_ok

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

VIP, PORT = "10.77.0.100", 7010
_TCP_TIMESTAMP = 24


def _readable_within(sock: socket.socket, secs: float) -> bool:
    return bool(select.select([sock], [], [], secs)[0])


def test_the_probe_carries_the_connections_numbers() -> None:
    big = b"y" * (FLIGHT_SEGMENTS * 1448) + b"z"  # one byte past what is sent again whole
    t = KickTarget(4, (VIP, PORT), ("10.77.0.1", 40000), end=50000, flight=big, ack=777,
                   window=512, tsval=123456, mss=1460)  # fmt: skip
    [probe] = kick_segments(t)
    tcp = probe[20:]
    sport, dport, s, a, off, flags, win = struct.unpack_from("!HHIIBBH", tcp)
    assert (sport, dport, s, a, flags, win) == (PORT, 40000, 49999, 777, 0x10, 512)
    assert off >> 4 == 8 and tcp[20:24] == b"\x01\x01\x08\x0a"
    assert struct.unpack_from("!I", tcp, 24)[0] == 123456
    assert tcp[32:] == b"z"  # our last byte again: the peer answers it at once
    assert checksum_ok(probe)
    [bare] = kick_segments(KickTarget(4, (VIP, PORT), ("10.77.0.1", 40000), end=5000,
                                      flight=b"", ack=777, window=512, tsval=None))  # fmt: skip
    assert bare[40:] == b"\0" and checksum_ok(bare)  # acknowledged already: any byte will do


def test_a_short_flight_is_sent_again_whole() -> None:
    """Up to FLIGHT_SEGMENTS segments the kick carries the flight itself, cut at the MSS less
    the options, the last segment pushed."""
    flight = os.urandom(3000)
    t = KickTarget(4, (VIP, PORT), ("10.77.0.1", 40000), end=8000, flight=flight, ack=777,
                   window=512, tsval=42, mss=1460)  # fmt: skip
    segs = kick_segments(t)
    assert len(segs) == 3
    got, seqs, flags = b"", [], []
    for pkt in segs:
        assert checksum_ok(pkt)
        tcp = pkt[20:]
        _, _, s, a, off, fl, _ = struct.unpack_from("!HHIIBBH", tcp)
        assert a == 777 and off >> 4 == 8
        seqs.append(s)
        flags.append(fl)
        got += tcp[32:]
    assert got == flight
    assert seqs == [5000, 5000 + 1448, 5000 + 2896]
    assert flags == [0x10, 0x10, 0x18]  # ACK, ACK, PSH|ACK


def _connected_to_a(lab: Lab) -> tuple[socket.socket, socket.socket]:
    """The VIP on a, and one connection from the peer to it: (the peer's socket, a's)."""
    lab.host("a").sh(f"ip addr add {VIP}/24 dev lan")
    listener = lab.host("a").socket(socket.AF_INET)
    listener.bind((VIP, PORT))
    listener.listen(1)
    p = lab.host("peer").socket(socket.AF_INET)
    p.connect((VIP, PORT))
    srv, _ = listener.accept()
    listener.close()
    return p, srv


def test_kick_moves_a_restored_flight_at_once(lab: Lab) -> None:
    peer, a, b = lab.host("peer"), lab.host("a"), lab.host("b")
    p, srv = _connected_to_a(lab)
    data = os.urandom(40_000)
    rule = f"OUTPUT -d {VIP} -p tcp -j DROP"  # the peer's ACKs never reach a
    peer.sh(f"iptables -I {rule}")
    try:
        srv.sendall(data)  # into the send buffer: a sends its first flight, then waits
        got = bytearray()
        while _readable_within(p, 0.2):
            got += p.recv(1 << 16)
        assert 0 < len(got) < len(data) and bytes(got) == data[: len(got)]
        a.sh(f"ip addr del {VIP}/24 dev lan")
        state = dump(srv, keep_repair=True)
        close_silently(srv)
        assert len(state.send_queue) == len(data), "want the whole flight unacknowledged"
        nsrv = in_netns(b.ns, restore, state)  # its window probe is answered towards a: lost
        time.sleep(0.05)
    finally:
        peer.sh(f"iptables -D {rule}")
    b.sh(f"ip addr add {VIP}/24 dev lan")
    mac = b.mac("lan")
    peer.sh(f"ip neigh replace {VIP} lladdr {mac} dev lan nud reachable")  # the GARP
    nsrv.send(b"more")  # behind the flight: the congestion window is full
    assert not _readable_within(p, 0.3), "the new bytes went without a kick: nothing to test"

    tsval = struct.unpack("I", nsrv.getsockopt(socket.IPPROTO_TCP, _TCP_TIMESTAMP, 4))[0]
    snd_nxt = state.snd_seq
    target = KickTarget(4, (VIP, PORT), (peer.addr("lan"), p.getsockname()[1]),
                        end=snd_nxt, flight=data, ack=state.rcv_seq,
                        window=state.window[3] >> state.rcv_wscale,
                        tsval=tsval if state.timestamps else None, mss=state.mss)  # fmt: skip
    t0 = time.monotonic()
    assert in_netns(b.ns, send_kicks, [target]) == 1
    want = data[len(got):] + b"more"
    rest = bytearray()
    while len(rest) < len(want) and _readable_within(p, 0.3):
        rest += p.recv(1 << 16)
    took = time.monotonic() - t0
    assert bytes(rest) == want, f"{len(rest)} of {len(want)} bytes after the kick"
    assert took < 0.3
    nsrv.sendall(b"and on")
    assert p.recv(10) == b"and on"
    p.close()
    nsrv.close()


def test_kick_delivers_a_short_flight_the_peer_never_had(lab: Lab) -> None:
    """A flight the peer never got (a dead master's send hold kept it back: queued, so sent as
    its kernel saw it), restored on b, where the restored socket's own copy dies in the clamp's
    standing rule (no queue bound yet, ``session.quiet``): the kick carries the flight itself,
    and the peer has it at once, not after b's first retransmit timer (~0.6 s or more)."""
    peer, a, b = lab.host("peer"), lab.host("a"), lab.host("b")
    unbound = f"OUTPUT -s {VIP} -p tcp --sport {PORT} -j NFQUEUE --queue-num 77"
    p, srv = _connected_to_a(lab)
    data = os.urandom(3000)
    a.sh(f"iptables -I {unbound}")
    try:
        srv.sendall(data)  # "sent": queued to nobody, dropped
        time.sleep(0.05)
        a.sh(f"ip addr del {VIP}/24 dev lan")
        state = dump(srv, keep_repair=True)
        close_silently(srv)
    finally:
        a.sh(f"iptables -D {unbound}")
    assert len(state.send_queue) == len(data) and not _readable_within(p, 0)
    b.sh(f"iptables -I {unbound}")
    try:
        nsrv = in_netns(b.ns, restore, state)  # its resent copy dies in the rule
        time.sleep(0.05)
    finally:
        b.sh(f"iptables -D {unbound}")
    b.sh(f"ip addr add {VIP}/24 dev lan")
    peer.sh(f"ip neigh replace {VIP} lladdr {b.mac('lan')} dev lan nud reachable")  # the GARP
    assert not _readable_within(p, 0.3), "the flight arrived without a kick: nothing to test"

    tsval = struct.unpack("I", nsrv.getsockopt(socket.IPPROTO_TCP, _TCP_TIMESTAMP, 4))[0]
    target = KickTarget(4, (VIP, PORT), (peer.addr("lan"), p.getsockname()[1]),
                        end=state.snd_seq, flight=data, ack=state.rcv_seq,
                        window=state.window[3] >> state.rcv_wscale,
                        tsval=tsval if state.timestamps else None, mss=state.mss)  # fmt: skip
    t0 = time.monotonic()
    assert in_netns(b.ns, send_kicks, [target]) == 3
    got = bytearray()
    while len(got) < len(data) and _readable_within(p, 0.3):
        got += p.recv(1 << 16)
    assert bytes(got) == data
    assert time.monotonic() - t0 < 0.3
    nsrv.sendall(b"and on")  # the peer's ACK for the flight reached the restored socket
    p.settimeout(2)
    assert p.recv(10) == b"and on"
    p.close()
    nsrv.close()
