"""Takeovers of our BGP speaker by ANOTHER node, with a real BIRD as the peer (issue 5).

The demo lab: BIRD in ``peer`` connects to the VIP; a nonstop agent pair (node-a, node-b) and a
witness protect VIP:179; one speaker per node runs as the protected service (the master's serves
the session, the other's follows its journal over the hb channel). 20 times, while BIRD streams
updates: SIGKILL of the master's agent and speaker; the other node restores the TCP connection
(TCP_REPAIR) and its speaker continues the BGP session (no OPEN); the killed node comes back as
the backup, its new speaker catches up on the journal. Afterwards BIRD's own view: the session
never went down (state and since unchanged), nothing learnt from us withdrawn, our RIB equal to
what BIRD announces.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nonstop.bench.bgp import BirdPeer, wait_for
from nonstop.cluster import Cluster, ClusterSpec
from nonstop.lab import Lab, LabProcess

pytestmark = [pytest.mark.netns, pytest.mark.timeout(170)]
TAKEOVERS = int(os.environ.get("NONSTOP_BGP_TAKEOVERS", "20"))
VIP = "10.77.0.100"
JOURNAL_PORT = 1790
STREAM = [f"10.77.{80 + i}.0/24" for i in range(8)]

SPEAKER = """
asn = 65001
router_id = "{vip}"
listen = "{vip}"
api_socket = "{dir}/bgp-api.sock"
agent = "{agent}"
key_file = "{key}"
journal_listen = "{me}:{jport}"
journal_peer = "{other}:{jport}"

[[peers]]
name = "bird"
address = "10.77.0.1"
asn = 65002
passive = true
hold_time = 9
next_hop6 = "fd77::11"

[[originate]]
prefix = "10.77.100.0/24"

