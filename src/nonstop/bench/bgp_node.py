"""Cross-node takeovers of our speaker (shared by ``nonstop bench bgp --takeover node`` and
tests/netns/test_bgp_takeover.py): the demo lab, a nonstop agent pair protecting VIP:179, one
speaker per node (the master's serves, the other follows its journal), BIRD in ``peer``."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nonstop.bench.bgp import BirdPeer, FrrPeer, rss_mb, wait_for, write_static
from nonstop.cluster import STEADY_TIMERS, Cluster, ClusterSpec
from nonstop.lab import Lab, LabProcess

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

[[originate]]
prefix = "10.77.100.0/24"

[[originate]]
prefix = "fd77:100::/48"
"""

# the peers in host ``peer``: BIRD on its lan address, FRR on a second address of the same lan
PEERS: dict[str, dict[str, Any]] = {
    "bird": {"address": "10.77.0.1", "asn": 65002},
    "frr": {"address": "10.77.0.2", "asn": 65003},
}
FRR_STREAM = [f"10.77.{90 + i}.0/24" for i in range(4)]  # FRR announces and withdraws these
FRR_STATIC = ["10.77.60.0/24", "fd77:60::/48"]
# with FRR on board, FRR's stream is not exported to BIRD: BIRD imports only routes that never
# churn, so any withdrawal BIRD counts is ours (the same holds for FRR through lastUpdate)
_NO_FRR_STREAM = ('export = { terms = [ { prefixes = [ { prefix = "10.77.88.0/21", le = 24 } ], '
                  'action = "reject" } ] }')


def peer_block(name: str, md5: str | None, others: tuple[str, ...]) -> str:
    p = PEERS[name]
    lines = ["[[peers]]", f'name = "{name}"', f'address = "{p["address"]}"', f"asn = {p['asn']}",
             "passive = true", "hold_time = 9", 'next_hop6 = "fd77::11"']
    if md5:
        lines.append(f'md5_password = "{md5}"')
    if name == "bird" and "frr" in others:
        lines.append(_NO_FRR_STREAM)
    return "\n".join(lines) + "\n"


class BgpPair:
    """The two speakers under the cluster; ``start(node)`` runs one (a standby on a backup)."""

    def __init__(self, c: Cluster, routes: list[str] | None = None, *,
                 peers: tuple[str, ...] = ("bird",), md5: dict[str, str] | None = None) -> None:
        self.c = c
        self.peers = peers
        self.procs: dict[str, LabProcess] = {}
        self.previous: dict[str, LabProcess] = {}  # the speaker each node ran before (its log)
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
            text += "".join("\n" + peer_block(p, (md5 or {}).get(p), peers) for p in peers)
            path = d / "speaker.toml"
            path.write_text(text)
            self.configs[node] = str(path)

    def start(self, node: str) -> LabProcess:
        self.n += 1
        path = self.c.endpoint(node, "bgp")
        self.c.wait(lambda: os.path.exists(path), 10.0, f"{path} to exist", poll=0.02)
        argv = [sys.executable, "-m", "nonstop", "-v", "bgp", "speaker", "--config",
                self.configs[node]]
        if node in self.procs:
            self.previous[node] = self.procs[node]
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

    def routes_total(self, node: str) -> int:
        from nonstop.bgp.cli import fetch

        sock = os.path.join(os.path.dirname(self.configs[node]), "bgp-api.sock")
        return int(fetch(sock, "/routes?limit=1")["total"])

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
        n = len(self.peers)
        return m["connections"] >= n and bool(m.get("sync", {}).get("protecting")) and \
            b.get("sync", {}).get("held_connections", 0) >= n


def bird_world(lab: Lab, static4: list[str] | None = None,
               static_file: Any = None, password: str | None = None) -> BirdPeer:
    bird = BirdPeer(lab.host("peer"), asn=65002, router_id="10.77.0.1")
    bird.write_config(
        [{"name": "ours", "local": "10.77.0.1", "address": VIP, "asn": 65001,
          "next_hop6": "fd77::1", "hold": 9, "password": password,
          "extra": "strict bind yes; "}],  # listen on 10.77.0.1 only: FRR listens on .2
        static4=static4 if static4 is not None else ["10.77.50.0/24", "10.77.51.0/24"],
        static6=["fd77:50::/48"], static_file=static_file,
        extra="protocol static stream { ipv4; " + " ".join(
            f"route {p} blackhole;" for p in STREAM) + " }")
    return bird

