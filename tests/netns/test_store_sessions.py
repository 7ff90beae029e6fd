"""TCP sessions kept across group moves (issue 7's last must-show), on a real 3-member etcd.

Three agent nodes, two groups; g0 carries a protected service (the stream checker's protected
server on g0's VIP, on every node: a standby until its node takes g0, restarted whenever its
agent drops it). A peer streams both ways on 24 connections through a planned switchover
(``nonstop groups switchover``) and two unplanned moves (SIGKILL of the master's agent and its
service; the next master cut from the etcd members, alive and heard by the others). Checked by
the stream checker on both ends: every connection kept, 0 resets, 0 bytes lost, 0 duplicated;
g1 (no services) stays put through g0's switchover; the ARP watcher in the peer sees no VIP
answered by two nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from nonstop.cluster import STEADY_TIMERS
from nonstop.lab import Lab, LabProcess
from nonstop.store.lab import StoreCluster, group_vip, store_topology

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]

GROUP, SVC, PORT, CONNS = "g0", "stream", 7400, 24
EXIT_DROPPED = 3  # nonstop.streams.protected: the agent dropped the service


class Services:
    """The stream service on every node, restarted as a standby when its agent drops it (a
    supervisor's job; the test plays it)."""

    def __init__(self, c: StoreCluster) -> None:
        self.c = c
        self.procs: dict[str, LabProcess] = {}
        self.gen: dict[str, int] = {}
        self.restarts = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self, node: str) -> LabProcess:
        with self._lock:
            self.gen[node] = self.gen.get(node, 0) + 1
            tag = f"-{node}-{self.gen[node]}"
            p = self.procs[node] = self.c.start_stream_service(node, GROUP, SVC, tag=tag)
            return p

    def kill(self, node: str) -> None:
        with self._lock:
            p = self.procs.pop(node)
        p.kill()
        p.reap()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            for node, p in list(self.procs.items()):
                if p.returncode == EXIT_DROPPED:
                    self.restarts += 1
                    self.start(node)

    def __enter__(self) -> Services:
        for n in self.c.nodes:
            self.start(n)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def report(self, node: str) -> dict:
        p = self.procs[node]
        p.terminate()
        path = os.path.join(self.c.lab.host(node).workdir, f"{SVC}-{node}-{self.gen[node]}.json")
        with open(path) as f:
            return json.load(f)


@pytest.fixture
def cluster(lab_factory: Callable[..., Lab], request: pytest.FixtureRequest) -> Iterator:
    lab = lab_factory(store_topology(3, 3))
    c = StoreCluster(lab, nodes=3, groups=2, services={GROUP: {SVC: PORT}}, **STEADY_TIMERS)
    try:
        c.start()
        c.wait_all_held(30)
        c.start_watch()
        yield c
        result = c.stop_watch()
        assert result["duals"] == [], f"the peer reached two VIP holders: {result['duals']}"
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            raise AssertionError("the test failed")  # print the logs below
    except BaseException:
        for n in c.nodes:
            print(f"----- {n}\n{c.log(n)[-8000:]}")
        raise


def wait_protecting(c: StoreCluster, master: str, n: int, timeout: float = 30.0) -> str:
    """Until ``master`` serves ``n`` connections of g0 with a whole copy on its standby; returns
    the standby."""
    def ok() -> str | None:
        s = c.sessions(master, SVC)
        sync = s.get("sync") or {}
        if s.get("role") != "master" or s.get("connections", 0) < n or not sync.get("protecting"):
            return None
        st = c.local_status(master) or {}
        standby = (st.get("standby") or {}).get(GROUP)
        if standby is None:
            return None
        b = c.sessions(standby, SVC).get("sync") or {}
        return standby if b.get("held_connections", 0) >= n else None

    try:
        return c.wait(ok, timeout, f"{master} to protect {n} connections of {GROUP}")
    except TimeoutError:
        print(json.dumps({x: c.sessions(x, SVC) for x in c.nodes}, indent=1))
        raise


