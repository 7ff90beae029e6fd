"""The ACK clamp (nonstop.session.nfq) on real TCP in a lab: a server on ``a`` behind the clamp, a
client on ``b`` streaming to it.

The clamp holds the ACK at the client's ISN + N: the client's acknowledged bytes stop at N while
the server's kernel already holds more; raising the limit lets the stream finish, every byte once.
The iptables rules go away on close, also when the body raised. A bulk stream is timed with and
without the queue in the same run (printed, not asserted: a benchmark figure).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
from tcpwatch import connected, tcp_info, wait_stable

from nonstop.lab import Lab
from nonstop.session.nfnl import kernel_queue
from nonstop.session.nfq import COMMENT, AckClamp, FourTuple, remove_rules
from nonstop.session.repair import dump
from nonstop.session.segment import SEQ_MOD, SYN, Segment, seq_add

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

A, B = "10.77.0.11", "10.77.0.12"
PORT = 7100
QUEUE = 3


def rules(lab: Lab, family: int = 4) -> str:
    return lab.host("a").sh(f"{'iptables' if family == 4 else 'ip6tables'} -w -S").stdout


class Reader(threading.Thread):
    """Reads a socket to EOF: count and sha256."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock, self.count, self.sha = sock, 0, hashlib.sha256()

    def run(self) -> None:
        buf = bytearray(1 << 16)
        while k := self.sock.recv_into(buf):
            self.sha.update(buf[:k])
            self.count += k


@pytest.mark.parametrize("family", [4, 6])
def test_clamp_holds_the_ack_then_the_stream_finishes(lab: Lab, family: int) -> None:
    a, b = lab.host("a"), lab.host("b")
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    va = A if family == 4 else a.addr6("lan")
    vb = B if family == 4 else b.addr6("lan")
    before = rules(lab, family)
    n_held = 100_000
    data = random.Random(7).randbytes(4 << 20)
    limit: dict[str, int | None] = {"ack": None}
    asked: list[FourTuple] = []

    def lim(t: FourTuple) -> int | None:
        if not asked:
            asked.append(t)
        return limit["ack"]

    with AckClamp(QUEUE, vip=va, port=PORT, family=family, limit=lim, netns=a.ns) as clamp:
        assert f"{COMMENT}:q{QUEUE}" in rules(lab, family)
        with connected(a, b, va, PORT, fam) as (cli, conn):
            base = dump(cli).snd_seq  # the client's ISN + 1: nothing sent yet
            acked0 = tcp_info(cli)[1]
            limit["ack"] = seq_add(base, n_held)
            reader = Reader(conn)
            reader.start()

            def write() -> None:
                cli.sendall(data)
                cli.shutdown(socket.SHUT_WR)

            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            _, held = wait_stable(lambda: tcp_info(cli))
            print(
                f"held: client bytes_acked {held - acked0}, server kernel delivered "
                f"{reader.count}, clamped {clamp.stats.clamped}"
            )
            assert held - acked0 == n_held
            assert reader.count > n_held  # the server's kernel has more: only the ACK lies
            assert clamp.stats.clamped > 0 and clamp.stats.dropped == 0
            assert asked[0][:2] == (va, PORT) and asked[0][2] == vb

            limit["ack"] = None
            conn.sendall(b"x")  # a segment with the true ACK, no need to wait for an RTO
            writer.join(timeout=30)
            reader.join(timeout=30)
            assert not writer.is_alive() and not reader.is_alive()
            assert reader.count == len(data)
            assert reader.sha.digest() == hashlib.sha256(data).digest()
            assert wait_stable(lambda: tcp_info(cli))[1] - acked0 >= len(data)
        assert clamp.error is None
    assert rules(lab, family) == before


def test_rules_removed_when_the_body_raises(lab: Lab) -> None:
    a = lab.host("a")
    root_before = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True).stdout
    before = rules(lab)
    with (
        pytest.raises(RuntimeError, match="boom"),
        AckClamp(QUEUE, vip=A, port=PORT, limit=lambda t: 0, netns=a.ns),
    ):
        assert f"{COMMENT}:q{QUEUE}" in rules(lab)
        raise RuntimeError("boom")
    assert COMMENT not in rules(lab) and rules(lab) == before
    root_after = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True).stdout
    assert root_after == root_before  # the root namespace never saw a rule


