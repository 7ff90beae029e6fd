"""``nonstop bgp speaker|summary|routes``: run the speaker, read its state over its unix socket."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from nonstop.cli import EXIT_FAIL, EXIT_OK, add_format_option

DEFAULT_SOCKET = "/run/nonstop/bgp.sock"


def add_parser(subparsers: Any) -> None:
    bgp = subparsers.add_parser("bgp", help="the BGP speaker (run it, show sessions and routes)")
    sub = bgp.add_subparsers(dest="bgp_command", required=True, metavar="COMMAND")
    p = sub.add_parser("speaker", help="run the BGP speaker (until SIGINT/SIGTERM)")
    p.add_argument("--config", required=True, help="speaker TOML file (see docs/bgp.md)")
    p.add_argument("--standby", action="store_true",
                   help="hot standby: follow the master at replica_socket, take its sessions "
                   "over (no OPEN) when it goes away, then run as the master")
    p.set_defaults(func=cmd_speaker)
    p = sub.add_parser("summary", help="one line per peer (like birdc show protocols)")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="the speaker's API socket")
    add_format_option(p)
    p.set_defaults(func=cmd_summary)
    p = sub.add_parser("routes", help="best routes (like birdc show route)")
    p.add_argument("prefix", nargs="?", help="only routes equal to or inside this prefix")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="the speaker's API socket")
    add_format_option(p)
    p.set_defaults(func=cmd_routes)


def cmd_speaker(args: argparse.Namespace) -> int:
    from nonstop.bgp.aio import run
    from nonstop.bgp.config import load

    cfg = load(args.config)  # ConfigError -> exit 2 with file, field, reason
    if args.standby and not cfg.replica_socket:
        print(f"nonstop bgp: {args.config}: replica_socket: needed with --standby",
              file=sys.stderr)
        return 2
    if cfg.agent is not None:  # a protected service: standby or master as the agent says
        from nonstop.bgp.protected import run_protected

        return asyncio.run(run_protected(cfg))  # EXIT_DEPOSED: the agent took the sessions
    asyncio.run(run(cfg, standby=args.standby))
    return EXIT_OK


def fetch(socket_path: str, path: str) -> dict[str, Any]:
    import aiohttp

    async def go() -> dict[str, Any]:
        conn = aiohttp.UnixConnector(path=socket_path)
        async with aiohttp.ClientSession(connector=conn) as s, \
                s.get(f"http://bgp{path}", timeout=aiohttp.ClientTimeout(total=10)) as r:
            data: dict[str, Any] = await r.json()
            if r.status != 200:
                raise RuntimeError(data.get("error", f"HTTP {r.status}"))
            return data

    return asyncio.run(go())


def _get(args: argparse.Namespace, path: str) -> dict[str, Any] | None:
    try:
        return fetch(args.socket, path)
    except (OSError, RuntimeError) as e:
        print(f"nonstop bgp: {args.socket}: {e}", file=sys.stderr)
        return None


def cmd_summary(args: argparse.Namespace) -> int:
    data = _get(args, "/summary")
    if data is None:
        return EXIT_FAIL
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"router id {data['router_id']}, AS {data['asn']}")
    print(f"{'peer':<12} {'address':<20} {'AS':>10} {'state':<12} {'since':>10} "
          f"{'rcvd v4/v6':>14} {'sent v4/v6':>14}")
    for r in data["peers"]:
        since = "-" if r["since_s"] is None else f"{r['since_s']:.0f}s"
        rx = f"{r['prefixes_received']['ipv4']}/{r['prefixes_received']['ipv6']}"
        tx = f"{r['prefixes_sent']['ipv4']}/{r['prefixes_sent']['ipv6']}"
        print(f"{r['peer']:<12} {r['address']:<20} {r['asn']:>10} {r['state']:<12} "
              f"{since:>10} {rx:>14} {tx:>14}")
        if r["last_error"]:
            print(f"{'':<12} last error: {r['last_error']}")
    return EXIT_OK


def cmd_routes(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    q = {"limit": str(args.limit)}
    if args.prefix:
        q["prefix"] = args.prefix
    data = _get(args, "/routes?" + urlencode(q))
    if data is None:
        return EXIT_FAIL
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return EXIT_OK
    for r in data["routes"]:
        extra = f" lp {r['local_pref']}" if r["local_pref"] is not None else ""
        extra += f" med {r['med']}" if r["med"] is not None else ""
        extra += (" comm " + " ".join(r["communities"])) if r["communities"] else ""
        print(f"{r['prefix']:<24} via {r['next_hop'] or '-':<18} from {r['from']:<10} "
              f"[{r['as_path']}] {r['origin']}{extra}")
    print(f"{len(data['routes'])} of {data['total']} routes shown")
    return EXIT_OK
