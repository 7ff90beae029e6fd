"""``nonstop bench bgp``: full-table load from a real peer into our Loc-RIB, against BIRD->BIRD.

A feeder (BIRD with N static routes from a generated file, or FRR with N ``network``
statements) sends the table; the receiver is either our speaker (``load_s``) or a second BIRD
(``baseline_load_s``), each timed from its process start until all N routes are in its table.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from nonstop.cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, add_format_option

NOT_YET = ("takeover_ms is a LOCAL restart here (hot standby on the same host, sockets passed "
           "over a unix socket); --takeover node measures the takeover by another node")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bgp", help="BGP full-table load vs BIRD->BIRD, RSS, standby resume",
                       description=__doc__)
    p.add_argument("--routes", type=int, default=100_000, help="table size (default 100000)")
    p.add_argument("--peer", choices=("bird", "frr"), default="bird", help="the feeder")
    p.add_argument("--no-baseline", dest="baseline", action="store_false")
    p.add_argument("--timeout", type=float, default=600.0, help="per load (s)")
    p.add_argument("--takeovers", type=int, default=5,
                   help="takeovers (SIGKILL of the master; default 5)")
    p.add_argument("--takeover", choices=("local", "node", "speaker"), default="local",
                   help="local: a hot standby on the same host continues the sockets; node: "
                   "the other node of a nonstop agent pair restores the connection (TCP_REPAIR) "
                   "and its speaker continues from the journal it followed; speaker: the "
                   "master's speaker alone is killed and started again, and takes the journal "
                   "back from the other node's standby (node and speaker: BIRD feeder only)")
    p.add_argument("--spare", action="store_true",
                   help="--takeover speaker: a second speaker waits on the master node for the "
                   "connections (no process start after the kill)")
    p.add_argument("--out", help="also write the JSON to this file")
    add_format_option(p)
    p.set_defaults(func=cmd_bgp, format="json")


def _topology() -> Any:
    from nonstop.lab import Topology

    topo = Topology(source="<bench bgp>")
    topo.channel("lan", v4="10.77.0.0/24", v6="fd77::/64")
    topo.host("ours", channels={"lan": 11})
    topo.host("feed", channels={"lan": 12})
    topo.host("base", channels={"lan": 13})
    return topo


OURS = """
asn = 65001
router_id = "10.77.0.11"
api_socket = "@API@"
replica_socket = "@API@.replica"
[[peers]]
name = "feed"
address = "10.77.0.12"
asn = 65002
connect_retry = 1
families = ["ipv4"]
[[originate]]
prefix = "10.77.100.0/24"
"""


def run(n: int, peer: str, baseline: bool, timeout: float, tick: Any,
        takeovers: int = 5) -> dict[str, Any]:
    from nonstop.bench.bgp import (
        BirdPeer,
        FrrPeer,
        OurSpeaker,
        rss_mb,
        standby_resume_ms,
        table_prefixes,
        wait_for,
        write_static,
    )
    from nonstop.lab import Lab

    out: dict[str, Any] = {"bench": "bgp", "routes": n, "peer": peer}
    with Lab(_topology()) as lab:
        feed_host = lab.host("feed")
        receivers = [{"name": "ours", "local": "10.77.0.12", "address": "10.77.0.11",
                      "asn": 65001},
                     {"name": "bird_base", "local": "10.77.0.12", "address": "10.77.0.13",
                      "asn": 65003}]
        if peer == "bird" or baseline:
            bird = BirdPeer(feed_host, asn=65002, router_id="10.77.0.12")
            static = bird.dir / "table.conf"
            write_static(static, n)
            bird.write_config(receivers if peer == "bird" else receivers[1:],
                              static_file=static)
            bird.start()
            wait_for(lambda: bird.count("master4") >= n, timeout, "feeder BIRD table")
        if peer == "frr":
            frr = FrrPeer(feed_host, asn=65002, router_id="10.77.0.12", listen="10.77.0.12",
                          name="frr")
            frr.write_config([{"address": "10.77.0.11", "asn": 65001, "hold": 90,
                               "keepalive": 30}], networks4=table_prefixes(n))
            frr.start()
        tick()
        if baseline:
            base = BirdPeer(lab.host("base"), asn=65003, router_id="10.77.0.13", name="base")
            base.write_config([{"name": "feed", "local": "10.77.0.13", "address": "10.77.0.12",
                                "asn": 65002}])
            base.start()
            wait_for(lambda: base.count("master4") >= n, timeout, "baseline BIRD load",
                     step=0.05)
            done = time.time()
            since = base.protocol("feed")["since"]  # HH:MM:SS.mmm, local wall clock
            out["baseline_load_s"] = round(_since_to_s(since, done), 3)
            assert base.proc is not None
            out["baseline_rss_mb"] = rss_mb(base.proc.pid).get("VmHWM")
            base.proc.terminate()
        tick()
        ours = OurSpeaker(lab.host("ours"), OURS)
        ours.start()
        row = wait_for(lambda: (r := ours.peer("feed"))["prefixes_received"]["ipv4"] >= n and r,
                       timeout, "our speaker's load", step=0.05)
        out["load_s"] = round(row["since_s"], 3)
        assert ours.proc is not None
        mem = rss_mb(ours.proc.pid)
        out["rss_mb"] = mem.get("VmHWM")
        out["rss_now_mb"] = mem.get("VmRSS")
        s = ours.peer("feed")
        out["loc_rib"] = ours.get("/routes?limit=1")["total"]
        out["session_state"] = s["state"]
        if "baseline_load_s" in out:
            out["load_ratio"] = round(out["load_s"] / out["baseline_load_s"], 2)
        tick()
        if takeovers:
            out.update(_takeovers(ours, bird if peer == "bird" else None, frr if peer == "frr"
                                  else None, takeovers, timeout))
    out.update(standby_resume_ms(n))
    if not takeovers:
        out["takeover_ms"] = None
        out["session_resets"] = None
        out["withdrawals_seen_by_peer"] = None
    out["not_yet"] = NOT_YET
    out["note"] = ("timings are wall clock on a shared 2-CPU machine (other jobs running): "
                   "noisy; load_s: from the receiver's session Established to all N routes in "
                   "its table, "
                   "polled every 50 ms")
    tick()
    return out


def _takeovers(ours: Any, bird: Any, frr: Any, k: int, timeout: float) -> dict[str, Any]:
    """k SIGKILLs of the master speaker; the hot standby continues the session each time."""
    import statistics

    from nonstop.bench.bgp import wait_for

    host = ours.host
    argv = [sys.executable, "-m", "nonstop", "bgp", "speaker", "--config", ours.config]
    master = ours.proc
    before = bird.protocol("ours")["since"] if bird else None
    frr_before = frr.neighbour("10.77.0.11") if frr else None
    times: list[float] = []
    resets = 0
    for i in range(k):
        standby = host.run([*argv, "--standby"], name=f"standby{i}")
        wait_for(lambda: ours.get("/summary")["standbys"] >= 1, timeout, "standby joined")
        time.sleep(1.0)  # let it apply the history it was sent
        killed = time.monotonic()
        master.kill()
        master.reap()
        pid = standby.pid
        s = wait_for(lambda: (x := _summary(ours)) and x["pid"] == pid and x,  # noqa: B023
                     timeout, "standby took over", step=0.02)
        times.append((s["takeover"]["resumed_at"] - killed) * 1000)
        resets += s["takeover"]["resets"]
        master = standby
    time.sleep(1.0)
    if bird:
        p = bird.protocol("ours")
        resets += int(p["since"] != before or not p["info"].startswith("Established"))
        withdrawals = bird.stats("ours").get("ipv4", {}).get("import_withdraws")
    else:
        n = frr.neighbour("10.77.0.11")
        resets += n.get("connectionsDropped", 0) - frr_before.get("connectionsDropped", 0)
        withdrawals = None  # bgpd counts no received withdrawals; its session counters are
        # checked (resets) instead
    times.sort()
    return {
        "takeovers": k,
        "takeover_ms": {"p50": round(statistics.median(times), 2),
                        "p99": round(times[min(len(times) - 1, int(0.99 * len(times)))], 2),
                        "max": round(times[-1], 2)},
        "session_resets": resets,
        "withdrawals_seen_by_peer": withdrawals,
    }


def _summary(ours: Any) -> dict[str, Any] | None:
    try:
        return ours.get("/summary")  # type: ignore[no-any-return]
    except (OSError, RuntimeError):
        return None


def _since_to_s(since: str, done: float) -> float:
    """Seconds from BIRD's 'since' (HH:MM:SS.mmm today, local time) to the wall time ``done``."""
    lt = time.localtime(done)
    h, m, sec = since.split(":")
    start = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, int(h), int(m), 0, 0, 0, -1))
    return done - (start + float(sec))