def test_both_rules_go_in_at_once_and_out_even_when_one_was_deleted_by_hand(lab: Lab) -> None:
    """The OUTPUT and INPUT rules go in and out with one iptables-restore each; when the
    deletion fails (an operator deleted one rule), the other is still deleted: no rule is left
    queueing to nobody."""
    a = lab.host("a")
    before = rules(lab)
    clamp = AckClamp(QUEUE, vip=A, port=PORT, limit=lambda t: 0, capture=lambda s, p: None,
                     netns=a.ns)
    clamp.open()
    try:
        ours = [r for r in rules(lab).splitlines() if f"{COMMENT}:q{QUEUE}" in r]
        assert sorted(r.split()[1] for r in ours) == ["INPUT", "OUTPUT"]
        a.sh(f"iptables -w -D INPUT {' '.join(clamp.rule('INPUT'))}")
    finally:
        clamp.close()
    assert COMMENT not in rules(lab) and rules(lab) == before


def test_capture_sees_every_inbound_byte(lab: Lab) -> None:
    """capture() gets the peer's segments: reassembled by sequence number they are the stream."""
    a, b = lab.host("a"), lab.host("b")
    data = random.Random(8).randbytes(2 << 20)
    segs: list[tuple[int, bytes]] = []
    syns: list[Segment] = []

    def capture(seg: Segment, payload: bytes) -> None:
        if seg.flags & SYN:
            syns.append(seg)
        if payload:
            segs.append((seg.seq, payload))

    clamp = AckClamp(QUEUE, vip=A, port=PORT, limit=lambda t: None, capture=capture, netns=a.ns)
    with clamp:
        assert "--dport 7100" in rules(lab) and f"{COMMENT}:q{QUEUE}" in rules(lab)
        with connected(a, b, A, PORT) as (cli, conn):
            reader = Reader(conn)
            reader.start()
            cli.sendall(data)
            cli.shutdown(socket.SHUT_WR)
            reader.join(timeout=30)
            assert reader.count == len(data)
    assert COMMENT not in rules(lab)
    assert clamp.error is None and clamp.stats.captured > 0
    (syn,) = syns
    assert syn.options.mss and syn.options.sack_permitted and syn.options.timestamps
    isn1 = seq_add(syn.seq, 1)
    stream = bytearray(len(data))
    have = bytearray(len(data))  # 1 where a byte was captured
    for seq, payload in segs:
        off = (seq - isn1) % SEQ_MOD
        stream[off : off + len(payload)] = payload
        have[off : off + len(payload)] = b"\1" * len(payload)
    assert have == b"\1" * len(data) and stream == data
    print(f"captured {len(segs)} data segments for {len(data)} bytes")


