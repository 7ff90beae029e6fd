"""Helpers for netns tests that watch a TCP socket from the outside (not a test module)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any


def tcp_info(sock: socket.socket) -> tuple[int, int]:
    """(tcpi_unacked segments, tcpi_bytes_acked) of a socket."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return struct.unpack_from("I", raw, 24)[0], struct.unpack_from("Q", raw, 120)[0]


def bytes_acked(sock: socket.socket) -> int:
    """tcpi_bytes_acked: how much of what ``sock`` sent the peer acknowledged."""
    return tcp_info(sock)[1]


def wait_stable(fn: Any, period: float = 0.3, timeout: float = 10.0) -> Any:
    """fn()'s value once it stayed the same for ``period`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = fn(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = fn()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= period:
            return now
    raise AssertionError(f"never stable: {last}")


@contextlib.contextmanager
def connected(
    server: Any, client: Any, addr: str, port: int, family: int = socket.AF_INET
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """One TCP connection from lab host ``client`` to ``addr``:``port`` on lab host ``server``:
    (the client's socket, the server's accepted one); all closed on exit."""
    with server.socket(family) as lsock, client.socket(family) as cli:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((addr, port))
        lsock.listen(1)
        cli.connect((addr, port))
        conn, _ = lsock.accept()
        with conn:
            yield cli, conn


def answering(sync: socket.socket, rx: Any, stop: threading.Event) -> threading.Thread:
    """A backup's side in a started thread: ``rx`` (a SyncReceiver) takes every sync datagram
    on ``sync`` and its ACKs go back, until ``stop``."""

    def answer() -> None:
        sync.settimeout(0.05)
        while not stop.is_set():
            try:
                data, src = sync.recvfrom(65536)
            except TimeoutError:
                continue
            for ack in rx.receive(data, time.monotonic()):
                sync.sendto(ack, src)

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    return t
