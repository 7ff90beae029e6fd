"""Two sans-IO speakers over a fake link: session, routes both ways, policy, withdrawals,
route refresh, hold timer; and the replication journal (standby resumes with a KEEPALIVE)."""

from __future__ import annotations

from nonstop.bgp import Journal, Speaker, Standby, State
from nonstop.bgp.config import loads
from nonstop.bgp.fsm import ConnectRequested, SessionEstablished
from nonstop.bgp.journal import session_state
from nonstop.bgp.nlri import key_of, prefix_of
from nonstop.bgp.policy import PolicyConfig, PrefixEntry, Term
from nonstop.bgp.wire import KEEPALIVE_BYTES, Framer, MsgType

A = """
asn = 65001
router_id = "10.77.0.11"
[[peers]]
name = "b"
address = "10.77.0.12"
asn = 65002
hold_time = 9
next_hop6 = "fd77::11"
[[originate]]
prefix = "10.77.100.0/24"
communities = ["65001:7"]
[[originate]]
prefix = "fd77:100::/48"
"""

B = """
asn = 65002
router_id = "10.77.0.12"
[[peers]]
name = "a"
address = "10.77.0.11"
asn = 65001
passive = true
next_hop6 = "fd77::12"
[[originate]]
prefix = "10.77.200.0/24"
[[originate]]
prefix = "10.77.201.0/24"
"""


class Pair:
    """Speaker a (active, peer b) and b (passive, peer a) joined by a fake TCP connection."""

    def __init__(self, a_cfg: str = A, b_cfg: str = B) -> None:
        self.a = Speaker(loads(a_cfg))
        self.b = Speaker(loads(b_cfg))
        self.now = 100.0
        self.wire_ab = bytearray()  # everything a sent to b

    def connect(self) -> None:
        ev = self.a.start(self.now)
        assert any(isinstance(e.event, ConnectRequested) for e in ev)
        self.b.start(self.now)
        self.a.connection_made("b", self.now, "10.77.0.11")
        self.b.connection_made("a", self.now, "10.77.0.12")
        self.pump()

    def pump(self, a: Speaker | None = None) -> None:
        a = a or self.a
        for _ in range(20):
            ab = a.data_to_send("b")
            ba = self.b.data_to_send("a")
            if not ab and not ba:
                return
            self.wire_ab += ab
            if ab:
                self.b.receive_data("a", ab, self.now)
            if ba:
                a.receive_data("b", ba, self.now)

    def tick(self, dt: float, a: Speaker | None = None) -> None:
        a = a or self.a
        self.now += dt
        a.timer(self.now)
        self.b.timer(self.now)
        self.pump(a)


def prefixes(sp: Speaker, fam: tuple[int, int] = (1, 1)) -> set[str]:
    v = 4 if fam == (1, 1) else 6
    return {prefix_of(k, v) for k in sp.loc[fam]}


def test_session_and_routes_both_ways() -> None:
    p = Pair()
    p.connect()
    assert p.a.peers["b"].session.state == State.ESTABLISHED
    assert p.b.peers["a"].session.state == State.ESTABLISHED
    assert p.a.peers["b"].session.hold_time == 9  # min(9, 90)
    assert prefixes(p.b) == {"10.77.100.0/24", "10.77.200.0/24", "10.77.201.0/24"}
    assert prefixes(p.b, (2, 1)) == {"fd77:100::/48"}
    assert prefixes(p.a) == {"10.77.100.0/24", "10.77.200.0/24", "10.77.201.0/24"}
    _, k = key_of("10.77.100.0/24")
    path = p.b.loc[(1, 1)][k]
    assert path.attrs.as_path == ((2, (65001,)),)
    assert path.attrs.next_hop == bytes([10, 77, 0, 11])
    assert path.attrs.communities == (65001 << 16 | 7,)
    _, k6 = key_of("fd77:100::/48")
    assert p.b.loc[(2, 1)][k6].attrs.next_hop[:2] == b"\xfd\x77"


def test_withdraw_and_originate_later() -> None:
    p = Pair()
    p.connect()
    p.a.withdraw_originated("10.77.100.0/24", p.now)
    p.a.originate("10.77.101.0/24", (), 5, p.now)
    p.pump()
    assert "10.77.100.0/24" not in prefixes(p.b)
    _, k = key_of("10.77.101.0/24")
    assert p.b.loc[(1, 1)][k].attrs.med == 5


def test_import_policy_prefix_list_and_communities() -> None:
    p = Pair()
    p.connect()
    pol = PolicyConfig(terms=[
        Term(prefixes=[PrefixEntry("10.77.200.0/23", ge=24, le=24)], action="reject"),
        Term(add_communities=["65001:99"], local_pref=200),
    ])
    p.a.set_policy("b", "import", pol, p.now)  # sends ROUTE-REFRESH; b re-sends everything
    p.pump()
    assert p.b.peers["a"].session.counters.get("received_route_refresh") == 2  # v4 + v6
    assert prefixes(p.a) == {"10.77.100.0/24"}  # 200/24 and 201/24 rejected
    pol2 = PolicyConfig(terms=[Term(prefixes=[PrefixEntry("10.77.201.0/24")],
                                    add_communities=["65001:99"], local_pref=200)],
                        default="reject")
    p.a.set_policy("b", "import", pol2, p.now)
    p.pump()
    _, k = key_of("10.77.201.0/24")
    assert p.a.loc[(1, 1)][k].attrs.communities == (65001 << 16 | 99,)
    assert p.a.loc[(1, 1)][k].attrs.local_pref == 200