def test_capture_out_sees_every_outbound_segment_before_the_clamp(lab: Lab) -> None:
    """capture_out() gets the server's segments with the ACK the kernel wrote (the wire carries
    the clamped one); its payloads reassemble to the stream; a hook that raises is counted and
    the segment still goes out."""
    a, b = lab.host("a"), lab.host("b")
    data = random.Random(9).randbytes(1 << 20)
    segs: list[tuple[int, bytes]] = []
    synacks: list[Segment] = []
    acks: list[int] = []

    def capture_out(seg: Segment, payload: bytes) -> None:
        if seg.flags & SYN:
            synacks.append(seg)
            return
        acks.append(seg.ack)
        if payload:
            segs.append((seg.seq, payload))
            if len(segs) == 3:
                raise RuntimeError("hook bug")  # after recording: the segment still goes out

    def lim(t: FourTuple) -> int | None:  # hold the client's ACK at its ISN + 1
        return synacks[0].ack if synacks else None

    clamp = AckClamp(QUEUE, vip=A, port=PORT, limit=lim, capture_out=capture_out, netns=a.ns)
    with clamp, connected(a, b, A, PORT) as (cli, conn):
        acked0 = tcp_info(cli)[1]
        cli.sendall(b"hello")
        assert conn.recv(5) == b"hello"
        reader = Reader(cli)
        reader.start()
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        reader.join(timeout=30)
        assert reader.count == len(data)
        assert reader.sha.digest() == hashlib.sha256(data).digest()
        assert tcp_info(cli)[1] == acked0  # the wire carried the clamped ACK only
    assert COMMENT not in rules(lab)
    (synack,) = synacks
    assert synack.options.mss and synack.options.timestamps
    assert seq_add(synack.ack, 5) in acks  # capture_out saw the kernel's ACK
    assert clamp.stats.clamped > 0 and clamp.stats.captured_out >= len(segs) - 1
    assert clamp.stats.errors == 1 and isinstance(clamp.error, RuntimeError)
    isn1 = seq_add(synack.seq, 1)
    stream = bytearray(len(data))
    have = bytearray(len(data))
    for seq, payload in segs:
        off = (seq - isn1) % SEQ_MOD
        stream[off : off + len(payload)] = payload
        have[off : off + len(payload)] = b"\1" * len(payload)
    assert have == b"\1" * len(data) and stream == data


BULK = r"""
import socket, sys, time
mode, host, port, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if mode.endswith("server"):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept()
else:
    c = socket.create_connection((host, port))
if mode.startswith("send"):
    buf = bytes(1 << 20); end = time.monotonic() + secs
    while time.monotonic() < end:
        c.sendall(buf)
    c.close()
else:
    buf = bytearray(1 << 20); n = 0; t0 = None
    while k := c.recv_into(buf):
        if t0 is None:
            t0 = time.perf_counter()
        n += k
    print(n, time.perf_counter() - t0, flush=True)
"""


def bulk(lab: Lab, direction: str, secs: float = 1.5) -> float:
    """Gbit/s of one stream: 'b->a' (a serves, receives: a sends only ACKs) or 'a->b' (a serves,
    sends the data: GSO segments through the queue)."""
    a, b = lab.host("a"), lab.host("b")
    server_mode, client_mode = (
        ("recv-server", "send") if direction == "b->a" else ("send-server", "recv")
    )
    args = [A, str(PORT), str(secs)]
    server = a.run(
        [sys.executable, "-c", BULK, server_mode, *args], stdout=subprocess.PIPE, name="bulk"
    )
    assert server.popen.stdout is not None
    assert server.popen.stdout.readline().strip() == b"ready"
    out = b.sh([sys.executable, "-c", BULK, client_mode, *args], timeout=secs + 30).stdout
    if direction == "b->a":
        out = server.popen.stdout.readline().decode()
    server.wait(timeout=30)
    n, dt = out.split()
    return int(n) * 8 / float(dt) / 1e9


def test_throughput_through_the_queue(lab: Lab) -> None:
    a = lab.host("a")
    figures: dict[str, float] = {}
    for direction in ("b->a", "a->b"):
        figures[f"{direction} plain"] = bulk(lab, direction)
        with AckClamp(QUEUE, vip=A, port=PORT, limit=lambda t: None, netns=a.ns) as clamp:
            figures[f"{direction} nfqueue pass-through"] = bulk(lab, direction)
        assert clamp.stats.seen > 0 and clamp.error is None
        figures[f"{direction} segments queued"] = clamp.stats.seen
        figures[f"{direction} overflows"] = clamp.stats.overflows
        with AckClamp(
            QUEUE, vip=A, port=PORT, limit=lambda t: None, capture=lambda s, p: None, netns=a.ns
        ) as clamp:
            figures[f"{direction} nfqueue pass-through + capture"] = bulk(lab, direction)
        assert clamp.stats.captured > 0 and clamp.error is None
        figures[f"{direction} overflows with capture"] = clamp.stats.overflows
    for k, v in figures.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")


