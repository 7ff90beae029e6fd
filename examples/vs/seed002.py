"""Seed 002 in a lab: a front and two web servers; one web server is killed mid-load.

    sudo .venv/bin/python examples/vs/seed002.py

Prints what the client saw: requests served by each web server and the failed ones (0 expected:
the front retries idempotent requests on the other server, then the dead one is marked down).
"""

from __future__ import annotations

import os
import signal
import time

from nonstop.lab import Lab
from nonstop.vs.labkit import HTTP_PORT, VsLab, vs_topology


def main() -> None:
    with Lab(vs_topology(workers=2)) as lab:
        vs = VsLab(lab)
        vs.front_config("front")
        vs.start_front("front")
        vs.start_worker("w1")
        vs.start_worker("w2")
        vs.wait_states("front", {"w1": "up", "w2": "up"})
        stop = os.path.join(lab.workdir, "stop")
        load = vs.load("http", f"{lab.host('front').addr('lan')}:{HTTP_PORT}", duration=30,
                       conns=16, until_file=stop)
        time.sleep(2)
        print("killing web server w1 (SIGKILL)")
        vs.procs["w1"].kill(signal.SIGKILL)
        time.sleep(2)
        open(stop, "w").close()
        r = vs.result(load)
        print(f"served: {r['workers']}, failed: {r['failed']}, {r['rps']} req/s")
        print("front:", vs.worker_states("front"))


if __name__ == "__main__":
    main()
