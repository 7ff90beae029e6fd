"""Real agents in network namespaces: the cluster core's "must show" list (issue 2).

Every test builds its own lab (peer, node-a, node-b, witness on channels lan + hb), starts the
agents and the witness as real processes, injects a fault, and checks what the peer can observe.
Timing asserts are generous bounds that catch a broken design, not benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from nonstop.cluster import PORT, Cluster, ClusterSpec
from nonstop.common import Role
from nonstop.lab.nsops import open_iproute

pytestmark = [pytest.mark.netns]

VIP = "10.77.0.100"


@pytest.fixture
def make_cluster(demo_lab, request) -> Iterator:
    made: list[Cluster] = []

    def make(**kw) -> Cluster:
        # 50 ms x 6 (a 250 ms fence, a 275 ms lease, 300 ms to declare a peer dead): these tests
        # check what the agents decide, not how fast. This CI's 2-CPU VMs freeze as a whole for
        # 50-470 ms at a time (timers late with no task in the way: the hypervisor); at 10 ms x 3
        # each freeze was a takeover in the middle of a test, and at 20 ms x 6 a 243 ms one let
        # a partitioned master's lease lapse. Freezes are ridden out now (rule 9 of
        # nonstop.failover.roles) when the witness answers, but not a lease lapsed in a
        # partition. The EOF of a dead agent's link is still seen at once; bench failover
        # measures the 10 ms heartbeats.
        kw = {"interval_ms": 50, "dead_after": 6, **kw}
        c = Cluster(demo_lab, ClusterSpec(**kw))
        c.start()
        c.wait_ready(timeout=20)
        made.append(c)
        return c

    yield make
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:  # pytest shows this teardown output with the failure
        for c in made:
            for n in (*c.spec.nodes, c.spec.witness):
                if n:
                    with contextlib.suppress(OSError):
                        print(f"----- log of {n}\n{c.log_text(n)[-4000:]}")


def dead(c: Cluster) -> float:
    """The dead interval of ``c``'s agents, in seconds."""
    return c.spec.interval_ms * c.spec.dead_after / 1000


def promoted_at(c: Cluster, node: str, after: float) -> dict | None:
    for h in c.history(node):
        if h["new"] == "master" and h["at_monotonic"] >= after:
            return h
    return None


def arp_answers(c: Cluster) -> dict[str, int]:
    """Every MAC that answers an ARP request for the VIP from the peer, over 100 ms."""
    r = c.lab.host("peer").sh(
        f"{sys.executable} -m nonstop.bench.probes arp --vip {VIP} --ifname lan --arp-ms 100"
    )
    return json.loads(r.stdout.strip().splitlines()[-1])["arp"]


class HolderWatch:
    """Reads which nodes hold the VIP, node after node, in a thread; ``max_holders`` is the most
    seen at once.

    Two reads are never at the same instant, and a loaded box can stall a thread between them
    for tens of ms. So a node counts as a holder at a read of another node only if its own reads
    just before and just after both found the VIP (the first reading of this test counted an
    old master read before its fence and the new master read after its promotion as two)."""

    def __init__(self, c: Cluster) -> None:
        self.c, self.reads, self.samples = c, [], 0
        self.nodes = list(c.spec.nodes)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        vip = self.c.spec.vip.split("/")[0]
        # opened in this thread: a pyroute2 socket belongs to the thread that made it
        ipr = {n: open_iproute(self.c.lab.host(n).ns) for n in self.nodes}
        try:
            while not self._stop.is_set():
                for n in self.nodes:
                    held = any(a.get_attr("IFA_ADDRESS") == vip for a in ipr[n].get_addr(family=2))
                    self.reads.append((n, held))
                self.samples += 1
                time.sleep(0.002)
        finally:
            for x in ipr.values():
                x.close()

    @property
    def max_holders(self) -> int:
        nodes, reads = self.nodes, self.reads
        before: list[dict[str, bool]] = []  # per read: each node's read just before it
        last: dict[str, bool] = {}
        for n, h in reads:
            before.append(dict(last))
            last[n] = h
        best, nxt = 0, {}  # nxt: each node's read just after the current one
        for k in range(len(reads) - 1, -1, -1):
            node, held = reads[k]
            others = sum(before[k].get(o, False) and nxt.get(o, False) for o in nodes if o != node)
            best = max(best, int(held) + others)
            nxt[node] = held
        return best

    def __enter__(self) -> HolderWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def test_sigkill_of_master_agent_moves_vip_at_once_and_fences(make_cluster):
    c = make_cluster()
    assert c.master() == "node-a"
    mac_a, mac_b = c.lab.host("node-a").mac("lan"), c.lab.host("node-b").mac("lan")
    assert set(arp_answers(c)) == {mac_a}
    t0 = time.monotonic()
    c.procs["node-a"].kill(signal.SIGKILL)
    c.wait_role("node-b", "master", timeout=2)
    h = promoted_at(c, "node-b", t0)
    assert h is not None
    # the agent link's EOF, not the dead interval (30 ms here), and well under a second
    assert "EOF" in h["reason"] or "RST" in h["reason"], h["reason"]
    assert h["at_monotonic"] - t0 < 1.0
    # the guard fenced node-a: its VIP is gone and only node-b answers ARP for it
    c.wait(lambda: c.vip_holders() == ["node-b"], 2, "node-a's VIP to be removed")
    assert set(arp_answers(c)) == {mac_b}
    assert c.lab.host("peer").ping(VIP)


