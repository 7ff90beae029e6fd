"""The first end-to-end TCP session takeover (nonstop.session.manager), standalone.

Hosts peer (.10), a (.11) and b (.12) on lan; VIP 10.77.0.100 on a. On a: an echo service that
commits after each echo, behind a MasterSession (ACK clamp + capture, sync to b). On b: a
BackupSession. The peer streams numbered lines on one connection (paced, so some are always in
flight) and checks the echo stream. Mid-stream a dies: its link goes down (nothing it sends
escapes any more: its kernel would FIN or RST the dead service's socket), the service and the
session are SIGKILLed, the VIP is deleted. b promotes: restores the connection, adds the VIP,
sends gratuitous ARPs, echoes on the restored socket. The peer's connection carries on: every line
is echoed exactly once and in order, then EOF; no reset. The interruption is printed.

The second case tests the ACK clamp's safety: the service on a stalls (stops reading and
committing) STALL_LINES lines before the kill, so a's kernel receives, and the peer sees ACKed,
bytes the service never committed. b must restore exactly those bytes into its receive queue
(read position = the stalled service's last commit) and the peer must never have been ACKed past
what b holds.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

import pytest

from nonstop.bench import takeover as scenario
from nonstop.lab import Lab, Topology

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

VIP, PORT, SYNC_PORT = "10.77.0.100", 7300, 7301
B = "10.77.0.12"
NODE = ["-m", "nonstop.bench.takeover_node"]  # the node script, shared with the benchmark
LINES, KILL_AT, PACE = 3000, 1000, 0.001
STALL_LINES = 100
COMMIT_LAG = 600  # ten lines


def line(i: int) -> bytes:
    return f"{i:08d} {'x' * 50}\n".encode()


def bytes_acked(sock: socket.socket) -> int:
    """tcpi_bytes_acked of a socket."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return struct.unpack_from("Q", info, 120)[0]


@pytest.fixture
def lab(lab_factory: Callable[..., Lab]) -> Lab:
    topo = Topology(source="<takeover>")
    topo.channel("lan", v4="10.77.0.0/24")
    topo.host("peer", channels={"lan": 10})
    topo.host("a", channels={"lan": 11})
    topo.host("b", channels={"lan": 12})
    return lab_factory(topo)


def test_takeover_keeps_the_connection(lab: Lab) -> None:
    takeover(lab, stall_at=None)


def test_takeover_restores_what_a_stalled_service_never_committed(lab: Lab) -> None:
    res = takeover(lab, stall_at=KILL_AT - STALL_LINES)
    done = int(re.search(r"STALLED done=(\d+)", res["master"]).group(1))  # type: ignore[union-attr]
    rm = re.search(r"RESTORED conn=1 read_pos=(\d+) write_pos=(\d+) resent=\d+ pending=(\d+)",
                   res["backup"])  # fmt: skip
    assert rm is not None, res["backup"]
    read_pos, write_pos, pending = map(int, rm.groups())
    assert read_pos == write_pos == done  # restored from the stalled service's last commit
    sent = KILL_AT * len(line(0))
    assert done < sent and pending > 0
    held = read_pos + pending  # what b holds of the peer's stream
    assert held <= sent
    acked = int(res["acked"])
    print(
        f"stall: service committed {done} B, peer had sent {sent} B and was ACKed {acked} B; "
        f"b put {pending} B back into the receive queue"
    )
    assert acked <= held  # the clamp: nothing ACKed that b cannot deliver
    assert acked > done  # a's kernel did take (and ACK) bytes the service never committed


def test_takeover_sends_on_from_what_the_peer_got_past_the_last_commit(lab: Lab) -> None:
    """The service's commits trail its echoes by COMMIT_LAG bytes: the peer holds echoed bytes
    past the last commit. They were held until b had them (the send-side hold), b restores them
    in the send queue (sent_pos past write_pos), and its service, replaying from the commit,
    skips them: every line once, in order, no stall."""
    res = takeover(lab, stall_at=None, commit_lag=COMMIT_LAG)
    rm = re.search(r"RESTORED conn=1 read_pos=(\d+) write_pos=(\d+) resent=\d+ pending=(\d+) "
                   r"sent_pos=(\d+)", res["backup"])  # fmt: skip
    assert rm is not None, res["backup"]
    read_pos, write_pos, pending, sent_pos = map(int, rm.groups())
    print(f"commit at {write_pos}, restored stream at {sent_pos}, {pending} B to read again")
    assert sent_pos > write_pos == read_pos
    assert sent_pos - write_pos <= pending  # echoed bytes are input the service reads again


