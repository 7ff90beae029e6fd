"""Our speaker against a real BIRD 2 and a real FRR bgpd in one lab: sessions with TCP-MD5,
routes both ways (IPv4, IPv6), policy, withdrawals, route refresh, malformed UPDATEs from a test
client (RFC 7606), and golden captures of BIRD's and FRR's own messages.

Set NONSTOP_BGP_WRITE_FIXTURES=1 to rewrite tests/fixtures/bgp/*.json from the captures.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nonstop.bench.bgp import BirdPeer, FrrPeer, OurSpeaker, wait_for
from nonstop.bgp.attrs import AttrDecoder, _hdr
from nonstop.bgp.update import decode_update
from nonstop.bgp.wire import (
    Capabilities,
    Framer,
    MsgType,
    Notification,
    Open,
    decode_notification,
    encode_keepalive,
    encode_notification,
    encode_open,
    frame,
)
from nonstop.lab import Lab, Topology

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]
FIXTURES = Path(__file__).parent.parent / "fixtures" / "bgp"

OURS = """
asn = 65001
router_id = "10.77.0.11"
listen = "10.77.0.11"
api_socket = "@API@"
kernel_table = 100

[[peers]]
name = "bird"
address = "10.77.0.12"
asn = 65002
hold_time = 9
connect_retry = 1
md5_password = "birdpw"
next_hop6 = "fd77::11"
[[peers.import.terms]]
prefixes = [{prefix = "10.77.52.0/23", ge = 24, le = 24}]
action = "reject"
[[peers.import.terms]]
add_communities = ["65001:2"]
[[peers.export.terms]]
add_communities = ["65001:5"]

[[peers]]
name = "frr"
address = "10.77.0.13"
asn = 65003
hold_time = 9
connect_retry = 1
md5_password = "frrpw"
next_hop6 = "fd77::11"

[[peers]]
name = "client"
address = "10.77.0.14"
asn = 65004
passive = true
hold_time = 30
families = ["ipv4"]

[[originate]]
prefix = "10.77.100.0/24"
communities = ["65001:1"]

