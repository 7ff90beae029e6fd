"""Local crash recovery of a supervised service: the agent pair protects the stream checker's
protected server (run by the agents' supervisors, ``[[services]]`` with a command); a peer
streams both ways on N connections; the service on the master is SIGKILLed K times. The agent
stays, the endpoint keeps every connection, the next instance adopts them from their last commit.

Used by ``nonstop bench restart`` and tests/netns/test_app_restart_netns.py. The peer's client
here is the stream checker's client that also records every arrival, so the interruption of each
kill is measured as the peer sees it: last byte before the kill to the first byte after it.

``python -m nonstop.bench.restart client ...`` runs that client (in the peer's namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from bisect import bisect_right
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from nonstop.bench.hostload import HostLoad
from nonstop.cluster import (
    STEADY_TIMERS,
    Cluster,
    ClusterSpec,
    SupervisedCluster,
    listener_pid,
    service_lines,
)

if TYPE_CHECKING:
    from nonstop.lab import Lab

PORT = 7400
SERVICE = "stream"


def make_cluster(lab: Lab, lines: list[str]) -> SupervisedCluster:
    # STEADY_TIMERS: local restarts need no fast failover, and the box's freezes fenced healthy
    # masters at 20 ms and at 100 ms
    spec = ClusterSpec(services={SERVICE: PORT}, preempt=False, **STEADY_TIMERS)
    return SupervisedCluster(lab, spec, {SERVICE: lines})


# ---- observation -------------------------------------------------------------------------------


def session(c: Cluster, node: str) -> dict[str, Any]:
    st = c.status(node)
    return {} if st is None or not st["sessions"] else st["sessions"][0]


def instances(c: Cluster, node: str) -> list[dict[str, Any]]:
    st = c.status(node)
    return [] if st is None else st["services"]["instances"]


def dump_logs(c: SupervisedCluster) -> None:
    """The agents' and their service instances' log tails (pytest shows them with a failure)."""
    for n in c.spec.nodes:
        with contextlib.suppress(OSError):
            print(f"----- log of {n}\n{c.log_text(n)[-8000:]}")
        logs = os.path.join(c.lab.host(n).workdir, "state", "services", "logs")
        for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
            with contextlib.suppress(OSError), open(os.path.join(logs, name)) as f:
                print(f"----- {n} {name}\n{f.read()[-3000:]}")


@contextlib.contextmanager
def running(c: SupervisedCluster) -> Iterator[SupervisedCluster]:
    """Start ``c``; on a failure print its logs (``dump_logs``); stop every process at the end."""
    c.start()
    try:
        yield c
    except BaseException:
        dump_logs(c)
        raise
    finally:
        for p in list(c.procs.values()):
            p.terminate(timeout=10)


def wait_active(c: Cluster, node: str, conns: int, standbys: int, timeout: float = 30.0,
                not_pid: int | None = None) -> int:  # fmt: skip
    """Until an instance listens (not ``not_pid``), the master's endpoint holds ``conns``
    connections and ``standbys`` instances wait; returns the listener's pid."""
    pid: int | None = None
    seen: dict[str, Any] = {}

    def ok() -> bool:
        nonlocal pid
        pid = listener_pid(c, node, PORT)
        seen["listener"] = pid
        if pid is None or pid == not_pid:
            return False
        s = session(c, node)
        insts = instances(c, node)
        seen.update(connections=s.get("connections"), standby_waiting=s.get("standby_waiting"),
                    instances=[(i["state"], i["pid"]) for i in insts])  # fmt: skip
        return (
            s.get("connections", 0) >= conns
            and s.get("standby_waiting", 0) >= standbys
            and all(i["state"] == "ready" and i["pid"] for i in insts)
        )

    try:
        c.wait(ok, timeout, f"{node}: an active instance, {conns} connections, {standbys} "
               "standbys", poll=0.01)  # fmt: skip
    except TimeoutError as e:  # what was missing, and whether the node is still master
        raise TimeoutError(f"{e}; last seen: {seen}, role {c.role(node)}, previous listener "
                           f"{not_pid}") from None  # fmt: skip
    assert pid is not None
    return pid


# ---- the peer's client: the stream checker's, with every arrival recorded ----------------------


async def _client(host: str, port: int, conns: int, rate: float, size: int) -> dict[str, Any]:
    """The stream checker's client until SIGTERM, with every arrival recorded."""
    from nonstop.streams.run import client

    return await client(host, port, conns=conns, duration=1e9, rate=rate, size=size,
                        connect_timeout=10.0, record_arrivals=True)  # fmt: skip