def promoted(c: StoreCluster, node: str, n: int, timeout: float = 15.0) -> dict:
    """The last promotion of g0's service on ``node`` once it restored ``n`` connections."""
    def ok() -> dict | None:
        st = c.local_status(node) or {}
        rows = ((st.get("sessions") or {}).get("last_promotion") or {}).get(GROUP) or []
        row = next((r for r in rows if r.get("service") == SVC), None)
        return row if row and row.get("restored") == n else None

    return c.wait(ok, timeout, f"{node} to restore {n} connections")


def test_sessions_kept_across_switchover_and_master_kill(cluster: StoreCluster) -> None:
    c = cluster
    held = c.wait_all_held()
    first, g1_master = held[GROUP][0], held["g1"][0]
    with Services(c) as svcs:
        svcs.procs[first].wait_output("serving", timeout=20)
        argv = [sys.executable, "-m", "nonstop.streams", "client", "--host", group_vip(0),
                "--port", str(PORT), "--conns", str(CONNS), "--duration", "3600",
                "--rate", "5", "--size", "100"]  # fmt: skip
        client = c.lab.host("peer").run(argv, stdout=subprocess.PIPE, name="client").popen
        out = b""
        try:
            # planned: switchover to the standby that holds the copy
            target = wait_protecting(c, first, CONNS)
            r = c.lab.host(first).sh(
                [sys.executable, "-m", "nonstop", "groups", "switchover", GROUP, "--to", target,
                 "--wait", "15", "--format", "json", "--config", c.config_paths[first]],
                check=False)  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
            switch_ms = json.loads(r.stdout)["ms"]
            c.wait(lambda: c.holders()[GROUP] == [target], 10, f"{GROUP} on {target}")
            p = promoted(c, target, CONNS)
            restore_ms = [p["restore_ms"]]
            assert p["from"] == "sync" and p["handed_to_service"] == CONNS, p
            assert "with its sessions synced there" in c.log(first)
            assert c.holders()["g1"] == [g1_master]  # the other group did not move

            # unplanned: SIGKILL of the master's agent and service
            standby = wait_protecting(c, target, CONNS)
            c.procs[target].kill()
            svcs.kill(target)
            c.procs[target].reap()
            t0 = time.monotonic()
            c.wait(lambda: c.holders()[GROUP] == [standby], 15, f"{GROUP} on {standby}")
            move_s = time.monotonic() - t0
            p = promoted(c, standby, CONNS)
            restore_ms.append(p["restore_ms"])
            assert p["handed_to_service"] == CONNS, p
            svcs.procs[standby].wait_output(f"serving: adopted {CONNS}", timeout=15)
            c.wait_all_held(10, exclude=(target,))

            # unplanned, the master alive: cut from etcd (not from the peer nor the others)
            last = wait_protecting(c, standby, CONNS)
            faults = [c.lab.partition(standby, e) for e in c.etcd]
            try:
                t0 = time.monotonic()
                c.wait(lambda: c.holders()[GROUP] == [last], 15, f"{GROUP} on {last}")
                cut_s = time.monotonic() - t0
                p = promoted(c, last, CONNS)
                restore_ms.append(p["restore_ms"])
                assert p["handed_to_service"] == CONNS, p
            finally:
                for f in faults:
                    f.heal()
            svcs.procs[last].wait_output(f"serving: adopted {CONNS}", timeout=15)
            time.sleep(1.0)  # the streams run on through the restored connections
        finally:
            client.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                out, _ = client.communicate(timeout=60)
        report = json.loads(out.decode().strip().splitlines()[-1])
        assert report["kept"] == CONNS, report
        assert report["resets"] == 0 and report["errors"] == {}, report
        assert report["lost"] == 0 and report["duplicated"] == 0, report
        assert report["corrupted"] == 0, report
        server = svcs.report(last)
        assert server["adopted"] == CONNS and server["errors"] == {}, server
        assert server["lost"] == 0 and server["duplicated"] == 0, server
        print(f"{GROUP}: {first} -> {target} (switchover, {switch_ms} ms) -> {standby} (kill: "
              f"VIP moved in {move_s:.2f} s) -> {last} (cut from etcd: {cut_s:.2f} s); "
              f"restore {restore_ms} ms; peer's longest silence per connection "
              f"{report['max_gap_ms']} ms; service restarts {svcs.restarts}")