def test_hold_keeps_data_until_kicked_then_every_byte_once(lab: Lab) -> None:
    """The send-side hold: the server's data past ``hold`` waits in the queue (the client gets
    exactly the bytes below it) while pure ACKs still pass (the client's own stream goes on);
    raising the hold and kick() lets the rest out, every byte once, in order."""
    a, b = lab.host("a"), lab.host("b")
    data = random.Random(11).randbytes(2 << 20)
    up = random.Random(12).randbytes(256 << 10)
    n_out = 50_000
    hold: dict[str, int | None] = {"end": None}
    clamp = AckClamp(QUEUE, vip=A, port=PORT, limit=lambda t: None,
                     hold=lambda t: hold["end"], netns=a.ns)  # fmt: skip
    with clamp, connected(a, b, A, PORT) as (cli, conn):
        hold["end"] = seq_add(dump(conn).snd_seq, n_out)
        got = Reader(cli)
        got.start()
        sent = Reader(conn)  # the client's stream: acknowledged, not held
        sent.start()
        writer = threading.Thread(target=conn.sendall, args=(data,), daemon=True)
        writer.start()
        cli.sendall(up)
        # not one byte past the hold (a segment across it waits whole)
        assert 0 < wait_stable(lambda: got.count) <= n_out
        assert wait_stable(lambda: sent.count) == len(up)
        assert clamp.stats.held_now > 0 and clamp.stats.passed > 0
        hold["end"] = None
        clamp.kick()
        writer.join(timeout=30)
        conn.shutdown(socket.SHUT_WR)
        got.join(timeout=30)
        assert not got.is_alive() and got.count == len(data)
        assert got.sha.digest() == hashlib.sha256(data).digest()
        assert clamp.stats.held_now == 0 and clamp.stats.held > 0
        cli.shutdown(socket.SHUT_WR)
        sent.join(timeout=30)
        assert sent.sha.digest() == hashlib.sha256(up).digest()
    assert clamp.error is None
    assert COMMENT not in rules(lab)


def test_rule_left_by_a_dead_listener_fails_closed(lab: Lab) -> None:
    """The worker holding the queue dies (its socket closes, its rules stay): nothing of VIP:port
    leaves, not even an ACK, until the rules are removed (they passed unclamped, once: a killed
    master's kernel acknowledged bytes its backup never got). remove_rules(keep=...) then
    clears the clamp's rules, not those kept (a new worker's own standing rules)."""
    a, b = lab.host("a"), lab.host("b")
    clamp = AckClamp(QUEUE, vip=A, port=PORT, limit=lambda t: None, capture=lambda s, p: None,
                     netns=a.ns)  # fmt: skip
    clamp.open()
    fd = os.open(f"/run/netns/{a.ns}", os.O_RDONLY)
    try:
        with connected(a, b, A, PORT) as (cli, conn):
            acked0 = tcp_info(cli)[1]
            kept = list(clamp._chains)
            clamp._chains.clear()  # a crash: the socket goes, the rules stay
            clamp.close()
            assert f"{COMMENT}:q{QUEUE}" in rules(lab) and kept
            conn.sendall(b"from the dead master")
            cli.sendall(b"to the dead master")
            cli.settimeout(1.0)
            with pytest.raises(TimeoutError):
                cli.recv(100)
            assert tcp_info(cli)[1] == acked0  # not even an ACK got out
            a.sh(["iptables", "-w", "-I", "OUTPUT", "-p", "udp", "--dport", "9", "-m",
                  "comment", "--comment", f"{COMMENT}:quiet", "-j", "DROP"])  # fmt: skip
            assert remove_rules(4, netns_fd=fd, keep={f"{COMMENT}:quiet"}) == 2
            assert f"{COMMENT}:quiet" in rules(lab)
            assert f"{COMMENT}:q{QUEUE}" not in rules(lab)
            cli.settimeout(10)  # the server's retransmission now gets through
            assert cli.recv(100) == b"from the dead master"
            assert remove_rules(4, netns_fd=fd) == 1  # the kept one
    finally:
        clamp.close()  # (closed above already unless the test failed before)
        os.close(fd)
    assert COMMENT not in rules(lab)


