"""Two Membership endpoints over a fake link (h11 ConnectionPair style): no sockets, no sleeping.

The link moves datagrams between the endpoints with a delay, drops them per channel on demand and
drives time: it jumps straight to the next deadline (a timer or a delivery), so every assertion on
when something happened is exact.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import pytest

from nonstop.common import Role
from nonstop.membership import (
    FLAG_WITNESS_LEASE,
    ChannelFaulted,
    ChannelRecovered,
    Event,
    Membership,
    MembershipConfig,
    MsgType,
    Outgoing,
    PeerJoined,
    PeerLeft,
    PeerLost,
    PeerRestarted,
    PeerStateChanged,
    decode_heartbeat,
)

KEY = bytes(range(32))
T0 = 1000.0
INTERVAL = 0.010
DEAD = 3 * INTERVAL
CHANNELS = ("lan", "hb")


def make(
    node: str,
    peer: str,
    *,
    now: float = T0,
    incarnation: int = 1,
    copies: int = 1,
    group: int = 1,
    key: bytes = KEY,
) -> Membership:
    cfg = MembershipConfig(
        node_id=node,
        group=group,
        interval=INTERVAL,
        dead_after=3,
        copies=copies,
        replay_window=256,
        channels=CHANNELS,
        peers={peer: CHANNELS},
    )
    m = Membership(cfg, key=key, incarnation=incarnation, now=now)
    m.set_local(Role.BACKUP, 100, 0)
    return m


# (src, datagram, index of this datagram among those src sent on that channel) -> drop it?
DropRule = Callable[[str, Outgoing, int], bool]


class FakeLink:
    def __init__(self, *nodes: Membership, now: float = T0) -> None:
        self.nodes = {n.config.node_id: n for n in nodes}
        self.now = now
        self.delay = 0.0
        self.cut: set[str] = set()  # channels that drop everything, both ways
        self.drop: DropRule | None = None
        self._sent_on: dict[tuple[str, str], int] = {}
        self._queue: list[tuple[float, int, str, str, str, bytes]] = []
        self._n = 0
        self.events: list[tuple[float, str, Event]] = []
        self.delivered: list[tuple[float, str, str, str]] = []  # (t, src, dst, channel)
        self.sent: list[tuple[float, str, Outgoing]] = []

    def replace(self, node: Membership) -> None:
        self.nodes[node.config.node_id] = node

    def remove(self, node_id: str) -> None:
        del self.nodes[node_id]  # crashed: sends nothing, receives nothing

    def run_until(self, t_end: float) -> None:
        same = 0
        while True:
            times = [n.get_timer() for n in self.nodes.values()]
            if self._queue:
                times.append(self._queue[0][0])
            t = max(min(times), self.now)
            if t > t_end:
                break
            same = same + 1 if t == self.now else 0
            assert same < 100, f"no progress at t={t}"
            self.step(t)
        self.now = t_end

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def step(self, t: float) -> None:
        self.now = t
        while self._queue and self._queue[0][0] <= t:
            _, _, src, dst, channel, data = heapq.heappop(self._queue)
            if dst in self.nodes:
                self.delivered.append((t, src, dst, channel))
                self.nodes[dst].receive_datagram(data, channel, t)
        for node in self.nodes.values():
            node.handle_timer(t)
        for src, node in self.nodes.items():
            for out in node.datagrams_to_send(t):
                self.transmit(src, out, t)
        self.collect(t)

    def transmit(self, src: str, out: Outgoing, t: float) -> None:
        self.sent.append((t, src, out))
        k = (src, out.channel)
        index = self._sent_on[k] = self._sent_on.get(k, 0) + 1
        if out.channel in self.cut or (self.drop is not None and self.drop(src, out, index)):
            return
        self._n += 1
        heapq.heappush(self._queue, (t + self.delay, self._n, src, out.peer, out.channel, out.data))

    def collect(self, t: float) -> None:
        for node_id, node in self.nodes.items():
            while (ev := node.next_event()) is not None:
                self.events.append((t, node_id, ev))

    def events_of(self, node: str, since: float = -math.inf) -> list[tuple[float, Event]]:
        return [(t, e) for t, n, e in self.events if n == node and t >= since]

    def last_delivery(self, dst: str, channels: tuple[str, ...] = CHANNELS) -> float:
        return max(t for t, _, d, ch in self.delivered if d == dst and ch in channels)


def pair(**kw: object) -> tuple[FakeLink, Membership, Membership]:
    a = make("node-a", "node-b", now=T0, **kw)  # type: ignore[arg-type]
    b = make("node-b", "node-a", now=T0 + 0.0037, **kw)  # type: ignore[arg-type]
    link = FakeLink(a, b)
    link.run_until(T0 + 0.05)
    return link, a, b


def test_join_both_channels_up() -> None:
    link, a, b = pair()
    for me, other in ((a, "node-b"), (b, "node-a")):
        joined = [e for _, n, e in link.events if isinstance(e, PeerJoined) and e.peer == other]
        assert len(joined) == 1
        assert joined[0].role is Role.BACKUP and joined[0].priority == 100
        view = me.peer(other)
        assert view is not None and view.alive and view.channels_up == CHANNELS
        rows = me.table(link.now)
        assert [(r.peer, r.channel, r.state) for r in rows] == [
            (other, "lan", "up"),
            (other, "hb", "up"),
        ]
        assert all(r.last_heard is not None and 0 <= r.last_heard < INTERVAL for r in rows)
        assert all(r.loss == 0.0 and r.incarnation == 1 and r.role is Role.BACKUP for r in rows)
    assert [e for _, _, e in link.events if not isinstance(e, PeerJoined)] == []
    assert b.counters["rx_ok"] > 0 and b.counters["malformed"] == b.counters["bad_auth"] == 0


def test_heartbeats_every_interval_on_every_channel() -> None:
    link, a, _ = pair()
    times = sorted({t for t, src, _ in link.sent if src == "node-a"})
    assert times == pytest.approx([T0 + i * INTERVAL for i in range(len(times))], abs=1e-9)
    per_tick = [o.channel for t, src, o in link.sent if src == "node-a" and t == times[-1]]
    assert per_tick == ["lan", "hb"]
    assert a.counters["tx"] == 2 * len(times)


def test_one_channel_silent_is_a_channel_fault_not_a_peer_loss() -> None:
    link, a, b = pair()
    cut_at = link.now
    link.cut.add("hb")
    link.run_for(0.2)
    for me, node, other in ((a, "node-a", "node-b"), (b, "node-b", "node-a")):
        evs = link.events_of(node, since=cut_at)
        assert [e for _, e in evs] == [ChannelFaulted(other, "hb", "no heartbeat on hb for 30 ms")]
        assert evs[0][0] == pytest.approx(link.last_delivery(node, ("hb",)) + DEAD, abs=1e-9)
        view = me.peer(other)
        assert view is not None and view.alive and view.channels_up == ("lan",)
        assert [r.state for r in me.table(link.now)] == ["up", "down"]
        row = me.table(link.now)[1]
        assert row.loss is not None and row.loss > 0.5  # lan keeps counting what hb misses
    healed = link.now
    link.cut.clear()
    link.run_for(0.05)
    for node, other in (("node-a", "node-b"), ("node-b", "node-a")):
        assert [e for _, e in link.events_of(node, since=healed)] == [ChannelRecovered(other, "hb")]
    assert [r.state for r in b.table(link.now)] == ["up", "up"]


def test_all_channels_silent_peer_lost_exactly_at_dead_interval() -> None:
    link, _, b = pair()
    link.remove("node-a")  # node-a dies: nothing more on any channel
    last = link.last_delivery("node-b")
    link.run_until(last + DEAD - 1e-6)
    view = b.peer("node-a")
    assert view is not None and view.alive and link.events_of("node-b", since=last) == []
    link.run_for(0.1)
    evs = link.events_of("node-b", since=last)
    assert [e for _, e in evs] == [PeerLost("node-a", "no heartbeat on lan, hb for 30 ms")]
    assert evs[0][0] == last + DEAD  # exact: the link jumped to get_timer()
    view = b.peer("node-a")
    assert view is not None and not view.alive and view.channels_up == ()
    assert [r.state for r in b.table(link.now)] == ["down", "down"]


def test_a_freeze_of_the_whole_host_is_no_ones_silence() -> None:
    """Both nodes (namespaces of one VM) stop for 10 dead intervals. Each wakes, is told how
    long it did not run (the agent measures its loop's lateness) and declares nobody lost: the
    peer's next heartbeat comes within an interval. A peer that died before the freeze is found
    one freeze later than without it."""
    link, a, b = pair()
    t0 = link.now
    link.now = t0 + 10 * DEAD  # nothing ran: no timer, no datagram
    for m in (a, b):
        due = m.get_timer()
        m.stalled(link.now - due, link.now)
    link.run_for(0.2)
    assert [e for _, e in link.events_of("node-b", since=t0)] == []
    assert [e for _, e in link.events_of("node-a", since=t0)] == []
    assert b.stalls == 1 and b.stalled_s > 9 * DEAD
    # a peer that is gone: the freeze only postpones the verdict by its own length
    link.remove("node-a")
    last = link.last_delivery("node-b")
    b.stalled(0.05, link.now)
    link.run_until(last + DEAD + 0.05 - 1e-6)
    assert link.events_of("node-b", since=last) == []
    link.run_for(0.01)
    assert [type(e) for _, e in link.events_of("node-b", since=last)] == [PeerLost]


def test_channels_failing_one_after_the_other() -> None:
    link, _, _ = pair()
    t1 = link.now
    link.cut.add("hb")
    link.run_for(0.1)
    link.cut.add("lan")
    link.run_for(0.1)
    assert [type(e) for _, e in link.events_of("node-b", since=t1)] == [ChannelFaulted, PeerLost]
    t, lost = link.events_of("node-b", since=t1)[-1]
    assert t == pytest.approx(link.last_delivery("node-b", ("lan",)) + DEAD, abs=1e-9)
    assert isinstance(lost, PeerLost) and lost.reason == "no heartbeat on lan, hb for 30 ms"


def test_recovery_after_peer_lost_rejoins() -> None:
    link, _, b = pair()
    link.cut.update(CHANNELS)
    link.run_for(0.1)
    healed = link.now
    link.cut.clear()
    link.run_for(0.1)
    evs = [e for _, e in link.events_of("node-b", since=healed)]
    assert len(evs) == 1 and isinstance(evs[0], PeerJoined) and evs[0].peer == "node-a"
    assert [r.state for r in b.table(link.now)] == ["up", "up"]


def test_channel_never_heard_after_join_faults() -> None:
    a = make("node-a", "node-b")
    b = make("node-b", "node-a", now=T0 + 0.002)
    link = FakeLink(a, b)
    link.cut.add("hb")
    link.run_until(T0 + 0.1)
    evs = link.events_of("node-b")
    assert [type(e) for _, e in evs] == [PeerJoined, ChannelFaulted]
    (t_join, _), (t_fault, fault) = evs
    assert t_fault == pytest.approx(t_join + DEAD, abs=1e-9)
    assert isinstance(fault, ChannelFaulted) and fault.reason == (
        "no heartbeat on hb since node-a joined 30 ms ago"
    )


def test_link_closed_loses_the_peer_at_once_and_ignores_its_stragglers() -> None:
    link, _, b = pair()
    link.delay = 0.002
    link.run_for(0.05)
    now = link.now
    b.link_closed("node-a", now, "agent link to node-a closed (EOF)")
    assert b.next_event() == PeerLost("node-a", "agent link to node-a closed (EOF)")
    assert [r.state for r in b.table(now)] == ["down", "down"]
    link.run_for(DEAD - 0.001)  # node-a's heartbeats still arrive: same incarnation, ignored
    assert link.events_of("node-b", since=now) == []
    assert b.counters["stale"] > 0
    link.run_for(0.05)  # node-a really is alive: after one dead interval it may come back
    assert [type(e) for _, e in link.events_of("node-b", since=now)] == [PeerJoined]


def test_leave_is_a_graceful_loss_and_stops_sending() -> None:
    link, a, b = pair()
    now = link.now
    a.leave(now)
    assert a.get_timer() == now
    link.run_for(0.001)
    evs = link.events_of("node-b", since=now)
    assert [e for _, e in evs] == [PeerLeft("node-a", 1), PeerLost("node-a", "left")]
    assert evs[0][0] == now
    after = [o for t, src, o in link.sent if src == "node-a" and t >= now]
    leaves = [o for o in after if decode_heartbeat(o.data, KEY).type is MsgType.LEAVE]
    assert [o.channel for o in leaves] == ["lan", "hb"]
    assert b.counters["stale"] == 0  # the second LEAVE (on hb) is not a drop
    link.run_for(0.2)
    assert [o for t, src, o in link.sent if src == "node-a" and t > now] == []
    assert a.datagrams_to_send(link.now) == []
    assert len(link.events_of("node-b", since=now)) == 2  # never rejoins in that incarnation


def test_fast_restart_with_new_incarnation() -> None:
    link, _, b = pair()
    now = link.now
    link.replace(make("node-a", "node-b", now=now + 0.001, incarnation=2))
    link.nodes["node-a"].set_local(Role.INIT, 100, 0)
    link.run_for(0.05)
    evs = [e for _, e in link.events_of("node-b", since=now)]
    assert evs == [
        PeerRestarted("node-a", 1, 2),
        PeerStateChanged("node-a", Role.INIT, 100, 0, Role.BACKUP, 100, 0),
    ]
    view = b.peer("node-a")
    assert view is not None and view.alive and view.incarnation == 2


def test_slow_restart_is_lost_then_restarted_and_joined() -> None:
    link, _, _ = pair()
    link.remove("node-a")
    link.run_for(0.1)
    now = link.now
    link.replace(make("node-a", "node-b", now=now, incarnation=7))
    link.run_for(0.05)
    assert [type(e) for _, e in link.events_of("node-b")] == [
        PeerJoined,
        PeerLost,
        PeerRestarted,
        PeerJoined,
    ]
    assert link.events_of("node-b", since=now)[0][1] == PeerRestarted("node-a", 1, 7)


def test_state_change_sent_at_once() -> None:
    link, a, _ = pair()
    now = link.now + 0.001  # between two ticks
    link.run_until(now)
    a.set_local(Role.MASTER, 200, FLAG_WITNESS_LEASE)
    a.send_now()
    assert a.get_timer() <= now  # due at once
    link.run_until(now)
    assert link.events_of("node-b", since=now) == [
        (now, PeerStateChanged("node-a", Role.MASTER, 200, 1, Role.BACKUP, 100, 0))
    ]


def test_rtt_from_echoes_is_twice_the_one_way_delay() -> None:
    link, a, b = pair()
    link.delay = 0.002
    link.run_for(1.0)
    for me in (a, b):
        rows = me.table(link.now)
        assert [r.rtt_ms for r in rows] == [pytest.approx(4.0, abs=0.01)] * 2
        assert all(r.state == "up" and r.loss == 0.0 for r in rows)


def test_loss_fraction_with_every_tenth_datagram_dropped() -> None:
    link, _, b = pair()
    link.drop = lambda src, out, i: src == "node-a" and out.channel == "lan" and i % 10 == 0
    link.run_for(3.0)
    lan, hb = b.table(link.now)
    assert lan.loss == pytest.approx(0.1, abs=0.011) and hb.loss == 0.0
    assert lan.state == hb.state == "up"
    assert [e for _, e in link.events_of("node-b", since=T0 + 0.05)] == []


def test_k_plus_one_copies_survive_k_omissions() -> None:
    link, _, b = pair(copies=2)
    # Every other datagram on lan is lost: exactly one copy of each heartbeat.
    link.drop = lambda src, out, i: out.channel == "lan" and i % 2 == 0
    start = link.now
    dup_before = b.counters["rx_duplicate"]
    link.run_for(1.0)
    assert link.events_of("node-b", since=start) == []
    assert [r.state for r in b.table(link.now)] == ["up", "up"]
    assert b.table(link.now)[0].loss == 0.0
    hb_ticks = sum(1 for t, s, o in link.sent if s == "node-a" and o.channel == "hb" and t > start)
    # hb delivers both copies: one counted as a duplicate per heartbeat; lan none.
    assert b.counters["rx_duplicate"] - dup_before == hb_ticks // 2


def test_one_copy_is_not_enough_against_the_same_omissions() -> None:
    link, _, _ = pair(copies=1)
    link.drop = lambda src, out, i: out.channel == "lan" and i % 4 != 0  # 3 of 4 lost
    start = link.now
    link.run_for(1.0)
    assert ChannelFaulted in [type(e) for _, e in link.events_of("node-b", since=start)]


def test_schedule_does_not_drift_and_skips_missed_ticks() -> None:
    m = make("node-a", "node-b")
    assert m.get_timer() == T0
    assert len(m.datagrams_to_send(T0)) == 2
    assert m.datagrams_to_send(T0 + 0.005) == []
    assert m.get_timer() == pytest.approx(T0 + INTERVAL, abs=1e-9)
    assert len(m.datagrams_to_send(T0 + 0.0351)) == 2  # late: 0.01, 0.02, 0.03 missed, one sent
    assert m.get_timer() == pytest.approx(T0 + 0.04, abs=1e-9)
    for _ in range(10_000):
        m.datagrams_to_send(m.get_timer())
    assert m.get_timer() == pytest.approx(T0 + 10_004 * INTERVAL, abs=1e-9)


def test_peer_view_of_unknown_and_never_heard() -> None:
    m = make("node-a", "node-b")
    assert m.peer("nobody") is None
    view = m.peer("node-b")
    assert view is not None and not view.alive and view.role is None and view.channels_up == ()
    rows = m.table(T0)
    assert [(r.state, r.last_heard, r.rtt_ms, r.loss) for r in rows] == [
        ("unknown", None, None, None)
    ] * 2


def test_rtt_ignores_heartbeats_that_sat_in_a_queue() -> None:
    """During an outage the kernel queues heartbeats (e.g. waiting for ARP) and delivers them
    when the link comes back: their echoes were measured long before they arrived and must not
    become RTT samples."""
    link, _, b = pair()
    link.delay = 0.001
    link.run_for(1.0)
    # The outage starts just after b's last heartbeat reached a and before a answered it, so
    # a's first echo of it is one of the queued heartbeats.
    last_b = max(t for t, src, _ in link.sent if src == "node-b")
    link.run_until(last_b + INTERVAL + 0.0015)  # its next one, 1 ms in flight, then 0.5 ms
    end = link.now + 0.3
    link.drop = lambda src, out, i: src == "node-b"  # b's heartbeats are lost meanwhile
    while link.now < end - 0.01:
        link.delay = end - link.now  # a's sit in a queue until the link comes back at `end`
        link.run_for(0.01)
    link.drop, link.delay = None, 0.001
    worst = 0.0
    for _ in range(50):  # watch b's table while the queued heartbeats arrive
        link.run_for(0.01)
        worst = max(worst, *(r.rtt_ms or 0.0 for r in b.table(link.now)))
    assert worst < 3.0  # the true RTT is 2 ms; a queued echo would have added up to 300 ms
