"""The two HA tools the failover benchmark drives, behind one small interface.

A driver starts its tool on the lab's nodes, injects the process fault (SIGKILL), restarts what it
killed, and says whether the group is settled (exactly one master, one backup, the VIP on the
master only). Everything else (timing, probes, network faults) is the benchmark's, identical for
both tools.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Protocol

from nonstop.bench.keepalived import KeepalivedGroup, KeepalivedSpec

if TYPE_CHECKING:
    from nonstop.lab import Lab

NODES = ("node-a", "node-b")
VIP = "10.77.0.100/24"


def vip_holders(lab: Lab, vip: str = VIP, channel: str = "lan") -> list[str]:
    """Nodes whose interface carries the VIP right now, read from the kernel over netlink."""
    ip = vip.split("/")[0]
    out = []
    for n in NODES:
        h = lab.host(n)
        addrs = h.iproute().get_addr(family=2, address=ip)
        if any(a.get_attr("IFA_ADDRESS") == ip for a in addrs):
            out.append(n)
    return out


class Driver(Protocol):
    name: str

    def start(self) -> None: ...
    def roles(self) -> dict[str, str | None]: ...
    def kill(self, node: str) -> float: ...
    def restart(self, node: str) -> None: ...
    def promotion_time(self, node: str, after: float) -> float | None: ...
    def promotion_reason(self, node: str, after: float) -> str | None: ...
    def master_changes(self, since: float, until: float) -> int | None: ...
    def describe(self) -> dict[str, Any]: ...
    def debug(self) -> str: ...
    def stop(self) -> None: ...


class KeepalivedDriver:
    name = "keepalived"

    def __init__(self, lab: Lab, *, interval_ms: int) -> None:
        self.lab = lab
        self.group = KeepalivedGroup(lab, KeepalivedSpec(interval_ms=interval_ms, vip=VIP))

    def start(self) -> None:
        self.group.start()
        for n in NODES:
            self.group.wait_child(n)

    def roles(self) -> dict[str, str | None]:
        return {n: (s.lower() if (s := self.group.state(n)) else None) for n in NODES}

    def kill(self, node: str) -> float:
        return self.group.kill(node)

    def restart(self, node: str) -> None:
        self.group.start(node)
        self.group.wait_child(node)

    def promotion_time(self, node: str, after: float) -> float | None:
        return None  # keepalived logs wall-clock time only; the netlink monitor is the measure

    def promotion_reason(self, node: str, after: float) -> str | None:
        return None

    def master_changes(self, since: float, until: float) -> int | None:
        return None  # counted from the VIP add events of the netlink monitors

    def debug(self) -> str:
        return "\n".join(f"--- {n}\n{self.group.log_text(n)[-1500:]}" for n in NODES)

    def describe(self) -> dict[str, Any]:
        with contextlib.suppress(OSError):
            with open(self.group.paths[NODES[0]]["conf"]) as f:
                conf = f.read()
            return {"tool": "keepalived", "version": "2.2.7", "config_node_a": conf}
        return {"tool": "keepalived"}

    def stop(self) -> None:
        self.group.stop()


class NonstopDriver:
    name = "nonstop"

    def __init__(self, lab: Lab, *, interval_ms: int, witness: bool) -> None:
        from nonstop.cluster import Cluster, ClusterSpec

        self.lab = lab
        spec = ClusterSpec(
            nodes=NODES,
            interval_ms=interval_ms,
            witness="witness" if witness else None,
            vip=VIP,
        )
        self.cluster = Cluster(lab, spec)

    def start(self) -> None:
        self.cluster.start()

    def roles(self) -> dict[str, str | None]:
        return {n: self.cluster.role(n) for n in NODES}

    def kill(self, node: str) -> float:
        """SIGKILL the agent process only (not its helpers): a crash on a live node."""
        proc = self.cluster.procs[node]
        t = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.reap()
        return t

    def restart(self, node: str) -> None:
        self.cluster.start_agent(node)

    def promotion_time(self, node: str, after: float) -> float | None:
        for entry in self.cluster.history(node):
            at = entry.get("at_monotonic")
            if entry.get("new") == "master" and isinstance(at, int | float) and at > after:
                return float(at)
        return None

    def promotion_reason(self, node: str, after: float) -> str | None:
        for entry in self.cluster.history(node):
            at = entry.get("at_monotonic")
            if entry.get("new") == "master" and isinstance(at, int | float) and at > after:
                return str(entry.get("reason"))
        return None

    def master_changes(self, since: float, until: float) -> int | None:
        n = 0
        for node in NODES:
            for entry in self.cluster.history(node):
                at = entry.get("at_monotonic")
                if entry.get("new") == "master" and isinstance(at, int | float):
                    n += since <= at <= until
        return n

    def debug(self) -> str:
        return "\n".join(f"--- {n}\n{self.cluster.log_text(n)[-1500:]}" for n in NODES)

    def describe(self) -> dict[str, Any]:
        s = self.cluster.spec
        return {
            "tool": "nonstop",
            "interval_ms": s.interval_ms,
            "dead_after": s.dead_after,
            "witness": s.witness,
            "channels": list(s.channels),
            "realtime": s.realtime,
            "preempt": s.preempt,
        }

    def stop(self) -> None:
        for p in self.cluster.procs.values():
            if p.alive:
                p.terminate(timeout=3.0)
            p.reap()


def settled_master(driver: Driver, lab: Lab) -> str | None:
    """The master if the group is settled (one master, one backup, VIP on the master only)."""
    roles = driver.roles()
    masters = [n for n, r in roles.items() if r == "master"]
    backups = [n for n, r in roles.items() if r == "backup"]
    if len(masters) != 1 or len(backups) != len(NODES) - 1:
        return None
    return masters[0] if vip_holders(lab) == masters else None


def wait_settled(driver: Driver, lab: Lab, *, stable_s: float, timeout: float) -> str:
    """Wait until the group has been settled with the same master for ``stable_s``."""
    end = time.monotonic() + timeout
    since: float | None = None
    current: str | None = None
    while True:
        now = time.monotonic()
        m = settled_master(driver, lab)
        if m is None or m != current:
            current, since = m, (now if m else None)
        elif since is not None and now - since >= stable_s:
            return m
        if now > end:
            raise TimeoutError(
                f"{driver.name}: group not settled after {timeout:.0f} s: "
                f"roles {driver.roles()}, VIP on {vip_holders(lab)}\n{driver.debug()}"
            )
        time.sleep(0.02)
