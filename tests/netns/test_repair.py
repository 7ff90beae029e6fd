"""TCP_REPAIR takeover with real sockets: a connection to the VIP on ``a`` is dumped, closed
silently, and restored on ``b`` after the VIP moved; the peer's socket never notices.

Sockets are created inside each host's namespace from this process (``LabHost.socket`` and
``nsops.in_netns``): a socket stays in the namespace it was made in, so one process can play the
peer, the old master and the new master. The state crosses from ``a`` to ``b`` as JSON in a file.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from movelab import movelab_lab  # noqa: F401  (the ``lab`` fixture)

from nonstop.lab import Lab, LabHost
from nonstop.lab.nsops import in_netns
from nonstop.session import (
    RepairError,
    TcpState,
    close_silently,
    dump,
    dump_many,
    restore,
    restore_many,
)
from nonstop.session import repair as repair_mod
from nonstop.session.repair import SIOCINQ, _ioctl_int, ts_later

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

VIP = {4: "10.77.0.100", 6: "fd77::100"}
PLEN = {4: 24, 6: 64}
FAM = {4: socket.AF_INET, 6: socket.AF_INET6}
PORT = 7000


# -- helpers --------------------------------------------------------------------------------------


@pytest.fixture(params=["c", "python"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The restore's system calls made from C (the default) or from Python (no compiler)."""
    if request.param == "python":
        monkeypatch.setattr(repair_mod, "_native", None)
    assert repair_mod.engine() == request.param, "the C restore was not built (setup.py)"
    return str(request.param)


def vip(host: LabHost, fam: int, op: str) -> None:
    nodad = " nodad" if fam == 6 else ""
    host.sh(f"ip -{fam} addr {op} {VIP[fam]}/{PLEN[fam]} dev lan{nodad if op == 'add' else ''}")


def point_peer_at(lab: Lab, fam: int, host: str) -> None:
    mac = lab.host(host).mac("lan")
    lab.host("peer").sh(f"ip -{fam} neigh replace {VIP[fam]} lladdr {mac} dev lan nud reachable")


def counters(host: LabHost) -> dict[str, int]:
    """Tcp (snmp) and TcpExt (netstat) counters of the host's namespace."""
    out: dict[str, int] = {}
    for f in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = host.sh(f"cat {f}").stdout.splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=True):
            kind = names.split(":")[0]
            if kind in ("Tcp", "TcpExt"):
                for k, v in zip(names.split()[1:], values.split()[1:], strict=True):
                    out[f"{kind}.{k}"] = int(v)
    return out


RESET_COUNTERS = ("Tcp.OutRsts", "Tcp.EstabResets", "TcpExt.TCPAbortOnData")


def assert_no_resets(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> None:
    """No host sent a RST or aborted a connection; the peer and b saw no connection reset. (The
    silent close on a counts as an EstabReset there: the kernel counts every ESTABLISHED ->
    CLOSE transition, although nothing is sent.)"""
    for h in before:
        keys = [k for k in RESET_COUNTERS if not (h == "a" and k == "Tcp.EstabResets")]
        delta = {k: after[h][k] - before[h][k] for k in keys}
        assert delta == dict.fromkeys(keys, 0), f"host {h}: {delta}"


def to_json(states: list[TcpState]) -> str:
    rows = []
    for st in states:
        d = msgspec.structs.asdict(st)
        d["send_queue"] = base64.b64encode(st.send_queue).decode()
        d["recv_queue"] = base64.b64encode(st.recv_queue).decode()
        rows.append(d)
    return json.dumps(rows)


def from_json(text: str) -> list[TcpState]:
    states = []
    for d in json.loads(text):
        d["send_queue"] = base64.b64decode(d["send_queue"])
        d["recv_queue"] = base64.b64decode(d["recv_queue"])
        d["window"] = tuple(d["window"]) if d["window"] is not None else None
        states.append(TcpState(**d))
    return states


def through_file(path: Path, states: list[TcpState]) -> list[TcpState]:
    path.write_text(to_json(states))
    return from_json(path.read_text())


class Pump:
    """Moves two byte streams over one connection without threads: ``tx`` bytes out of each
    socket, everything readable into ``rx``; a reset or any socket error fails the test."""

    def __init__(self, **socks: socket.socket) -> None:
        self.socks = socks
        self.tx = {k: b"" for k in socks}
        self.rx = {k: bytearray() for k in socks}

    def run(self, want: dict[str, int], timeout: float = 10.0) -> None:
        sel = selectors.DefaultSelector()
        for name, s in self.socks.items():
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, name)
        deadline = time.monotonic() + timeout
        try:
            while any(len(self.rx[k]) < n for k, n in want.items()) or any(self.tx.values()):
                if time.monotonic() > deadline:
                    got = {k: len(v) for k, v in self.rx.items()}
                    raise AssertionError(f"stalled: have {got}, want {want}")
                for key, ev in sel.select(0.05):
                    name, s = key.data, key.fileobj
                    assert isinstance(s, socket.socket)
                    if ev & selectors.EVENT_READ:
                        data = s.recv(1 << 16)
                        assert data, f"{name}: unexpected EOF"
                        self.rx[name] += data
                    if ev & selectors.EVENT_WRITE and self.tx[name]:
                        n = s.send(self.tx[name][: 1 << 16])
                        self.tx[name] = self.tx[name][n:]
        finally:
            sel.close()


