"""VipManager in a real two-host lab: netlink add/remove, gratuitous ARP, unsolicited NA.

Host ``a`` runs the VipManager (in a child process inside its namespace, as the agent does);
host ``b`` is the neighbour whose cache must flip to a's MAC.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import pytest

from nonstop.lab import Lab

pytestmark = pytest.mark.netns

VIP4 = "10.77.0.100"
VIP6 = "fd77::100"
FAKE_MAC = "02:77:ee:ee:ee:01"




def run_in(lab: Lab, host: str, body: str) -> dict:
    """Run ``body`` (Python, with ``vm`` a VipManager for both VIPs) in ``host``; it prints JSON."""
    code = textwrap.dedent(
        f"""
        import asyncio, json, time
        from nonstop.failover.vip import VipManager, VipSpec
        vm = VipManager(
            [VipSpec("{VIP4}/24", "lan", 3, 0.01), VipSpec("{VIP6}/64", "lan", 3, 0.01)]
        )
        """
    ) + textwrap.dedent(body)
    out = lab.host(host).sh([sys.executable, "-c", code]).stdout
    return json.loads(out.strip().splitlines()[-1])


def addrs(lab: Lab, host: str) -> set[str]:
    ipr = lab.host(host).iproute()
    return {f"{m.get('address')}/{m['prefixlen']}" for m in ipr.get_addr()}


def neigh(lab: Lab, host: str, ip: str) -> str | None:
    out = lab.host(host).sh(f"ip neigh show {ip} dev lan").stdout.split()
    return out[out.index("lladdr") + 1] if "lladdr" in out else None


def test_acquire_release_idempotent(lab: Lab) -> None:
    res = run_in(
        lab,
        "a",
        """
        vm.acquire(); vm.acquire()          # EEXIST is fine
        held = vm.held()
        vm.release(); vm.release()          # ENOENT / EADDRNOTAVAIL are fine
        print(json.dumps({"held": held, "after": vm.held()}))
        """,
    )
    assert res == {"held": [f"{VIP4}/24", f"{VIP6}/64"], "after": []}
    assert f"{VIP4}/24" not in addrs(lab, "a")


def test_acquire_leaves_vips_on_interface(lab: Lab) -> None:
    run_in(lab, "a", 'vm.acquire(); print("{}")')
    try:
        assert {f"{VIP4}/24", f"{VIP6}/64"} <= addrs(lab, "a")
        out = lab.host("a").sh(f"ip -6 addr show dev lan to {VIP6}").stdout
        assert "nodad" in out and "tentative" not in out
        assert lab.host("b").ping(VIP4) and lab.host("b").ping(VIP6)
    finally:
        run_in(lab, "a", 'vm.release(); print("{}")')
    assert not {f"{VIP4}/24", f"{VIP6}/64"} & addrs(lab, "a")


def _capture_first(lab: Lab, ethertype: int, match: Callable[[bytes], bool]) -> tuple:
    """Capture in b; returns (thread, result dict) with the receive time of the first match."""
    s = lab.host("b").socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    s.bind(("lan", ethertype))
    s.settimeout(5)
    result: dict = {}

    def loop() -> None:
        # SCHED_FIFO for this capture thread only: the receive time is then the arrival time,
        # not when a busy CPU got round to us (it ends with the thread)
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(70))
        try:
            while True:
                frame = s.recv(2048)
                if match(frame):
                    result["t"] = time.monotonic()
                    return
        except TimeoutError:
            pass
        finally:
            s.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t, result


def test_announce_flips_neighbour_caches(lab: Lab) -> None:
    b = lab.host("b")
    mac_a = lab.host("a").mac("lan")
    b.sh(f"ip neigh replace {VIP4} lladdr {FAKE_MAC} dev lan nud stale")
    b.sh(f"ip -6 neigh replace {VIP6} lladdr {FAKE_MAC} dev lan nud stale")
    vip4 = socket.inet_aton(VIP4)
    vip6 = socket.inet_pton(socket.AF_INET6, VIP6)
    t4, got4 = _capture_first(lab, 0x0806, lambda f: f[28:32] == vip4 and f[38:42] == vip4)
    t6, got6 = _capture_first(lab, 0x86DD, lambda f: f[54] == 136 and f[62:78] == vip6)
    try:
        res = run_in(
            lab,
            "a",
            """
            async def main():
                vm.acquire()
                t0 = time.monotonic()
                await vm.announce()
                print(json.dumps({"t0": t0, "t1": time.monotonic()}))
            asyncio.run(main())
            """,
        )
        t4.join(5)
        t6.join(5)
        # arp_notify only fires on link up: the flip comes from our announcement, not the kernel
        assert neigh(lab, "b", VIP4) == mac_a
        assert neigh(lab, "b", VIP6) == mac_a
        assert "t" in got4 and "t" in got6
        first4 = got4["t"] - res["t0"]
        first6 = got6["t"] - res["t0"]
        # 3 frames 10 ms apart: the burst takes ~20 ms, the first frame is out at once, also on
        # this first (cold) call that opens the sockets: before the 10 ms a design that waits
        # an interval first would take (a 5 ms bound read 6.4 ms on a loaded CI box; the
        # median over 20 bursts is test_garp_first_frame_latency's)
        assert first4 < 0.010 and first6 < 0.010, (first4, first6)
        assert 0.015 < res["t1"] - res["t0"] < 0.2
        print(f"\nfirst GARP seen by b {first4 * 1e3:.3f} ms, first NA {first6 * 1e3:.3f} ms")
    finally:
        run_in(lab, "a", 'vm.release(); print("{}")')


def test_garp_first_frame_latency(lab: Lab) -> None:
    """Median over 20 bursts of announce() call -> first GARP received by the neighbour."""
    vip4 = socket.inet_aton(VIP4)
    samples = []
    code = """
        import sys
        async def main():
            vm.acquire()
            for _ in range(20):
                sys.stdin.readline()
                t0 = time.monotonic()
                await vm.announce()
                print(json.dumps({"t0": t0}), flush=True)
            vm.release()
        asyncio.run(main())
        """
    full = textwrap.dedent(
        f"""
        import asyncio, json, time
        from nonstop.failover.vip import VipManager, VipSpec
        vm = VipManager([VipSpec("{VIP4}/24", "lan", 1, 0.01)])
        """
    ) + textwrap.dedent(code)
    # stdin drives the rounds (lab.run() gives /dev/null); down() kills it if we do not
    p = subprocess.Popen(
        lab.host("a").ns_argv([sys.executable, "-c", full]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(20):
            t, got = _capture_first(lab, 0x0806, lambda f: f[28:32] == vip4)
            time.sleep(0.01)  # the capture thread is in recv()
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("\n")
            p.stdin.flush()
            t0 = json.loads(p.stdout.readline())["t0"]
            t.join(5)
            samples.append(got["t"] - t0)
        p.stdin.close()
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    med = statistics.median(samples)
    print(f"\nGARP first frame: median {med * 1e6:.0f} us, max {max(samples) * 1e6:.0f} us (n=20)")
    assert med < 0.005