def test_remove_rules_sweeps_leftovers(lab: Lab) -> None:
    """A crashed agent's rules (found by their comment) are deleted; other rules stay."""
    a = lab.host("a")
    clamp = AckClamp(QUEUE, vip=A, port=PORT, limit=lambda t: None, netns=a.ns)
    a.sh(["iptables", "-w", "-I", "OUTPUT", *clamp.rule("OUTPUT")])
    a.sh(["iptables", "-w", "-I", "INPUT", *clamp.rule("INPUT")])
    a.sh("iptables -w -I OUTPUT -p udp --dport 9 -j ACCEPT")
    clamp.close()  # never opened: only releases its namespace handle
    fd = os.open(f"/run/netns/{a.ns}", os.O_RDONLY)
    try:
        assert remove_rules(4, netns_fd=fd) == 2
        assert remove_rules(4, netns_fd=fd) == 0
    finally:
        os.close(fd)
    assert COMMENT not in rules(lab) and "--dport 9" in rules(lab)


def _quiet(lab: Lab, *calls: str) -> None:
    """``QuietRule(A, PORT, 4, QUEUE)``'s ``calls`` inside ``a`` (it runs iptables where it is)."""
    code = ("from nonstop.session.quiet import QuietRule\n"
            f"q = QuietRule({A!r}, {PORT}, 4, {QUEUE})\n" + "".join(f"q.{c}()\n" for c in calls))
    lab.host("a").sh([sys.executable, "-c", code])


def _copies(lab: Lab) -> tuple[int, int]:
    lines = [ln for ln in rules(lab).splitlines() if f'"{COMMENT}:q{QUEUE}"' in ln.split()]
    return (sum(ln.startswith("-A OUTPUT ") for ln in lines),
            sum(ln.startswith("-A INPUT ") for ln in lines))  # fmt: skip


