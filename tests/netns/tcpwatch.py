"""Helpers for netns tests that watch a TCP socket from the outside (not a test module)."""

from __future__ import annotations

import socket
import struct
import time
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
