"""L4 TCP relay: bytes between a client and a worker, zero copy through a pipe with os.splice.

Each direction is one coroutine: splice socket -> pipe, then pipe -> socket, waiting on the
event loop's reader/writer callbacks when a side would block. The bytes never enter Python
(``SPLICE_F_MOVE``). ``copy_pump`` is the fallback (recv_into / sendall through a buffer), used when
splice is off (``front.splice = false``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket

CHUNK = 1 << 20
F_SETPIPE_SZ = 1031
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


async def _wait(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    fut = loop.create_future()
    add, remove = (
        (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    )

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    add(fd, ready)
    try:
        await fut
    finally:
        remove(fd)


async def splice_pump(src: socket.socket, dst: socket.socket) -> int:
    """Move bytes from ``src`` to ``dst`` until EOF; then half-close ``dst``. Returns the count."""
    loop = asyncio.get_running_loop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
    sfd, dfd = src.fileno(), dst.fileno()
    total = pending = 0
    try:
        while True:
            if pending == 0:
                try:
                    n = os.splice(sfd, w, CHUNK, flags=_FLAGS)
                except BlockingIOError:
                    await _wait(loop, sfd, False)
                    continue
                if n == 0:
                    break
                pending = n
            try:
                m = os.splice(r, dfd, pending, flags=_FLAGS)
            except BlockingIOError:
                await _wait(loop, dfd, True)
                continue
            pending -= m
            total += m
    finally:
        os.close(r)
        os.close(w)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
    return total


async def copy_pump(src: socket.socket, dst: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    total = 0
    while True:
        n = await loop.sock_recv_into(src, buf)
        if n == 0:
            break
        await loop.sock_sendall(dst, view[:n])
        total += n
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
    return total


async def relay(a: socket.socket, b: socket.socket, *, splice: bool = True) -> tuple[int, int]:
    """Relay both ways until both directions ended or one fails; closes neither socket.
    Returns (bytes a->b, bytes b->a)."""
    pump = splice_pump if splice else copy_pump
    t1 = asyncio.ensure_future(pump(a, b))
    t2 = asyncio.ensure_future(pump(b, a))
    try:
        done, _ = await asyncio.wait((t1, t2), return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            err = t.exception()
            if err is not None:
                raise err
        return t1.result(), t2.result()
    finally:
        for t in (t1, t2):
            if not t.done():
                t.cancel()
        await asyncio.gather(t1, t2, return_exceptions=True)
