"""Seed 002 with containers (issue 6, item 4): the front over two web servers that run in podman
containers inside their lab hosts' namespaces; one container is killed (``podman kill``) mid-load.

The workers are the demo worker (``nonstop vs worker``) in the local Python base image, started
through the application manager's PodmanRuntime (``--runtime runc``, ``--network ns:...``).
Checked: the worker process runs in its host's network namespace, the front routes around the
killed one with 0 failed idempotent requests, and every container is gone at the end (the cached
base image stays).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

from nonstop.app.runtime.container import podman_unavailable
from nonstop.lab import Lab
from nonstop.vs.labkit import HTTP_PORT, VsLab, vs_topology

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


@pytest.fixture
def vs(lab_factory: Callable[..., Lab]) -> Iterator[VsLab]:
    if why := podman_unavailable():
        pytest.skip(f"podman cannot run containers here: {why}")
    lab = lab_factory(vs_topology(workers=2, source="tests/netns/test_vs_podman.py"))
    v = VsLab(lab)
    try:
        v.front_config("front", rpc=False, l4=False)
        v.start_front("front")
        for w in ("w1", "w2"):
            v.start_container_worker(w)
        v.wait_states("front", {"w1": "up", "w2": "up"}, timeout=15)
        yield v
    finally:
        left = v.remove_containers()
        assert left == [], f"containers left behind: {left}"


def _netns_inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_kill_a_worker_container_mid_load_no_failed_request(vs: VsLab) -> None:
    for w in ("w1", "w2"):
        c = vs.containers[w]
        assert c.pid is not None and vs.container_state(w) == "running"
        # the worker in the container lives in its lab host's namespace, not in one of podman's
        assert _netns_inode(f"/proc/{c.pid}/ns/net") == _netns_inode(
            f"/run/netns/{vs.lab.host(w).ns}"
        )
    stop = os.path.join(vs.lab.workdir, "stop-http")
    url = f"{vs.lab.host('front').addr('lan')}:{HTTP_PORT}"
    load = vs.load("http", url, duration=60, conns=16, until_file=stop)
    try:
        time.sleep(1.5)  # load on both workers
        vs.kill_container("w1")
        vs.wait_states("front", {"w1": "down", "w2": "up"}, timeout=10)
        vs.wait(lambda: vs.container_state("w1") == "exited", 10, "w1's container exited")
        time.sleep(1.5)
    finally:
        open(stop, "w").close()
    r = vs.result(load)
    print(r)
    assert r["failed"] == 0, r
    assert r["errors"] == {}, r
    # both served before the kill; w2 carried the rest (a generous floor: the box is shared)
    assert r["workers"].get("w1", 0) > 0 and r["workers"].get("w2", 0) > 0, r
    assert r["ok"] >= 50, r
    assert vs.worker_states("front") == {"w1": "down", "w2": "up"}
