"""The virtual server's front in a lab: HTTP and L4 through real worker processes on two channels.

Topology (nonstop.vs.labkit.vs_topology): client, front, w1..w3; channels lan and hb. Workers
register at run time and send heartbeats on both channels. Every failed request the load
generator sees is counted (it never retries).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from nonstop.lab import Lab
from nonstop.vs.labkit import HTTP_PORT, L4_PORT, VsLab, vs_topology

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]


@pytest.fixture
def vs(lab_factory: Callable[..., Lab]) -> Iterator[VsLab]:
    lab = lab_factory(vs_topology(workers=4))
    v = VsLab(lab)
    v.front_config("front")
    v.start_front("front")
    for w in ("w1", "w2", "w3"):
        v.start_worker(w)
    v.wait_states("front", {"w1": "up", "w2": "up", "w3": "up"})
    yield v


def _front(v: VsLab) -> str:
    return f"{v.lab.host('front').addr('lan')}:{HTTP_PORT}"


def _raw(v: VsLab, data: bytes) -> bytes:
    h = v.lab.host("client")
    with h.socket() as s:
        s.settimeout(3)
        s.connect((v.lab.host("front").addr("lan"), HTTP_PORT))
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_kill_worker_mid_load_no_failed_request(vs: VsLab) -> None:
    stop = os.path.join(vs.lab.workdir, "stop-http")
    load = vs.load("http", _front(vs), duration=20, conns=16, until_file=stop)
    time.sleep(1.0)
    vs.procs["w1"].kill(signal.SIGKILL)
    vs.wait_states("front", {"w1": "down"}, timeout=3)
    time.sleep(1.0)
    open(stop, "w").close()
    r = vs.result(load)
    assert r["failed"] == 0, r
    assert r["ok"] > 20, r  # generous: at load average 16 the generator got only 37 through
    assert set(r["workers"]) == {"w1", "w2", "w3"}, r
    st = vs.status("front")
    assert st is not None
    assert st["counters"]["http.web"].get("retries", 0) >= 0


def test_cut_one_channel_worker_still_used(vs: VsLab) -> None:
    vs.lab.link_down("w2", "lan")  # its data-path channel: the front switches to hb
    vs.wait_states("front", {"w2": "degraded"}, timeout=3)
    st = vs.status("front")
    assert st is not None
    w2 = next(w for w in st["workers"] if w["id"] == "w2")
    assert w2["address"] == vs.lab.host("w2").addr("hb")
    rows = {(s["worker"], s["channel"]): s["state"] for s in st["stations"]}
    assert rows[("w2", "lan")] == "down" and rows[("w2", "hb")] == "up"
    r = vs.result(vs.load("http", _front(vs), duration=1.5, conns=8))
    assert r["failed"] == 0, r
    assert r["workers"].get("w2", 0) > 10, r  # still served, through hb


def test_workers_join_and_leave_at_run_time(vs: VsLab) -> None:
    vs.start_worker("w4")
    vs.wait_states("front", {"w4": "up"})
    r = vs.result(vs.load("http", _front(vs), duration=1.0, conns=8))
    assert r["workers"].get("w4", 0) > 0, r
    vs.procs["w4"].send_signal(signal.SIGTERM)  # LEAVE: drained, then removed
    vs.wait_states("front", {"w4": None}, timeout=5)
    r = vs.result(vs.load("http", _front(vs), duration=1.0, conns=8))
    assert r["failed"] == 0 and "w4" not in r["workers"], r


def test_config_reload_adds_and_drains_static_workers(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(vs_topology(workers=2))
    v = VsLab(lab)
    v.front_config("front", workers=["w1"], heartbeat=False)  # plain servers, TCP checks
    front = v.start_front("front")
    v.start_worker("w1", register=False)
    v.start_worker("w2", register=False)
    v.wait_states("front", {"w1": "up"})
    assert "w2" not in v.worker_states("front")
    v.front_config("front", workers=["w2"], heartbeat=False)
    front.send_signal(signal.SIGHUP)
    v.wait_states("front", {"w1": None, "w2": "up"}, timeout=5)
    r = v.result(v.load("http", f"{lab.host('front').addr('lan')}:{HTTP_PORT}", duration=1))
    assert r["failed"] == 0 and set(r["workers"]) == {"w2"}, r


def test_malformed_http_gets_400_and_front_carries_on(vs: VsLab) -> None:
    for bad in (
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nZZ\r\n",
        b"\x00\xff" * 100 + b"\r\n\r\n",
    ):
        out = _raw(vs, bad)
        assert out.startswith(b"HTTP/1.1 400 "), (bad, out)
        assert b"x-nonstop-error" in out
    out = _raw(vs, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and b"hello from w" in out
    st = vs.status("front")
    assert st is not None and st["counters"]["http.web"]["bad_request"] == 5


def test_post_on_a_dying_worker_gets_a_clear_502(vs: VsLab) -> None:
    # /slow holds the request on the worker; killing every worker then leaves no one to answer.
    h = vs.lab.host("client")
    with h.socket() as s:
        s.settimeout(5)
        s.connect((vs.lab.host("front").addr("lan"), HTTP_PORT))
        s.sendall(b"POST /slow?ms=3000 HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi")
        time.sleep(0.5)
        for w in ("w1", "w2", "w3"):
            vs.procs[w].kill(signal.SIGKILL)
        out = s.recv(65536)
    assert out.startswith(b"HTTP/1.1 502 "), out
    assert b"not idempotent, not retried" in out


def test_l4_relay_and_new_connections_avoid_a_dead_worker(vs: VsLab) -> None:
    addr = f"{vs.lab.host('front').addr('lan')}:{L4_PORT}"
    r = vs.result(vs.load("l4", addr, duration=1.0, conns=3))
    assert r["failed"] == 0 and r["bytes"] > 10_000_000, r
    vs.procs["w3"].kill(signal.SIGKILL)
    vs.wait_states("front", {"w3": "down"}, timeout=3)
    h = vs.lab.host("client")
    for _ in range(6):  # every new connection reaches a live worker's sink
        with h.socket() as s:
            s.settimeout(3)
            s.connect((vs.lab.host("front").addr("lan"), L4_PORT))
            s.sendall(b"x" * 100_000)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(10) == b""  # clean EOF from the sink, not a reset