def frr_world(lab: Lab, password: str | None = None) -> FrrPeer:
    """FRR bgpd in ``peer`` on a second lan address (10.77.0.2, added in the lab namespace and
    gone with it), connecting to the VIP from there: a host route to the VIP with that source
    (BIRD binds 10.77.0.1 itself; FRR's ``update-source`` needs zebra's interface list, and
    bgpd runs without zebra)."""
    host, addr = lab.host("peer"), PEERS["frr"]["address"]
    dev = host.ifname("lan")
    host.sh(["ip", "addr", "add", f"{addr}/{host.prefixlen('lan')}", "dev", dev])
    host.sh(["ip", "route", "add", f"{VIP}/32", "dev", dev, "src", addr])
    frr = FrrPeer(host, asn=PEERS["frr"]["asn"], router_id=addr, listen=addr)
    frr.write_config([{"address": VIP, "asn": 65001, "password": password}],
                     networks4=[p for p in FRR_STATIC if ":" not in p],
                     networks6=[p for p in FRR_STATIC if ":" in p])
    return frr


def frr_stream(frr: FrrPeer, on: bool) -> None:
    """FRR announces (on) or withdraws its stream prefixes: one UPDATE burst each way."""
    no = "" if on else "no "
    frr.configure(f"router bgp {PEERS['frr']['asn']}", "address-family ipv4 unicast",
                  *(f"{no}network {p}" for p in FRR_STREAM))


def cluster(lab: Lab, md5: dict[str, str] | None = None) -> Cluster:
    # STEADY_TIMERS, a 450 ms fence timeout (a SIGKILLed agent is detected at once anyway, by
    # its closed link), so the box's freezes do not fence a healthy master (at 50 ms x 3 an 83 ms
    # stall fenced the new master once, at 100 ms x 3 a ~200 ms one did, and a fenced master
    # drops the sessions: docs/bgp.md)
    c = Cluster(lab, ClusterSpec(services={"bgp": 179}, preempt=False, **STEADY_TIMERS))
    if md5:  # the service's TCP-MD5 keys ([[services]] md5): ClusterSpec has no field for them
        for path in c.config_paths.values():
            text = Path(path).read_text()
            keys = ", ".join(f'"{a}" = "{pw}"' for a, pw in md5.items())
            if "port = 179\n" in text:
                Path(path).write_text(text.replace("port = 179\n",
                                                   f"port = 179\nmd5 = {{ {keys} }}\n", 1))
    c.start()
    c.wait_ready(timeout=20)
    return c


def take_over(c: Cluster, pair: BgpPair, master: str, timeout: float = 30.0
              ) -> tuple[str, dict[str, Any], float]:
    """SIGKILL of ``master``'s agent and speaker; the other node's speaker takes over; the
    killed node comes back as the backup with a new standby speaker. Returns the new master,
    its takeover record and SIGKILL -> KEEPALIVE written (ms)."""
    backup = next(x for x in c.spec.nodes if x != master)
    wait_for(lambda: pair.ready(master), timeout, "protected and followed")
    killed = time.monotonic()
    c.procs[master].kill()
    pair.procs[master].kill()
    c.wait_role(backup, "master", timeout=5)
    pid = pair.procs[backup].pid
    try:
        s = wait_for(lambda: (x := pair.summary(backup)) and x["pid"] == pid and x, timeout,
                     "the standby took over")
    except TimeoutError:
        print(pair.procs[backup].output()[-4000:], file=sys.stderr)
        raise
    tk = s["takeover"]
    pair.procs[master].reap()
    c.start_agent(master)  # generous: an agent's start takes seconds on a loaded box
    c.wait_role(master, "backup", timeout=30)
    pair.start(master)
    return backup, tk, (tk["resumed_at"] - killed) * 1000


