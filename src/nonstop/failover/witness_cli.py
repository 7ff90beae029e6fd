"""``nonstop witness``: the small daemon around WitnessCore (asyncio UDP on every listen address).

One line per lease that changes hands (grants to a new holder, transfers, releases), never one
per renewal. SIGTERM / SIGINT stop it cleanly. Exit codes as in nonstop.cli (3: failed start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

from nonstop.failover.witness import LeaseAcquired, LeaseReleased, WitnessCore

EXIT_START = 3


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, core: WitnessCore, out: _Out) -> None:
        self.core = core
        self.out = out
        self.transport: Any = None  # the selector datagram transport (has sendto)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.monotonic()
        for dst, reply in self.core.receive(data, addr, now):
            self.transport.sendto(reply, dst)
        while (ev := self.core.next_event()) is not None:
            self.out.event(ev)

    def error_received(self, exc: Exception) -> None:  # ICMP errors on a reply: nothing to do
        self.out.line("send-error", f"send error: {exc}", error=str(exc))


class _Out:
    def __init__(self, fmt: str) -> None:
        self.json = fmt == "json"

    def line(self, kind: str, text: str, **fields: Any) -> None:
        if self.json:
            print(json.dumps({"event": kind, **fields}), flush=True)
        else:
            print(f"nonstop witness: {text}", flush=True)

    def event(self, ev: LeaseAcquired | LeaseReleased) -> None:
        if isinstance(ev, LeaseAcquired):
            if ev.previous and ev.previous != ev.holder:
                text = f"group {ev.group}: lease moved from {ev.previous} to {ev.holder}"
            else:
                text = f"group {ev.group}: lease granted to {ev.holder}"
            self.line("granted", text, group=ev.group, holder=ev.holder, previous=ev.previous)
        elif ev.term is not None:
            self.line("released", f"group {ev.group}: {ev.holder} released the lease unused: "
                      f"term back to {ev.term}", group=ev.group, holder=ev.holder,
                      term=ev.term)  # fmt: skip
        else:
            self.line("released", f"group {ev.group}: {ev.holder} released the lease",
                      group=ev.group, holder=ev.holder)  # fmt: skip


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(
    *, config: str, fmt: str = "pretty", max_lease: float = 1.0, realtime: bool = True
) -> int:
    from nonstop.config import load_witness_config

    cfg, key = load_witness_config(config)
    out = _Out(fmt)
    loop = asyncio.get_running_loop()
    core = WitnessCore(key, max_lease, time.monotonic(), run=time.time_ns() // 1000)
    transports: list[asyncio.BaseTransport] = []
    try:
        for item in cfg.witness.listen:
            host, port = _split(item)
            t, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(core, out), local_addr=(host, port)
            )
            transports.append(t)
    except OSError as e:
        for t in transports:
            t.close()
        print(f"nonstop witness: cannot listen on {item}: {e.strerror}", file=sys.stderr)
        return EXIT_START
    # The witness answers on a takeover's critical path (a backup waits for its grant, a master's
    # lease lapses if its renewals go unanswered): like the agents, it runs SCHED_FIFO.
    rt_failed = []
    if realtime:
        from nonstop.agent.realtime import make_realtime

        rt_failed = make_realtime()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    out.line(
        "started",
        f"{cfg.witness.id} listening on {', '.join(cfg.witness.listen)} (pid {os.getpid()}, "
        f"max lease {max_lease * 1000:.0f} ms, grants start after {max_lease * 1000:.0f} ms)",
        id=cfg.witness.id, listen=list(cfg.witness.listen), pid=os.getpid(),
        max_lease_ms=round(max_lease * 1000), realtime_failed=rt_failed,
    )  # fmt: skip
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for t in transports:
            t.close()
    status = core.status(time.monotonic())
    out.line("stopped", f"stopped; counters {status['counters']}", **status)
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.max_lease_ms <= 0:
        print("nonstop witness: --max-lease-ms must be > 0", file=sys.stderr)
        return 2
    return asyncio.run(
        serve(
            config=args.config,
            fmt=args.format,
            max_lease=args.max_lease_ms / 1000,
            realtime=not args.no_realtime,
        )
    )


def add_parser(sub: Any) -> None:
    from nonstop.cli import add_format_option

    p = sub.add_parser("witness", help="run the lease witness that breaks ties between nodes")
    p.add_argument("--config", required=True, help="witness TOML file")
    p.add_argument(
        "--max-lease-ms", type=int, default=1000,
        help="longest lease granted; also the start-up grace period (default 1000)",
    )  # fmt: skip
    p.add_argument(
        "--no-realtime", action="store_true", help="do not run at real-time priority (SCHED_FIFO)"
    )
    add_format_option(p)
    p.set_defaults(func=_run)
