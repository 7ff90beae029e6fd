"""``nonstop bench throughput``: a bulk stream through the ACK clamp (with capture, as the session
manager runs it) vs an unprotected one, in the same run, on an unshaped veth and a tbf-shaped one.
See nonstop.bench.throughput for the scenario."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nonstop.cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, add_format_option


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "throughput",
        help="bulk TCP throughput through the ACK clamp + capture vs unprotected",
        description="A bulk stream to a service protected by the session manager's NFQUEUE path "
        "(ACK clamp, inbound and outbound capture) vs the same service unprotected, alternating "
        "in one lab, on an unshaped veth and on a tbf-shaped link. Issue 3's targets: ratio >= "
        "0.8 unshaped, >= 0.95 at 1 Gbit/s. Prints per link and direction protected_gbps, "
        "unprotected_gbps, ratio and the CPU seconds of the queue process.",
    )
    p.add_argument("--secs", type=float, default=3.0, help="seconds per stream (default 3)")
    p.add_argument("--repeat", type=int, default=1, help="rounds per link (medians reported)")
    p.add_argument(
        "--rate",
        action="append",
        metavar="RATE",
        help="tbf rate of the shaped link, or 'none' for the unshaped veth (repeatable; "
        "default: none and 1gbit)",
    )
    p.add_argument(
        "--direction",
        choices=("up", "down", "both"),
        default="both",
        help="up: the peer sends to the service; down: the service sends (default both)",
    )
    p.add_argument("--out", help="also write the JSON to this file")
    add_format_option(p)
    p.set_defaults(func=cmd_throughput, format="json")


def cmd_throughput(args: argparse.Namespace) -> int:
    from nonstop.bench.cli import emit, lacks_root, with_progress
    from nonstop.bench.throughput import DIRECTIONS, run

    if lacks_root():
        return EXIT_USAGE
    if args.secs <= 0 or args.repeat < 1:
        print("nonstop bench: --secs > 0 and --repeat >= 1", file=sys.stderr)
        return EXIT_USAGE
    rates = tuple(None if r == "none" else r for r in (args.rate or ["none", "1gbit"]))
    directions = DIRECTIONS if args.direction == "both" else (args.direction,)
    result = with_progress(
        len(rates) * len(directions),
        lambda tick: run(
            rates=rates, directions=directions, secs=args.secs, repeat=args.repeat, tick=tick
        ),
        label="bench throughput",
    )
    if emit(result, args):
        for r in result["links"]:
            print(
                f"{r['link']:>16} {r['direction']:>4}: protected {r['protected_gbps']} Gbit/s, "
                f"unprotected {r['unprotected_gbps']} Gbit/s, ratio {r['ratio']}, "
                f"queue CPU {r['queue_cpu_s']} s"
            )
    broken = any(r["queue"]["errors"] or r["protected_gbps"] <= 0 for r in result["links"])
    return EXIT_FAIL if broken else EXIT_OK