def cmd_bgp(args: argparse.Namespace) -> int:
    from nonstop.bench.cli import emit, lacks_root, with_progress

    if lacks_root():
        return EXIT_USAGE
    if not 1 <= args.routes <= 1 << 20:
        print("nonstop bench bgp: --routes 1..1048576", file=sys.stderr)
        return EXIT_USAGE
    if args.takeover in ("node", "speaker"):
        from nonstop.bench.bgp_node import run_node

        if args.peer != "bird":
            print(f"nonstop bench bgp: --takeover {args.takeover} needs --peer bird",
                  file=sys.stderr)
            return EXIT_USAGE
        result = with_progress(3, lambda tick: run_node(args.routes, args.takeovers,
                                                        args.timeout, tick, args.takeover,
                                                        args.spare),
                               label="bench bgp")
        if emit(result, args):
            what = "takeovers to the other node" if args.takeover == "node" else \
                "restarts of the speaker alone"
            print(f"{result['routes']} routes: load {result['load_s']} s, {result['takeovers']} "
                  f"{what}: {result['takeover_ms']} ms, resets "
                  f"{result['session_resets']}, withdrawals {result['withdrawals_seen_by_peer']}")
        ok = result.get("loc_rib_after", 0) >= args.routes and not result.get("session_resets")
        return EXIT_OK if ok else EXIT_FAIL
    result = with_progress(5, lambda tick: run(args.routes, args.peer, args.baseline,
                                               args.timeout, tick, args.takeovers),
                           label="bench bgp")
    if emit(result, args):
        print(f"{result['routes']} routes from {result['peer']}: load {result['load_s']} s "
              f"(BIRD->BIRD {result.get('baseline_load_s')} s), RSS {result['rss_mb']} MB, "
              f"standby resume {result['resume_ms']} ms")
    ok = (result.get("loc_rib") or 0) >= args.routes and not result.get("session_resets")
    return EXIT_OK if ok else EXIT_FAIL
