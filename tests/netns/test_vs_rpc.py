"""RPC through the front in a lab: primary/backup under a worker's death, NVP outvoting a wrong
worker, DRB surviving the primary's crash, the adaptive manager switching modes, bad frames."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from nonstop.lab import Lab
from nonstop.vs.labkit import RPC_PORT, VsLab, vs_topology
from nonstop.vs.rpc.client import RpcClient, RpcError
from nonstop.vs.rpc.frame import Reply, encode

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]


def _setup(lab_factory: Callable[..., Lab], **wopts: Any) -> VsLab:
    lab = lab_factory(vs_topology(workers=3))
    v = VsLab(lab)
    v.front_config("front")
    v.start_front("front")
    for w in ("w1", "w2", "w3"):
        v.start_worker(w, **wopts.get(w, {}))
    v.wait_states("front", {"w1": "up", "w2": "up", "w3": "up"})
    return v


def _calls(v: VsLab, calls: list[tuple[str, list[Any], dict[str, Any]]]) -> list[Any]:
    """Run calls from the client host (a socket made in its namespace) in order."""
    host = v.lab.host("client")
    addr = v.lab.host("front").addr("lan")

    async def go() -> list[Any]:
        out: list[Any] = []
        c = RpcClient(addr, RPC_PORT, socket_factory=host.socket)
        for method, args, kw in calls:
            try:
                out.append(await c.invoke(method, *args, **kw))
            except RpcError as e:
                out.append(e)
        await c.close()
        return out

    return asyncio.run(go())


def test_primary_backup_worker_killed_mid_load(lab_factory: Callable[..., Lab]) -> None:
    v = _setup(lab_factory)
    stop = os.path.join(v.lab.workdir, "stop-rpc")
    addr = f"{v.lab.host('front').addr('lan')}:{RPC_PORT}"
    load = v.load(
        "rpc",
        addr,
        duration=20,
        conns=8,
        until_file=stop,
        extra=["--method", "sleep", "--args", "[20]"],
    )
    time.sleep(1.0)
    v.procs["w2"].kill(signal.SIGKILL)
    v.wait_states("front", {"w2": "down"}, timeout=3)
    time.sleep(0.7)
    open(stop, "w").close()
    r = v.result(load)
    assert r["failed"] == 0, r
    assert r["ok"] > 50 and r["modes"].get("primary_backup", 0) > 0, r
    # the faults raise the recent fault rate: the adaptive manager may move to DRB for a while
    assert set(r["modes"]) <= {"primary_backup", "drb"}, r


def test_nvp_outvotes_a_wrong_worker(lab_factory: Callable[..., Lab]) -> None:
    v = _setup(lab_factory, w2={"wrong": True})
    out = _calls(v, [("add", [2, 3], {"mode": "nvp"}), ("add", [2, 3], {"mode": "primary_backup"})])
    nvp = out[0]
    assert isinstance(nvp, Reply) and nvp.value == 5 and nvp.mode == "nvp", nvp
    assert "outvoted w2" in nvp.reason and sorted(nvp.workers) == ["w1", "w3"]
    v.procs["w1"].kill(signal.SIGKILL)  # now 1 right, 1 wrong, 1 dead: no majority
    v.wait_states("front", {"w1": "down"}, timeout=3)
    v.start_worker("w1", wrong=True)  # two wrong ones that agree? they do: a + b + 1 twice
    v.wait_states("front", {"w1": "up"})
    out = _calls(v, [("add", [2, 3], {"mode": "nvp"})])
    assert isinstance(out[0], Reply) and out[0].value == 6  # the majority wins, even wrong
    v.procs["w1"].kill(signal.SIGKILL)
    v.wait_states("front", {"w1": "down"}, timeout=3)
    out = _calls(v, [("add", [2, 3], {"mode": "nvp"})])
    assert isinstance(out[0], RpcError) and "nvp needs 3 workers" in out[0].reason


def test_nvp_without_majority_is_a_clear_error(lab_factory: Callable[..., Lab]) -> None:
    v = _setup(lab_factory, w2={"wrong": True})
    v.procs["w3"].kill(signal.SIGKILL)  # asked before the front notices: 1 right, 1 wrong, 1 dead
    out = _calls(v, [("add", [2, 3], {"mode": "nvp"})])
    err = out[0]
    assert isinstance(err, RpcError) and err.reply is not None, err
    assert "no majority" in err.reason and err.reply.mode == "nvp", err.reason


def test_drb_survives_the_primary_crash_and_swaps_roles(lab_factory: Callable[..., Lab]) -> None:
    v = _setup(lab_factory, w1={"bad_primary": True})
    out = _calls(v, [("sqrt", [2.0], {"mode": "drb"})] * 2)
    first, second = out
    assert isinstance(first, Reply) and abs(first.value - 2**0.5) < 1e-6, first
    assert first.mode == "drb"
    # w1's primary version fails its acceptance test: the alternate answered, roles swapped
    assert "alternate on" in first.reason and "roles swapped" in first.reason, first.reason
    assert isinstance(second, Reply) and "primary on" in second.reason, second.reason
    primary = second.workers[0]
    v.procs[primary].kill(signal.SIGKILL)  # crash the current primary node
    out = _calls(v, [("sqrt", [9.0], {"mode": "drb"})])
    assert isinstance(out[0], Reply) and abs(out[0].value - 3.0) < 1e-6, out[0]
    assert out[0].workers[0] != primary


def test_adaptive_manager_switches_mode_as_workers_disappear(
    lab_factory: Callable[..., Lab],
) -> None:
    v = _setup(lab_factory)
    modes = []
    for kill in ("w3", "w2", None):
        r = _calls(v, [("add", [1, 1], {"reliability": 3})])[0]
        assert isinstance(r, Reply) and r.value == 2, r
        modes.append((r.mode, r.reason))
        if kill:
            v.procs[kill].kill(signal.SIGKILL)
            v.wait_states("front", {kill: "down"}, timeout=3)
    assert [m for m, _ in modes] == ["nvp", "drb", "primary_backup"], modes
    assert "one worker" in modes[2][1]


def test_malformed_rpc_frames_get_a_clear_error(lab_factory: Callable[..., Lab]) -> None:
    v = _setup(lab_factory)
    h = v.lab.host("client")
    for bad in (
        struct.pack(">I", 0),
        struct.pack(">I", 1 << 30),
        struct.pack(">I", 3) + b"\xc1zz",
        encode(Reply(1, True)),
    ):
        with h.socket() as s:
            s.settimeout(3)
            s.connect((v.lab.host("front").addr("lan"), RPC_PORT))
            s.sendall(bad)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        from nonstop.vs.rpc.frame import FrameDecoder

        d = FrameDecoder()
        d.feed(data)
        err = d.next_frame()
        assert isinstance(err, Reply) and err.id == 0 and not err.ok and err.error, (bad, data)
    r = _calls(v, [("add", [1, 2], {})])[0]
    assert isinstance(r, Reply) and r.value == 3
    st = v.status("front")
    assert st is not None and st["counters"]["rpc.rpc"]["bad_frame"] == 4
