"""nonstop.lab for real: namespaces, bridges, addresses, faults, processes and teardown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nonstop.common import ConfigError
from nonstop.lab import Lab, LabError, Topology, demo_topology, nsops

NO = 0.2  # seconds to wait for a reply that must not come


def small_topology() -> Topology:
    topo = Topology()
    topo.channel("lan", v4="10.77.0.0/24", v6="fd77::/64")
    topo.host("a", channels={"lan": 11})
    topo.host("b", channels={"lan": 12})
    return topo


def reaches(lab: Lab, src: str, dst: str, channel: str, v6: bool = False) -> bool:
    d = lab.host(dst)
    addr = d.addr6(channel) if v6 else d.addr(channel)
    assert addr is not None
    return lab.host(src).ping(addr, count=3, timeout=1.0)


def cut(lab: Lab, src: str, dst: str, channel: str, v6: bool = False) -> bool:
    d = lab.host(dst)
    addr = d.addr6(channel) if v6 else d.addr(channel)
    assert addr is not None
    return not lab.host(src).ping(addr, count=1, timeout=NO)


def gone(pids: list[int]) -> bool:
    return all(nsops.proc_start_time(p) is None for p in pids)


def root_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


# -- topology (no root needed) -----------------------------------------------------------------


def test_topology_addresses_and_toml_round_trip() -> None:
    topo = demo_topology()
    assert topo.addr("node-a", "lan") == "10.77.0.11"
    assert topo.addr6("node-a", "lan") == "fd77::11"
    assert topo.addr6("node-a", "hb") is None
    assert topo.addr("peer", "lan") == "10.77.0.1"
    example = Path(__file__).parents[2] / "examples" / "lab-demo.toml"
    assert Topology.from_toml(example).to_dict() == topo.to_dict()
    assert Topology.from_dict(topo.to_dict()).to_dict() == topo.to_dict()


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda t: t.channel("x", v4="192.168.0.0/24"), "channels.x.v4"),
        (lambda t: t.channel("x", v4="10.77.9.0/24", v6="2001:db8::/64"), "channels.x.v6"),
        (lambda t: t.channel("waytoolongname", v4="10.77.0.0/24"), "channels.waytoolongname"),
        (lambda t: t.channel("hb", v4="10.77.0.128/25"), "channels.hb"),
        (lambda t: t.host("x", channels={"nope": 1}), "hosts.x.channels.nope"),
        (lambda t: t.host("x", channels={"lan": 11}), "hosts.x.channels.lan"),
        (lambda t: t.host("x", channels={"lan": 255}), "hosts.x.channels.lan"),
    ],
)
def test_topology_rejects(build: Callable[[Topology], object], field: str) -> None:
    topo = small_topology()
    with pytest.raises(ConfigError) as e:
        build(topo)
    assert e.value.field == field


# -- the lab --------------------------------------------------------------------------------------


@pytest.mark.netns
def test_ping_on_both_channels_v4_and_v6(demo_lab: Lab) -> None:
    lab = demo_lab
    assert lab.prefix.startswith("ns") and len(lab.prefix) == 6
    for a in ("peer", "node-a", "node-b", "witness"):
        for b in ("peer", "node-a", "node-b", "witness"):
            if a != b:
                assert reaches(lab, a, b, "lan"), (a, b)
                assert reaches(lab, a, b, "lan", v6=True), (a, b)
                if "peer" not in (a, b):
                    assert reaches(lab, a, b, "hb"), (a, b)
    assert cut(lab, "peer", "node-a", "hb")  # peer has no hb: 10.77.1.11 is unroutable
    h = lab.host("node-a")
    assert h.ns == f"{lab.prefix}-node-a" and h.workdir.is_dir() and h.workdir.parent == lab.workdir
    assert (h.ifname("lan"), h.addr("lan"), h.addr6("lan")) == ("lan", "10.77.0.11", "fd77::11")
    addrs = {i["ifname"]: i for i in json.loads(h.sh("ip -j addr").stdout)}
    assert set(addrs) == {"lo", "lan", "hb"} and all(
        i["operstate"] != "DOWN" for i in addrs.values()
    )
    assert addrs["lan"]["address"] == h.mac("lan")
    v6 = [a for a in addrs["lan"]["addr_info"] if a["local"] == "fd77::11"]
    assert v6 and not v6[0].get("tentative")  # DAD is off: usable at once
    bridges = json.loads(
        nsops.ns_run(lab.switch_ns, ["ip", "-j", "link", "show", "type", "bridge"]).stdout
    )
    assert {b["ifname"] for b in bridges} == {"lan", "hb"}
    assert not any(n.startswith(lab.prefix) or n.startswith("h0-") for n in root_links())


@pytest.mark.netns
def test_link_down_cuts_one_channel_only(demo_lab: Lab) -> None:
    lab = demo_lab
    fault = lab.link_down("node-b", "hb")
    assert cut(lab, "node-a", "node-b", "hb")
    assert reaches(lab, "node-a", "node-b", "lan")
    assert reaches(lab, "node-a", "witness", "hb")
    assert "NO-CARRIER" in lab.host("node-b").sh("ip link show hb").stdout
    fault.heal()
    assert reaches(lab, "node-a", "node-b", "hb")
    lab.link_down("node-b", "lan")
    assert cut(lab, "peer", "node-b", "lan") and reaches(lab, "node-a", "node-b", "hb")
    lab.link_up("node-b", "lan")
    assert reaches(lab, "peer", "node-b", "lan", v6=True)  # v6 address survived


@pytest.mark.netns
def test_partition_between_two_hosts_only(demo_lab: Lab) -> None:
    lab = demo_lab
    fault = lab.partition("node-a", "node-b")
    for ch, v6 in (("lan", False), ("lan", True), ("hb", False)):
        assert cut(lab, "node-a", "node-b", ch, v6) and cut(lab, "node-b", "node-a", ch, v6)
    for a, b, ch in (
        ("node-a", "witness", "hb"),
        ("node-b", "witness", "hb"),
        ("peer", "node-a", "lan"),
        ("node-b", "peer", "lan"),
    ):
        assert reaches(lab, a, b, ch), (a, b, ch)
    fault.heal()
    assert reaches(lab, "node-a", "node-b", "hb") and reaches(lab, "node-b", "node-a", "lan", True)
    assert "nonstop-lab" not in lab.host("node-a").sh("iptables -S; ip6tables -S").stdout
    with lab.partition("node-a", "node-b", channels=["hb"]):
        assert cut(lab, "node-a", "node-b", "hb") and reaches(lab, "node-a", "node-b", "lan")
    assert reaches(lab, "node-a", "node-b", "hb")
    with pytest.raises(LabError):
        lab.partition("peer", "node-a", channels=["hb"])


@pytest.mark.netns
def test_isolate_keeps_processes_running(demo_lab: Lab) -> None:
    lab = demo_lab
    sleeper = lab.host("node-a").run(["sleep", "60"])
    fault = lab.isolate("node-a")
    for other in ("peer", "node-b", "witness"):
        assert cut(lab, other, "node-a", "lan")
    assert cut(lab, "node-b", "node-a", "hb")
    assert reaches(lab, "node-b", "witness", "hb") and reaches(lab, "peer", "node-b", "lan")
    assert sleeper.alive
    fault.heal()
    assert reaches(lab, "peer", "node-a", "lan") and reaches(lab, "node-b", "node-a", "hb")


@pytest.mark.netns
def test_loss(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(small_topology())
    with lab.loss("b", "lan", 100):
        assert cut(lab, "a", "b", "lan") and cut(lab, "a", "b", "lan", v6=True)
    assert reaches(lab, "a", "b", "lan")
    with lab.loss("b", "lan", 50):
        ok = sum(lab.host("a").ping("10.77.0.12", timeout=0.05) for _ in range(100))
    assert 15 <= ok <= 85, ok  # ~50; the bounds fail with probability < 1e-10


@pytest.mark.netns
def test_rate_applies_tbf(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(small_topology())
    a, b = lab.host("a"), lab.host("b")

    def qdiscs() -> list[dict]:
        return json.loads(b.sh("tc -j qdisc show dev lan").stdout)

    def send_seconds(nbytes: int) -> float:
        srv = a.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind((a.addr("lan"), 0))
        srv.listen()
        got = []
        t = threading.Thread(target=lambda: got.append(_drain(srv)))
        t.start()
        cli = b.socket(socket.AF_INET, socket.SOCK_STREAM)
        t0 = time.monotonic()
        cli.connect(srv.getsockname())
        cli.sendall(b"x" * nbytes)
        cli.close()
        t.join(10)
        srv.close()
        assert got == [nbytes]
        return time.monotonic() - t0

    fast = send_seconds(1_000_000)
    fault = lab.rate("b", "lan", "8mbit")
    (q,) = qdiscs()
    assert q["kind"] == "tbf" and q["options"]["rate"] == 1_000_000
    slow = send_seconds(1_000_000)  # 1 MB at 1 MB/s, minus one 64 KiB burst
    assert slow > 0.8 and fast < 0.5, (fast, slow)
    fault.heal()
    assert all(q["kind"] != "tbf" for q in qdiscs())


def _drain(srv: socket.socket) -> int:
    conn, _ = srv.accept()
    n = 0
    with conn:
        while data := conn.recv(1 << 16):
            n += len(data)
    return n


@pytest.mark.netns
def test_cpu_hog_runs_and_dies_on_down(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(small_topology())
    hog = lab.cpu_hog("a", workers=2)
    time.sleep(0.3)
    pids = nsops.pids_in([lab.host("a").ns])
    assert hog.pid in pids and len(pids) == 2
    ticks = [int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[11]) for p in pids]
    assert all(t > 0 for t in ticks)  # both have burnt user CPU time
    assert lab.down() == []
    assert not hog.alive and gone(pids)


@pytest.mark.netns
def test_down_after_exception_kills_everything() -> None:
    topo = small_topology()
    with pytest.raises(RuntimeError, match="boom"), Lab(topo) as lab:
        a = lab.host("a")
        tracked = a.run(["sleep", "60"])
        # a daemon that escaped its parent, and an untracked process: found by namespace
        a.sh("setsid sleep 61 >/dev/null 2>&1 < /dev/null &")
        loose = subprocess.Popen(lab.host("b").ns_argv(["sleep", "62"]))
        time.sleep(0.1)
        pids = nsops.pids_in(lab.namespaces)
        assert tracked.pid in pids and loose.pid in pids and len(pids) == 3
        namespaces, workdir, prefix = lab.namespaces, lab.workdir, lab.prefix
        raise RuntimeError("boom")
    loose.wait(2)
    assert gone(pids) and not tracked.alive
    assert not any(nsops.ns_exists(n) for n in namespaces)
    assert not workdir.exists() and nsops.read_state(prefix) is None
    assert lab.down() == []  # idempotent


CHILD = textwrap.dedent(
    """
    import sys, time
    from nonstop.lab import Lab, Topology
    topo = Topology()
    topo.channel("lan", v4="10.77.0.0/24")
    topo.host("a", channels={"lan": 1})
    lab = Lab(topo).up()
    p = lab.host("a").run(["sleep", "60"])
    print(lab.prefix, p.pid, flush=True)
    time.sleep(60)
    """
)


def _spawn_lab_owner() -> tuple[subprocess.Popen[str], str, int]:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    prefix, pid = child.stdout.readline().split()
    return child, prefix, int(pid)


@pytest.mark.netns
def test_sweep_stale_removes_lab_of_killed_owner() -> None:
    child, prefix, sleeper = _spawn_lab_owner()
    try:
        child.kill()
        child.wait(5)
        state = nsops.read_state(prefix)
        assert state is not None and Lab.owner_alive(state) is False
        assert nsops.ns_exists(f"{prefix}-a") and not gone([sleeper])
        assert prefix in Lab.sweep_stale()
        assert not nsops.ns_exists(f"{prefix}-a") and not nsops.ns_exists(f"{prefix}-sw")
        assert gone([sleeper]) and nsops.read_state(prefix) is None
    finally:
        child.kill()
        Lab.remove(prefix) if nsops.read_state(prefix) else None


@pytest.mark.netns
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_tears_down(sig: int) -> None:
    child, prefix, sleeper = _spawn_lab_owner()
    try:
        child.send_signal(sig)
        child.wait(5)
        assert gone([sleeper]) and not nsops.ns_exists(f"{prefix}-a")
        assert nsops.read_state(prefix) is None
    finally:
        child.kill()
        Lab.remove(prefix) if nsops.read_state(prefix) else None


def _nonstop(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "nonstop"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "nonstop"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=30)


@pytest.mark.netns
def test_cli_up_status_down_round_trip() -> None:
    prefix = f"t{os.getpid() % 10**6}"
    try:
        up = _nonstop("lab", "up", "--prefix", prefix, "--format", "json")
        assert up.returncode == 0, up.stderr
        built = json.loads(up.stdout)
        assert built["prefix"] == prefix
        assert {h["name"] for h in built["hosts"]} == {"peer", "node-a", "node-b", "witness"}
        assert nsops.read_state(prefix)["owner"] is None  # detached: the CLI has exited
        out = nsops.ns_run(f"{prefix}-witness", ["ip", "-j", "addr", "show", "hb"]).stdout
        assert json.loads(out)[0]["addr_info"][0]["local"] == "10.77.1.13"
        st = _nonstop("lab", "status", "--format", "json")
        assert st.returncode == 0, st.stderr
        (mine,) = [lab for lab in json.loads(st.stdout)["labs"] if lab["prefix"] == prefix]
        assert mine["detached"] and all(h["present"] for h in mine["hosts"])
        a = next(h for h in mine["hosts"] if h["name"] == "node-a")
        assert a["interfaces"]["lan"]["v6"] == "fd77::11"
        assert Lab.sweep_stale() == [] or prefix not in Lab.sweep_stale()  # detached: kept
        down = _nonstop("lab", "down", "--prefix", prefix, "--format", "json")
        assert down.returncode == 0, down.stderr
        assert json.loads(down.stdout) == {"removed": [prefix], "problems": {}}
        st = json.loads(_nonstop("lab", "status", "--format", "json").stdout)
        assert prefix not in {lab["prefix"] for lab in st["labs"]}
        assert not any(n.startswith(prefix + "-") for n in os.listdir("/run/netns"))
    finally:
        if nsops.read_state(prefix):
            Lab.remove(prefix)
