"""``nonstop bench restart``: local crash recovery of a supervised service (issue 4).

The agent pair protects the stream checker's protected server, run by the agents' supervisors;
the peer streams both ways on N connections; the service on the master is SIGKILLed K times.
Reported from the peer's side: ``kept``, ``resets``, ``bytes_lost``, ``interruption_ms``
{p50, p99} (last byte before a kill to the first byte after it, per connection and kill), for the
service as a process and, next to it, in a podman container (``container``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from nonstop.bench.cli import emit, lacks_root, with_progress
from nonstop.cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, add_format_option


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "restart",
        help="local crash recovery: N connections kept through K SIGKILLs of the service",
        description=__doc__,
    )
    p.add_argument("--sessions", type=int, default=256, help="connections (default 256)")
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs of the process (default 10)")
    p.add_argument("--container-kills", type=int, default=3,
                   help="SIGKILLs of the container (default 3; 0: no container run)")  # fmt: skip
    p.add_argument("--instances", type=int, default=2, choices=(1, 2),
                   help="2: a warm standby takes over (default); 1: cold restart")  # fmt: skip
    p.add_argument("--rate", type=float, default=20.0,
                   help="messages per second each way per connection (default 20)")  # fmt: skip
    p.add_argument("--out", help="also write the JSON to this file")
    add_format_option(p)
    p.set_defaults(func=cmd_restart, format="json")


def cmd_restart(args: argparse.Namespace) -> int:
    from nonstop.bench import restart as R
    from nonstop.lab import Lab
    from nonstop.lab.topology import demo_topology

    if lacks_root("nonstop bench restart"):
        return EXIT_USAGE
    if args.sessions < 1 or args.kills < 1 or args.rate <= 0:
        print("nonstop bench restart: --sessions, --kills >= 1, --rate > 0", file=sys.stderr)
        return EXIT_USAGE
    container = args.container_kills > 0 and shutil.which("podman") is not None

    def body(tick: Any) -> dict[str, Any]:
        with Lab(demo_topology()) as lab:
            result = R.run(lab, sessions=args.sessions, kills=args.kills,
                           instances_=args.instances, rate=args.rate, tick=tick)  # fmt: skip
        result["container"] = None
        if container:
            from nonstop.app.runtime.container import ensure_python_image

            image = ensure_python_image()
            with Lab(demo_topology()) as lab:
                result["container"] = R.run(
                    lab, sessions=args.sessions, kills=args.container_kills, runtime="podman",
                    instances_=args.instances, rate=args.rate, image=image, tick=tick,
                )  # fmt: skip
        result["target_p99_ms"] = 50
        return result

    total = args.kills + (args.container_kills if container else 0)
    result = with_progress(total, body, "bench restart")
    if emit(result, args):
        print(f"kept {result['kept']}/{result['sessions']}, resets {result['resets']}, "
              f"bytes lost {result['bytes_lost']}, interruption {result['interruption_ms']}")
    clean = result["kept"] == result["sessions"] and result["resets"] == 0
    return EXIT_OK if clean else EXIT_FAIL
