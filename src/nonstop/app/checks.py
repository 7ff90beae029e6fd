"""Readiness and liveness checks: their config and the probes (TCP connect, HTTP status, command).

A probe returns ``(ok, detail)`` and never raises for a failing service: a refused connection, a
timeout, a 500 or a non-zero exit is a failed check with a detail sentence. The supervisor core
decides what the results mean (thresholds, intervals); this module only runs one probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.parse
from typing import Annotated

import msgspec

from nonstop.spawn import DEVNULL, PIPE, spawn

Ms = Annotated[int, msgspec.Meta(ge=0)]
PositiveMs = Annotated[int, msgspec.Meta(ge=1)]
Count = Annotated[int, msgspec.Meta(ge=1, le=1000)]


class CheckConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Exactly one of ``tcp`` ("host:port"), ``http`` (a URL) or ``command`` (argv)."""

    tcp: str = ""
    http: str = ""
    command: list[str] = []
    http_status: list[int] = []  # accepted statuses; empty: 200-399
    interval_ms: PositiveMs = 1000
    timeout_ms: PositiveMs = 1000
    initial_delay_ms: Ms = 0
    success_threshold: Count = 1
    failure_threshold: Count = 3

    def problem(self) -> tuple[str, str] | None:
        """(field, reason) if the check is wrong, else None."""
        kinds = [k for k in ("tcp", "http", "command") if getattr(self, k)]
        if len(kinds) != 1:
            return "tcp", f"give exactly one of tcp, http, command (got {kinds or 'none'})"
        if self.tcp:
            host, _, port = self.tcp.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                return "tcp", f"{self.tcp!r} is not host:port"
        if self.http:
            u = urllib.parse.urlsplit(self.http)
            if u.scheme != "http" or not u.hostname:
                return "http", f"{self.http!r} is not an http:// URL (https is not supported)"
        if self.timeout_ms > self.interval_ms:
            return "timeout_ms", f"{self.timeout_ms} ms is longer than interval_ms"
        return None

    def spec(self) -> tuple[float, float, int, int]:
        """The core's view: (interval, initial delay, success threshold, failure threshold)."""
        return (
            self.interval_ms / 1000,
            self.initial_delay_ms / 1000,
            self.success_threshold,
            self.failure_threshold,
        )


async def run_check(cfg: CheckConfig) -> tuple[bool, str]:
    """Run one probe, bounded by ``timeout_ms``."""
    timeout = cfg.timeout_ms / 1000
    try:
        async with asyncio.timeout(timeout):
            if cfg.tcp:
                return await _tcp(cfg.tcp)
            if cfg.http:
                return await _http(cfg.http, cfg.http_status)
            return await _command(cfg.command)
    except TimeoutError:
        return False, f"no answer within {cfg.timeout_ms} ms"


def _why(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


async def _tcp(target: str) -> tuple[bool, str]:
    host, _, port = target.rpartition(":")
    try:
        _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    except OSError as e:
        return False, f"tcp {target}: {_why(e)}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, f"tcp {target} connected"


async def _http(url: str, accept: list[int]) -> tuple[bool, str]:
    u = urllib.parse.urlsplit(url)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    try:
        reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    except OSError as e:
        return False, f"GET {url}: {_why(e)}"
    try:
        host = u.netloc
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
    except OSError as e:
        return False, f"GET {url}: {_why(e)}"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False, f"GET {url}: not an HTTP answer: {line[:60]!r}"
    status = int(parts[1])
    ok = status in accept if accept else 200 <= status < 400
    return ok, f"GET {url}: {status}"


async def _command(argv: list[str]) -> tuple[bool, str]:
    try:
        proc = await spawn(
            argv, stdin=DEVNULL, stdout=DEVNULL, stderr=PIPE, start_new_session=True
        )
    except OSError as e:
        return False, f"{argv[0]}: {_why(e)}"
    try:
        _, err = await proc.communicate()
    except asyncio.CancelledError:  # the timeout: the probe must not outlive it
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    rc = proc.returncode
    tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
    return rc == 0, f"{argv[0]} exited {rc}" + (f": {tail[0][:120]}" if tail else "")
