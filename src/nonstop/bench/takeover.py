"""The TCP session takeover scenario with N connections (``nonstop bench takeover``, and the
many-connection case of tests/netns/test_takeover.py).

Hosts peer (.10), a (.11) and b (.12) on lan; VIP 10.77.0.100 on a. On a an echo service behind a
MasterSession, on b a BackupSession (both ``python -m nonstop.bench.takeover_node``). The peer
opens ``sessions`` connections to VIP:port and streams numbered lines on all of them at once (one
line per connection per round, ``pace`` seconds between rounds). At round ``kill_at`` a dies (its
link goes down, its processes are SIGKILLed, its VIP deleted) and b promotes. Every connection
must carry on: each line echoed once and in order, then EOF, no reset.

Per connection the interruption is the time from the last echo the peer saw before the kill to
the first one after it.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from nonstop.lab import Lab, Topology

VIP, PORT, SYNC_PORT = "10.77.0.100", 7300, 7301
B = "10.77.0.12"
NODE = ["-m", "nonstop.bench.takeover_node"]


def line(i: int) -> bytes:
    return f"{i:08d} {'x' * 50}\n".encode()


LINE_LEN = len(line(0))


def topology() -> Topology:
    topo = Topology(source="<takeover>")
    topo.channel("lan", v4="10.77.0.0/24")
    topo.host("peer", channels={"lan": 10})
    topo.host("a", channels={"lan": 11})
    topo.host("b", channels={"lan": 12})
    return topo


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    lines: int
    buf: bytearray = field(default_factory=bytearray)
    good: int = 0  # lines echoed correctly, in order
    bad: int = 0  # bytes that did not match the expected stream (duplicates, reordering)
    eof: bool = False
    reset: bool = False
    broken: str = ""
    arrivals: list[float] = field(default_factory=list)

    def feed(self, data: bytes, now: float) -> None:
        if self.broken:
            self.bad += len(data)
            return
        self.buf += data
        while self.good < self.lines and len(self.buf) >= LINE_LEN:
            got = bytes(self.buf[:LINE_LEN])
            if got != line(self.good):
                self.broken = f"line {self.good}: got {got!r}"
                self.bad += len(self.buf)
                self.buf.clear()
                return
            del self.buf[:LINE_LEN]
            self.arrivals.append(now)
            self.good += 1
        if self.good == self.lines and self.buf:
            self.bad += len(self.buf)  # echoed more than sent
            self.broken = f"{len(self.buf)} bytes past the end"
            self.buf.clear()


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run(
    lab: Lab,
    sessions: int,
    *,
    lines: int = 600,
    kill_at: int = 200,
    pace: float = 0.002,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Run the scenario in ``lab`` (built from :func:`topology`) and return the figures."""
    peer, a, b = lab.host("peer"), lab.host("a"), lab.host("b")
    key = os.urandom(32).hex()
    a.sh(f"ip addr add {VIP}/24 dev lan")
    env = {"PYTHONUNBUFFERED": "1"}
    py = sys.executable
    backup = b.run(
        [py, *NODE, "backup", f"{VIP}/24", "lan", B, SYNC_PORT, key], name="backup", env=env
    )
    backup.wait_output("READY")
    master = a.run([py, *NODE, "master", VIP, PORT, B, SYNC_PORT, key], name="master", env=env)
    master.wait_output("READY")

    conns: list[_Conn] = []
    for _ in range(sessions):
        s = peer.socket()
        s.settimeout(timeout)
        s.connect((VIP, PORT))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(_Conn(s, lines))
    stop = threading.Event()

    def read() -> None:
        sel = selectors.DefaultSelector()
        for c in conns:
            sel.register(c.sock, selectors.EVENT_READ, c)
        open_ = len(conns)
        while open_ and not stop.is_set():
            for k, _ in sel.select(0.2):
                c = k.data
                try:
                    data = c.sock.recv(65536)
                except ConnectionResetError:
                    c.reset = True
                    data = b""
                except OSError as e:
                    c.broken = c.broken or repr(e)
                    data = b""
                if data:
                    c.feed(data, time.monotonic())
                else:
                    c.eof = not c.reset
                    sel.unregister(c.sock)
                    open_ -= 1
        sel.close()

    reader = threading.Thread(target=read, name="takeover-reader", daemon=True)
    reader.start()
    killed_at = 0.0
    send_errors = 0
    for i in range(lines):
        if i == kill_at:
            a.sh("ip link set lan down")  # nothing a sends escapes any more
            killed_at = time.monotonic()
            master.kill(signal.SIGKILL)
            master.reap()
            a.sh(f"ip addr del {VIP}/24 dev lan")
            backup.send_signal(signal.SIGUSR1)
        for c in conns:
            if c.reset:
                continue
            try:
                c.sock.sendall(line(i))
            except OSError:
                c.reset = True
                send_errors += 1
        time.sleep(pace)
    for c in conns:
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            c.reset = True
    reader.join(timeout=timeout)
    stop.set()
    reader.join(timeout=1)
    for c in conns:
        c.sock.close()

    m_out, b_out = master.output(), backup.output()
    stats = [ln for ln in m_out.splitlines() if ln.startswith("STATS")]
    fields = dict(kv.split("=") for kv in stats[-1].split()[1:]) if stats else {}
    pm = re.search(r"PROMOTED conns=(\d+) restore_ms=([\d.]+) vip_garp_ms=([\d.]+)", b_out)
    gaps, after_kill = [], []
    for c in conns:
        before = [t for t in c.arrivals if t <= killed_at]
        after = [t for t in c.arrivals if t > killed_at]
        if before and after:
            gaps.append((after[0] - before[-1]) * 1e3)
            after_kill.append((after[0] - killed_at) * 1e3)
    records = int(fields.get("records", 0))
    kept = sum(1 for c in conns if c.good == lines and c.eof and not c.broken and not c.reset)
    return {
        "sessions": sessions,
        "lines_per_session": lines,
        "kill_at_line": kill_at,
        "kept": kept,
        "resets": sum(c.reset for c in conns),
        "eof": sum(c.eof for c in conns),
        "broken": [c.broken for c in conns if c.broken][:5],
        "bytes_lost": sum((lines - c.good) * LINE_LEN for c in conns),
        "bytes_duplicated": sum(c.bad for c in conns),
        "restored": int(pm.group(1)) if pm else None,
        "restore_ms": float(pm.group(2)) if pm else None,
        "restore_us_per_session": round(float(pm.group(2)) * 1e3 / sessions, 2) if pm else None,
        "vip_garp_ms": float(pm.group(3)) if pm else None,
        "interruption_ms": {
            "p50": _round(_pct(gaps, 0.5)),
            "p99": _round(_pct(gaps, 0.99)),
            "max": _round(max(gaps, default=None)),
            "n": len(gaps),
        },
        "kill_to_first_echo_ms": {
            "p50": _round(_pct(after_kill, 0.5)),
            "p99": _round(_pct(after_kill, 0.99)),
        },
        "sync_records": records,
        "sync_batches": int(fields.get("batches", 0)),
        "sync_tx_bytes": int(fields.get("tx_bytes", 0)),
        "sync_bytes_per_update": round(int(fields.get("tx_bytes", 0)) / records, 2)
        if records
        else None,
        "master_stats": fields,
        "master_log": m_out[-20000:],
        "backup_log_tail": b_out[-2000:],
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)
