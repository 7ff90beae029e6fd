"""Drive a store-backed cluster in a lab: a real 3-member etcd cluster on its own hosts, N agent
nodes, a peer, and the ARP watcher. Shared by the netns tests and ``nonstop bench groups``.

Topology: ``lan`` 10.77.0.0/24 (peer .1, nodes .11+, the VIPs .100+), ``hb`` 10.77.1.0/24
(nodes: heartbeats), ``st`` 10.77.2.0/24 (nodes and etcd hosts e1..e3 at .21+). Group ``gI``
prefers node ``I mod N`` (priority 200), then the next node (150), then the rest (100).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nonstop.lab import Topology

if TYPE_CHECKING:
    from nonstop.lab import Lab, LabProcess

CLIENT_PORT, PEER_PORT, HB_PORT = 2379, 2380, 7780


def store_topology(nodes: int = 3, etcd: int = 3) -> Topology:
    topo = Topology(source="<store>")
    topo.channel("lan", v4="10.77.0.0/24")
    topo.channel("hb", v4="10.77.1.0/24")
    topo.channel("st", v4="10.77.2.0/24")
    topo.host("peer", channels={"lan": 1})
    for i in range(nodes):
        topo.host(f"n{i + 1}", channels={"lan": 11 + i, "hb": 11 + i, "st": 11 + i})
    for i in range(etcd):
        topo.host(f"e{i + 1}", channels={"st": 21 + i})
    return topo


def group_vip(i: int) -> str:
    return f"10.77.0.{100 + i}"


class StoreCluster:
    def __init__(
        self,
        lab: Lab,
        *,
        nodes: int = 3,
        groups: int = 3,
        etcd: int = 3,
        interval_ms: int = 10,
        dead_after: int = 3,
        lease_ttl_ms: int = 1000,
        keepalive_interval_ms: int = 100,
        drop_margin_ms: int = 200,
        failsafe: bool = True,
        startup_grace_ms: int = 10000,  # load 20 on 2 CPUs: agents came up > 3 s apart
        services: dict[str, dict[str, int]] | None = None,  # group -> {service: port}
    ) -> None:
        self.lab = lab
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.etcd = [f"e{i + 1}" for i in range(etcd)]
        self.groups = [f"g{i}" for i in range(groups)]
        self.services = services or {}
        self.endpoints = [f"http://{lab.host(e).addr('st')}:{CLIENT_PORT}" for e in self.etcd]
        self.procs: dict[str, LabProcess] = {}
        self.key_path = os.path.join(lab.workdir, "cluster.key")
        with open(os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        self.settings = dict(
            interval_ms=interval_ms,
            dead_after=dead_after,
            lease_ttl_ms=lease_ttl_ms,
            keepalive_interval_ms=keepalive_interval_ms,
            drop_margin_ms=drop_margin_ms,
            failsafe=failsafe,
            startup_grace_ms=startup_grace_ms,
        )
        self.config_paths = {n: self._write_config(n) for n in self.nodes}
        self.watcher: LabProcess | None = None

    # -- configs ----------------------------------------------------------------------------
    def priorities(self, gi: int) -> dict[str, int]:
        n = len(self.nodes)
        out = {}
        for k in range(n):
            node = self.nodes[(gi + k) % n]
            out[node] = 200 if k == 0 else 150 if k == 1 else 100
        return out

    def _write_config(self, name: str) -> str:
        s, host = self.settings, self.lab.host(name)
        eps = ", ".join(f'"{e}"' for e in self.endpoints)
        lines = [
            "[node]", f'id = "{name}"', f'key_file = "{self.key_path}"',
            f'state_dir = "{os.path.join(host.workdir, "state")}"', 'cluster = "lab"', "",
            "[store]", 'kind = "etcd"', f"endpoints = [{eps}]",
            f"lease_ttl_ms = {s['lease_ttl_ms']}",
            f"keepalive_interval_ms = {s['keepalive_interval_ms']}",
            f"drop_margin_ms = {s['drop_margin_ms']}",
            f"failsafe = {str(s['failsafe']).lower()}",
            f"startup_grace_ms = {s['startup_grace_ms']}", "",
            "[heartbeat]", f"interval_ms = {s['interval_ms']}",
            f"dead_after = {s['dead_after']}",
            f"port = {HB_PORT}", "tune_neighbours = false", "",
        ]  # fmt: skip
        for ch in ("lan", "hb"):
            lines += ["[[channels]]", f'name = "{ch}"', f'address = "{host.addr(ch)}"', ""]
        for n in self.nodes:
            h = self.lab.host(n)
            addrs = ", ".join(f'{ch} = "{h.addr(ch)}"' for ch in ("lan", "hb"))
            lines += ["[[members]]", f'id = "{n}"', f"addresses = {{ {addrs} }}", ""]
        for i, g in enumerate(self.groups):
            prio = ", ".join(f"{n} = {p}" for n, p in self.priorities(i).items())
            lines += ["[[groups]]", f'name = "{g}"', f'vip = "{group_vip(i)}/24"',
                      'interface = "lan"', f"priorities = {{ {prio} }}"]  # fmt: skip
            svcs = ", ".join(f'{{ name = "{n}", port = {p}, sync_channel = "hb" }}'
                             for n, p in self.services.get(g, {}).items())  # fmt: skip
            lines += [f"services = [{svcs}]", ""]
        path = os.path.join(host.workdir, f"{name}.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        return path

    # -- etcd -------------------------------------------------------------------------------
    def start_etcd(self, member: str) -> LabProcess:
        h = self.lab.host(member)
        ip = h.addr("st")
        initial = ",".join(
            f"{e}=http://{self.lab.host(e).addr('st')}:{PEER_PORT}" for e in self.etcd
        )
        argv = [
            "etcd", "--name", member, "--data-dir", str(h.workdir / "data"),
            "--listen-client-urls", f"http://{ip}:{CLIENT_PORT}",
            "--advertise-client-urls", f"http://{ip}:{CLIENT_PORT}",
            "--listen-peer-urls", f"http://{ip}:{PEER_PORT}",
            "--initial-advertise-peer-urls", f"http://{ip}:{PEER_PORT}",
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"nonstop-{self.lab.prefix}",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--log-level", "warn",
        ]  # fmt: skip
        p = h.run(argv, name=f"etcd-{member}")
        self.procs[member] = p
        return p

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        h = self.lab.host(self.nodes[0])
        eps = ",".join(self.endpoints)
        return h.sh(["etcdctl", "--endpoints", eps, "--command-timeout", "2s", *args], check=check)

    def etcd_leader(self) -> str | None:
        r = self.etcdctl("endpoint", "status", "-w", "json", check=False)
        try:
            rows = json.loads(r.stdout)
        except ValueError:
            return None
        for row, e in zip(rows, self.etcd, strict=False):
            st = row["Status"]
            if st["header"]["member_id"] == st["leader"]:
                name = row["Endpoint"]
                for m in self.etcd:
                    if self.lab.host(m).addr("st") in name:
                        return m
                return e
        return None

    def wait_etcd(self, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = self.etcdctl("endpoint", "health", check=False)
            if r.returncode == 0 and (r.stdout + r.stderr).count("is healthy") == len(self.etcd):
                return
            time.sleep(0.1)
        raise TimeoutError("the etcd cluster did not become healthy")

    # -- agents -----------------------------------------------------------------------------
    def start_agent(self, name: str) -> LabProcess:
        argv = [sys.executable, "-m", "nonstop", "-v", "groups", "agent", "--config",
                self.config_paths[name]]  # fmt: skip
        p = self.lab.host(name).run(argv, name=f"agent-{name}")
        self.procs[name] = p
        return p

    def start(self) -> None:
        """A cold start: the agents first (each retries its session until etcd answers), then
        etcd. So every node opens its session within a keep-alive interval or two of the
        others however slowly Python starts on a loaded box, and the groups spread by
        priority (a node that came up seconds late would find its groups taken: no
        preemption)."""
        procs = [self.start_agent(n) for n in self.nodes]
        for n, p in zip(self.nodes, procs, strict=True):
            p.wait_output(f"groups agent {n} up", timeout=60)
        for e in self.etcd:
            self.start_etcd(e)
        self.wait_etcd()

    def state_dir(self, node: str) -> str:
        return os.path.join(self.lab.host(node).workdir, "state")

    def endpoint(self, node: str, service: str) -> str:
        return os.path.join(self.state_dir(node), f"{service}.sock")

    def local_status(self, node: str) -> dict[str, Any] | None:
        """What ``node``'s agent wrote about itself (groups-status.json); None if unreadable."""
        try:
            with open(os.path.join(self.state_dir(node), "groups-status.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def sessions(self, node: str, service: str) -> dict[str, Any]:
        """The session worker's last status of ``service`` on ``node`` ({} if none)."""
        st = self.local_status(node)
        rows = ((st or {}).get("sessions") or {}).get("services") or []
        return next((r for r in rows if r.get("name") == service), {})

    def start_stream_service(
        self, node: str, group: str, service: str, *, rate: float = 5.0, size: int = 100,
        tag: str = "",
    ) -> LabProcess:  # fmt: skip
        """The stream checker's protected server for ``service`` of ``group`` on ``node`` (a
        standby until its node takes the group). Start the agent first."""
        path = self.endpoint(node, service)
        self.wait(lambda: os.path.exists(path), 30, f"{path} to exist")
        host = self.lab.host(node)
        report = os.path.join(host.workdir, f"{service}{tag}.json")
        argv = [sys.executable, "-m", "nonstop.streams", "protected-server",
                "--host", group_vip(self.groups.index(group)),
                "--port", str(self.services[group][service]), "--agent", path,
                "--rate", str(rate), "--size", str(size), "--report", report]  # fmt: skip
        return host.run(argv, name=f"{service}-{node}{tag}")

    def log(self, name: str) -> str:
        p = self.procs.get(name)
        return p.output() if p is not None else ""

    # -- observation --------------------------------------------------------------------------
    def status(self, node: str | None = None, *, store: bool = True) -> dict[str, Any] | None:
        """``nonstop groups status`` run on ``node`` (default the first); None if it failed
        (``store=False``: also when only the store is unavailable, exit 1 with JSON)."""
        node = node or self.nodes[0]
        r = self.lab.host(node).sh(
            [sys.executable, "-m", "nonstop", "groups", "status", "--format", "json",
             "--config", self.config_paths[node]], check=False)  # fmt: skip
        if r.returncode != 0 and (store or r.returncode != 1 or not r.stdout.strip()):
            return None
        return json.loads(r.stdout)

    def members(self) -> set[str]:
        """Nodes whose member key is in etcd (their lease lives)."""
        r = self.etcdctl("get", "/nonstop/lab/members/", "--prefix", "--keys-only", check=False)
        return {line.rsplit("/", 1)[-1] for line in r.stdout.split() if "/members/" in line}

    def holders(self) -> dict[str, list[str]]:
        """group -> nodes whose lan carries its VIP now (read from each node's kernel by
        netlink, in process: no command per poll on a loaded box)."""
        out: dict[str, list[str]] = {g: [] for g in self.groups}
        for n in self.nodes:
            ipr = self.lab.host(n).iproute()
            (idx,) = ipr.link_lookup(ifname="lan")
            have = {a.get("address") for a in ipr.get_addr(family=socket.AF_INET, index=idx)}
            for i, g in enumerate(self.groups):
                if group_vip(i) in have:
                    out[g].append(n)
        return out

    def wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        end = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.02)

    def wait_all_held(self, timeout: float = 10.0, exclude: tuple[str, ...] = ()) -> dict:
        def ok() -> dict[str, list[str]] | None:
            h = self.holders()
            good = all(len(v) == 1 and v[0] not in exclude for v in h.values())
            return h if good else None

        return self.wait(ok, timeout, "every group held by exactly one node")

    # -- the ARP watcher in the peer ----------------------------------------------------------
    def start_watch(self) -> None:
        argv = [sys.executable, "-m", "nonstop.store.arpwatch", "--ifname", "lan"]
        for i in range(len(self.groups)):
            argv += ["--vip", group_vip(i)]
        self._watch_out = self.lab.host("peer").workdir / "arpwatch.json"
        with open(self._watch_out, "wb") as out:
            self.watcher = self.lab.host("peer").run(argv, stdout=out, name="arpwatch")

    def stop_watch(self) -> dict[str, Any]:
        assert self.watcher is not None
        self.watcher.send_signal(signal.SIGTERM)
        self.watcher.wait(timeout=5)
        self.watcher = None
        return json.loads(self._watch_out.read_text())

    def mac_to_node(self) -> dict[str, str]:
        return {self.lab.host(n).mac("lan"): n for n in self.nodes}
