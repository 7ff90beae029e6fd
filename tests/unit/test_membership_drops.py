"""Datagrams the membership core must refuse: dropped and counted, no event, no exception."""

from __future__ import annotations

import logging

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nonstop.common import LocalProtocolError, Role
from nonstop.config import AgentConfig
from nonstop.membership import (
    MAGIC,
    Membership,
    MembershipConfig,
    PeerJoined,
    PeerStateChanged,
    StationRow,
)

KEY = bytes(range(32))
T0 = 500.0
INTERVAL = 0.01
DROPS = ("malformed", "bad_version", "bad_auth", "replay", "stale", "wrong_group",
         "unknown_peer", "wrong_channel", "looped_back")  # fmt: skip


def make(node: str, peers: dict[str, tuple[str, ...]] | None = None, **kw: object) -> Membership:
    cfg = MembershipConfig(
        node_id=node,
        group=kw.pop("group", 1),  # type: ignore[arg-type]
        interval=INTERVAL,
        dead_after=3,
        channels=("lan", "hb"),
        peers=peers or {("node-b" if node != "node-b" else "node-a"): ("lan", "hb")},
    )
    return Membership(cfg, key=kw.pop("key", KEY), incarnation=kw.pop("incarnation", 1), now=T0)  # type: ignore[arg-type]


def ticks(m: Membership, n: int, start: float = T0) -> list[dict[str, bytes]]:
    """n heartbeat ticks of ``m``, as {channel: datagram} (to its only peer)."""
    out = []
    for i in range(n):
        out.append({o.channel: o.data for o in m.datagrams_to_send(start + i * INTERVAL)})
    return out


def snapshot(m: Membership, now: float) -> tuple[list[StationRow], object, int]:
    return m.table(now), m.peer("node-a"), m.counters["rx_ok"]


def drops(m: Membership) -> dict[str, int]:
    return {k: v for k, v in m.counters.items() if k in DROPS and v}


def refused(m: Membership, data: bytes, channel: str, counter: str, now: float = T0) -> None:
    before, before_drops = snapshot(m, now), dict(m.counters)
    m.receive_datagram(data, channel, now)
    assert m.next_event() is None
    assert snapshot(m, now) == before
    assert m.counters[counter] == before_drops[counter] + 1


def joined_pair() -> tuple[Membership, Membership, list[dict[str, bytes]]]:
    a, b = make("node-a"), make("node-b")
    beats = ticks(a, 300)
    b.receive_datagram(beats[0]["lan"], "lan", T0)
    assert isinstance(b.next_event(), PeerJoined)
    return a, b, beats


def test_forged_with_another_key() -> None:
    _, b, _ = joined_pair()
    forger = make("node-a", key=b"x" * 32)
    forger.set_local(Role.MASTER, 255)
    for _ in range(5):
        forger.datagrams_to_send(T0)  # move its seq past the real one
    data = ticks(forger, 1, T0 + 1)[0]["lan"]
    refused(b, data, "lan", "bad_auth")
    view = b.peer("node-a")
    assert view is not None and view.role is Role.INIT


def test_replayed_same_bytes_and_old_seq() -> None:
    _, b, beats = joined_pair()
    refused(b, beats[0]["lan"], "lan", "rx_duplicate")
    for i in range(1, 300):
        b.receive_datagram(beats[i]["lan"], "lan", T0 + i * INTERVAL)
    assert b.next_event() is None
    refused(b, beats[10]["lan"], "lan", "replay", T0 + 3)  # older than the 256-seq window
    refused(b, beats[299]["lan"], "lan", "rx_duplicate", T0 + 3)


def test_old_incarnation_after_restart_is_a_replay() -> None:
    _, b, beats = joined_pair()
    a2 = make("node-a", incarnation=2)
    b.receive_datagram(ticks(a2, 1)[0]["hb"], "hb", T0 + 0.001)
    while b.next_event():
        pass
    refused(b, beats[5]["hb"], "hb", "replay", T0 + 0.002)
    refused(b, beats[6]["lan"], "lan", "replay", T0 + 0.002)  # its window never saw 2 yet


def test_every_prefix_is_dropped() -> None:
    _, b, beats = joined_pair()
    data = beats[1]["lan"]
    before = snapshot(b, T0)
    for n in range(len(data)):
        b.receive_datagram(data[:n], "lan", T0)
    assert b.next_event() is None and snapshot(b, T0) == before
    assert b.counters["malformed"] + b.counters["bad_auth"] == len(data)


@given(st.binary(max_size=200), st.sampled_from(["lan", "hb"]), st.booleans())
def test_random_bytes_fed_whole(data: bytes, channel: str, with_magic: bool) -> None:
    _, b, _ = joined_pair()
    if with_magic:
        data = MAGIC + b"\x01" + data
    before = snapshot(b, T0)
    b.receive_datagram(data, channel, T0)
    assert b.next_event() is None and snapshot(b, T0) == before
    assert sum(drops(b).values()) == 1


def test_wrong_channel() -> None:
    _, b, beats = joined_pair()
    refused(b, beats[1]["lan"], "hb", "wrong_channel")


def test_peer_not_configured_on_that_channel() -> None:
    a = make("node-a")
    b = make("node-b", peers={"node-a": ("lan",)})
    refused(b, ticks(a, 1)[0]["hb"], "hb", "wrong_channel")


def test_wrong_group() -> None:
    b = make("node-b")
    refused(b, ticks(make("node-a", group=2), 1)[0]["lan"], "lan", "wrong_group")


