"""python -m nonstop.streams server|client|protected-server: see nonstop.streams.run and
nonstop.streams.protected."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from nonstop.streams.run import client, serve


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m nonstop.streams")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("server", "client", "protected-server"):
        s = sub.add_parser(name)
        s.add_argument("--host", required=True)
        s.add_argument("--port", type=int, default=5001)
        s.add_argument("--rate", type=float, default=100.0, help="messages per second each way")
        s.add_argument("--size", type=int, default=256, help="payload bytes per message")
    sub.choices["server"].add_argument("--report", help="write the server's JSON report here")
    from nonstop.streams import protected

    protected.add_arguments(sub.choices["protected-server"])
    c = sub.choices["client"]
    c.add_argument("--conns", type=int, default=1)
    c.add_argument("--duration", type=float, default=5.0)
    c.add_argument("--long-gap", type=float, help="list silences longer than this (s)")
    c.add_argument("--samples", help="write per-connection progress samples (JSON) here")
    c.add_argument("--arrival", choices=["kernel", "app"], default="kernel",
                   help="time what arrives by the kernel's receive timestamp (default) or by "
                        "when the read returned")
    a = p.parse_args()
    if a.cmd == "protected-server":
        sys.exit(asyncio.run(protected.serve(a.host, a.port, agent=a.agent, rate=a.rate,
                                             size=a.size, report=a.report)))  # fmt: skip
    elif a.cmd == "server":
        asyncio.run(serve(a.host, a.port, rate=a.rate, size=a.size, report=a.report))
    else:
        out = asyncio.run(client(a.host, a.port, conns=a.conns, duration=a.duration,
                                 rate=a.rate, size=a.size, long_gap=a.long_gap,
                                 samples=a.samples, arrival=a.arrival))  # fmt: skip
        print(json.dumps(out))


if __name__ == "__main__":
    main()