def test_one_channel_down_is_a_channel_fault_not_a_failover(make_cluster):
    c = make_cluster()
    before = len(c.history("node-a")), len(c.history("node-b"))
    fault = c.lab.link_down("node-b", "hb")

    def row(node: str, peer: str, ch: str) -> dict:
        st = c.status(node)
        assert st is not None
        return next(r for r in st["stations"] if r["peer"] == peer and r["channel"] == ch)

    c.wait(lambda: row("node-a", "node-b", "hb")["state"] == "down", 2, "hb to be down")
    time.sleep(4 * dead(c))
    assert row("node-a", "node-b", "lan")["state"] == "up"
    assert c.role("node-a") == "master" and c.role("node-b") == "backup"
    assert (len(c.history("node-a")), len(c.history("node-b"))) == before
    assert c.status("node-a")["counters"]["channel_faults"] >= 1
    fault.heal()
    c.wait(lambda: row("node-a", "node-b", "hb")["state"] == "up", 2, "hb to come back")


def test_partition_between_nodes_with_witness_keeps_one_master(make_cluster):
    c = make_cluster()
    with HolderWatch(c) as w:
        fault = c.lab.partition("node-a", "node-b")  # every channel; both still reach the peer
        time.sleep(3 * dead(c))  # node-b found node-a silent and asked: refused
        assert c.role("node-a") == "master"
        assert c.role("node-b") == "backup"  # the witness refused it the lease
        assert c.vip_holders() == ["node-a"]
        fault.heal()
        time.sleep(0.2)
    assert w.max_holders == 1 and w.samples > 10
    assert c.role("node-a") == "master" and c.role("node-b") == "backup"


def test_partition_without_witness_gives_two_masters_like_vrrp(make_cluster):
    """The documented risk of running without a witness (README, "Without a witness")."""
    c = make_cluster(witness=None)
    fault = c.lab.partition("node-a", "node-b")
    c.wait_role("node-b", "master", timeout=2)
    assert sorted(c.vip_holders()) == ["node-a", "node-b"]
    fault.heal()  # the lower priority steps down as soon as they hear each other
    c.wait(lambda: c.vip_holders() == ["node-a"], 2, "node-b to step down after the heal")


@pytest.mark.parametrize("preempt", [True, False])
def test_old_master_returns_preemption_honoured(make_cluster, preempt):
    c = make_cluster(preempt=preempt)
    c.procs["node-a"].kill(signal.SIGKILL)
    c.wait_role("node-b", "master", timeout=2)
    with HolderWatch(c) as w:
        c.start_agent("node-a")
        if preempt:
            c.wait_role("node-a", "master", timeout=10)
            c.wait_role("node-b", "backup", timeout=2)
        else:
            c.wait_role("node-a", "backup", timeout=10)
            time.sleep(0.3)
            assert c.role("node-b") == "master"
    assert w.max_holders == 1


