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
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nonstop.bench.bgp import BirdPeer, wait_for
from nonstop.bench.bgp_node import STREAM, BgpPair, bird_world, cluster, take_over
from nonstop.cluster import Cluster
from nonstop.lab import Lab

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]  # ~35 s quiet, ~100 s at load 10
TAKEOVERS = int(os.environ.get("NONSTOP_BGP_TAKEOVERS", "20"))
@pytest.fixture
def world(demo_lab: Lab, request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, BgpPair,
                                                                             BirdPeer]]:
    c = cluster(demo_lab)
    pair = BgpPair(c)
    try:
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
                master, tk, ms = take_over(c, pair, master)
            except TimeoutError:
                print(pair.summary(master), c.status(master), c.status(backup))
                raise
            backup = next(x for x in c.spec.nodes if x != master)
            assert tk["resets"] == 0 and tk["resumed"] == ["bird"], tk
            takeovers.append(ms)
            infos.append(tk)
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
