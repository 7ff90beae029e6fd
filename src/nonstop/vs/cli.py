"""``nonstop vs``: run the front, run a demo worker, read a front's status, make an RPC call.

    nonstop vs run --config front.toml [--check]
    nonstop vs worker --id w1 --http 10.77.0.21:8080 --channel lan=10.77.0.21 \
        --channel hb=10.77.1.21 --front lan=10.77.0.11,hb=10.77.1.11 --key-file vs.key
    nonstop vs status --admin 127.0.0.1:7801 [--format json]
    nonstop vs call --front 10.77.0.100:7900 add 1 2 [--mode auto] [--reliability 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
from typing import Any

from nonstop.cli import EXIT_FAIL, EXIT_OK, EXIT_START, EXIT_USAGE, add_format_option


def add_parser(subparsers: Any) -> None:
    vs = subparsers.add_parser("vs", help="virtual server: HA front over a worker pool, RPC modes")
    sub = vs.add_subparsers(dest="vs_command", required=True, metavar="SUB")

    p = sub.add_parser("run", help="run the front (HTTP/TCP/RPC listeners, health, registration)")
    p.add_argument("--config", required=True)
    p.add_argument("--check", action="store_true", help="check the config and exit")
    p.add_argument("--uvloop", action="store_true", help="use uvloop if it is installed")
    add_format_option(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("worker", help="run a demo worker (HTTP + RPC + registration/heartbeats)")
    p.add_argument("--id", required=True)
    p.add_argument("--http", help="listen address:port of the HTTP server")
    p.add_argument("--rpc-port", type=int)
    p.add_argument("--sink-port", type=int, help="TCP sink (reads, discards) for L4 tests")
    p.add_argument("--channel", action="append", default=[], help="NAME=ADDRESS (repeat)")
    p.add_argument("--front", action="append", default=[], help="CH=ADDR,CH=ADDR per front")
    p.add_argument("--control-port", type=int, default=7800)
    p.add_argument("--key-file")
    p.add_argument("--interval-ms", type=int, default=20)
    p.add_argument("--weight", type=int, default=1)
    p.add_argument("--wrong", action="store_true", help="add() answers wrong (NVP tests)")
    p.add_argument("--bad-primary", action="store_true", help="primary sqrt() fails its test")
    p.add_argument("--uvloop", action="store_true")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("status", help="workers and Active Stations Table of a running front")
    p.add_argument("--admin", required=True, help="the front's admin address:port")
    add_format_option(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("call", help="one RPC call through the front")
    p.add_argument("--front", required=True, help="the front's RPC listener address:port")
    p.add_argument("method")
    p.add_argument("args", nargs="*", help="JSON values")
    p.add_argument("--mode", default="auto", choices=("auto", "primary_backup", "nvp", "drb"))
    p.add_argument("--reliability", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--deadline-ms", type=int, default=0)
    add_format_option(p)
    p.set_defaults(func=cmd_call)


def _run(coro: Any, use_uvloop: bool) -> Any:
    if use_uvloop:
        try:
            import uvloop  # type: ignore[import-not-found]

            return uvloop.run(coro)
        except ImportError:
            print("nonstop vs: uvloop is not installed; using asyncio", file=sys.stderr)
    return asyncio.run(coro)


def cmd_run(args: argparse.Namespace) -> int:
    from nonstop.vs.config import load_vs_config
    from nonstop.vs.front import Front

    cfg, key = load_vs_config(args.config)  # ConfigError -> exit 2 in nonstop.cli
    if args.check:
        print("config ok" if args.format == "pretty" else json.dumps({"ok": True}))
        return EXIT_OK
    front = Front(cfg, key, config_path=args.config)
    try:
        _run(front.run(), args.uvloop)
    except OSError as e:
        print(f"nonstop vs: cannot start: {e}", file=sys.stderr)
        return EXIT_START
    return EXIT_OK


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for it in items:
        for part in it.split(","):
            k, sep, v = part.partition("=")
            if not sep:
                raise SystemExit(f"nonstop vs worker: {what} {part!r} is not NAME=ADDRESS")
            out[k] = v
    return out


def cmd_worker(args: argparse.Namespace) -> int:
    from nonstop.auth import load_key
    from nonstop.vs.worker import WorkerOptions, run_worker

    http = None
    if args.http:
        host, _, port = args.http.rpartition(":")
        http = (host, int(port))
    key = load_key(args.key_file, config_file="<cli>", field="--key-file") if args.key_file else b""
    opts = WorkerOptions(
        id=args.id,
        http=http,
        channels=_pairs(args.channel, "--channel"),
        fronts=[_pairs([f], "--front") for f in args.front],
        control_port=args.control_port,
        key=key,
        rpc_port=args.rpc_port,
        sink_port=args.sink_port,
        interval=args.interval_ms / 1000,
        weight=args.weight,
        wrong=args.wrong,
        bad_primary=args.bad_primary,
    )
    if opts.fronts and not opts.channels:
        print("nonstop vs worker: --front needs --channel", file=sys.stderr)
        return EXIT_USAGE
    try:
        _run(run_worker(opts), args.uvloop)
    except OSError as e:
        print(f"nonstop vs worker: cannot start: {e}", file=sys.stderr)
        return EXIT_START
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(f"http://{args.admin}/status", timeout=3) as r:
            st = json.load(r)
    except OSError as e:
        print(f"nonstop vs status: {e}", file=sys.stderr)
        return EXIT_FAIL
    if args.format == "json":
        print(json.dumps(st, indent=1))
        return EXIT_OK
    for w in st["workers"]:
        print(f"{w['id']:<12} {w['state']:<9} {w['address']:<16} in flight {w['in_flight']}")
    for s in st["stations"]:
        print(f"  {s['worker']:<10} {s['channel']:<6} {s['address']:<16} {s['state']}")
    return EXIT_OK


def cmd_call(args: argparse.Namespace) -> int:
    from nonstop.vs.rpc.client import RpcClient, RpcError

    host, _, port = args.front.rpartition(":")
    values = [json.loads(a) for a in args.args]

    async def go() -> Any:
        c = RpcClient(host, int(port))
        try:
            return await c.invoke(
                args.method,
                *values,
                mode=args.mode,
                reliability=args.reliability,
                deadline_ms=args.deadline_ms,
            )
        finally:
            await c.close()

    try:
        reply = asyncio.run(go())
    except RpcError as e:
        r = e.reply
        out = {"ok": False, "error": e.reason, "mode": r.mode if r else None}
        print(json.dumps(out) if args.format == "json" else f"error: {e.reason}")
        return EXIT_FAIL
    out = {
        "ok": True,
        "value": reply.value,
        "mode": reply.mode,
        "reason": reply.reason,
        "workers": reply.workers,
    }
    print(
        json.dumps(out)
        if args.format == "json"
        else f"{reply.value!r} ({reply.mode}: {reply.reason})"
    )
    return EXIT_OK
