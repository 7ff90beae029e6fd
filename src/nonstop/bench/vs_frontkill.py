"""The front-master kill of ``nonstop bench vs``: two fronts under an agent pair (+ witness), the
HTTP load on the VIP, the master node's agent and front SIGKILLed mid-run.

``protected=True`` runs the HTTP listener as the agents' protected service with the response
journal between the fronts (docs/vs.md, "Front takeover"); ``False`` is the plain listener on the
VIP (IP_FREEBIND), whose keep-alive connections on the dead front are reset. Not a sub-command of
its own: ``vs_cli`` calls :func:`front_kill` (no ``add_parser`` here on purpose).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

NODES = ("node-a", "node-b")
VIP = "10.77.0.100"


def front_kill(*, protected: bool, conns: int, procs: int, after: float = 2.0) -> dict[str, Any]:
    from nonstop.cluster import STEADY_TIMERS, Cluster, ClusterSpec
    from nonstop.lab import Lab
    from nonstop.vs.labkit import HTTP_PORT, VsLab, vs_topology

    with Lab(vs_topology(workers=3, fronts=NODES, witness=True)) as lab:
        services = {"web": HTTP_PORT} if protected else {}
        c = Cluster(lab, ClusterSpec(nodes=NODES, vip=f"{VIP}/24", api_port=None,
                                     services=services, preempt=False,
                                     **STEADY_TIMERS))  # fmt: skip
        c.start()
        m = c.wait_ready(timeout=20)
        b = next(n for n in NODES if n != m)
        v = VsLab(lab)
        for n in NODES:
            kw: dict[str, Any] = {}
            if protected:
                ep = c.endpoint(n, "web")
                c.wait(lambda ep=ep: os.path.exists(ep), 10, f"{ep} to exist", poll=0.02)
                kw = {"agent": ep, "journal_peer": next(o for o in NODES if o != n)}
            v.front_config(n, listen=VIP, rpc=False, l4=False, **kw)
            v.start_front(n)
        for w in ("w1", "w2", "w3"):
            v.start_worker(w)
        for n in NODES:
            v.wait_states(n, {"w1": "up", "w2": "up", "w3": "up"}, timeout=10)
        stop = os.path.join(lab.workdir, "stop-front-kill")
        load = v.load("http", f"{VIP}:{HTTP_PORT}", duration=120, conns=conns, procs=procs,
                      until_file=stop)  # fmt: skip

        def ready() -> bool:
            if not protected:
                return True
            s, sb = c.status(m), c.status(b)
            if not s or not sb or not s["sessions"] or not sb["sessions"]:
                return False
            sa, sbb = s["sessions"][0], sb["sessions"][0]
            return (sa["connections"] >= conns and sa.get("sync", {}).get("protecting", False)
                    and sbb.get("sync", {}).get("held_connections", 0) >= conns)  # fmt: skip

        try:
            c.wait(ready, 30, f"{m} to protect {conns} connections", poll=0.1)
        except TimeoutError as e:
            s_m, s_b = c.status(m) or {}, c.status(b) or {}
            raise TimeoutError(f"{e}; load: {load.output()[-300:]!r}; {m}: "
                               f"{s_m.get('sessions')}; {b}: {s_b.get('sessions')}") from None

        time.sleep(1.0)
        c.procs[m].kill(signal.SIGKILL)
        v.procs[f"front-{m}"].kill(signal.SIGKILL)
        t0 = time.monotonic()
        c.wait_role(b, "master", timeout=10)
        took = time.monotonic() - t0
        time.sleep(after)
        open(stop, "w").close()
        r = v.result(load, timeout=60)
        st = v.status(b) or {"counters": {}}
        return {
            "failed": r["failed"],
            "reconnects": r["connects"] - conns,
            "ok": r["ok"],
            "rps": r["rps"],
            "p99_ms": r["p99_ms"],
            "errors": r["errors"],
            "conns": conns,
            "new_master_after_ms": round(took * 1000, 1),
            "front": st["counters"].get("protected.web", {}),
        }
