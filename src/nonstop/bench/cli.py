"""``nonstop bench``: benchmarks that compare nonstop with an established tool in the same lab.

Sub-commands: ``failover`` and ``takeover`` here; every other benchmark lives in a module
``nonstop/bench/<name>_cli.py`` with ``add_parser(sub)``, found and registered at start (so a new
benchmark touches no shared file). Results are JSON on stdout (and in ``--out``); progress goes to
stderr. ``emit()`` and ``with_progress()`` are the helpers every benchmark uses for both.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from nonstop.cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, add_format_option


def add_parser(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks against a baseline tool (JSON)")
    sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    _add_failover(sub)
    _add_takeover(sub)
    for name in _plugin_modules():
        importlib.import_module(name).add_parser(sub)


def _plugin_modules() -> list[str]:
    here = Path(__file__).parent
    return sorted(f"nonstop.bench.{p.stem}" for p in here.glob("*_cli.py"))


def _add_takeover(sub: Any) -> None:
    p = sub.add_parser(
        "takeover",
        help="TCP session takeover: N connections kept through the master's death",
        description="The agent pair (10 ms heartbeats) protects a stream service on the VIP; the "
        "peer streams both ways on N connections; the master's agent and service are SIGKILLed "
        "once the backup holds every connection; the backup restores them with TCP_REPAIR and "
        "its standby service carries on. Seed 001's anchor: 0.70 ms average recovery per "
        "session at 256 sessions. A timeline PNG is written per run. --standalone runs the "
        "older scenario without agents (the promotion is a signal, no detection).",
    )
    p.add_argument("--sessions", type=int, nargs="+", default=[256], help="one run per value")
    p.add_argument("--sweep", action="store_true", help="64, 128, 256, 512 and 10000 sessions")
    p.add_argument("--rate", type=float, default=None,
                   help="messages per second each way per connection (default 20 up to 512 "
                        "connections; above, 1000 / N: 0.1 at 10,000)")  # fmt: skip
    p.add_argument("--interval-ms", type=int, default=10, help="heartbeat interval (ms)")
    p.add_argument("--png-dir", default="out", help="where the timeline PNGs go (default out/)")
    p.add_argument("--standalone", action="store_true",
                   help="the session manager alone: no agents, promotion by signal")  # fmt: skip
    p.add_argument("--out", help="also write the JSON to this file")
    add_format_option(p)
    p.set_defaults(func=cmd_takeover, format="json")


def cmd_takeover(args: argparse.Namespace) -> int:
    from nonstop.lab import Lab

    if lacks_root():
        return EXIT_USAGE
    counts = [64, 128, 256, 512, 10000] if args.sweep else args.sessions
    if any(n < 1 for n in counts) or (args.rate is not None and args.rate <= 0):
        print("nonstop bench: --sessions must be >= 1 and --rate > 0", file=sys.stderr)
        return EXIT_USAGE

    def body(tick: Any) -> list[dict[str, Any]]:
        results = []
        for n in counts:
            if args.standalone:
                from nonstop.bench.takeover import run, topology

                with Lab(topology()) as lab:
                    results.append(run(lab, n))
            else:
                from nonstop.bench import takeover_agent

                os.makedirs(args.png_dir, exist_ok=True)
                png = os.path.join(args.png_dir, f"bench-takeover-{n}.png")
                # thousands of connections: fewer messages each, 1,000 a second each way in all
                # (512 x 20 msg/s already saturates a 2-CPU box's Python packet path, ~10-15k
                # segments/s: 10,000 x 0.5 msg/s offered 20-25k, the kernel queue dropped
                # 73-143k segments and ~700 connections stalled); a --rate given is taken as is
                rate = args.rate or (20.0 if n <= 512 else 1000.0 / n)
                # and heartbeats of at least 50 ms: opening thousands of connections stalls a
                # 2-CPU box's agent past a 20 ms fence (it steps down, healthy)
                hb = args.interval_ms if n <= 512 else max(50, args.interval_ms)
                try:
                    results.append(takeover_agent.run(
                        n, rate=rate, interval_ms=hb, png=png,
                        say=lambda m: print(f"  {m}", file=sys.stderr)))  # fmt: skip
                except (TimeoutError, RuntimeError) as e:  # reported, the sweep goes on
                    print(f"  {n} sessions: {e}", file=sys.stderr)
                    results.append({"sessions": n, "error": str(e), "kept": 0, "resets": None,
                                    "bytes_lost": None, "bytes_duplicated": None,
                                    "restore_us_per_session": None,
                                    "interruption_ms": {"p50": None, "p99": None}})  # fmt: skip
            tick()
        return results

    results = with_progress(len(counts), body, label="bench takeover")
    out: dict[str, Any] = {"bench": "takeover", "runs": results}
    if emit(out if len(results) > 1 else results[0], args):
        for r in results:
            i = r["interruption_ms"]
            print(
                f"{r['sessions']} sessions: kept {r['kept']}, resets {r['resets']}, "
                f"lost {r['bytes_lost']} B, duplicated {r['bytes_duplicated']} B, "
                f"restore {r['restore_us_per_session']} us/session, "
                f"interruption p50 {i['p50']} ms p99 {i['p99']} ms"
            )
            extra = (r.get("role_changes_after_kill") or [])[1:]
            for change in extra:  # the takeover is the first; a fence after it is news
                print(f"  then {change} (the figures are the last promotion's)")
    bad = any(r.get("error") or r["resets"] or r["bytes_lost"] or r["kept"] != r["sessions"]
              for r in results)  # fmt: skip
    return EXIT_FAIL if bad else EXIT_OK


def _add_failover(sub: Any) -> None:
    p = sub.add_parser(
        "failover",
        help="failover time: nonstop vs keepalived (VRRPv3) in the same netns lab",
        description="Kill the master (its agent process, or the whole node) N times and measure "
        "how long the backup takes to hold the VIP and to answer the peer. See bench/README.md.",
    )
    p.add_argument(
        "--runs", type=int, default=20, help="faults per tool (default 20; 0: soak only)"
    )
    p.add_argument("--interval-ms", type=int, default=10, help="heartbeat/advert interval (ms)")
    p.add_argument(
        "--fault",
        choices=("kill", "node"),
        default="kill",
        help="kill: SIGKILL the master's process; node: isolate the master's host",
    )
    p.add_argument("--baseline", choices=("keepalived", "none"), default="keepalived")
    p.add_argument(
        "--soak",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the runs, S seconds without faults under CPU hogs and 5%% loss "
        "on hb, counting false failovers",
    )
    p.add_argument(
        "--soak-loss-channel",
        choices=("hb", "lan"),
        default="hb",
        help="channel that loses 5%% of its packets during the soak (default hb; keepalived "
        "only uses lan)",
    )
    p.add_argument(
        "--witness",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run our agents with the witness (default on)",
    )
    p.add_argument(
        "--no-ours",
        dest="ours",
        action="store_false",
        help="run the baseline only (checks the harness)",
    )
    p.add_argument(
        "--store",
        choices=("embedded", "etcd"),
        default="embedded",
        help="embedded: the pair above (heartbeats + witness); etcd: N nodes, G groups on a "
        "3-member etcd (nonstop.bench.groups_cli), with the embedded pair's figures alongside",
    )
    p.add_argument("--nodes", type=int, help="--store etcd: agent nodes (default 5)")
    p.add_argument("--groups", type=int, help="--store etcd: groups (default 20)")
    p.add_argument("--out", help="also write the JSON to this file")
    add_format_option(p)

    def route(args: argparse.Namespace) -> int:
        from nonstop.bench.groups_cli import cmd_failover_store

        if args.store == "etcd" or args.nodes is not None or args.groups is not None:
            return cmd_failover_store(args)
        return cmd_failover(args)

    p.set_defaults(func=route, format="json")


def cmd_failover(args: argparse.Namespace) -> int:
    from nonstop.bench.failover import FailoverConfig, run_failover

    if args.runs < 0 or args.interval_ms < 1 or args.soak < 0:
        print("nonstop bench: --runs >= 0, --interval-ms >= 1, --soak >= 0", file=sys.stderr)
        return EXIT_USAGE
    if args.runs == 0 and args.soak == 0:
        print("nonstop bench: nothing to do (--runs 0 and no --soak)", file=sys.stderr)
        return EXIT_USAGE
    if lacks_root():
        return EXIT_FAIL
    cfg = FailoverConfig(
        runs=args.runs,
        interval_ms=args.interval_ms,
        fault=args.fault,
        baseline=None if args.baseline == "none" else args.baseline,
        soak_s=args.soak,
        soak_loss_channel=args.soak_loss_channel,
        witness=args.witness,
        ours=args.ours,
    )
    tools = int(cfg.ours) + int(cfg.baseline is not None)
    total = tools * (cfg.runs + int(cfg.soak_s))
    result = with_progress(total, lambda tick: run_failover(cfg, tick))
    if emit(result, args):
        _pretty(result)
    failed = (result.get("failed_runs") or 0) + (
        (result.get("baseline") or {}).get("failed_runs") or 0
    )
    return EXIT_FAIL if failed and failed >= tools * max(cfg.runs, 1) else EXIT_OK


def lacks_root(label: str = "nonstop bench") -> bool:
    """True (and says so on stderr) when not root: every benchmark builds network namespaces."""
    if os.geteuid() == 0:
        return False
    print(f"{label}: needs root (network namespaces)", file=sys.stderr)
    return True


def emit(result: Any, args: argparse.Namespace) -> bool:
    """Write the JSON to ``--out`` if given and print it with ``--format json``; return True
    when the caller should print its pretty form instead."""
    text = json.dumps(result, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.format == "json":
        print(text)
        return False
    return True


def with_progress(total: int, body: Any, label: str = "bench failover") -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as prog:
        task = prog.add_task("runs", total=total)
        return body(lambda: prog.advance(task))


def _pretty(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"failover: fault={r['fault']} interval={r['interval_ms']} ms runs={r['runs']}")
    for col in (
        "tool",
        "detect p50",
        "detect p99",
        "vip move p50",
        "vip move p99",
        "false failovers",
        "dual masters",
        "failed",
    ):
        t.add_column(col)
    rows = [("nonstop", r)]
    if r.get("baseline"):
        rows.append((r["baseline"]["tool"], r["baseline"]))
    for name, d in rows:
        t.add_row(
            name,
            str(d["detect_ms"]["p50"]),
            str(d["detect_ms"]["p99"]),
            str(d["vip_move_ms"]["p50"]),
            str(d["vip_move_ms"]["p99"]),
            str(d["false_failovers"]),
            str(d["dual_masters"]),
            str(d.get("failed_runs")),
        )
    console = Console()
    console.print(t)
    if r.get("ratio_p50") is not None:
        console.print(f"detect p50 ratio nonstop/keepalived: {r['ratio_p50']}")