def test_export_policy_removes_community() -> None:
    p = Pair()
    p.connect()
    p.a.set_policy("b", "export", PolicyConfig(terms=[Term(communities=["65001:7"],
                                                           remove_communities=["65001:7"])]))
    p.pump()
    _, k = key_of("10.77.100.0/24")
    assert p.b.loc[(1, 1)][k].attrs.communities == ()


def test_keepalives_and_hold_timer() -> None:
    p = Pair()
    p.connect()
    for _ in range(10):
        p.tick(2.0)  # keepalive every 3 s keeps the 9 s hold timer alive
    assert p.a.peers["b"].session.state == State.ESTABLISHED
    # b goes silent: a's hold timer expires, NOTIFICATION 4/0, routes from b gone
    p.now += 9.5
    p.a.timer(p.now)
    assert p.a.peers["b"].session.state == State.IDLE
    assert prefixes(p.a) == {"10.77.100.0/24"}
    out = p.a.data_to_send("b")
    assert out[18] == MsgType.NOTIFICATION and out[19:21] == b"\x04\x00"


def test_standby_resumes_with_keepalive_only() -> None:
    p = Pair()
    j = Journal(p.a)
    p.connect()
    p.tick(2.0)
    p.tick(2.0)
    p.b.originate("10.77.202.0/24", (), None, p.now)
    p.pump()
    standby = Standby(loads(A))
    for rec in j.take():
        standby.apply(rec)
    assert session_state(standby.speaker) == session_state(p.a)
    assert {k: v.attrs for k, v in standby.speaker.loc[(1, 1)].items()} == \
        {k: v.attrs for k, v in p.a.loc[(1, 1)].items()}
    # the master dies; the standby takes over the same TCP stream
    before = len(p.wire_ab)
    p.now += 1.0
    resumed = standby.resume(p.now)
    assert [r.peer for r in resumed] == ["b"]
    assert resumed[0].tx_position == len(p.wire_ab) + len(KEEPALIVE_BYTES)
    out = standby.speaker.data_to_send("b")
    assert out == KEEPALIVE_BYTES  # no OPEN, nothing else
    p.wire_ab += out
    p.b.receive_data("a", out, p.now)
    # the peer parses the whole stream it saw as one session, never an OPEN after the first
    f = Framer()
    f.feed(bytes(p.wire_ab))
    kinds = [m[0] for m in f.messages()]
    assert kinds.count(MsgType.OPEN) == 1 and f.position == len(p.wire_ab) > before
    # and it carries on: routes both ways, timers
    p.b.originate("10.77.203.0/24", (), None, p.now)
    p.pump(standby.speaker)
    assert "10.77.203.0/24" in prefixes(standby.speaker)
    for _ in range(6):
        p.tick(2.0, standby.speaker)
    assert p.b.peers["a"].session.state == State.ESTABLISHED
    assert standby.speaker.peers["b"].session.state == State.ESTABLISHED


def test_established_event() -> None:
    p = Pair()
    p.a.start(p.now)
    p.b.start(p.now)
    p.a.connection_made("b", p.now, "10.77.0.11")
    p.b.connection_made("a", p.now, "10.77.0.12")
    ev = p.b.receive_data("a", p.a.data_to_send("b"), p.now)
    ev += p.a.receive_data("b", p.b.data_to_send("a"), p.now)
    ev += p.b.receive_data("a", p.a.data_to_send("b"), p.now)
    assert any(isinstance(e.event, SessionEstablished) for e in ev)


def test_standbys_chain_through_the_journal() -> None:
    """A standby that took over journals its takeover (RESUME): a later standby fed the whole
    history holds the same state as the new master, and can take over again."""
    p = Pair()
    j = Journal(p.a)
    p.connect()
    p.tick(2.0)
    p.b.originate("10.77.204.0/24", (), None, p.now)
    p.pump()
    history = j.take()
    s1 = Standby(loads(A))
    for rec in history:
        s1.apply(rec)
    j2 = Journal(s1.speaker, history=list(history))
    s1.resume(p.now + 0.5, written={"b": s1.written["b"]})
    p.pump(s1.speaker)
    s1.speaker.originate("10.77.105.0/24", (), None, p.now)
    p.pump(s1.speaker)
    assert "10.77.105.0/24" in prefixes(p.b)
    s2 = Standby(loads(A))
    for rec in j2.records:
        s2.apply(rec)
    assert session_state(s2.speaker) == session_state(s1.speaker)
    s2.resume(p.now + 1.0)
    assert s2.speaker.data_to_send("b") == KEEPALIVE_BYTES


def test_resume_skips_bytes_the_kernel_already_took() -> None:
    p = Pair()
    j = Journal(p.a)
    p.connect()
    # the master produced an UPDATE, the kernel took it, the master died before journaling it
    p.a.originate("10.77.106.0/24", (), None, p.now)
    data = p.a.data_to_send("b", journal=False)
    s = Standby(loads(A))
    for rec in j.take():
        s.apply(rec)
    written = s.written["b"] + len(data)
    s.resume(p.now, written={"b": written})
    assert s.speaker.data_to_send("b") == KEEPALIVE_BYTES  # the UPDATE is not sent twice
