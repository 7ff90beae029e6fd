"""``nonstop lab up|status|down``: the lab from the command line, on the same code as the tests."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from nonstop.cli import add_format_option
from nonstop.lab import nsops
from nonstop.lab.host import LabError
from nonstop.lab.lab import Lab
from nonstop.lab.topology import Topology, demo_topology


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("lab", help="network-namespace testbed: up, status, down")
    sub = p.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    up = sub.add_parser("up", help="build a lab and leave it up (default: the demo topology)")
    up.add_argument("--topology", metavar="FILE", help="TOML topology (see examples/lab-demo.toml)")
    up.add_argument("--prefix", help="name prefix (default: random nsXXXX)")
    add_format_option(up)
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="every lab on this machine")
    add_format_option(st)
    st.set_defaults(func=cmd_status)

    down = sub.add_parser("down", help="remove a lab (or all), also one whose owner died")
    which = down.add_mutually_exclusive_group(required=True)
    which.add_argument("--prefix", help="the lab to remove")
    which.add_argument("--all", action="store_true", help="every lab on this machine")
    add_format_option(down)
    down.set_defaults(func=cmd_down)


def _interfaces(topo: Topology, host: str) -> dict[str, dict[str, str | None]]:
    return {
        ch: {
            "ifname": ch,
            "v4": topo.addr(host, ch),
            "v6": topo.addr6(host, ch),
            "mac": topo.mac(host, ch),
        }
        for ch in topo.hosts[host].channels
    }


def describe(state: dict[str, Any]) -> dict[str, Any]:
    """What `status` shows of one recorded lab."""
    topo = Topology.from_dict(state.get("topology") or {}, source=f"lab {state['prefix']}")
    owner = state.get("owner")
    hosts = []
    for name, ns in (state.get("hosts") or {}).items():
        hosts.append(
            {
                "name": name,
                "ns": ns,
                "present": nsops.ns_exists(ns),
                "interfaces": _interfaces(topo, name) if name in topo.hosts else {},
            }
        )
    procs = [
        {
            "name": p.get("name"),
            "host": p.get("host"),
            "pid": p.get("pid"),
            "alive": nsops.pid_alive(p.get("pid"), p.get("start")),
            "argv": p.get("argv"),
        }
        for p in state.get("processes", [])
    ]
    return {
        "prefix": state["prefix"],
        "status": state.get("status"),
        "detached": owner is None,
        "owner_pid": owner.get("pid") if isinstance(owner, dict) else None,
        "owner_alive": Lab.owner_alive(state),
        "created": state.get("created"),
        "workdir": state.get("workdir"),
        "switch": state.get("switch"),
        "hosts": hosts,
        "processes": procs,
    }


def cmd_up(args: argparse.Namespace) -> int:
    topo = Topology.from_toml(args.topology) if args.topology else demo_topology()
    try:
        lab = Lab(topo, prefix=args.prefix).up()
    except LabError as e:
        print(f"nonstop lab up: {e}", file=sys.stderr)
        return 3
    lab.detach()
    out = {
        "prefix": lab.prefix,
        "build_seconds": round(lab.build_seconds or 0.0, 4),
        "switch": lab.switch_ns,
        "workdir": str(lab.workdir),
        "hosts": [
            {"name": h.name, "ns": h.ns, "interfaces": _interfaces(topo, h.name)}
            for h in lab.hosts.values()
        ],
    }
    if args.format == "json":
        print(json.dumps(out, indent=1))
    else:
        _print_lab_pretty(describe(nsops.read_state(lab.prefix) or {}), built=out["build_seconds"])
        print(f"remove with: nonstop lab down --prefix {lab.prefix}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    labs = [describe(s) for s in Lab.states()]
    if args.format == "json":
        print(json.dumps({"labs": labs}, indent=1))
        return 0
    if not labs:
        print("no labs on this machine")
    for lab in labs:
        _print_lab_pretty(lab)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    prefixes = [s["prefix"] for s in Lab.states()] if args.all else [args.prefix]
    removed: list[str] = []
    problems: dict[str, list[str]] = {}
    for prefix in prefixes:
        t0 = time.perf_counter()
        try:
            left = Lab.remove(prefix)
        except LabError as e:
            left = [str(e)]
        if left:
            problems[prefix] = left
        else:
            removed.append(prefix)
        if args.format != "json":
            what = "removed" if not left else "problems: " + "; ".join(left)
            print(f"{prefix}: {what} ({time.perf_counter() - t0:.3f} s)")
    if args.format == "json":
        print(json.dumps({"removed": removed, "problems": problems}, indent=1))
    elif not prefixes:
        print("no labs on this machine")
    return 1 if problems else 0


def _print_lab_pretty(lab: dict[str, Any], built: float | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if lab["detached"]:
        owner = "detached"
    else:
        owner = f"pid {lab['owner_pid']} ({'alive' if lab['owner_alive'] else 'DEAD'})"
    title = f"lab {lab['prefix']}: {lab['status']}, owner {owner}"
    if built is not None:
        title += f", built in {built * 1000:.0f} ms"
    t = Table(title=title, title_justify="left")
    for col in ("host", "netns", "iface", "IPv4", "IPv6", "MAC"):
        t.add_column(col)
    for h in lab["hosts"]:
        first = True
        ns = h["ns"] if h["present"] else f"{h['ns']} (missing)"
        for ifc in h["interfaces"].values() or [{}]:
            t.add_row(
                h["name"] if first else "",
                ns if first else "",
                ifc.get("ifname", ""),
                ifc.get("v4") or "",
                ifc.get("v6") or "",
                ifc.get("mac", ""),
            )
            first = False
    console = Console()
    console.print(t)
    if lab["processes"]:
        pt = Table(title=f"processes of {lab['prefix']}", title_justify="left")
        for col in ("name", "host", "pid", "alive", "argv"):
            pt.add_column(col)
        for p in lab["processes"]:
            argv = " ".join(p["argv"] or [])
            pt.add_row(p["name"], p["host"], str(p["pid"]), "yes" if p["alive"] else "no", argv)
        console.print(pt)