[[originate]]
prefix = "fd77:100::/48"
"""


def topology() -> Topology:
    topo = Topology(source="<bgp>")
    topo.channel("lan", v4="10.77.0.0/24", v6="fd77::/64")
    for name, n in (("a", 11), ("b", 12), ("c", 13), ("d", 14)):
        topo.host(name, channels={"lan": n})
    return topo


class World:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.bird = BirdPeer(lab.host("b"), asn=65002, router_id="10.77.0.12")
        self.bird.write_config(
            [{"name": "ours", "local": "10.77.0.12", "address": "10.77.0.11", "asn": 65001,
              "password": "birdpw", "next_hop6": "fd77::12", "hold": 9},
             {"name": "rec", "local": "10.77.0.12", "address": "10.77.0.14", "asn": 65004,
              "next_hop6": "fd77::12", "extra": "passive on;"}],
            static4=["10.77.50.0/24", "10.77.51.0/24", "10.77.52.0/24", "10.77.53.0/24"],
            static6=["fd77:50::/48"])
        self.frr = FrrPeer(lab.host("c"), asn=65003, router_id="10.77.0.13", listen="10.77.0.13")
        self.frr.write_config(
            [{"address": "10.77.0.11", "asn": 65001, "password": "frrpw"},
             {"address": "10.77.0.14", "asn": 65004}],
            networks4=["10.77.60.0/24"], networks6=["fd77:60::/48"])
        self.ours = OurSpeaker(lab.host("a"), OURS)
        self.bird.start()
        self.frr.start()
        self.ours.start()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    lab = Lab(topology()).up()
    try:
        w = World(lab)
        wait_for(lambda: w.bird.established("ours") and w.frr.established("10.77.0.11"), 20,
                 "BIRD and FRR sessions")
        yield w
    finally:
        problems = lab.down()
        assert not problems, problems


def test_sessions_established_with_md5(world: World) -> None:
    for name in ("bird", "frr"):
        r = world.ours.peer(name)
        assert r["state"] == "established" and r["md5"] is True
        assert r["hold_time"] == 9
    n = world.frr.neighbour("10.77.0.11")
    assert n["neighborCapabilities"]["4byteAs"] == "advertisedAndReceived"
    assert n["neighborCapabilities"]["gracefulRestart"] == "advertisedAndReceived"


def test_routes_both_ways_with_policy(world: World) -> None:
    want = {"10.77.50.0/24", "10.77.51.0/24", "10.77.60.0/24", "10.77.100.0/24",
            "fd77:50::/48", "fd77:60::/48", "fd77:100::/48"}
    rib = wait_for(lambda: (r := world.ours.routes()) and want <= set(r) and r, 10,
                   "routes from BIRD and FRR")
    assert "10.77.52.0/24" not in rib and "10.77.53.0/24" not in rib  # import prefix list
    assert rib["10.77.50.0/24"]["communities"] == ["65001:2"]  # import: add community
    assert rib["10.77.50.0/24"]["as_path"] == "65002"
    assert rib["fd77:50::/48"]["next_hop"] == "fd77::12"
    # BIRD: our route with our community + the export policy's, FRR's route through us
    b4 = wait_for(lambda: (r := world.bird.routes("master4")) and "10.77.60.0/24" in r and r,
                  10, "FRR's route at BIRD")
    assert "(65001,1)" in b4["10.77.100.0/24"] and "(65001,5)" in b4["10.77.100.0/24"]
    assert "65001 65003" in b4["10.77.60.0/24"]
    b6 = world.bird.routes("master6")
    assert "fd77:100::/48" in b6 and "fd77:60::/48" in b6
    # FRR: BIRD's routes through us (AS path 65001 65002), IPv4 and IPv6
    f4 = wait_for(lambda: (r := world.frr.routes("ipv4")) and "10.77.50.0/24" in r and r, 10,
                  "BIRD's route at FRR")
    assert f4["10.77.50.0/24"][0]["path"] == "65001 65002"
    assert "10.77.100.0/24" in f4 and "10.77.52.0/24" not in f4
    assert "fd77:50::/48" in world.frr.routes("ipv6")


def test_best_routes_installed_in_kernel_table(world: World) -> None:
    a = world.lab.host("a")

    def table(v: str) -> str:
        return a.sh(f"ip -{v} route show table 100 proto bgp").stdout

    wait_for(lambda: "10.77.50.0/24 via 10.77.0.12" in table("4"), 10, "kernel route")
    assert "10.77.60.0/24 via 10.77.0.13" in table("4")
    assert "10.77.52.0/24" not in table("4")  # rejected by import policy
    assert "10.77.100.0/24" not in table("4")  # ours: no next hop to install
    wait_for(lambda: "fd77:50::/48 via fd77::12" in table("6"), 10, "kernel IPv6 route")


def test_withdrawals_propagate(world: World) -> None:
    wait_for(lambda: "10.77.50.0/24" in world.frr.routes("ipv4"), 10, "route at FRR")
    world.bird.cli("disable", "s4")
    wait_for(lambda: "10.77.50.0/24" not in world.ours.routes(), 10, "withdrawal at ours")
    wait_for(lambda: "10.77.50.0/24" not in world.frr.routes("ipv4"), 10, "withdrawal at FRR")
    routes = world.lab.host("a").sh("ip route show table 100").stdout
    assert "10.77.50.0/24" not in routes and "10.77.60.0/24" in routes
    world.bird.cli("enable", "s4")
    wait_for(lambda: "10.77.50.0/24" in world.frr.routes("ipv4"), 10, "route back at FRR")


def test_route_refresh_both_ways(world: World) -> None:
    before = world.ours.peer("bird")["counters"].get("received_route_refresh", 0)
    world.bird.cli("reload", "in", "ours")  # BIRD asks us with ROUTE-REFRESH
    wait_for(lambda: world.ours.peer("bird")["counters"].get("received_route_refresh", 0)
             > before, 10, "ROUTE-REFRESH from BIRD")
    sent = world.ours.peer("frr")["counters"].get("received_route_refresh", 0)
    world.frr.vtysh("clear bgp 10.77.0.11 soft in")
    wait_for(lambda: world.ours.peer("frr")["counters"].get("received_route_refresh", 0)
             > sent, 10, "ROUTE-REFRESH from FRR")
    assert world.bird.established("ours") and world.frr.established("10.77.0.11")
    assert "10.77.100.0/24" in world.bird.routes("master4")


# -- a scripted peer -------------------------------------------------------------------------------


class Client:
    """A hand-driven BGP peer in host d (AS 65004) using our own codec."""

    def __init__(self, world: World, remote: str = "10.77.0.11", asn: int = 65004) -> None:
        self.sock = world.lab.host("d").socket()
        self.sock.settimeout(5)
        self.sock.bind(("10.77.0.14", 0))
        self.sock.connect((remote, 179))
        self.framer = Framer()
        caps = Capabilities(frozenset({(1, 1), (2, 1)}), asn, True, (0, 120))
        self.sock.sendall(encode_open(Open(asn, 30, "10.77.0.14", caps)))
        self.received: list[tuple[int, bytes]] = []

    def read(self, timeout: float = 2.0, until: int | None = None) -> list[tuple[int, bytes]]:
        deadline = time.monotonic() + timeout
        got: list[tuple[int, bytes]] = []
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                got.append((-1, b""))
                break
            self.framer.feed(data)
            for kind, body, _ in self.framer.messages():
                got.append((kind, bytes(body)))
                if until is not None and kind == until:
                    self.received += got
                    return got
        self.received += got
        return got

    def handshake(self) -> None:
        msgs = self.read(until=MsgType.KEEPALIVE)
        assert [k for k, _ in msgs][:2] == [MsgType.OPEN, MsgType.KEEPALIVE]
        self.sock.sendall(encode_keepalive())

    def send_update(self, attrs: bytes, nlri: bytes) -> None:
        self.sock.sendall(frame(MsgType.UPDATE, b"\0\0" + len(attrs).to_bytes(2, "big") + attrs
                                + nlri))

    def close(self) -> None:
        self.sock.close()


ORIGIN = _hdr(0x40, 1, b"\0")
PATH = _hdr(0x40, 2, bytes([2, 1]) + struct.pack("!I", 65004))
NH = _hdr(0x40, 3, socket.inet_aton("10.77.0.14"))


def pfx(p: str) -> bytes:
    a, n = p.split("/")
    return bytes([int(n)]) + socket.inet_aton(a)[: (int(n) + 7) // 8]


def test_malformed_updates_rfc7606(world: World) -> None:
    c = Client(world)
    try:
        c.handshake()
        c.send_update(ORIGIN + PATH + NH, pfx("10.77.70.0/24"))
        wait_for(lambda: "10.77.70.0/24" in world.ours.routes(), 5, "valid route")
        # treat-as-withdraw: malformed ORIGIN withdraws the route, the session stays up
        c.send_update(_hdr(0x40, 1, b"\7") + PATH + NH, pfx("10.77.70.0/24"))
        wait_for(lambda: "10.77.70.0/24" not in world.ours.routes(), 5, "treat-as-withdraw")
        # treat-as-withdraw: COMMUNITIES length 5
        c.send_update(ORIGIN + PATH + NH + _hdr(0xC0, 8, b"\0" * 5), pfx("10.77.71.0/24"))
        # attribute-discard: ATOMIC_AGGREGATE of length 1, the route is kept
        c.send_update(ORIGIN + PATH + NH + _hdr(0x40, 6, b"\0"), pfx("10.77.72.0/24"))
        wait_for(lambda: "10.77.72.0/24" in world.ours.routes(), 5, "attribute-discard")
        assert "10.77.71.0/24" not in world.ours.routes()
        assert all(k != MsgType.NOTIFICATION for k, _ in c.read(0.5))
        r = world.ours.peer("client")
        assert r["state"] == "established"
        assert r["counters"]["treat_as_withdraw"] == 2
        assert r["counters"]["attribute_discard"] == 1
        # session reset: an unrecognized well-known attribute -> NOTIFICATION 3/2
        c.send_update(ORIGIN + PATH + NH + _hdr(0x40, 99, b"x"), pfx("10.77.73.0/24"))
        msgs = c.read(3, until=MsgType.NOTIFICATION)
        n = decode_notification(msgs[-1][1])
        assert (msgs[-1][0], n.code, n.subcode) == (MsgType.NOTIFICATION, 3, 2)
    finally:
        c.close()
    # a second client: a malformed MP_REACH_NLRI -> NOTIFICATION 3/9; a bad marker -> 1/1
    for payload, code in (
        (ORIGIN + PATH + _hdr(0x80, 14, b"\0\2\1\5" + b"\0" * 6), (3, 9)),
        (None, (1, 1)),
    ):
        # after a reset the peer is Idle for idle_hold (1 s), then Active again: accept
        wait_for(lambda: world.ours.peer("client")["state"] == "active", 5, "client Active")
        c = Client(world)
        try:
            c.handshake()
            if payload is None:
                c.sock.sendall(b"\0" * 16 + b"\0\x13\x04")
            else:
                c.send_update(payload, b"")
            msgs = c.read(3, until=MsgType.NOTIFICATION)
            n = decode_notification(msgs[-1][1])
            assert (n.code, n.subcode) == code
        finally:
            c.close()
    # the speaker survived it all and kept the real peers
    assert world.ours.proc is not None and world.ours.proc.alive
    assert world.bird.established("ours") and world.frr.established("10.77.0.11")
    assert world.ours.peer("bird")["counters"].get("sent_notification", 0) == 0


# -- golden captures ------------------------------------------------------------------------------


def _record(world: World, remote: str, label: str) -> list[tuple[int, bytes]]:
    """Open a session to a real peer as AS 65004 and keep every message it sends."""
    c = Client(world, remote=remote)
    try:
        c.handshake()
        c.read(2.5)
        c.sock.sendall(encode_notification(Notification(6, 2)))
    finally:
        c.close()
    return c.received


def _describe(kind: int, body: bytes) -> dict[str, Any]:
    from nonstop.bgp.nlri import prefix_of
    from nonstop.bgp.wire import decode_open

    d: dict[str, Any] = {"type": MsgType(kind).name, "hex": (frame(kind, body)).hex()}
    if kind == MsgType.OPEN:
        o = decode_open(body)
        d["decoded"] = {"asn": o.asn, "hold_time": o.hold_time, "router_id": o.router_id,
                        "families": sorted(list(f) for f in o.caps.families),
                        "as4": o.caps.as4, "route_refresh": o.caps.route_refresh,
                        "graceful_restart": list(o.caps.graceful_restart or ()) or None}
    elif kind == MsgType.UPDATE:
        u = decode_update(body, AttrDecoder(as4=True, ebgp=True))
        a = u.attrs
        d["decoded"] = {
            "announced": sorted(prefix_of(k, 4 if f[0] == 1 else 6)
                                for f, ks in u.announced.items() for k in ks),
            "withdrawn": sorted(prefix_of(k, 4 if f[0] == 1 else 6)
                                for f, ks in u.withdrawn.items() for k in ks),
            "as_path": [[t, list(s)] for t, s in a.as_path] if a else None,
            "next_hop": (u.mp_next_hop or (a.next_hop if a else b"")).hex(),
            "communities": list(a.communities) if a else [],
            "withdraw_reason": u.withdraw_reason,
        }
    return d


@pytest.mark.parametrize("peer", ["bird", "frr"])
def test_capture_real_messages(world: World, peer: str) -> None:
    remote = "10.77.0.12" if peer == "bird" else "10.77.0.13"
    msgs = _record(world, remote, peer)
    kinds = [k for k, _ in msgs]
    assert kinds[0] == MsgType.OPEN and MsgType.KEEPALIVE in kinds and MsgType.UPDATE in kinds
    described = [_describe(k, b) for k, b in msgs if k > 0]
    announced = {p for d in described if d["type"] == "UPDATE"
                 for p in d["decoded"]["announced"]}
    own = {"bird": {"10.77.50.0/24", "fd77:50::/48"}, "frr": {"10.77.60.0/24", "fd77:60::/48"}}
    assert own[peer] <= announced
    assert "10.77.100.0/24" in announced  # learnt from us, passed on
    if os.environ.get("NONSTOP_BGP_WRITE_FIXTURES"):
        if peer == "bird":
            version = world.bird.cli("show", "status").splitlines()[0].replace(" ready.", "")
        else:
            version = world.frr.vtysh("show version").splitlines()[0]
        FIXTURES.mkdir(parents=True, exist_ok=True)
        (FIXTURES / f"{peer}-session.json").write_text(json.dumps(
            {"peer": version.strip(), "note": "messages the peer sent to AS 65004 at "
             "10.77.0.14 in tests/netns/test_bgp_peers.py", "messages": described},
            indent=1) + "\n")