def test_unknown_peer() -> None:
    b = make("node-b")
    refused(b, ticks(make("node-c"), 1)[0]["lan"], "lan", "unknown_peer")


def test_own_heartbeat_looped_back() -> None:
    a = make("node-a")
    refused(a, ticks(a, 1)[0]["lan"], "lan", "looped_back")


def test_unknown_channel_name_is_the_adapters_bug() -> None:
    with pytest.raises(LocalProtocolError):
        make("node-b").receive_datagram(b"anything", "wifi", T0)


def test_reordered_older_heartbeat_does_not_undo_a_state_change() -> None:
    a, b = make("node-a"), make("node-b")
    a.set_local(Role.BACKUP, 100)
    t1, t2 = ticks(a, 2)
    a.set_local(Role.MASTER, 100)
    (t3,) = ticks(a, 1, T0 + 2 * INTERVAL)
    b.receive_datagram(t1["lan"], "lan", T0)
    b.receive_datagram(t3["lan"], "lan", T0 + 0.021)
    b.receive_datagram(t2["hb"], "hb", T0 + 0.022)  # late on hb, still says BACKUP
    events = [b.next_event(), b.next_event(), b.next_event()]
    assert isinstance(events[0], PeerJoined)
    assert events[1] == PeerStateChanged("node-a", Role.MASTER, 100, 0, Role.BACKUP, 100, 0)
    assert events[2] is None
    view = b.peer("node-a")
    assert view is not None and view.role is Role.MASTER and view.channels_up == ("lan", "hb")


def test_drops_are_logged_once_then_every_thousandth(caplog: pytest.LogCaptureFixture) -> None:
    b = make("node-b")
    with caplog.at_level(logging.WARNING, logger="nonstop.membership"):
        for _ in range(2001):
            b.receive_datagram(b"garbage", "lan", T0)
    assert b.counters["malformed"] == 2001
    assert [r.getMessage().split("(")[1].split(")")[0] for r in caplog.records] == [
        "malformed #1", "malformed #1000", "malformed #2000",
    ]  # fmt: skip


def test_local_misuse_raises() -> None:
    m = make("node-a")
    with pytest.raises(LocalProtocolError):
        m.link_closed("nobody", T0, "eof")
    with pytest.raises(LocalProtocolError):
        m.set_local(Role.MASTER, 256)
    with pytest.raises(LocalProtocolError):
        m.set_local(2, 100)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"channels": ()},
        {"channels": ("lan", "lan")},
        {"peers": {"node-a": ("lan",)}},
        {"peers": {"node-b": ("wifi",)}},
        {"peers": {"node-b": ()}},
        {"group": 70000},
        {"interval": 0},
        {"dead_after": 1},
        {"copies": 0},
        {"replay_window": 0},
        {"node_id": ""},
    ],
)
def test_bad_config_is_refused(change: dict) -> None:
    kw: dict = dict(node_id="node-a", channels=("lan", "hb"), peers={"node-b": ("lan", "hb")})
    with pytest.raises(ValueError):
        MembershipConfig(**{**kw, **change})


def test_short_key_is_refused() -> None:
    cfg = MembershipConfig(node_id="node-a", channels=("lan",), peers={"node-b": ("lan",)})
    with pytest.raises(ValueError):
        Membership(cfg, key=b"short", incarnation=1, now=T0)


def test_config_from_agent_config() -> None:
    agent = msgspec.convert(
        {
            "node": {"id": "node-a", "group": 9, "key_file": "k"},
            "channels": [
                {"name": "lan", "address": "10.77.1.1"},
                {"name": "hb", "address": "10.77.2.1"},
            ],
            "peers": [
                {"id": "node-b", "addresses": {"hb": "10.77.2.2", "lan": "10.77.1.2"}},
                {"id": "node-c", "addresses": {"lan": "10.77.1.3"}},
            ],
            "heartbeat": {"interval_ms": 20, "dead_after": 4, "copies": 2, "replay_window": 64},
        },
        AgentConfig,
    )
    cfg = MembershipConfig.from_agent_config(agent)
    assert (cfg.node_id, cfg.group, cfg.channels) == ("node-a", 9, ("lan", "hb"))
    assert cfg.peers == {"node-b": ("lan", "hb"), "node-c": ("lan",)}
    assert (cfg.interval, cfg.dead_after, cfg.copies, cfg.replay_window) == (0.02, 4, 2, 64)
    assert cfg.dead_interval == pytest.approx(0.08)


def test_link_closed_after_an_earlier_leave_still_quarantines_the_new_incarnation() -> None:
    a, b = make("node-a"), make("node-b")
    b.receive_datagram(ticks(a, 1)[0]["lan"], "lan", T0)
    a.leave(T0 + 0.005)
    b.receive_datagram(a.datagrams_to_send(T0 + 0.005)[0].data, "lan", T0 + 0.005)
    a2 = make("node-a", incarnation=2)
    beats = ticks(a2, 3, T0 + 0.1)
    b.receive_datagram(beats[0]["lan"], "lan", T0 + 0.1)
    b.link_closed("node-a", T0 + 0.101, "agent link closed")
    events = []
    while (ev := b.next_event()) is not None:
        events.append(type(ev).__name__)
    assert events == [
        "PeerJoined",
        "PeerLeft",
        "PeerLost",
        "PeerRestarted",
        "PeerJoined",
        "PeerLost",
    ]
    refused(b, beats[1]["lan"], "lan", "stale", T0 + 0.11)