[[originate]]
prefix = "fd77:100::/48"
"""


class BgpPair:
    """The two speakers under the cluster; ``start(node)`` runs one (a standby on a backup)."""

    def __init__(self, c: Cluster, routes: list[str] | None = None) -> None:
        self.c = c
        self.procs: dict[str, LabProcess] = {}
        self.n = 0
        self.configs: dict[str, str] = {}
        nodes = c.spec.nodes
        for node in nodes:
            other = next(x for x in nodes if x != node)
            host = c.lab.host(node)
            d = host.workdir / "bgp"
            d.mkdir(parents=True, exist_ok=True)
            text = SPEAKER.format(vip=VIP, dir=d, agent=c.endpoint(node, "bgp"), key=c.key_path,
                                  me=host.addr("hb"), other=c.lab.host(other).addr("hb"),
                                  jport=JOURNAL_PORT)
            path = d / "speaker.toml"
            path.write_text(text)
            self.configs[node] = str(path)

    def start(self, node: str) -> LabProcess:
        self.n += 1
        path = self.c.endpoint(node, "bgp")
        self.c.wait(lambda: os.path.exists(path), 10.0, f"{path} to exist", poll=0.02)
        argv = [sys.executable, "-m", "nonstop", "-v", "bgp", "speaker", "--config",
                self.configs[node]]
        self.procs[node] = self.c.lab.host(node).run(argv, name=f"bgp-{node}-{self.n}")
        return self.procs[node]

    def summary(self, node: str) -> dict[str, Any] | None:
        from nonstop.bgp.cli import fetch

        try:
            return fetch(os.path.join(os.path.dirname(self.configs[node]), "bgp-api.sock"),
                         "/summary")
        except (OSError, RuntimeError, ValueError):
            return None

    def routes(self, node: str) -> set[str]:
        from nonstop.bgp.cli import fetch

        sock = os.path.join(os.path.dirname(self.configs[node]), "bgp-api.sock")
        return {r["prefix"] for r in fetch(sock, "/routes?limit=100000")["routes"]}

    def ready(self, master: str) -> bool:
        """The master's session is Established, the backup node holds a synced copy of the
        connection and the other speaker follows the whole journal."""
        s = self.summary(master)
        if not s or s.get("standbys") != 1 or \
                any(p["state"] != "established" for p in s["peers"]):
            return False
        other = next(x for x in self.c.spec.nodes if x != master)
        st, bt = self.c.status(master), self.c.status(other)
        if not st or not bt or not st["sessions"] or not bt["sessions"]:
            return False
        m, b = st["sessions"][0], bt["sessions"][0]
        return m["connections"] >= 1 and bool(m.get("sync", {}).get("protecting")) and \
            b.get("sync", {}).get("held_connections", 0) >= 1


def bird_world(lab: Lab, static4: list[str] | None = None,
               static_file: Any = None) -> BirdPeer:
    bird = BirdPeer(lab.host("peer"), asn=65002, router_id="10.77.0.1")
    bird.write_config(
        [{"name": "ours", "local": "10.77.0.1", "address": VIP, "asn": 65001,
          "next_hop6": "fd77::1", "hold": 9}],
        static4=static4 if static4 is not None else ["10.77.50.0/24", "10.77.51.0/24"],
        static6=["fd77:50::/48"], static_file=static_file,
        extra="protocol static stream { ipv4; " + " ".join(
            f"route {p} blackhole;" for p in STREAM) + " }")
    return bird


@pytest.fixture
def world(demo_lab: Lab, request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, BgpPair,
                                                                             BirdPeer]]:
    # 50 ms heartbeats: a 100 ms fence timeout (a SIGKILLed agent is detected at once anyway,
    # by its closed link), so a loaded box does not fence a healthy master
    c = Cluster(demo_lab, ClusterSpec(services={"bgp": 179}, preempt=False, interval_ms=50))
    c.start()
    pair = BgpPair(c)
    try:
        c.wait_ready(timeout=20)
        bird = bird_world(demo_lab)
        bird.start()
        yield c, pair, bird
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for n in c.spec.nodes:
                with contextlib.suppress(OSError):
                    print(f"----- agent log of {n}\n{c.log_text(n)[-6000:]}")
            for n, p in pair.procs.items():
                print(f"----- speaker on {n}\n{p.output()[-6000:]}")


def test_takeovers_to_the_other_node_keep_the_session(
        world: tuple[Cluster, BgpPair, BirdPeer]) -> None:
    c, pair, bird = world
    master = c.master()
    assert master is not None
    backup = next(x for x in c.spec.nodes if x != master)
    pair.start(master).wait_output("serving", 15)
    pair.start(backup).wait_output("standby", 15)
    try:
        wait_for(lambda: pair.ready(master), 30, "session established and protected")
    except TimeoutError:
        print(pair.summary(master), c.status(master), c.status(backup))
        raise
    wait_for(lambda: "10.77.100.0/24" in bird.routes("master4", "ours"), 10, "our route at BIRD")
    since = bird.protocol("ours")["since"]

    stop = threading.Event()

    def stream() -> None:  # BIRD keeps announcing and withdrawing while we take over
        on = True
        while not stop.is_set():
            bird.cli("disable" if on else "enable", "stream")
            on = not on
            time.sleep(0.15)
        bird.cli("enable", "stream")

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    takeovers: list[float] = []
    infos: list[dict[str, Any]] = []
    try:
        for _ in range(TAKEOVERS):
            try:
                wait_for(lambda: pair.ready(master), 20, "protected and followed")  # noqa: B023
            except TimeoutError:
                print(pair.summary(master), c.status(master), c.status(backup))
                raise
            killed = time.monotonic()
            c.procs[master].kill()
            pair.procs[master].kill()
            c.wait_role(backup, "master", timeout=5)
            pid = pair.procs[backup].pid
            s = wait_for(lambda: (x := pair.summary(backup)) and x["pid"] == pid and x,  # noqa: B023
                         10, "the standby took over")
            tk = s["takeover"]
            assert tk["resets"] == 0 and tk["resumed"] == ["bird"], tk
            takeovers.append((tk["resumed_at"] - killed) * 1000)
            infos.append(tk)
            pair.procs[master].reap()
            c.start_agent(master)  # the killed node comes back: backup, resynced
            c.wait_role(master, "backup", timeout=10)
            pair.start(master)
            master, backup = backup, master
    finally:
        stop.set()
        t.join()
    takeovers.sort()
    print(f"\n{TAKEOVERS} takeovers to the other node: SIGKILL -> KEEPALIVE written, ms: "
          f"median {takeovers[len(takeovers) // 2]:.1f}, max {takeovers[-1]:.1f}; "
          f"input bytes the standby had already (dropped from the restored stream): "
          f"{[i['skipped']['bird'] for i in infos]}; written bytes sent again: "
          f"{[i['resent']['bird'] for i in infos]}")

    # BIRD's own view: the session never went down
    time.sleep(1.0)
    p = bird.protocol("ours")
    assert p["info"].startswith("Established") and p["since"] == since, p
    st = bird.stats("ours")
    assert st["ipv4"]["import_withdraws"] == 0 and st["ipv6"]["import_withdraws"] == 0, st
    assert {"10.77.100.0/24"} <= set(bird.routes("master4", "ours"))
    want = {"10.77.50.0/24", "10.77.51.0/24", "fd77:50::/48", "10.77.100.0/24",
            "fd77:100::/48", *STREAM}
    rib = wait_for(lambda: (r := pair.routes(master)) == want and r, 10, "our RIB = BIRD's")
    assert rib == want
    s = pair.summary(master)
    assert s is not None and s["peers"][0]["counters"].get("received_open") == 1, s
    assert "received_notification" not in s["peers"][0]["counters"], s
