"""Active health checks of the workers: TCP connect, HTTP status, or a command's exit code.

One coroutine per front runs every ``interval`` and checks every non-draining worker
concurrently; each result goes to ``Pool.check_result`` (``fall``/``rise`` are the pool's).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from nonstop.vs.config import HealthConfig
from nonstop.vs.http import ResponseParser
from nonstop.vs.pool import Pool, Worker


async def check_tcp(addr: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        async with asyncio.timeout(timeout):
            _, w = await asyncio.open_connection(addr, port)
    except (OSError, TimeoutError) as e:
        return False, f"tcp {addr}:{port}: {e or 'timeout'}"
    w.close()
    return True, "tcp ok"


async def check_http(
    addr: str, port: int, path: str, expect: int, timeout: float
) -> tuple[bool, str]:
    try:
        async with asyncio.timeout(timeout):
            r, w = await asyncio.open_connection(addr, port)
            try:
                w.write(
                    f"GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n".encode()
                )
                p = ResponseParser()
                while (resp := p.next_response()) is None:
                    data = await r.read(65536)
                    if not data:
                        p.eof()
                        resp = p.next_response()
                        break
                    p.feed(data)
            finally:
                w.close()
    except (OSError, TimeoutError) as e:
        return False, f"http {addr}:{port}: {e or 'timeout'}"
    except Exception as e:  # RemoteProtocolError from a garbled answer
        return False, f"http {addr}:{port}: {e}"
    if resp is None or resp.status != expect:
        return False, f"http {path} answered {None if resp is None else resp.status}"
    return True, "http ok"


async def check_command(argv: list[str], addr: str, port: int, timeout: float) -> tuple[bool, str]:
    env = {**os.environ, "WORKER_ADDR": addr, "WORKER_PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(timeout):
            rc = await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return False, f"command timed out after {timeout}s"
    return rc == 0, f"command exit {rc}"


class HealthChecker:
    def __init__(self, pool: Pool, cfg: HealthConfig) -> None:
        self.pool = pool
        self.cfg = cfg

    async def check(self, w: Worker) -> tuple[bool, str]:
        c = self.cfg
        addr = self.pool.address(w, time.monotonic())
        t = c.timeout_ms / 1000
        if c.kind == "tcp":
            return await check_tcp(addr, w.spec.port, t)
        if c.kind == "http":
            return await check_http(addr, w.spec.port, c.path, c.expect_status, t)
        return await check_command(c.command, addr, w.spec.port, t)

    async def run(self) -> None:
        if self.cfg.kind == "none":
            return
        interval = self.cfg.interval_ms / 1000
        while True:
            workers = [w for w in self.pool.workers.values() if w.draining_since is None]
            results = await asyncio.gather(*(self.check(w) for w in workers))
            now = time.monotonic()
            for w, (ok, why) in zip(workers, results, strict=True):
                self.pool.check_result(w.id, ok, now, why)
            await asyncio.sleep(interval)
