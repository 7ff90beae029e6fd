"""A commit is synced only once the backup's copy holds every byte it covers.

Seen at 10,000 connections: an outgoing segment was dropped in an NFQUEUE overflow, the next one
was captured (it waits in the sender, past the gap), and the service's commit covering both went
to the backup at once, ahead of the bytes. When the master died in that window the backup held a
commit past its copy and could not hand the connection over (433 of 10,000 reset). The master's
packet hooks are driven here directly, with parsed-looking segments, no queue.
"""

from __future__ import annotations

from nonstop.session.manager import MasterSession
from nonstop.session.segment import ACK, SYN, Segment, TcpOptions, seq_add

VIP, PORT, PEER, PPORT = "10.77.9.1", 7400, "10.77.9.2", 40000
ISS, IRS = 1000, 5000  # our initial sequence number, the peer's


def seg(*, out: bool, seq: int, ack: int, flags: int, length: int = 0,
        options: TcpOptions | None = None) -> Segment:  # fmt: skip
    src, dst, sport, dport = (VIP, PEER, PORT, PPORT) if out else (PEER, VIP, PPORT, PORT)
    return Segment(4, src, dst, sport, dport, seq, ack, flags, 65535, options or TcpOptions(),
                   20, 40, length)  # fmt: skip


def test_commit_waits_for_the_bytes_past_a_gap() -> None:
    m = MasterSession(VIP, PORT, b"k" * 32, backup=None, queue_num=99)
    try:
        opts = TcpOptions(mss=1460, wscale=7, sack_permitted=True)
        m._inbound(seg(out=False, seq=IRS, ack=0, flags=SYN, options=opts), b"")
        m._outbound(seg(out=True, seq=ISS, ack=IRS + 1, flags=SYN | ACK, options=opts), b"")
        ft = (VIP, PORT, PEER, PPORT)
        t = m._conns[ft]
        first, second = b"a" * 100, b"b" * 100
        base = seq_add(ISS, 1)
        # the first segment never reached the hook (queue overflow); the second did
        m._outbound(seg(out=True, seq=base + 100, ack=IRS + 1, flags=ACK, length=100), second)
        assert t.snd_nxt == base + 200  # the highest end seen
        m.commit_many([(ft, (0, 200, b"s"))])
        assert t.pending_commit is not None, "committed ahead of bytes the mirror lacks"
        # TCP sends the first one again: the gap is filled, the commit goes
        m._outbound(seg(out=True, seq=base, ack=IRS + 1, flags=ACK, length=100), first)
        assert t.pending_commit is None
        conn = m.sender.connections()[t.conn_id]
        assert conn.commit is not None and conn.commit.wpos == base + 200
        assert conn.snd_end == base + 200 and conn.snd_data.endswith(first + second)
    finally:
        m.close()