def restart_speaker(c: Cluster, pair: BgpPair, master: str, timeout: float = 30.0, *,
                    spare: bool = False) -> tuple[dict[str, Any], float]:
    """SIGKILL of ``master``'s speaker alone (its agent stays master and keeps the
    connections). Started again there (``spare``: a second speaker started beforehand, waiting
    in the agent's endpoint for the connections, goes on at once), it takes the journal back
    from the standby, which exits (EXIT_DEPOSED) and is started again. Returns the new
    speaker's takeover record and SIGKILL -> KEEPALIVE written (ms)."""
    backup = next(x for x in c.spec.nodes if x != master)
    wait_for(lambda: pair.ready(master), timeout, "protected and followed")
    standby, dead = pair.procs[backup], pair.procs[master]
    if spare:
        nxt = pair.start(master)  # blocks in the endpoint (the port is taken) until adopted

        def waiting() -> bool:
            st = c.status(master)
            return bool(st and st["sessions"] and st["sessions"][0]["standby_waiting"] >= 1)

        wait_for(waiting, timeout, "the spare waiting in the agent's endpoint")
    killed = time.monotonic()
    dead.kill()
    dead.reap()
    pid = (nxt if spare else pair.start(master)).pid
    s = wait_for(lambda: (x := pair.summary(master)) and x["pid"] == pid and x, timeout,
                 "the restarted speaker serving")
    try:
        standby.wait(timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the standby on {backup} did not end after giving the journal "
                           f"back:\n{standby.output()[-3000:]}") from None
    pair.start(backup)
    return s["takeover"], (s["takeover"]["resumed_at"] - killed) * 1000


def run_node(n: int, takeovers: int, timeout: float, tick: Any,
             mode: str = "node", spare: bool = False) -> dict[str, Any]:
    """``nonstop bench bgp --takeover node|speaker``: BIRD feeds n routes to the VIP; k
    takeovers to the other node (node) or restarts of the master's speaker alone (speaker);
    BIRD's view checked after."""
    from nonstop.lab import demo_topology

    out: dict[str, Any] = {"bench": "bgp", "takeover_mode": mode, "routes": n, "peer": "bird",
                           "spare": spare}
    with Lab(demo_topology()) as lab:
        c = cluster(lab)
        try:
            pair = BgpPair(c)
            static = Path(lab.host("peer").workdir) / "table.conf"
            write_static(static, n)
            bird = bird_world(lab, static4=[], static_file=static)
            bird.start()
            wait_for(lambda: bird.count("master4") >= n, timeout, "feeder BIRD table")
            tick()
            master = c.master() or ""
            pair.start(master).wait_output("serving", 15)
            row = wait_for(lambda: (s := pair.summary(master)) and
                           s["peers"][0]["prefixes_received"]["ipv4"] >= n and s["peers"][0],
                           timeout, "our speaker's load", step=0.05)
            out["load_s"] = round(row["since_s"], 3)
            out["rss_mb"] = rss_mb(pair.procs[master].pid).get("VmHWM")
            backup = next(x for x in c.spec.nodes if x != master)
            t0 = time.monotonic()
            pair.start(backup)
            wait_for(lambda: pair.ready(master), timeout, "the standby to catch up", step=0.05)
            out["standby_catch_up_s"] = round(time.monotonic() - t0, 3)
            tick()
            since = bird.protocol("ours")["since"]
            times, infos = [], []
            for _ in range(takeovers):
                if mode == "speaker":
                    tk, ms = restart_speaker(c, pair, master, timeout, spare=spare)
                else:
                    master, tk, ms = take_over(c, pair, master, timeout)
                times.append(ms)
                infos.append(tk)
            time.sleep(1.0)
            p = bird.protocol("ours")
            resets = sum(t["resets"] for t in infos)
            resets += int(p["since"] != since or not p["info"].startswith("Established"))
            out["takeovers"] = takeovers
            times.sort()
            out["takeover_ms"] = {
                "p50": round(statistics.median(times), 2),
                "p99": round(times[min(len(times) - 1, int(0.99 * len(times)))], 2),
                "max": round(times[-1], 2)} if times else None
            out["journal_apply_at_takeover_ms"] = max((t["applied_ms"] for t in infos),
                                                      default=None)
            out["session_resets"] = resets
            out["withdrawals_seen_by_peer"] = bird.stats("ours").get("ipv4", {}).get(
                "import_withdraws")
            s = pair.summary(master)
            out["loc_rib_after"] = pair.routes_total(master)
            out["journal_records"] = s["journal"]["records"] if s else None
            tick()
        finally:
            for p in pair.procs.values():
                p.kill()
    out["note"] = ("takeover_ms: SIGKILL of the master's agent and speaker -> the other node's "
                   "speaker wrote its KEEPALIVE on the restored connection" if mode == "node" else
                   "takeover_ms: SIGKILL of the master's speaker alone -> the next speaker "
                   "on the same node (a spare waiting already, or else started after the kill: "
                   "its start included) wrote its KEEPALIVE, with the journal taken back from "
                   "the standby") + \
        "; wall clock on a shared 2-CPU machine: noisy"
    return out