def test_the_quiet_rule_is_the_clamps_own_with_nobody_bound(lab: Lab) -> None:
    """The standing rules (``session.quiet``): one copy each however often added; with nobody
    bound they let nothing of VIP:port through either way, not even an ACK. A clamp that does
    not own its rules opens without adding any, serves, and leaves them at close: quiet again.
    ``remove`` deletes every copy, a duplicate added by hand too."""
    a, b = lab.host("a"), lab.host("b")
    with connected(a, b, A, PORT) as (cli, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _quiet(lab, "add", "add")
        assert _copies(lab) == (1, 1)
        acked0 = tcp_info(cli)[1]
        conn.sendall(b"q1")
        cli.sendall(b"up")
        cli.settimeout(1.0)
        with pytest.raises(TimeoutError):
            cli.recv(100)
        assert tcp_info(cli)[1] == acked0  # the client's byte not even acknowledged
        clamp = AckClamp(QUEUE, vip=A, port=PORT, limit=lambda t: None,
                         capture=lambda s, p: None, netns=a.ns, own_rules=False)  # fmt: skip
        try:
            clamp.open()
            assert _copies(lab) == (1, 1)  # open inserted nothing
            conn.sendall(b"q2")
            got = b""
            cli.settimeout(10)
            while len(got) < 4:  # q1 resent, and q2
                got += cli.recv(100)
            assert got == b"q1q2"
            conn.settimeout(10)
            assert conn.recv(100) == b"up"  # the client's resend, captured on the way in
            assert clamp.stats.captured > 0
        finally:
            clamp.close()
        assert _copies(lab) == (1, 1)  # left standing: quiet again
        conn.sendall(b"q3")
        cli.settimeout(1.0)
        with pytest.raises(TimeoutError):
            cli.recv(100)
        a.sh(["iptables", "-w", "-I", "OUTPUT", *clamp.rule("OUTPUT")])  # a duplicate
        assert _copies(lab) == (2, 1)
        _quiet(lab, "remove")
        assert _copies(lab) == (0, 0)
        cli.settimeout(10)  # the resend gets through now
        assert cli.recv(100) == b"q3"
    assert COMMENT not in rules(lab)


def test_a_full_queue_shows_in_the_kernels_figures(lab: Lab) -> None:
    """More held segments than the queue's maximum length: the kernel drops the rest, and
    ``kernel_queue`` (the session status's ``clamp.kernel_queue``) shows them waiting and
    dropped. Released, TCP sends the dropped ones again: every byte arrives once."""
    a, b = lab.host("a"), lab.host("b")
    ends: dict[FourTuple, int] = {}
    clamp = AckClamp(QUEUE, vip=A, port=PORT, limit=lambda t: None, hold=lambda t: ends.get(t),
                     netns=a.ns, maxlen=4)  # fmt: skip

    def figures() -> dict[str, int] | None:
        return kernel_queue(QUEUE, a.sh("cat /proc/net/netfilter/nfnetlink_queue").stdout)

    with clamp, contextlib.ExitStack() as stack:
        lsock = stack.enter_context(a.socket())
        lsock.bind((A, PORT))
        lsock.listen(8)
        pairs = []
        for _ in range(8):
            cli = stack.enter_context(b.socket())
            cli.connect((A, PORT))
            pairs.append((cli, stack.enter_context(lsock.accept()[0])))
        assert figures() == {"waiting": 0, "dropped_full": 0, "dropped_user": 0}
        readers = []
        for cli, conn in pairs:  # nothing more leaves any of them
            ends[(A, PORT, B, conn.getpeername()[1])] = dump(conn).snd_seq
            readers.append(Reader(cli))
            readers[-1].start()
        # each dump sent a window probe (repair mode off) through the queue: while the clamp's
        # thread is slow to answer them (a loaded box), the kernel drops those past four too.
        # Counted from when they are gone.
        deadline = time.monotonic() + 10
        while (kq := figures()) is not None and kq["waiting"]:
            assert time.monotonic() < deadline, kq
            time.sleep(0.02)
        assert kq is not None
        base = kq["dropped_full"]
        data = random.Random(13).randbytes(1000)
        for _, conn in pairs:  # a data segment each: four held, four dropped
            conn.sendall(data)
        deadline = time.monotonic() + 10
        while (kq := figures()) is not None and kq["dropped_full"] - base < 4:
            assert time.monotonic() < deadline, kq
            time.sleep(0.02)
        assert kq is not None and kq["waiting"] == 4, kq  # the held ones, nothing else
        assert clamp.stats.held_now == 4
        ends.clear()
        clamp.kick()
        for (_, conn), got in zip(pairs, readers, strict=True):
            conn.shutdown(socket.SHUT_WR)
            got.join(timeout=30)
            assert got.count == len(data) and got.sha.digest() == hashlib.sha256(data).digest()
    assert figures() is None


def test_a_hushed_clamp_drops_both_ways_and_lets_nothing_held_out(lab: Lab) -> None:
    """``AckClamp.hushed`` (rule 9: a master's VIPs are down while its agent asks the witness):
    every segment is dropped both ways and the connection lives on; unhushed, TCP sends it all
    again and both ends get every byte."""
    a, b = lab.host("a"), lab.host("b")
    with connected(a, b, A, PORT) as (cli, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clamp = AckClamp(QUEUE, vip=A, port=PORT, limit=lambda t: None,
                         capture=lambda s, p: None, netns=a.ns)  # fmt: skip
        with clamp:
            conn.sendall(b"h0")
            cli.settimeout(10)
            assert cli.recv(100) == b"h0"
            clamp.hushed = True
            seen = clamp.stats.seen
            conn.sendall(b"h1")
            cli.sendall(b"up")
            cli.settimeout(1.0)
            with pytest.raises(TimeoutError):
                cli.recv(100)
            conn.settimeout(0.5)
            with pytest.raises(TimeoutError):
                conn.recv(100)
            assert clamp.stats.hushed >= 2 and clamp.stats.seen > seen
            clamp.hushed = False
            clamp.kick()
            got = b""
            cli.settimeout(10)
            while len(got) < 2:  # h1 sent again by the service's TCP
                got += cli.recv(100)
            assert got == b"h1"
            conn.settimeout(10)
            assert conn.recv(100) == b"up"  # the client's resend

