"""``nonstop groups``: the store-backed agent and its operator commands.

    nonstop groups agent --config node.toml          run this node's agent
    nonstop groups status --config node.toml         every group: master, standby, TTL, revision
    nonstop groups switchover G --to NODE --config node.toml [--wait S]

``status`` and ``switchover`` read the store itself (any node's config works: they need its
endpoints, cluster name and groups); both take ``--format json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from nonstop.cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, add_format_option
from nonstop.store.base import StoreUnavailable
from nonstop.store.config import StoreAgentConfig, load_store_config, parse_store_config


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("groups", help="groups of N nodes on a store (etcd)")
    sub = p.add_subparsers(dest="groups_cmd", required=True, metavar="CMD")
    a = sub.add_parser("agent", help="run this node's store-backed agent")
    a.add_argument("--config", required=True)
    a.set_defaults(func=cmd_agent)
    s = sub.add_parser("status", help="every group: master, standby, lease TTL left, revision")
    s.add_argument("--config", required=True)
    add_format_option(s)
    s.set_defaults(func=cmd_status)
    w = sub.add_parser("switchover", help="move a group to another node by hand")
    w.add_argument("group")
    w.add_argument("--to", required=True, metavar="NODE")
    w.add_argument("--config", required=True)
    w.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the move (0: no)")
    add_format_option(w)
    w.set_defaults(func=cmd_switchover)


def _cfg(path: str) -> StoreAgentConfig:
    with open(path, "rb") as f:
        return parse_store_config(path, f.read())


def cmd_agent(args: argparse.Namespace) -> int:
    from nonstop.store.daemon import run_agent

    cfg, key = load_store_config(args.config)
    asyncio.run(run_agent(cfg, key))
    return EXIT_OK


async def cluster_status(cfg: StoreAgentConfig) -> dict[str, Any]:
    """What ``nonstop groups status`` prints, read from the store now."""
    from nonstop.store.core import GroupsCore
    from nonstop.store.daemon import core_config
    from nonstop.store.etcd import EtcdStore

    store = EtcdStore(cfg.store.endpoints, cluster=cfg.node.cluster, node="ctl",
                      timeout=cfg.store.timeout_ms / 1000)  # fmt: skip
    try:
        view = await store.read()
        core = GroupsCore(core_config(cfg))
        core.set_view(view, time.monotonic())
        ttls: dict[int, float | None] = {}
        for rec in view.groups.values():
            if rec.lease not in ttls:
                ttls[rec.lease] = await store.lease_ttl(rec.lease)
        groups = []
        for g in cfg.groups:
            rec = view.groups.get(g.name)
            sw = view.switchovers.get(g.name)
            groups.append(
                {
                    "group": g.name,
                    "vip": g.vip,
                    "master": rec.holder if rec else None,
                    "standby": core.standby_of(g.name),
                    "lease_ttl_s": ttls.get(rec.lease) if rec else None,
                    "revision": rec.revision if rec else None,
                    "switchover_to": sw.target if sw else None,
                }
            )
        return {
            "cluster": cfg.node.cluster,
            "revision": view.revision,
            "members": sorted(view.members),
            "groups": groups,
        }
    finally:
        await store.close()


def _print_status(st: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"cluster {st['cluster']} at revision {st['revision']}; "
              f"members alive: {', '.join(st['members']) or 'none'}")  # fmt: skip
    for col in ("group", "vip", "master", "standby", "lease TTL s", "revision", "switchover"):
        t.add_column(col)
    for g in st["groups"]:
        t.add_row(
            *(
                str(g[k]) if g[k] is not None else "-"
                for k in (
                    "group",
                    "vip",
                    "master",
                    "standby",
                    "lease_ttl_s",
                    "revision",
                    "switchover_to",
                )
            )
        )
    Console().print(t)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _cfg(args.config)
    try:
        st = asyncio.run(cluster_status(cfg))
    except StoreUnavailable as e:
        print(f"nonstop groups: store unavailable: {e}", file=sys.stderr)
        return EXIT_FAIL
    if args.format == "json":
        print(json.dumps(st, indent=1))
    else:
        _print_status(st)
    return EXIT_OK


async def switchover(cfg: StoreAgentConfig, group: str, target: str, wait: float) -> dict[str, Any]:
    from nonstop.store.etcd import EtcdStore

    g = next((x for x in cfg.groups if x.name == group), None)
    if g is None:
        raise ValueError(f"no group {group!r}")
    if target not in g.priorities:
        raise ValueError(f"{target} does not serve {group}")
    store = EtcdStore(cfg.store.endpoints, cluster=cfg.node.cluster, node="ctl",
                      timeout=cfg.store.timeout_ms / 1000)  # fmt: skip
    try:
        view = await store.read()
        if target not in view.members:
            raise ValueError(f"{target} is not alive in the store")
        before = view.groups.get(group)
        if before is not None and before.holder == target:
            return {"group": group, "from": target, "to": target, "moved": True, "ms": 0.0}
        t0 = time.monotonic()
        await store.request_switchover(group, target)
        out: dict[str, Any] = {"group": group, "from": before.holder if before else None,
                               "to": target, "moved": False, "ms": None}  # fmt: skip
        while wait > 0 and time.monotonic() - t0 < wait:
            rec = (await store.read()).groups.get(group)
            if rec is not None and rec.holder == target:
                out["moved"], out["ms"] = True, round((time.monotonic() - t0) * 1000, 1)
                break
            await asyncio.sleep(0.02)
        return out
    finally:
        await store.close()


def cmd_switchover(args: argparse.Namespace) -> int:
    cfg = _cfg(args.config)
    try:
        out = asyncio.run(switchover(cfg, args.group, args.to, args.wait))
    except ValueError as e:
        print(f"nonstop groups: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StoreUnavailable as e:
        print(f"nonstop groups: store unavailable: {e}", file=sys.stderr)
        return EXIT_FAIL
    if args.format == "json":
        print(json.dumps(out))
    else:
        state = f"moved in {out['ms']} ms" if out["moved"] else "requested (not confirmed yet)"
        print(f"{out['group']}: {out['from']} -> {out['to']}: {state}")
    return EXIT_OK if out["moved"] or args.wait <= 0 else EXIT_FAIL
