"""Groups on a real 3-member etcd cluster (Debian etcd 3.4): 3 agent nodes, 3 groups, a peer.

One lab for the module (etcd start-up is the slow part); the scenarios run in order and each
leaves every group held again. An ARP watcher in the peer runs through every scenario: no VIP may
ever be answered by two MACs in one round. (TCP sessions across moves:
test_store_sessions.py; these tests check the VIP, mastership and fencing.)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest

from nonstop.cluster import STEADY_TIMERS
from nonstop.lab import Lab
from nonstop.store.lab import StoreCluster, store_topology

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[StoreCluster]:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    Lab.sweep_stale()
    lab = Lab(store_topology(3, 3)).up()
    c = StoreCluster(lab, nodes=3, groups=3, **STEADY_TIMERS)  # the box freezes
    try:
        c.start()
        c.wait_all_held(15)
        c.start_watch()
        yield c
        result = c.stop_watch()
        assert result["rounds"] > 100
        assert result["duals"] == [], f"the peer reached two VIP holders: {result['duals']}"
    except BaseException:
        for n in (*c.nodes, *c.etcd):
            print(f"----- {n}\n{c.log(n)[-3000:]}")
        raise
    finally:
        problems = lab.down()
        assert not problems


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, cluster: StoreCluster) -> Iterator[None]:
    """A failed scenario prints every node's and etcd member's log (the module's lab lives on,
    so its own teardown would print them only at the end, if at all)."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for n in (*cluster.nodes, *cluster.etcd):
            print(f"----- {n}\n{cluster.log(n)[-3000:]}")


def master_of(c: StoreCluster, group: str) -> str:
    return c.wait_all_held(10)[group][0]


def test_spread_and_status(cluster: StoreCluster) -> None:
    held = cluster.wait_all_held()
    assert {v[0] for v in held.values()} == set(cluster.nodes)  # one group each, by priority
    st = cluster.status()
    assert st is not None
    for g in st["groups"]:
        assert g["master"] == held[g["group"]][0]
        assert g["standby"] not in (None, g["master"])
        assert g["revision"] > 0
        assert g["held_here"] == (g["master"] == cluster.nodes[0])  # n1's agent says the same
        assert g["failsafe"] is False
    assert st["agent"]["running"] and st["store_error"] is None


def test_switchover(cluster: StoreCluster) -> None:
    old = master_of(cluster, "g0")
    target = next(n for n in cluster.nodes if n != old)
    r = cluster.lab.host(old).sh(
        f"{sys.executable} -m nonstop groups switchover g0 "
        f"--to {target} --format json --config {cluster.config_paths[old]}",
        check=False,
    )
    assert r.returncode == 0, r.stderr
    cluster.wait(lambda: cluster.holders()["g0"] == [target], 5, "g0 on the target")
    left = cluster.etcdctl("get", "/nonstop/lab/groups/g0/switchover", "-w", "json")
    assert '"kvs"' not in left.stdout, left.stdout  # the target cleared the request


def test_kill_master(cluster: StoreCluster) -> None:
    victim = master_of(cluster, "g1")
    cluster.procs[victim].kill()
    cluster.procs[victim].reap()
    t0 = time.monotonic()
    # the guard drops the VIP at once (EOF); the lease expires within TTL + etcd's 0.5 s sweep
    held = cluster.wait_all_held(8, exclude=(victim,))
    assert victim not in held["g1"]
    print(f"g1 moved from {victim} to {held['g1'][0]} in {time.monotonic() - t0:.2f} s")
    cluster.start_agent(victim)
    cluster.wait(lambda: victim in cluster.members(), 10, f"{victim} back")


def test_partition_master_from_etcd(cluster: StoreCluster) -> None:
    victim = master_of(cluster, "g2")
    faults = [cluster.lab.partition(victim, e) for e in cluster.etcd]
    try:
        # the others still reach etcd: the master leaves failsafe to them and drops its VIPs
        held = cluster.wait_all_held(10, exclude=(victim,))
        assert victim not in held["g2"]
        assert "still reaches the store" in cluster.log(victim)
    finally:
        for f in faults:
            f.heal()
    cluster.wait(lambda: victim in cluster.members(), 10, f"{victim} back")


def test_kill_etcd_leader(cluster: StoreCluster) -> None:
    leader = cluster.etcd_leader()
    assert leader is not None
    before = cluster.wait_all_held()
    cluster.procs[leader].kill()
    cluster.procs[leader].reap()
    time.sleep(2.0)  # election, lease renewals on the new leader
    held = cluster.wait_all_held(10)
    assert all(len(v) == 1 for v in held.values())
    print(f"after killing etcd leader {leader}: {before} -> {held}")
    cluster.start_etcd(leader)
    cluster.wait_etcd()


def test_quorum_lost_failsafe(cluster: StoreCluster) -> None:
    before = cluster.wait_all_held()
    victims = cluster.etcd[:2]
    for e in victims:
        cluster.procs[e].kill()
        cluster.procs[e].reap()
    try:
        time.sleep(2.5)  # every lease renewal fails; failsafe: every member hears every other
        if cluster.holders() != before:
            for n in cluster.nodes:
                print(f"----- {n}\n{cluster.log(n)[-2500:]}")
        assert cluster.holders() == before
        assert any("failsafe mode" in cluster.log(n) for n in cluster.nodes)
        m = before["g0"][0]
        st = cluster.status(m, store=False)  # no store: exit 1, the agent's own state shown
        assert st is not None and st["store_error"] and st["members"] is None
        assert {g["group"] for g in st["groups"] if g["failsafe"]} == set(st["agent"]["holding"])
        assert st["groups"][0]["failsafe"] and st["agent"]["failsafe"]
        # a member goes: the masters can no longer prove nobody else acts; they drop
        gone = cluster.nodes[0]
        cluster.procs[gone].kill()
        cluster.procs[gone].reap()
        cluster.wait(lambda: all(not v for v in cluster.holders().values()), 5, "all VIPs dropped")
    finally:
        for e in victims:
            cluster.start_etcd(e)
    cluster.wait_etcd()
    cluster.start_agent(cluster.nodes[0])
    cluster.wait_all_held(15)
