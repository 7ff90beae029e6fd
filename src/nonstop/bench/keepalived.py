"""keepalived (Debian 2.2.7, VRRPv3) as the benchmark's baseline, run in the same lab as ours.

One keepalived per node, started inside the node's namespace (so it never sees the root
namespace) with every file it writes in the host's workdir:

    keepalived --dont-fork --log-console --log-detail --no-syslog --vrrp
               --use-file CONF --pid PIDFILE --vrrp_pid VRRP_PIDFILE

Config: one ``vrrp_instance`` on the VIP channel's interface, ``version 3``, ``advert_int`` = the
benchmark interval in seconds, priorities 200/100, preemption on (no ``nopreempt``), adverts sent
unicast to the other node (``unicast_src_ip`` / ``unicast_peer``, like our heartbeats), no
authentication (VRRPv3 has none), the VIP with the channel's prefix length. The VRRP process
gets real-time priority (``vrrp_rt_priority``), as our agent does with ``realtime = true``.
The role is read from keepalived's own log lines ("(VI_1) Entering MASTER STATE").
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nonstop.lab import Lab, LabProcess

_STATE_RE = re.compile(r"\(VI_1\) Entering (MASTER|BACKUP|FAULT) STATE")


@dataclass
class KeepalivedSpec:
    nodes: tuple[str, ...] = ("node-a", "node-b")
    priorities: dict[str, int] = field(default_factory=lambda: {"node-a": 200, "node-b": 100})
    vip: str = "10.77.0.100/24"
    channel: str = "lan"
    interval_ms: int = 10
    vrid: int = 77
    rt_priority: int | None = 50


def render_config(lab: Lab, spec: KeepalivedSpec, node: str) -> str:
    """keepalived.conf for ``node``."""
    host = lab.host(node)
    peers = [lab.host(n).addr(spec.channel) for n in spec.nodes if n != node]
    advert = f"{spec.interval_ms / 1000:.3f}".rstrip("0").rstrip(".")
    rt = f"    vrrp_rt_priority {spec.rt_priority}\n" if spec.rt_priority else ""
    return (
        "global_defs {\n"
        f"    router_id {node}\n"
        "    vrrp_version 3\n"
        "    vrrp_garp_master_delay 0\n"
        "    vrrp_garp_master_repeat 3\n"
        f"{rt}"
        "}\n"
        "vrrp_instance VI_1 {\n"
        "    state BACKUP\n"
        f"    interface {host.ifname(spec.channel)}\n"
        f"    virtual_router_id {spec.vrid}\n"
        "    version 3\n"
        f"    priority {spec.priorities.get(node, 100)}\n"
        f"    advert_int {advert}\n"
        f"    unicast_src_ip {host.addr(spec.channel)}\n"
        "    unicast_peer {\n" + "".join(f"        {p}\n" for p in peers) + "    }\n"
        "    virtual_ipaddress {\n"
        f"        {spec.vip} dev {host.ifname(spec.channel)}\n"
        "    }\n"
        "}\n"
    )


class KeepalivedGroup:
    """The keepalived instances of a lab's nodes: write configs, start, kill, read roles."""

    def __init__(self, lab: Lab, spec: KeepalivedSpec | None = None) -> None:
        self.lab = lab
        self.spec = spec or KeepalivedSpec()
        self.procs: dict[str, LabProcess] = {}
        self.paths: dict[str, dict[str, str]] = {}
        for n in self.spec.nodes:
            wd = str(self.lab.host(n).workdir)
            p = {
                "conf": os.path.join(wd, "keepalived.conf"),
                "pid": os.path.join(wd, "keepalived.pid"),
                "vrrp_pid": os.path.join(wd, "keepalived-vrrp.pid"),
                "log": os.path.join(wd, "keepalived.log"),
            }
            with open(p["conf"], "w") as f:
                f.write(render_config(lab, self.spec, n))
            self.paths[n] = p

    def argv(self, node: str) -> list[str]:
        p = self.paths[node]
        return [
            "keepalived",
            "--dont-fork",
            "--log-console",
            "--log-detail",
            "--no-syslog",
            "--vrrp",
            "--use-file",
            p["conf"],
            "--pid",
            p["pid"],
            "--vrrp_pid",
            p["vrrp_pid"],
        ]

    def start(self, node: str | None = None) -> None:
        for n in [node] if node else self.spec.nodes:
            p = self.paths[n]
            for k in ("pid", "vrrp_pid"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p[k])
            with open(p["log"], "ab") as out:
                out.write(f"=== start {time.monotonic():.6f}\n".encode())
                out.flush()
                self.procs[n] = self.lab.host(n).run(
                    self.argv(n), stdout=out, stderr=out, name=f"keepalived-{n}"
                )

    def pids(self, node: str) -> list[int]:
        """Every pid of ``node``'s instance: the parent and the VRRP child (from its pid file)."""
        out = []
        proc = self.procs.get(node)
        if proc is not None and proc.alive:
            out.append(proc.pid)
        with contextlib.suppress(OSError, ValueError), open(self.paths[node]["vrrp_pid"]) as f:
            child = int(f.read().strip())
            if child not in out and os.path.exists(f"/proc/{child}"):
                out.append(child)
        return out

    def wait_child(self, node: str, timeout: float = 5.0) -> None:
        """Wait until the VRRP child has written its pid file."""
        end = time.monotonic() + timeout
        while len(self.pids(node)) < 2:
            if time.monotonic() > end:
                raise TimeoutError(f"keepalived on {node} did not start its VRRP process")
            time.sleep(0.01)

    def kill(self, node: str) -> float:
        """SIGKILL every keepalived pid of ``node``; return the monotonic time of the first kill."""
        pids = self.pids(node)
        t = time.monotonic()
        for pid in reversed(pids):  # the VRRP child first: it holds the role
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc = self.procs.get(node)
        if proc is not None:
            proc.reap()
        return t

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.alive:
                proc.terminate(timeout=3.0)
            proc.reap()

    def state(self, node: str) -> str | None:
        """The instance's last logged state (MASTER/BACKUP/FAULT) since its last start."""
        try:
            with open(self.paths[node]["log"], errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        text = text[text.rfind("=== start") :]
        states = _STATE_RE.findall(text)
        return states[-1] if states else None

    def log_text(self, node: str) -> str:
        with open(self.paths[node]["log"], errors="replace") as f:
            return f.read()