def fill_until_full(s: socket.socket, stream: bytes) -> int:
    """Send from ``stream`` without blocking until the socket refuses more; return bytes sent."""
    s.setblocking(False)
    sent = 0
    while sent < len(stream):
        try:
            sent += s.send(stream[sent : sent + (1 << 16)])
        except BlockingIOError:
            break
    s.setblocking(True)
    return sent


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


# -- one connection, with both queues non-empty ---------------------------------------------------


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("order", ["vip_first", "restore_first"])
def test_takeover_one_connection(lab: Lab, fam: int, order: str, engine: str) -> None:
    peer, a, b = lab.host("peer"), lab.host("a"), lab.host("b")
    up = os.urandom(8 << 20)  # peer -> VIP stream
    down = os.urandom(8 << 20)  # VIP -> peer stream
    vip(a, fam, "add")
    listener = a.socket(FAM[fam])
    listener.bind((VIP[fam], PORT))
    listener.listen(4)
    p = peer.socket(FAM[fam])
    p.connect((VIP[fam], PORT))
    srv, _ = listener.accept()
    listener.close()
    p_name = p.getsockname()
    p_fd = p.fileno()

    # both ways, read fully
    pump = Pump(peer=p, srv=srv)
    pump.tx = {"peer": up[:100_000], "srv": down[:100_000]}
    pump.run({"peer": 100_000, "srv": 100_000})
    up_off = down_off = 100_000

    # unread bytes on the server: the receive queue
    p.setblocking(True)
    p.sendall(up[up_off : up_off + 3000])
    up_off += 3000
    wait_for(lambda: _ioctl_int(srv.fileno(), SIOCINQ) == 3000, "3000 unread bytes on a")

    # unacknowledged and unsent bytes on the server: the peer drops what a sends, then a sends
    # until its buffer is full (in flight up to cwnd, the rest unsent)
    tables = "iptables" if fam == 4 else "ip6tables"
    drop = f"INPUT -s {VIP[fam]} -p tcp -j DROP"
    peer.sh(f"{tables} -I {drop}")
    try:
        down_off += fill_until_full(srv, down[down_off:])
        time.sleep(0.02)  # let the in-flight part leave

        before = {h: counters(lab.host(h)) for h in ("peer", "a", "b")}
        vip(a, fam, "del")  # the old master lets go of the VIP, then hands the connection over
        (state,) = through_file(lab.workdir / "state.json", [dump(srv, keep_repair=True)])
        close_silently(srv)
        assert state.recv_queue == up[up_off - 3000 : up_off]
        assert state.send_queue == down[down_off - len(state.send_queue) : down_off]
        assert len(state.send_queue) > state.unsent_len > 0, "want sent-unacked and unsent bytes"
        assert (state.src, state.sport, state.dst, state.dport) == (
            VIP[fam], PORT, p_name[0], p_name[1]
        )  # fmt: skip

        if order == "vip_first":
            vip(b, fam, "add")
            point_peer_at(lab, fam, "b")
            nsrv = in_netns(b.ns, restore, state)
        else:  # established on b before b owns the VIP (IP_TRANSPARENT)
            nsrv = in_netns(b.ns, restore, state)
            time.sleep(0.05)  # the window probe goes out; nothing may answer it with a reset
            vip(b, fam, "add")
            point_peer_at(lab, fam, "b")
    finally:
        peer.sh(f"{tables} -D {drop}")

    # the same peer socket carries on both ways; every byte exactly once, in order
    pump = Pump(peer=p, srv=nsrv)
    pump.rx["peer"] = bytearray(down[:100_000])  # what the peer read before the takeover
    pump.tx = {"peer": up[up_off : up_off + 200_000], "srv": down[down_off : down_off + 200_000]}
    pump.run({"peer": down_off + 200_000, "srv": 3000 + 200_000})
    assert bytes(pump.rx["peer"]) == down[: down_off + 200_000]
    assert bytes(pump.rx["srv"]) == up[up_off - 3000 : up_off + 200_000]
    assert p.fileno() == p_fd and p.getsockname() == p_name
    assert p.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    after = {h: counters(lab.host(h)) for h in ("peer", "a", "b")}
    assert_no_resets(before, after)
    p.close()
    nsrv.close()


