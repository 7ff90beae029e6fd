"""Seed 002 with containers: a front and two web servers in podman containers; one is killed.

    sudo .venv/bin/python examples/vs/seed002_podman.py [--duration 6] [--conns 16]

The lab (network namespaces: client, front, w1, w2 on two channels) runs the front as a process;
each web server is the demo worker (``nonstop vs worker``) in a podman container joined to its
host's namespace (``--network ns:/run/netns/<ns>``, runc, the local Python base image built on
first use). Load goes through the front; mid-load ``podman kill --signal KILL`` stops w1's
container. Prints what the client saw: requests served by each web server and the failed ones
(0 expected: the front retries idempotent requests on the other server and marks the dead one
down). Every container is removed at the end, even on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from nonstop.app.runtime.container import podman_unavailable
from nonstop.lab import Lab
from nonstop.vs.labkit import HTTP_PORT, VsLab, vs_topology


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=6.0, help="seconds of load (default 6)")
    ap.add_argument("--conns", type=int, default=16, help="keep-alive client connections")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args()
    if why := podman_unavailable():
        print(f"cannot run: {why}", file=sys.stderr)
        return 3
    # SIGTERM unwinds like Ctrl-C, so the finally below removes the containers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with Lab(vs_topology(workers=2, source="examples/vs/seed002_podman.py")) as lab:
        vs = VsLab(lab)
        try:
            vs.front_config("front", rpc=False, l4=False)
            vs.start_front("front")
            for w in ("w1", "w2"):
                c = vs.start_container_worker(w)
                print(f"web server {w}: container {c.container} (pid {c.pid})")
            vs.wait_states("front", {"w1": "up", "w2": "up"}, timeout=15)
            stop = os.path.join(lab.workdir, "stop")
            url = f"{lab.host('front').addr('lan')}:{HTTP_PORT}"
            load = vs.load("http", url, duration=args.duration + 60, conns=args.conns,
                           until_file=stop)  # fmt: skip
            time.sleep(args.duration / 2)
            print("killing web server w1: podman kill --signal KILL", vs.containers["w1"].container)
            vs.kill_container("w1")
            vs.wait_states("front", {"w1": "down"}, timeout=10)
            time.sleep(args.duration / 2)
            open(stop, "w").close()
            r = vs.result(load)
            states = vs.worker_states("front")
        finally:
            left = vs.remove_containers()
    out = {
        "served": r["workers"],
        "failed_requests": r["failed"],
        "ok": r["ok"],
        "errors": r["errors"],
        "rps": r["rps"],
        "front_states": states,
        "containers_left": left,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"served: {r['workers']}, failed idempotent requests: {r['failed']}, "
              f"{r['rps']} req/s")  # fmt: skip
        print("front:", states)
        print("containers removed" if not left else f"containers left: {left}")
    return 0 if r["failed"] == 0 and not left else 1


if __name__ == "__main__":
    raise SystemExit(main())
