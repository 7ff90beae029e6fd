"""Bulk TCP throughput through the ACK clamp vs without it (``nonstop bench throughput``).

Hosts peer (.10) and a (.11) on lan. On a a bulk service listens on two ports: ``PORT_PLAIN``
with nothing on its path and ``PORT_PROTECTED`` behind an :class:`AckClamp` run the way the
session manager runs it (``python -m nonstop.bench.throughput queue``, its own process, so its CPU
time is its own): inbound capture and ``capture_out`` on, the peer's payload and ours copied to
Python for every segment, the clamp's limit the point up to which the peer's bytes were captured
and the send-side hold at the end of our bytes seen leaving (what an instantly confirming backup
would hold: the checks run, nothing waits; a real backup adds one sync round trip per data
segment, see ``bench takeover``). One stream per measurement, ``secs`` long, in
one ``direction``: ``up`` the peer sends (the service's ACKs are clamped, the peer's data
captured), ``down`` the service sends (its GSO data segments pass through the queue). Unprotected
and protected streams alternate in the same lab, on an unshaped veth and on a tbf-shaped one.

Node commands (inside a lab host): ``queue VIP PORT QUEUE`` prints ``READY`` and, on SIGTERM,
``DONE <json stats>``; ``serve HOST PORT MODE SECS`` / ``client HOST PORT MODE SECS`` (MODE
``send`` or ``recv``) move the bytes; the receiving end prints ``RESULT <bytes> <seconds>``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from typing import Any

from nonstop.lab import Lab, Topology

SERVICE, PEER = "10.77.0.11", "10.77.0.10"
PORT_PLAIN, PORT_PROTECTED = 7400, 7401
QUEUE = 7
NODE = [sys.executable, "-m", "nonstop.bench.throughput"]
DIRECTIONS = ("up", "down")


def topology() -> Topology:
    topo = Topology(source="<throughput>")
    topo.channel("lan", v4="10.77.0.0/24")
    topo.host("peer", channels={"lan": 10})
    topo.host("a", channels={"lan": 11})
    return topo


def _result(text: str) -> tuple[int, float]:
    for line in text.splitlines():
        if line.startswith("RESULT "):
            n, dt = line.split()[1:3]
            return int(n), float(dt)
    raise RuntimeError(f"no RESULT in:\n{text}")


def stream(lab: Lab, direction: str, *, protected: bool, secs: float) -> dict[str, Any]:
    """One bulk stream between peer and a: Gbit/s, and the queue's stats when protected."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} not in {DIRECTIONS}")
    a, peer = lab.host("a"), lab.host("peer")
    port = PORT_PROTECTED if protected else PORT_PLAIN
    serve_mode, client_mode = ("recv", "send") if direction == "up" else ("send", "recv")
    queue = None
    if protected:
        queue = a.run([*NODE, "queue", SERVICE, port, QUEUE], name="queue")
        queue.wait_output("READY")
    try:
        server = a.run([*NODE, "serve", SERVICE, port, serve_mode, secs], name="serve")
        server.wait_output("LISTEN")
        argv = [*NODE, "client", SERVICE, port, client_mode, secs]
        out = peer.sh(argv, timeout=secs + 60).stdout
        server.wait(timeout=60)
        n, dt = _result(server.output() if direction == "up" else out)
        result: dict[str, Any] = {"gbps": round(n * 8 / dt / 1e9, 3), "bytes": n}
        if queue is not None:
            queue.send_signal(signal.SIGTERM)
            queue.wait(timeout=15)
            done = queue.wait_output("DONE ")
            result["queue"] = json.loads(done.split("DONE ", 1)[1].splitlines()[0])
            queue = None
        return result
    finally:
        if queue is not None and queue.alive:
            queue.terminate()