def test_takeover_keeps_64_concurrent_connections(lab: Lab) -> None:
    """64 connections stream at once; a dies mid-stream; b takes every one of them over."""
    n = 64
    r = scenario.run(lab, n)
    print({k: v for k, v in r.items() if not k.endswith("log") and k != "master_stats"})
    summary = f"{r['broken']}\nbackup: {r['backup_log_tail']}\nmaster: {r['master_log']}"
    assert r["restored"] == n, summary
    assert r["resets"] == 0, summary
    assert r["bytes_lost"] == 0 and r["bytes_duplicated"] == 0, summary
    assert r["kept"] == n, summary
    assert r["interruption_ms"]["n"] == n  # every connection echoed lines before and after
    fields = r["master_stats"]
    assert int(fields["captured"]) > 0
    assert fields["dropped"] == fields["errors"] == "0"


def takeover(lab: Lab, *, stall_at: int | None, commit_lag: int = 0) -> dict[str, object]:
    peer, a, b = lab.host("peer"), lab.host("a"), lab.host("b")
    key = os.urandom(32).hex()
    a.sh(f"ip addr add {VIP}/24 dev lan")
    env = {"PYTHONUNBUFFERED": "1"}
    backup = b.run(
        [sys.executable, *NODE, "backup", f"{VIP}/24", "lan", B, SYNC_PORT, key],
        name="backup",
        env=env,
    )
    backup.wait_output("READY")
    master = a.run(
        [sys.executable, *NODE, "master", VIP, PORT, B, SYNC_PORT, key, commit_lag],
        name="master",
        env=env,
    )
    master.wait_output("READY")

    sock = peer.socket()
    sock.settimeout(20)
    sock.connect((VIP, PORT))
    acked0 = bytes_acked(sock)
    acked = -1
    arrivals: list[float] = []
    errors: list[BaseException] = []
    extra = bytearray()

    def read() -> None:
        buf = bytearray()
        i = 0
        try:
            while i < LINES:
                data = sock.recv(65536)
                if not data:
                    raise AssertionError(f"EOF after {i} lines")
                buf += data
                while i < LINES and len(buf) >= len(line(i)):
                    n = len(line(i))
                    got = bytes(buf[:n])
                    assert got == line(i), f"line {i}: got {got!r}"
                    del buf[:n]
                    arrivals.append(time.monotonic())
                    i += 1
            extra.extend(buf)
            while data := sock.recv(65536):  # after our FIN: nothing more but EOF
                extra.extend(data)
        except BaseException as e:
            errors.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed_at = 0.0
    for i in range(LINES):
        if i == stall_at:
            master.send_signal(signal.SIGUSR2)
        if i == KILL_AT:
            # a dies: nothing it sends escapes, its processes are killed, its VIP removed
            a.sh("ip link set lan down")
            killed_at = time.monotonic()
            acked = bytes_acked(sock) - acked0  # no ACK from a can arrive any more
            master.kill(signal.SIGKILL)
            master.reap()
            a.sh(f"ip addr del {VIP}/24 dev lan")
            backup.send_signal(signal.SIGUSR1)
        sock.sendall(line(i))
        time.sleep(PACE)
    sock.shutdown(1)
    reader.join(timeout=60)
    sock.close()
    out = backup.output()
    print(out)
    assert not reader.is_alive(), f"the reader hung after {len(arrivals)} lines"
    assert not errors, f"{errors[0]!r} after {len(arrivals)} lines\n{master.output()}"
    assert len(arrivals) == LINES
    assert bytes(extra) == b"", f"echoed more than sent: {bytes(extra[:80])!r}"
    assert "PROMOTED conns=1 " in out
    stats = [ln for ln in master.output().splitlines() if ln.startswith("STATS")][-1]
    print("master before the kill:", stats)
    fields = dict(kv.split("=") for kv in stats.split()[1:])
    # the protection engaged: an ACK lowered, or a data segment held until b had its bytes (with
    # the send hold, a segment often leaves only once its ACK is confirmed too: nothing to lower)
    assert int(fields["clamped"]) + int(fields["held"]) > 0 and int(fields["captured"]) > 0
    assert fields["dropped"] == fields["errors"] == "0"
    before = [t for t in arrivals if t <= killed_at]
    after = [t for t in arrivals if t > killed_at]
    assert before and after
    gap = after[0] - before[-1]
    worst = max(y - x for x, y in itertools.pairwise(arrivals))
    print(
        f"takeover: {len(before)} lines echoed before the kill, {len(after)} after; "
        f"interruption (last echo before the kill -> first after) {gap * 1e3:.1f} ms, "
        f"kill -> first echo after {(after[0] - killed_at) * 1e3:.1f} ms, "
        f"largest gap between echoes {worst * 1e3:.1f} ms"
    )
    backup.wait_output("EOF")
    return {"master": master.output(), "backup": backup.output(), "acked": acked}