def test_restore_error_names_the_step(lab: Lab, engine: str) -> None:
    a = lab.host("a")
    vip(a, 4, "add")
    listener = a.socket(socket.AF_INET)
    listener.bind((VIP[4], PORT))
    listener.listen(1)
    p = lab.host("peer").socket(socket.AF_INET)
    p.connect((VIP[4], PORT))
    srv, _ = listener.accept()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    state = dump(srv)
    assert srv.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1  # repair off clears it
    # the 4-tuple is still in use on a: connect in repair mode refuses it
    with pytest.raises(RepairError) as info:
        in_netns(a.ns, restore, state)
    assert info.value.step == "connect" and info.value.errno == errno.EADDRNOTAVAIL
    assert str(info.value).startswith("connect: ")
    # a listening socket cannot enter repair mode
    with pytest.raises(RepairError) as info:
        dump(listener)
    assert info.value.step == "repair on" and info.value.errno == errno.EPERM
    # the original connection still works after dump() left repair mode
    srv.sendall(b"still here")
    assert p.recv(100) == b"still here"
    srv.close()
    listener.close()
    p.close()


# -- many connections -----------------------------------------------------------------------------


def test_takeover_many_connections(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    n = 1000
    peer, a, b = lab.host("peer"), lab.host("a"), lab.host("b")
    vip(a, 4, "add")
    listener = a.socket(socket.AF_INET)
    listener.bind((VIP[4], PORT))
    listener.listen(n)
    peers = []
    for _ in range(n):
        p = peer.socket(socket.AF_INET)
        p.connect((VIP[4], PORT))
        peers.append(p)
    by_port = {}
    for _ in range(n):
        s, addr = listener.accept()
        by_port[addr[1]] = s
    listener.close()
    srvs = [by_port[p.getsockname()[1]] for p in peers]
    for i, (p, s) in enumerate(zip(peers, srvs, strict=True)):
        p.sendall(b"before %6d|" % i)  # left unread on a: goes over in the receive queue
        s.sendall(b"a says %6d|" % i)
    for i, p in enumerate(peers):
        assert p.recv(100) == b"a says %6d|" % i
    wait_for(lambda: all(_ioctl_int(s.fileno(), SIOCINQ) == 14 for s in srvs), "unread bytes")

    before = {h: counters(lab.host(h)) for h in ("peer", "a", "b")}
    vip(a, 4, "del")
    t0 = time.perf_counter()
    states = dump_many(srvs, keep_repair=True)
    t_dump = time.perf_counter() - t0
    for s in srvs:
        s.close()  # still in repair mode: nothing reaches the peer
    states = through_file(lab.workdir / "states.json", states)
    assert all(st.recv_queue == b"before %6d|" % i for i, st in enumerate(states))

    def out_segs() -> int:  # b's TCP segments sent, from this thread's namespace
        with open("/proc/thread-self/net/snmp") as f:
            head, vals = [ln.split() for ln in f if ln.startswith("Tcp:")][:2]
        return int(vals[head.index("OutSegs")])

    def built() -> int:  # b's established sockets on VIP:PORT
        with open("/proc/thread-self/net/tcp") as f:
            rows = [ln.split() for ln in f][1:]
        return sum(r[1].endswith(f":{PORT:04X}") and r[3] == "01" for r in rows)

    seen: list[tuple[int, int]] = []

    def timed_restore() -> tuple[list[socket.socket], float]:
        start = out_segs()
        t0 = time.perf_counter()
        socks = restore_many(states, before_live=lambda: seen.append((built(),
                                                                      out_segs() - start)))
        dt = time.perf_counter() - t0
        seen.append((built(), out_segs() - start))
        return socks, dt

    nsrvs, t_restore = in_netns(b.ns, timed_restore)
    # every socket was built before the hook ran, and none had sent anything; then each left
    # repair mode and sent its window probe (the promotion lifts the quiet rule in the hook)
    assert seen[0] == (n, 0) and seen[1][0] == n and seen[1][1] >= n, seen
    vip(b, 4, "add")
    point_peer_at(lab, 4, "b")
    for i, (p, s) in enumerate(zip(peers, nsrvs, strict=True)):
        s.sendall(b"b says %6d|" % i)
        p.sendall(b"after  %6d|" % i)
    for i, (p, s) in enumerate(zip(peers, nsrvs, strict=True)):
        # generous: 2,000 segments at once can overflow the host's backlog (1,000 packets), and
        # a restored socket without an RTT sample resends after 1 s, then 2 s, then 4 s
        p.settimeout(20)
        s.settimeout(20)
        assert p.recv(100) == b"b says %6d|" % i
        want = b"before %6d|after  %6d|" % (i, i)
        got = b""
        while len(got) < len(want):
            got += s.recv(100)
        assert got == want
    after = {h: counters(lab.host(h)) for h in ("peer", "a", "b")}
    assert_no_resets(before, after)
    with capsys.disabled():
        print(
            f"\nTCP_REPAIR {n} connections: dump {t_dump / n * 1e6:.1f} us/socket, "
            f"restore {t_restore / n * 1e6:.1f} us/socket"
        )
    for s in (*peers, *nsrvs):
        s.close()


def test_timestamp_advance_keeps_the_usec_flag() -> None:
    assert ts_later(1000, 0.0105) == 1010  # ms clock: +10 ms, low bit stays 0
    assert ts_later(1001, 0.0105) == 11501  # usec clock (flag set): +10500 us, flag kept
    assert ts_later(0xFFFFFFF0, 0.1) == 0x54  # wraps at 2**32
    assert ts_later(1000, -5.0) == 1000  # a clock from elsewhere never goes back


# -- recovery of bytes in flight at the takeover --------------------------------------------------


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("chain", ["INPUT", "OUTPUT"])
def test_in_flight_bytes_recover_at_once(
    lab: Lab, fam: int, chain: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """a sends 10,000 bytes (within the initial congestion window) while the peer drops what a
    sends (INPUT: the bytes are lost in flight) or what it sends to the VIP (OUTPUT: the peer has
    the bytes, a never saw the ACKs). After the move to b the peer has every byte at once: no
    ~1 s tail-loss probe, no 3 s retransmit timer, and no ACK beyond snd_nxt stalling b."""
    peer, a, b = lab.host("peer"), lab.host("a"), lab.host("b")
    data = os.urandom(10_000)
    vip(a, fam, "add")
    listener = a.socket(FAM[fam])
    listener.bind((VIP[fam], PORT))
    listener.listen(1)
    p = peer.socket(FAM[fam])
    p.connect((VIP[fam], PORT))
    srv, _ = listener.accept()
    listener.close()
    tables = "iptables" if fam == 4 else "ip6tables"
    rule = f"{chain} {'-s' if chain == 'INPUT' else '-d'} {VIP[fam]} -p tcp -j DROP"
    peer.sh(f"{tables} -I {rule}")
    try:
        srv.sendall(data)
        time.sleep(0.02)  # let it leave
        vip(a, fam, "del")
        state = dump(srv, keep_repair=True)
        close_silently(srv)
    finally:
        peer.sh(f"{tables} -D {rule}")
    assert state.send_queue == data and state.unsent_len == 0, "want all 10,000 bytes unacked"
    vip(b, fam, "add")
    point_peer_at(lab, fam, "b")
    t0 = time.monotonic()
    nsrv = in_netns(b.ns, restore, state)
    pump = Pump(peer=p, srv=nsrv)
    pump.run({"peer": len(data)})
    took = time.monotonic() - t0
    assert bytes(pump.rx["peer"]) == data
    nsrv.sendall(b"more")  # and the connection carries on
    p.setblocking(True)
    assert p.recv(10) == b"more"
    with capsys.disabled():
        print(f"\nlost={chain == 'INPUT'} v{fam}: all bytes {took * 1e3:.1f} ms after restore")
    assert took < 0.5
    p.close()
    nsrv.close()