def compare(lab: Lab, direction: str, *, secs: float = 3.0, repeat: int = 1) -> dict[str, Any]:
    """``repeat`` rounds of an unprotected then a protected stream; medians and their ratio."""
    plain, prot, queues = [], [], []
    for _ in range(repeat):
        plain.append(stream(lab, direction, protected=False, secs=secs)["gbps"])
        r = stream(lab, direction, protected=True, secs=secs)
        prot.append(r["gbps"])
        queues.append(r["queue"])
    p, u = statistics.median(prot), statistics.median(plain)
    q = queues[len(queues) // 2]
    return {
        "direction": direction,
        "protected_gbps": round(p, 3),
        "unprotected_gbps": round(u, 3),
        "ratio": round(p / u, 3) if u else None,
        "queue_cpu_s": q["cpu_s"],
        "queue_cpu_s_per_gbit": round(q["cpu_s"] / (p * secs), 4) if p else None,
        "queue": q,
        "runs": {"protected_gbps": prot, "unprotected_gbps": plain},
    }


def run(
    *,
    rates: tuple[str | None, ...] = (None, "1gbit"),
    directions: tuple[str, ...] = DIRECTIONS,
    secs: float = 3.0,
    repeat: int = 1,
    tick: Any = None,
) -> dict[str, Any]:
    """Every (link, direction): a fresh lab per link; ``rate`` None is the unshaped veth."""
    links = []
    for rate in rates:
        with Lab(topology()) as lab:
            if rate is not None:
                lab.rate("peer", "lan", rate)
                lab.rate("a", "lan", rate)
            for d in directions:
                r = compare(lab, d, secs=secs, repeat=repeat)
                links.append({"link": "veth" if rate is None else f"veth tbf {rate}", **r})
                if tick is not None:
                    tick()
    return {
        "bench": "throughput",
        "secs": secs,
        "repeat": repeat,
        "targets": {"veth": 0.8, "veth tbf 1gbit": 0.95},  # issue 3
        "links": links,
        "note": "2-CPU machine shared with other jobs: figures are noisy",
    }


# -- the nodes -------------------------------------------------------------------------------------


def _say(*args: object) -> None:
    print(*args, flush=True)


def queue_node(vip: str, port: int, queue: int) -> None:
    """An AckClamp with both capture hooks, the limit at the captured point, until SIGTERM."""
    from nonstop.session.nfq import AckClamp, FourTuple
    from nonstop.session.segment import FIN, SYN, Segment, seq_add, seq_lt

    captured: dict[FourTuple, int] = {}  # connection -> end of the peer's contiguous bytes seen
    held: dict[FourTuple, dict[int, int]] = {}  # out-of-order ranges seen past a gap: seq -> end
    totals = {"in_bytes": 0, "out_bytes": 0}

    def capture(seg: Segment, payload: bytes) -> None:
        ft = (seg.dst, seg.dport, seg.src, seg.sport)
        if seg.flags & SYN:
            captured[ft], held[ft] = seq_add(seg.seq, 1), {}
            return
        end = captured.get(ft)
        totals["in_bytes"] += len(payload)
        if end is None or not payload:
            return
        ranges = held[ft]
        new = seq_add(seg.seq, len(payload))
        if seq_lt(end, seg.seq):  # past a gap: wait for it to be filled, as SyncSender does
            if seq_lt(ranges.get(seg.seq, seg.seq), new):
                ranges[seg.seq] = new
            return
        while seq_lt(end, new):
            end = new
            for start in [s for s in ranges if not seq_lt(end, s)]:  # now reachable
                r = ranges.pop(start)
                new = r if seq_lt(new, r) else new
        captured[ft] = end

    sent: dict[FourTuple, int] = {}  # connection -> end of our bytes seen leaving

    def capture_out(seg: Segment, payload: bytes) -> None:
        totals["out_bytes"] += len(payload)
        # SYN and FIN take a sequence number each: the hold counts our FIN (nfq._must_hold)
        end = seq_add(seg.seq, len(payload) + bool(seg.flags & SYN) + bool(seg.flags & FIN))
        if seq_lt(sent.get(seg.four_tuple, end), end) or seg.four_tuple not in sent:
            sent[seg.four_tuple] = end

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    clamp = AckClamp(
        queue, vip=vip, port=port, limit=captured.get, capture=capture, capture_out=capture_out,
        hold=sent.get,  # the send-side hold at what an instant backup holds: checked, never held
    )
    with clamp:
        t0 = os.times()
        _say("READY")
        stop.wait()
        t1 = os.times()
    st = clamp.stats
    out = {
        "cpu_s": round(t1.user + t1.system - t0.user - t0.system, 3),
        "cpu_user_s": round(t1.user - t0.user, 3),  # Python: parsing, the hooks, copies
        "cpu_sys_s": round(t1.system - t0.system, 3),  # recv, and verdicts (reinjection runs the
        # rest of the stack for the released segments in this process's context)
        "seen": st.seen,
        "passed": st.passed,
        "clamped": st.clamped,
        "dropped": st.dropped,
        "overflows": st.overflows,
        "batches": st.batches,
        "captured": st.captured,
        "captured_out": st.captured_out,
        "errors": st.errors,
        "error": repr(clamp.error) if clamp.error else None,
        **totals,
    }
    _say("DONE " + json.dumps(out))


def _move(sock: socket.socket, mode: str, secs: float) -> None:
    if mode == "send":
        buf = bytes(1 << 20)
        end = time.monotonic() + secs
        while time.monotonic() < end:
            sock.sendall(buf)
        sock.close()
        return
    buf2 = bytearray(1 << 20)
    n, t0 = 0, None
    while k := sock.recv_into(buf2):
        if t0 is None:
            t0 = time.perf_counter()
        n += k
    _say(f"RESULT {n} {time.perf_counter() - (t0 or time.perf_counter()):.6f}")


def main(argv: list[str]) -> int:
    cmd, *rest = argv
    if cmd == "queue":
        queue_node(rest[0], int(rest[1]), int(rest[2]))
    elif cmd in ("serve", "client"):
        host, port, mode, secs = rest[0], int(rest[1]), rest[2], float(rest[3])
        if cmd == "serve":
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((host, port))
            srv.listen(1)
            _say("LISTEN")
            conn, _ = srv.accept()
            srv.close()
        else:
            conn = socket.create_connection((host, port), timeout=30)
            conn.settimeout(None)
        _move(conn, mode, secs)
    else:
        print(f"unknown command {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
