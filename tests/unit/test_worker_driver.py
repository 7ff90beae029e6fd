"""The agent's side of the session worker (session/driver.py) never blocks its loop: a worker that
does not read its requests gets them queued, in order, and sent when it reads again."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from typing import Any

import msgspec

from nonstop.session.driver import MAX_QUEUED, WorkerDriver
from nonstop.session.worker import SessionWorker


class Driver(WorkerDriver):
    def specs(self) -> list[dict[str, Any]]:
        return []


def test_a_worker_that_does_not_read_never_blocks_the_loop() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        asyncio.run(_scenario(ours, theirs, proc))
    finally:
        proc.kill()
        proc.wait()
        ours.close()
        theirs.close()


async def _scenario(ours: socket.socket, theirs: socket.socket, proc: Any) -> None:
    loop = asyncio.get_running_loop()
    d = Driver(b"k" * 32)
    d.worker = SessionWorker(ours, proc)
    d._loop = loop
    loop.add_reader(ours.fileno(), d._readable)
    replies: list[int] = []
    sent = 0
    t0 = time.monotonic()
    while d.counters.get("worker_backlog", 0) == 0:  # until the worker's socket is full
        assert d._send({"op": "status", "n": sent}, lambda r: replies.append(r and r["n"]))
        sent += 1
    for _ in range(MAX_QUEUED - 1):
        assert d._send({"op": "status", "n": sent}, lambda r: replies.append(r and r["n"]))
        sent += 1
    assert len(d._queued) == MAX_QUEUED
    assert not d._send({"op": "status", "n": -1}, lambda r: replies.append(-1))  # refused
    assert d.counters["worker_backlog_refused"] == 1
    assert time.monotonic() - t0 < 1.0  # nothing waited for the worker

    # the worker reads again and answers each request in order
    dec, enc = msgspec.msgpack.Decoder(), msgspec.msgpack.Encoder()
    theirs.setblocking(False)
    seen: list[int] = []
    deadline = time.monotonic() + 10
    while len(seen) < sent and time.monotonic() < deadline:
        try:
            req = dec.decode(theirs.recv(1 << 16))
        except BlockingIOError:
            await asyncio.sleep(0.001)
            continue
        seen.append(req["n"])
        theirs.send(enc.encode({"ok": True, "n": req["n"]}))
    while len(replies) < sent and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert seen == list(range(sent))
    assert replies == list(range(sent))
    assert not d._queued
    loop.remove_reader(ours.fileno())
