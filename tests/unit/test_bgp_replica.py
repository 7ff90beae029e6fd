"""The local hot standby's plumbing (bgp/replica.py): the kernel's counts of a socket read as of
one instant, and a follower that gets each descriptor with the frame it belongs to however the
stream is cut into reads."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nonstop.bgp.config import loads
from nonstop.bgp.replica import StandbyFollower, _frame, kernel_counts

CONFIG = """
asn = 65001
router_id = "10.77.0.11"

[[peers]]
name = "p0"
address = "10.77.0.12"
asn = 65002

[[peers]]
name = "p1"
address = "10.77.0.13"
asn = 65003
"""


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    srv.close()
    yield a, b
    a.close()
    b.close()


def test_kernel_counts_add_up(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"x" * 5000)
    b.sendall(b"y" * 300)
    got = 0
    while got < 1200:
        got += len(b.recv(1200 - got))
    while True:  # until all of a's bytes are in b's queue
        received, _, inq, _ = kernel_counts(b)
        if received == 5000:
            break
    assert received - inq == 1200  # what b read
    _, acked, _, outq = kernel_counts(b)
    assert acked + outq == 300  # what b wrote (the passive side's SYN is not counted)


def test_kernel_counts_consistent_while_segments_arrive(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """received - inq is what the reader consumed however many segments land during the read."""
    a, b = pair
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            try:
                a.send(b"z" * 100)
            except BlockingIOError:
                stop.wait(0.001)

    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a.setblocking(False)
    b.setblocking(False)
    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        read, seen = 0, set()
        for _ in range(3000):
            received, _, inq, _ = kernel_counts(b)
            assert received - inq == read
            seen.add(received)
            with contextlib.suppress(BlockingIOError):  # keep the window open
                read += len(b.recv(300))
        assert len(seen) > 100  # segments did land between the reads
    finally:
        stop.set()
        t.join()


def _serve(path: str, frames: list[tuple[bytes, list[int]]]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        c, _ = srv.accept()
        with c:
            for data, fds in frames:
                if fds:
                    socket.send_fds(c, [data], fds)
                else:
                    c.sendall(data)
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_follower_keeps_a_descriptor_for_the_rest_of_its_frame(tmp_path: Path, chunk: int) -> None:
    """A read can end inside an F frame: its descriptor came with the frame's first byte."""
    s0, s1 = socket.socket(), socket.socket(socket.AF_INET6)
    path = str(tmp_path / "replica.sock")
    t = _serve(path, [(_frame(b"F", struct.pack("!HB", 0, 1)), [s0.fileno()]),
                      (_frame(b"F", struct.pack("!HB", 1, 0)), [s1.fileno()])])
    f = StandbyFollower(loads(CONFIG), path)
    f.follow(connect_timeout=5, chunk=chunk)
    t.join()
    assert sorted(f.socks) == ["p0", "p1"]
    assert f.socks["p0"][1] is True and f.socks["p1"][1] is False
    assert f.socks["p1"][0].family == socket.AF_INET6
    for sock, _ in f.socks.values():
        sock.close()
    s0.close()
    s1.close()
