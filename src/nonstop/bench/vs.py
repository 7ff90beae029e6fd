"""Load generators for the virtual-server benchmark and tests: HTTP (keep-alive, many
connections), L4 bulk TCP, and RPC calls. Each prints one JSON object on stdout.

    python -m nonstop.bench.vs http --url 10.77.0.11:8080 --duration 5 --conns 64 [--procs 2]
    python -m nonstop.bench.vs l4 --addr 10.77.0.11:9000 --duration 5 --conns 4
    python -m nonstop.bench.vs rpc --addr 10.77.0.11:7900 --duration 3 --conns 8

Every failed request is counted, never hidden: a connection error, a reset, a timeout, a
non-2xx status or a corrupt response is one failure (and the request is not retried by the
generator). A ``GET /`` answer from ``nonstop vs worker`` must say ``hello from <x-worker>
#<x-seq>``: a stream spliced from two different responses fails that check (``corrupt``).
``connects`` counts connections opened: with keep-alive and no failure it equals ``--conns``.
``--until-file`` stops when the file appears (the test's way to end a run at a chosen moment).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
import time
from collections import Counter
from typing import Any

from nonstop.vs.http import ResponseParser


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * p))], 3)


def _stop_check(deadline: float, until_file: str | None) -> bool:
    return time.monotonic() >= deadline or (until_file is not None and os.path.exists(until_file))


async def _http_conn(
    host: str, port: int, path: str, deadline: float, until_file: str | None, st: dict[str, Any]
) -> None:
    req = f"GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
    lat: list[float] = st["lat"]
    check = path == "/"
    while not _stop_check(deadline, until_file):
        st["connects"] += 1
        try:
            async with asyncio.timeout(5):
                r, w = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as e:
            st["fail"] += 1
            st["errors"][f"connect: {type(e).__name__}"] += 1
            await asyncio.sleep(0.01)
            continue
        p = ResponseParser()
        try:
            while not _stop_check(deadline, until_file):
                t0 = time.monotonic()
                w.write(req)
                async with asyncio.timeout(5):
                    while (resp := p.next_response()) is None:
                        data = await r.read(65536)
                        if not data:
                            raise ConnectionResetError("closed by the server")
                        p.feed(data)
                lat.append((time.monotonic() - t0) * 1000)
                wk = resp.header(b"x-worker")
                if check and wk and resp.body != b"hello from %s #%s\n" % (
                    wk,
                    resp.header(b"x-seq"),
                ):
                    raise ValueError("corrupt response")  # the stream is out of step: give up
                if 200 <= resp.status < 300:
                    st["ok"] += 1
                    if wk:
                        st["workers"][wk.decode()] += 1
                else:
                    st["fail"] += 1
                    st["errors"][f"status {resp.status}"] += 1
                if not resp.keep_alive:
                    break
        except (OSError, TimeoutError, Exception) as e:  # every failure counts
            st["fail"] += 1
            st["errors"][str(e) if isinstance(e, ValueError) else type(e).__name__] += 1
        finally:
            w.close()


def _http_proc(args: dict[str, Any]) -> dict[str, Any]:
    st: dict[str, Any] = {
        "ok": 0, "fail": 0, "connects": 0, "errors": Counter(), "workers": Counter(), "lat": []
    }
    host, _, port = args["url"].rpartition(":")

    async def main() -> None:
        deadline = time.monotonic() + args["duration"]
        await asyncio.gather(
            *(
                _http_conn(host, int(port), args["path"], deadline, args["until_file"], st)
                for _ in range(args["conns"])
            )
        )

    asyncio.run(main())
    return st


def run_http(
    url: str,
    *,
    duration: float,
    conns: int,
    procs: int = 1,
    path: str = "/",
    until_file: str | None = None,
) -> dict[str, Any]:
    a = {
        "url": url,
        "duration": duration,
        "conns": max(1, conns // procs),
        "path": path,
        "until_file": until_file,
    }
    t0 = time.monotonic()
    if procs == 1:
        parts = [_http_proc(a)]
    else:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            parts = pool.map(_http_proc, [a] * procs)
    elapsed = time.monotonic() - t0
    lat = [x for p in parts for x in p["lat"]]
    ok = sum(p["ok"] for p in parts)
    errors: Counter[str] = Counter()
    workers: Counter[str] = Counter()
    for p in parts:
        errors.update(p["errors"])
        workers.update(p["workers"])
    return {
        "ok": ok,
        "failed": sum(p["fail"] for p in parts),
        "connects": sum(p["connects"] for p in parts),
        "rps": round(ok / elapsed, 1),
        "p50_ms": _pct(lat, 0.5),
        "p99_ms": _pct(lat, 0.99),
        "errors": dict(errors),
        "workers": dict(workers),
        "seconds": round(elapsed, 2),
    }


def run_l4(addr: str, *, duration: float, conns: int) -> dict[str, Any]:
    """Send bulk bytes on ``conns`` connections to an echo-less sink path: the worker's L4 port
    discards; we count bytes written (acknowledged by the kernel through the relay)."""
    host, _, port = addr.rpartition(":")

    async def one(st: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        try:
            s = socket.create_connection((host, int(port)), timeout=5)
        except OSError as e:
            st["fail"] += 1
            st["errors"][type(e).__name__] += 1
            return
        s.setblocking(False)
        buf = b"\0" * (1 << 20)
        deadline = time.monotonic() + duration
        try:
            while time.monotonic() < deadline:
                await loop.sock_sendall(s, buf)
                st["bytes"] += len(buf)
            s.shutdown(socket.SHUT_WR)
            while await loop.sock_recv(s, 65536):
                pass
        except OSError as e:
            st["fail"] += 1
            st["errors"][type(e).__name__] += 1
        finally:
            s.close()

    st: dict[str, Any] = {"bytes": 0, "fail": 0, "errors": Counter()}

    async def main() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(one(st) for _ in range(conns)))
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    return {
        "gbps": round(st["bytes"] * 8 / elapsed / 1e9, 3),
        "bytes": st["bytes"],
        "failed": st["fail"],
        "errors": dict(st["errors"]),
        "seconds": round(elapsed, 2),
    }


def run_rpc(
    addr: str,
    *,
    duration: float,
    conns: int,
    method: str = "add",
    args: list[Any] | None = None,
    mode: str = "auto",
    reliability: int = 1,
    until_file: str | None = None,
) -> dict[str, Any]:
    from nonstop.vs.rpc.client import RpcClient, RpcError

    host, _, port = addr.rpartition(":")
    st: dict[str, Any] = {"ok": 0, "fail": 0, "errors": Counter(), "modes": Counter(), "lat": []}

    async def one(deadline: float) -> None:
        c = RpcClient(host, int(port))
        while not _stop_check(deadline, until_file):
            t0 = time.monotonic()
            try:
                reply = await c.invoke(
                    method, *(args or [1, 2]), mode=mode, reliability=reliability
                )
                st["ok"] += 1
                st["modes"][reply.mode] += 1
                st["lat"].append((time.monotonic() - t0) * 1000)
            except (RpcError, OSError, TimeoutError) as e:
                st["fail"] += 1
                st["errors"][str(getattr(e, "reason", e))[:80]] += 1
                await asyncio.sleep(0.01)
        await c.close()

    async def main() -> float:
        t0 = time.monotonic()
        deadline = t0 + duration
        await asyncio.gather(*(one(deadline) for _ in range(conns)))
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    return {
        "ok": st["ok"],
        "failed": st["fail"],
        "calls_per_s": round(st["ok"] / elapsed, 1),
        "p99_ms": _pct(st["lat"], 0.99),
        "modes": dict(st["modes"]),
        "errors": dict(st["errors"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nonstop.bench.vs")
    sub = ap.add_subparsers(dest="kind", required=True)
    h = sub.add_parser("http")
    h.add_argument("--url", required=True, help="address:port")
    h.add_argument("--path", default="/")
    h.add_argument("--procs", type=int, default=1)
    l4 = sub.add_parser("l4")
    l4.add_argument("--addr", required=True)
    r = sub.add_parser("rpc")
    r.add_argument("--addr", required=True)
    r.add_argument("--method", default="add")
    r.add_argument("--args", default="[1, 2]", help="JSON list")
    r.add_argument("--mode", default="auto")
    r.add_argument("--reliability", type=int, default=1)
    for p in (h, l4, r):
        p.add_argument("--duration", type=float, default=5.0)
        p.add_argument("--conns", type=int, default=16)
        p.add_argument("--until-file")
    a = ap.parse_args(argv)
    if a.kind == "http":
        out = run_http(
            a.url,
            duration=a.duration,
            conns=a.conns,
            procs=a.procs,
            path=a.path,
            until_file=a.until_file,
        )
    elif a.kind == "l4":
        out = run_l4(a.addr, duration=a.duration, conns=a.conns)
    else:
        out = run_rpc(
            a.addr,
            duration=a.duration,
            conns=a.conns,
            method=a.method,
            args=json.loads(a.args),
            mode=a.mode,
            reliability=a.reliability,
            until_file=a.until_file,
        )
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
