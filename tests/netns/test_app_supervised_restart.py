"""Local crash recovery under the agent (issue 4's "must show"): the agents' supervisors run the
stream checker's protected server; a peer streams both ways on 256 connections to the VIP.

- 20 SIGKILLs of the service process on the master: the agent stays and restarts it each time,
  the new process adopts every connection from the endpoint with its last commit;
- the same with the service in a podman container (3 kills);
- a crash loop on the master (the service dies at start 5 times): the master declares a local
  fault, the backup takes the VIP and the connections; once the cause is gone, ``nonstop service
  reset`` on the old master starts its service again and makes it a backup (preemption is off:
  the VIP stays where it is).
Checked by the peer's stream checker: every connection kept, 0 resets, 0 bytes lost or
duplicated (the server side aborts a connection, a reset the client counts, on any loss or
duplicate in the client's stream).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from nonstop.bench import restart as R

pytestmark = [pytest.mark.netns]


def assert_clean(res: dict, n: int) -> None:
    assert res["kept"] == n, res
    assert res["resets"] == 0 and res["errors"] == {}, res
    assert res["bytes_lost"] == 0 and res["duplicated"] == 0 and res["corrupted"] == 0, res


def test_twenty_sigkills_of_the_service_process(demo_lab) -> None:
    n = 256
    res = R.run(demo_lab, sessions=n, kills=20, instances_=1, rate=20.0, settle=0.2)
    print(json.dumps(res))
    assert_clean(res, n)
    assert res["restarts_seen_by_supervisor"] >= 20, res


def test_warm_standby_takes_over_at_once(demo_lab) -> None:
    n = 64
    res = R.run(demo_lab, sessions=n, kills=5, instances_=2, rate=50.0, settle=0.2)
    print(json.dumps(res))
    assert_clean(res, n)
    # generous: the standby is already running; a cold start of Python alone takes ~80 ms idle
    assert res["kill_to_first_byte_ms"]["p50"] < 1000, res


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
def test_three_sigkills_of_the_service_in_a_podman_container(demo_lab) -> None:
    from nonstop.app.runtime.container import ensure_python_image

    image = ensure_python_image()
    n = 256
    try:
        res = R.run(demo_lab, sessions=n, kills=3, runtime="podman", instances_=1, rate=20.0,
                    image=image, settle=0.2)  # fmt: skip
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0",
                        *(f"nonstop-{x}-stream" for x in ("node-a", "node-b"))],
                       capture_output=True, check=False)  # fmt: skip
    print(json.dumps(res))
    assert_clean(res, n)


def test_crash_loop_moves_the_vip_then_a_reset_restarts_the_service(demo_lab) -> None:
    n = 64
    flag = os.path.join(demo_lab.workdir, "crash-{node}")
    lines = R.service_lines(instances=1, rate=20.0, crash_if=flag, crash_loop_deaths=5)
    c = R.make_cluster(demo_lab, lines)
    with R.running(c):
        master = c.wait_ready(timeout=30)
        other = next(x for x in c.spec.nodes if x != master)
        R.wait_active(c, master, 0, 0, timeout=60)
        out = os.path.join(demo_lab.host("peer").workdir, "crash-loop.json")
        client = R.start_client(c, n, 20.0, 100, out)
        pid = R.wait_active(c, master, n, 0, timeout=60)
        c.wait(lambda: R.session(c, master).get("sync", {}).get("protecting"), 20,
               "the backup to hold a copy of every connection")  # fmt: skip
        open(flag.replace("{node}", master), "w").close()  # from now on it dies at start
        os.kill(pid, signal.SIGKILL)
        c.wait_role(other, "master", timeout=20)
        st = c.status(master)
        assert st is not None and st["role"] == "fault", st
        assert "crash loop" in st["reason"], st["reason"]
        assert st["services"]["crash_loops"] and st["services"]["counters"]["crash_loops"] == 1
        inst = st["services"]["instances"][0]
        assert inst["state"] == "crash-loop" and inst["last_exit"] == "exit 3", inst
        assert c.vip_holders() == [other]
        # the operator fixes the cause and clears the crash loop: no agent restart
        os.unlink(flag.replace("{node}", master))
        nonstop = [sys.executable, "-m", "nonstop"]
        r = demo_lab.host(master).sh(
            [*nonstop, "service", "reset", "stream", "--config", c.config_paths[master],
             "--format", "json"], check=False,
        )  # fmt: skip
        print(r.stdout, r.stderr)
        assert r.returncode == 0, (r.stdout, r.stderr)
        doc = json.loads(r.stdout)
        assert doc["changed"] and doc["instances"][0]["cleared"], doc
        # the fault was the crash loop alone: withdrawn, the node is a backup again
        assert doc["role_before"] == "fault" and doc["role"] == "backup", doc
        assert doc["faults"] == [], doc
        recovered = (
            "recovered from the local fault: service stream crash loop cleared "
            "(crash loop reset by the operator)"
        )
        assert doc["role_changes"] == [{"old": "fault", "new": "backup", "reason": recovered}]
        c.wait(lambda: R.instances(c, master)[0]["state"] == "ready"
               and R.instances(c, master)[0]["pid"], 20, f"{master}: the service ready again")
        st = c.status(master)
        assert st is not None and st["role"] == "backup", st["role"]
        last = st["history"][-1]
        assert (last["old"], last["new"]) == ("fault", "backup"), last
        assert last["reason"] == recovered, last
        assert st["services"]["crash_loops"] == [], st["services"]
        assert st["services"]["counters"]["crash_loop_resets"] == 1, st["services"]
        inst = st["services"]["instances"][0]
        assert inst["generation"] == 6 and inst["consecutive_deaths"] == 0, inst
        # the new master sees a backup again: eligible for the next failover
        def seen_as_backup() -> bool:
            st = c.status(other)
            return st is not None and {p["id"]: p["role"] for p in st["peers"]}[master] == "backup"

        c.wait(seen_as_backup, 10, f"{other} to see {master} as backup")
        assert c.role(other) == "master" and c.vip_holders() == [other]  # no preemption
        pid = inst["pid"]
        r = demo_lab.host(master).sh([*nonstop, "status", "--config", c.config_paths[master]],
                                     check=False)  # fmt: skip
        print(r.stdout)
        assert r.returncode == 0 and "Supervised services" in r.stdout, (r.stdout, r.stderr)
        # it stays up (it no longer dies at start): the same instance after that command
        assert R.instances(c, master)[0]["pid"] == pid
        # a second reset finds nothing to do, and says so
        r = demo_lab.host(master).sh(
            [*nonstop, "service", "reset", "stream", "--config", c.config_paths[master]],
            check=False,
        )
        assert r.returncode == 0, (r.stdout, r.stderr)
        print(r.stdout, "".join(x for x in c.log_text(master).splitlines(True) if "crash" in x))
        want = f"{master}: stream: not in a crash loop (ready), nothing to reset"
        assert r.stdout.strip() == want, r.stdout
        client.send_signal(signal.SIGTERM)
        client.wait(60)
        with open(out) as f:
            rep = json.load(f)
        rep.pop("arrivals")
        assert rep["kept"] == n and rep["resets"] == 0 and rep["lost"] == 0, rep
        assert rep["duplicated"] == 0 and rep["errors"] == {}, rep


def test_step_downs_restart_the_service_as_a_standby_not_as_deaths(demo_lab) -> None:
    """A step-down drops the service's channel and the service exits: the agent restarts it as
    a standby (a planned restart). Counted as deaths, 5 step-downs within a minute (a node
    preempted back and forth) were a crash loop: a local fault that took the node out."""
    from nonstop.cluster import STEADY_TIMERS, ClusterSpec

    lines = R.service_lines(instances=1, rate=20.0, crash_loop_deaths=5)
    spec = ClusterSpec(services={R.SERVICE: R.PORT}, **STEADY_TIMERS)  # preempt: node-a (200)
    c = R.SupervisedCluster(demo_lab, spec, {R.SERVICE: lines})
    with R.running(c):
        c.wait_role("node-a", "master", timeout=30)
        for _ in range(6):
            c.procs["node-a"].terminate(timeout=10)  # graceful: node-b takes over at once
            c.wait_role("node-b", "master", timeout=10)
            c.start_agent("node-a")
            c.wait_role("node-a", "master", timeout=30)  # preemption: node-b steps down
            c.wait_role("node-b", "backup", timeout=10)

        def back() -> bool:
            rows = R.instances(c, "node-b")
            return bool(rows) and rows[0]["state"] == "ready" and rows[0]["restarts"] >= 6

        c.wait(back, 15, "node-b's service to be restarted 6 times")
        st = c.status("node-b") or {}
        services = st["services"]
        assert services["counters"]["deaths"] == 0, services
        assert not services["crash_loops"], services
        assert st["role"] == "backup" and not st.get("faults"), st
