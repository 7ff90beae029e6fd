"""Local restarts of our speaker through the replication journal, with a real BIRD and a real FRR
as peers: the master is SIGKILLed while BIRD streams updates, the hot standby continues the same
TCP connections (same sockets, passed over a unix socket) without an OPEN. Afterwards the peers'
own views show the sessions never went down, nothing learnt from us was withdrawn, and our RIB
equals what the peers announce."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from nonstop.bench.bgp import BirdPeer, FrrPeer, wait_for
from nonstop.lab import Lab, LabProcess, Topology

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]
RESTARTS = int(os.environ.get("NONSTOP_BGP_RESTARTS", "20"))

CONFIG = """
asn = 65001
router_id = "10.77.0.11"
listen = "10.77.0.11"
api_socket = "@DIR@/bgp.sock"
replica_socket = "@DIR@/replica.sock"

[[peers]]
name = "bird"
address = "10.77.0.12"
asn = 65002
hold_time = 9
connect_retry = 1
md5_password = "birdpw"
next_hop6 = "fd77::11"

[[peers]]
name = "frr"
address = "10.77.0.13"
asn = 65003
hold_time = 9
connect_retry = 1
next_hop6 = "fd77::11"

[[originate]]
prefix = "10.77.100.0/24"

[[originate]]
prefix = "fd77:100::/48"
"""

STREAM = [f"10.77.{80 + i}.0/24" for i in range(8)]


def topology() -> Topology:
    topo = Topology(source="<bgp restart>")
    topo.channel("lan", v4="10.77.0.0/24", v6="fd77::/64")
    for name, n in (("a", 11), ("b", 12), ("c", 13)):
        topo.host(name, channels={"lan": n})
    return topo


class Node:
    """Our speaker processes in host a: one master, one standby at a time."""

    def __init__(self, lab: Lab) -> None:
        self.host = lab.host("a")
        self.dir = self.host.workdir / "speaker"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "bgp.toml"
        self.config.write_text(CONFIG.replace("@DIR@", str(self.dir)))
        self.n = 0

    def start(self, standby: bool) -> LabProcess:
        self.n += 1
        argv = [sys.executable, "-m", "nonstop", "-v", "bgp", "speaker", "--config", self.config]
        return self.host.run(argv + (["--standby"] if standby else []), name=f"speaker{self.n}")

    def get(self, path: str) -> dict:
        from nonstop.bgp.cli import fetch

        return fetch(str(self.dir / "bgp.sock"), path)

    def summary(self) -> dict | None:
        try:
            return self.get("/summary")
        except (OSError, RuntimeError):
            return None


@pytest.fixture
def world() -> Iterator[tuple[Lab, BirdPeer, FrrPeer, Node]]:
    lab = Lab(topology()).up()
    try:
        bird = BirdPeer(lab.host("b"), asn=65002, router_id="10.77.0.12")
        bird.write_config(
            [{"name": "ours", "local": "10.77.0.12", "address": "10.77.0.11", "asn": 65001,
              "password": "birdpw", "next_hop6": "fd77::12", "hold": 9}],
            static4=["10.77.50.0/24", "10.77.51.0/24"], static6=["fd77:50::/48"],
            extra="protocol static stream { ipv4; " + " ".join(
                f"route {p} blackhole;" for p in STREAM) + " }")
        frr = FrrPeer(lab.host("c"), asn=65003, router_id="10.77.0.13", listen="10.77.0.13")
        frr.write_config([{"address": "10.77.0.11", "asn": 65001}],
                         networks4=["10.77.60.0/24"], networks6=["fd77:60::/48"])
        bird.start()
        frr.start()
        yield lab, bird, frr, Node(lab)
    finally:
        problems = lab.down()
        assert not problems, problems


def test_local_restarts_keep_sessions(world: tuple[Lab, BirdPeer, FrrPeer, Node]) -> None:
    _, bird, frr, node = world
    master = node.start(standby=False)
    wait_for(lambda: (s := node.summary()) and all(p["state"] == "established"
                                                    for p in s["peers"]), 20, "sessions")
    standby = node.start(standby=True)
    wait_for(lambda: (s := node.summary()) and s["standbys"] == 1, 10, "standby joined")
    wait_for(lambda: "10.77.100.0/24" in frr.routes("ipv4") and
             "10.77.50.0/24" in frr.routes("ipv4"), 10, "routes at FRR")
    bird_since = bird.protocol("ours")["since"]
    frr_before = frr.neighbour("10.77.0.11")
    assert frr_before["connectionsEstablished"] == 1

    stop = threading.Event()

    def stream() -> None:  # BIRD keeps announcing and withdrawing while we restart
        on = True
        while not stop.is_set():
            bird.cli("disable" if on else "enable", "stream")
            on = not on
            time.sleep(0.15)
        bird.cli("enable", "stream")

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    takeovers = []
    try:
        for _ in range(RESTARTS):
            killed = time.monotonic()
            master.kill()
            master.reap()
            pid = standby.pid
            try:
                s = wait_for(lambda: (x := node.summary()) and x["pid"] == pid and x,  # noqa: B023
                             10, "standby took over")
            except TimeoutError:
                print(standby.output()[-3000:])
                raise
            tk = s["takeover"]
            if tk["resets"] or sorted(tk["resumed"]) != ["bird", "frr"]:
                print("--- killed master ---", master.output()[-4000:], sep="\n")
                print("--- standby ---", standby.output()[-6000:], sep="\n")
            assert tk["resets"] == 0 and sorted(tk["resumed"]) == ["bird", "frr"], tk
            takeovers.append((tk["resumed_at"] - killed) * 1000)
            master, standby = standby, node.start(standby=True)
            wait_for(lambda: (x := node.summary()) and x["standbys"] == 1, 10, "new standby")
    finally:
        stop.set()
        t.join()
    print(f"\n{RESTARTS} local restarts: takeover ms (SIGKILL -> sessions resumed) "
          f"max {max(takeovers):.1f}, median {sorted(takeovers)[len(takeovers) // 2]:.1f}")

    # the peers' own view: the session never went down
    time.sleep(1.0)
    p = bird.protocol("ours")
    assert p["info"].startswith("Established") and bird.same_since(p["since"], bird_since), p
    n = frr.neighbour("10.77.0.11")
    assert n["bgpState"] == "Established"
    assert n["connectionsEstablished"] == 1 and n["connectionsDropped"] == 0
    assert n["messageStats"]["notificationsRecv"] == 0
    assert n["messageStats"]["notificationsSent"] == 0
    # nothing learnt from us was withdrawn at BIRD (it imports only our two originated routes)
    st = bird.stats("ours")
    assert st["ipv4"]["import_withdraws"] == 0 and st["ipv6"]["import_withdraws"] == 0
    # our RIB equals what the peers announce, and FRR still has everything through us
    want = {"10.77.50.0/24", "10.77.51.0/24", "fd77:50::/48", "10.77.60.0/24",
            "fd77:60::/48", "10.77.100.0/24", "fd77:100::/48", *STREAM}
    rib = wait_for(lambda: (r := {x["prefix"] for x in node.get("/routes")["routes"]})
                   == want and r, 10, "our RIB equal to the peers' tables")
    assert rib == want
    f4 = wait_for(lambda: (r := frr.routes("ipv4")) and set(STREAM) <= set(r) and r, 10,
                  "stream routes at FRR")
    assert "10.77.100.0/24" in f4 and "10.77.50.0/24" in f4
    assert master.alive and standby.alive