def test_sigstop_of_master_steps_down_never_two_masters(make_cluster):
    c = make_cluster(preempt=False)
    old = c.master()
    new = next(n for n in c.spec.nodes if n != old)
    agent = c.procs[old]
    with HolderWatch(c) as w:
        t0 = time.monotonic()
        agent.stop()
        time.sleep((c.spec.dead_after + 2) * c.spec.interval_ms / 1000)
        agent.cont()
        c.wait_role(new, "master", timeout=2)
        c.wait_role(old, "backup", timeout=2)
        time.sleep(0.2)
    assert w.max_holders == 1
    assert c.vip_holders() == [new]
    demoted = [h for h in c.history(old) if h["old"] == "master" and h["at_monotonic"] >= t0]
    assert demoted, c.history(old)
    # the woken master did not re-announce: the peer's traffic goes to the new master only
    new_mac = c.lab.host(new).mac("lan")
    assert set(arp_answers(c)) == {new_mac}
    assert c.lab.host("peer").ping(VIP)
    neigh = c.lab.host("peer").sh(f"ip -j neigh show {VIP}", check=False).stdout
    assert new_mac in neigh, neigh


def test_a_stall_under_the_fence_timeout_is_ridden_out(make_cluster):
    """A master stalled for less than its fence timeout (250 ms here) asks its guard (FEED,
    PING) before it gives anything up: the guard answers unfenced, the VIP is still there, and
    no backup can have taken over (it waits 300 ms), so the agent carries on as master. It
    used to step down at 0.75 of the timeout, and each 15 ms stall of a loaded 2-CPU box (at 10
    ms heartbeats) cost every protected stream a second. A freeze of the VM on top of the
    SIGSTOP can take a stall past the timeout: that one is ridden out by rule 9 (the witness),
    also with no role change."""
    c = make_cluster(preempt=False)
    master = c.master()
    assert master is not None
    before = len(c.history(master))
    counters0 = (c.status(master) or {})["counters"]
    agent = c.procs[master]
    for _ in range(3):
        agent.stop()
        time.sleep(0.2)  # + up to one feed period (25 ms) since the last feed: 200-226 ms
        agent.cont()
        time.sleep(0.2)
    counters = (c.status(master) or {})["counters"]
    assert counters.get("stalls", 0) - counters0.get("stalls", 0) >= 1, counters
    ridden = sum(counters.get(k, 0) - counters0.get(k, 0)
                 for k in ("stalls_ridden_out", "freezes_ridden_out"))  # fmt: skip
    assert ridden == counters.get("stalls", 0) - counters0.get("stalls", 0), counters
    assert counters.get("stalls_ridden_out", 0) > counters0.get("stalls_ridden_out", 0), counters
    assert len(c.history(master)) == before, c.history(master)[before:]
    assert c.vip_holders() == [master]
    assert "stalled for" in c.log_text(master) and "carrying on as master" in c.log_text(master)


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it (the agent's guard, in its own session, included)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return out


def test_a_freeze_of_the_whole_lab_changes_no_role(make_cluster):
    """Every process of the group stops at once for longer than the fence timeout, the lease
    and the dead interval (SIGSTOP of both agents, their guards and the witness: a paused VM,
    as this CI's 2-CPU VMs do for up to ~500 ms). Woken, the backup does not count the freeze
    as the master's silence (``Membership.stalled``); the master, fenced by its guard, asks the
    witness, which grants the lease again under the same term, and adds its VIP back (rule 9 of
    nonstop.failover.roles). Before, each such freeze was a takeover, or two."""
    c = make_cluster(preempt=False)
    master = c.master()
    assert master is not None and c.spec.witness is not None
    backup = next(n for n in c.spec.nodes if n != master)
    before = {n: len(c.history(n)) for n in c.spec.nodes}
    pids = [p for n in c.spec.nodes for p in tree(c.procs[n].pid)]
    pids.append(c.procs[c.spec.witness].pid)
    assert len(pids) >= 5, pids  # two agents, two guards, the witness
    freeze = 3 * c.spec.interval_ms * c.spec.dead_after / 1000  # 360 ms
    for _ in range(2):
        for p in pids:
            os.kill(p, signal.SIGSTOP)
        time.sleep(freeze)
        for p in reversed(pids):  # the witness first, the master's agent last
            os.kill(p, signal.SIGCONT)
        time.sleep(0.5)
    assert {n: len(c.history(n)) for n in c.spec.nodes} == before, {
        n: c.history(n)[before[n]:] for n in c.spec.nodes
    }
    assert c.vip_holders() == [master]
    st = c.status(master) or {}
    assert st["counters"].get("freezes_ridden_out", 0) >= 1, st["counters"]
    assert "master again" in c.log_text(master)
    assert (c.status(backup) or {})["stalls"]["total_ms"] >= freeze * 1000


def test_graceful_stop_hands_over(make_cluster):
    c = make_cluster()
    t0 = time.monotonic()
    c.procs["node-a"].terminate()
    c.wait_role("node-b", "master", timeout=2)
    h = promoted_at(c, "node-b", t0)
    assert h is not None and h["at_monotonic"] - t0 < 1.0
    assert c.procs["node-a"].wait(timeout=5) == 0
    assert c.vip_holders() == ["node-b"]


def test_forged_replayed_truncated_random_heartbeats_are_dropped(make_cluster):
    c = make_cluster()
    st0 = c.status("node-a")
    inc_b = next(p["incarnation"] for p in st0["peers"] if p["id"] == "node-b")
    with open(c.key_path) as f:
        key = f.read().strip().encode()
    # From the peer host, aim at node-a's heartbeat port on lan: a forged heartbeat (wrong key),
    # a replayed one (right key, node-b's incarnation, an old sequence number), a heartbeat of
    # another group, every truncation of a valid one, and random bytes.
    script = f"""
import os, socket, random
from nonstop.membership import Heartbeat, encode_heartbeat, MsgType
from nonstop.common import Role
from nonstop.lab.nsops import open_iproute
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst = ({c.lab.host("node-a").addr("lan")!r}, {PORT})
def hb(group=1, seq=1, role=Role.MASTER, prio=254, inc={inc_b}):
    return Heartbeat(type=MsgType.HEARTBEAT, group=group, node_id="node-b", channel="lan",
                     incarnation=inc, seq=seq, role=role, priority=prio, flags=0,
                     sent_at=0, echo_seq=0, echo_delay_us=0)
good = encode_heartbeat(hb(), {key!r})
s.sendto(encode_heartbeat(hb(seq=10**9), b"x" * 32), dst)       # forged
for _ in range(3): s.sendto(good, dst)                            # replayed (seen seq)
s.sendto(encode_heartbeat(hb(inc={inc_b} - 1, seq=10**9), {key!r}), dst)  # replayed (old run)
s.sendto(encode_heartbeat(hb(group=7, seq=10**9), {key!r}), dst)  # another group
for i in range(len(good)): s.sendto(good[:i], dst)                # truncated
rnd = random.Random(7)
for _ in range(500): s.sendto(rnd.randbytes(rnd.randrange(0, 200)), dst)  # random
"""
    path = os.path.join(c.lab.workdir, "inject.py")
    with open(path, "w") as f:
        f.write(script)
    c.lab.host("peer").sh(f"{sys.executable} {path}")
    time.sleep(0.3)
    st = c.status("node-a")
    assert st is not None, "the agent died"
    k0, k = st0["counters"], st["counters"]
    for counter in ("bad_auth", "replay", "rx_duplicate", "malformed", "wrong_group"):
        assert k.get(counter, 0) > k0.get(counter, 0), counter
    assert st["role"] == "master" and c.role("node-b") == "backup"
    assert len(st["history"]) == len(st0["history"])
    assert Role.MASTER  # the forged priority-254 MASTER changed nothing


def test_rest_api_status_cli_metrics_and_hooks(make_cluster, demo_lab):
    hook_log = os.path.join(demo_lab.workdir, "hooks.log")
    hook = os.path.join(demo_lab.workdir, "hook.sh")
    with open(hook, "w") as f:
        f.write(f'#!/bin/sh\necho "$1 $2 old=$NONSTOP_OLD_ROLE" >> {hook_log}\n')
    os.chmod(hook, 0o755)
    c = make_cluster(hooks={"master": hook, "backup": hook})
    peer = c.lab.host("peer")
    a, b = c.lab.host("node-a").addr("lan"), c.lab.host("node-b").addr("lan")
    # load balancers on the peer see 200 on the master and 503 elsewhere
    code = (
        "import sys, urllib.request, urllib.error\n"
        "def get(u):\n"
        "    try: return urllib.request.urlopen(u, timeout=2).status\n"
        "    except urllib.error.HTTPError as e: return e.code\n"
        f"print(*(get(f'http://{{h}}:8780/{{p}}') for h in ({a!r}, {b!r}) "
        "for p in ('master', 'backup', 'health')))\n"
    )
    out = peer.sh([sys.executable, "-c", code]).stdout.split()
    assert out == ["200", "503", "200", "503", "200", "200"], out
    metrics = peer.sh(
        [
            sys.executable,
            "-c",
            f"import urllib.request; print(urllib.request.urlopen("
            f"'http://{a}:8780/metrics', timeout=2).read().decode())",
        ]
    ).stdout
    assert 'nonstop_role{node="node-a",role="master"} 1.0' in metrics
    assert 'nonstop_channel_up{channel="hb",peer="node-b"} 1.0' in metrics
    assert "nonstop_events_total" in metrics
    # the CLI, as an operator runs it, in both formats
    r = c.lab.host("node-a").sh(
        [
            sys.executable,
            "-m",
            "nonstop",
            "status",
            "--socket",
            c.socket_path("node-a"),
            "--format",
            "json",
        ]
    )
    st = json.loads(r.stdout)
    assert st["role"] == "master" and {row["channel"] for row in st["stations"]} == {"lan", "hb"}
    r = c.lab.host("node-a").sh(
        [sys.executable, "-m", "nonstop", "status", "--socket", c.socket_path("node-a")]
    )
    assert "Active Stations Table" in r.stdout and "node-b" in r.stdout

    # hooks: each role change ran the hook with the new role and the node
    def hooks_ran() -> str:
        if not os.path.exists(hook_log):
            return ""
        with open(hook_log) as f:
            return f.read()

    c.wait(
        lambda: "master node-a" in hooks_ran(),
        3,
        "the master hook",
    )
    c.procs["node-a"].kill(signal.SIGKILL)
    c.wait(lambda: "master node-b old=backup" in hooks_ran(), 3, "node-b's hook")


def test_ipv6_vip_moves_with_unsolicited_na(make_cluster):
    c = make_cluster(vip6="fd77::100/64")
    peer = c.lab.host("peer")
    assert peer.ping("fd77::100")

    def neigh_mac() -> str | None:
        out = peer.sh("ip -6 -j neigh show fd77::100", check=False).stdout
        entries = json.loads(out or "[]")
        return entries[0].get("lladdr") if entries else None

    assert neigh_mac() == c.lab.host("node-a").mac("lan")
    c.procs["node-a"].kill(signal.SIGKILL)
    c.wait_role("node-b", "master", timeout=2)
    # the unsolicited NA flips the peer's entry without it asking
    c.wait(lambda: neigh_mac() == c.lab.host("node-b").mac("lan"), 2, "the NA to reach the peer")
    assert peer.ping("fd77::100")


def test_fence_command_after_agent_and_guard_both_died(make_cluster):
    """The case `nonstop fence` (systemd ExecStopPost) exists for: agent and guard killed
    together leave the VIP; the command removes it, and refuses on a running master."""
    c = make_cluster(witness=None)
    a = c.lab.host("node-a")
    fence = [sys.executable, "-m", "nonstop", "fence", "--config", c.config_paths["node-a"]]
    r = a.sh([*fence, "--format", "json"], check=False)
    assert r.returncode != 0 and "master" in r.stderr  # refuses while the agent is master
    agent = c.procs["node-a"]
    guard = int(open(f"/proc/{agent.pid}/task/{agent.pid}/children").read().split()[0])  # noqa: SIM115
    agent.stop()  # so it cannot react to its guard's death
    os.kill(guard, signal.SIGKILL)
    agent.kill(signal.SIGKILL)
    c.wait_role("node-b", "master", timeout=2)
    assert sorted(c.vip_holders()) == ["node-a", "node-b"]  # the flaw the command is for
    out = json.loads(a.sh([*fence, "--format", "json"]).stdout)
    assert out == {"removed": [c.spec.vip]}
    assert c.vip_holders() == ["node-b"]