def start_client(c: Cluster, conns: int, rate: float, size: int, out: str) -> subprocess.Popen:
    vip = c.spec.vip.split("/")[0]
    argv = [sys.executable, "-m", "nonstop.bench.restart", "client", "--host", vip, "--port",
            str(PORT), "--conns", str(conns), "--rate", str(rate), "--size", str(size),
            "--out", out]  # fmt: skip
    return c.lab.host("peer").run(argv, name="restart-client").popen


def interruptions(arrivals: list[list[float]], kills: list[float]) -> tuple[list[float], list]:
    """Per (kill, connection): last arrival before the kill to the first after it (ms), and
    kill to the first arrival after it (ms)."""
    gaps, after = [], []
    for arr in arrivals:
        for k in kills:
            i = bisect_right(arr, k)
            if 0 < i < len(arr):
                gaps.append((arr[i] - arr[i - 1]) * 1000)
                after.append((arr[i] - k) * 1000)
    return gaps, after


def pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    v = sorted(values)

    def at(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))], 2)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(v[-1], 2)}


# ---- one run -----------------------------------------------------------------------------------


def run(lab: Lab, *, sessions: int = 256, kills: int = 20, runtime: str = "process",
        instances_: int = 2, rate: float = 50.0, size: int = 100, image: str = "",
        settle: float = 0.3, tick: Any = None) -> dict[str, Any]:  # fmt: skip
    """Start the pair, stream on ``sessions`` connections, SIGKILL the master's active service
    instance ``kills`` times; the result is the peer's view (kept, resets, lost, interruption)."""
    lines = service_lines(runtime=runtime, instances=instances_, rate=rate, size=size,
                          image=image)  # fmt: skip
    c = make_cluster(lab, lines)
    out_path = os.path.join(lab.host("peer").workdir, f"restart-{runtime}.json")
    load = HostLoad().start()
    with running(c):
        master = c.wait_ready(timeout=30)
        standbys = instances_ - 1
        wait_active(c, master, 0, standbys, timeout=60)
        client = start_client(c, sessions, rate, size, out_path)
        pid = wait_active(c, master, sessions, standbys, timeout=60)
        time.sleep(settle)
        kill_times: list[float] = []
        restart_s: list[float] = []
        for _ in range(kills):
            t = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            kill_times.append(t)
            pid = wait_active(c, master, sessions, standbys, timeout=60, not_pid=pid)
            restart_s.append(time.monotonic() - t)
            time.sleep(settle)
            if tick is not None:
                tick()
        assert c.role(master) == "master", "the master changed during local restarts"
        client.send_signal(signal.SIGTERM)
        client.wait(120)
        with open(out_path) as f:
            rep = json.load(f)
        ses = session(c, master)
        st = c.status(master) or {}
        restarts = sum(i["restarts"] for i in st.get("services", {}).get("instances", []))
    gaps, after = interruptions(rep.pop("arrivals"), kill_times)
    return {
        "sessions": sessions,
        "kills": kills,
        "runtime": runtime,
        "instances": instances_,
        "rate_per_conn": rate,
        "message_period_ms": round(1000 / rate, 2),
        "kept": rep["kept"],
        "resets": rep["resets"],
        "bytes_lost": rep["lost"] * size,
        "messages_lost": rep["lost"],
        "duplicated": rep["duplicated"],
        "corrupted": rep["corrupted"],
        "errors": rep["errors"],
        "interruption_ms": pcts(gaps),
        "kill_to_first_byte_ms": pcts(after),
        # both timed by the peer's kernel (receive timestamps); its reads lagged behind by this
        "client_read_lag_ms": rep.get("read_lag_ms"),
        "service_back_s": pcts(restart_s),
        "restarts_seen_by_supervisor": restarts,
        "endpoint_counters": ses.get("endpoint_counters", {}),
        "host": load.stop(),  # this box's speed that hour (figures move with it)
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nonstop.bench.restart")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, default=PORT)
    c.add_argument("--conns", type=int, default=1)
    c.add_argument("--rate", type=float, default=50.0)
    c.add_argument("--size", type=int, default=100)
    c.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    rep = asyncio.run(_client(a.host, a.port, a.conns, a.rate, a.size))
    with open(a.out + ".tmp", "w") as f:
        json.dump(rep, f)
    os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
