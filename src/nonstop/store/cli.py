"""``nonstop groups``: the store-backed agent and its operator commands.

    nonstop groups agent --config node.toml          run this node's agent
    nonstop groups status --config node.toml         every group: master, standby, TTL, revision
    nonstop groups switchover G --to NODE --config node.toml [--wait S]

``status`` and ``switchover`` read the store itself (any node's config works: they need its
endpoints, cluster name and groups); both take ``--format json``. ``status`` also reads what
this node's agent decided (``<state_dir>/groups-status.json``, written by the agent on every
change and once a second): which groups it holds, failsafe mode, its own lease deadline. So it
still says something useful when the store cannot answer (exit 1 then, the local part printed).
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


def local_status(cfg: StoreAgentConfig, now: float | None = None) -> dict[str, Any] | None:
    """This node's agent's own state (None: no agent ever ran here). ``running`` is False when
    its file is over 3 s old (the agent writes it at least once a second)."""
    from nonstop.store.daemon import status_path

    now = time.monotonic() if now is None else now
    try:
        with open(status_path(cfg)) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or "at" not in raw:
        return None

    def left(t: float | None) -> float | None:
        return None if t is None else round(t - now, 3)

    return {
        "node": raw.get("node"),
        "running": now - float(raw["at"]) < 3.0,
        "session": raw.get("session"),
        "lease_left_s": left(raw.get("lease_until")),
        "last_renewal_s_ago": None if raw.get("renewed_at") is None
        else round(now - raw["renewed_at"], 3),
        "holds_until_s": left(raw.get("hold_deadline")),
        "store_ok": raw.get("store_ok"),
        "failsafe": raw.get("failsafe"),
        "deferring_to": raw.get("deferring_to"),
        "holding": raw.get("holding", []),
        "standby": raw.get("standby", {}),
        "peers": raw.get("peers", {}),
        "counters": raw.get("counters", {}),
    }  # fmt: skip


async def cluster_status(cfg: StoreAgentConfig) -> dict[str, Any]:
    """What ``nonstop groups status`` prints: the store now, merged with this node's agent."""
    st = await store_status(cfg)
    return merge_local(st, local_status(cfg), cfg)


def merge_local(
    st: dict[str, Any] | None, local: dict[str, Any] | None, cfg: StoreAgentConfig
) -> dict[str, Any]:
    """Per group: ``held_here`` (this node's VIP is up for it by its agent's decision) and
    ``failsafe`` (held here in failsafe mode); the store's columns are None without a store."""
    if st is None:
        st = {"cluster": cfg.node.cluster, "revision": None, "members": None,
              "groups": [{"group": g.name, "vip": g.vip, "master": None, "standby": None,
                          "lease_ttl_s": None, "revision": None, "switchover_to": None}
                         for g in cfg.groups]}  # fmt: skip
    running = bool(local and local["running"])
    held = set(local["holding"]) if local and running else set()
    for g in st["groups"]:
        g["held_here"] = g["group"] in held
        g["failsafe"] = bool(running and local and local["failsafe"] and g["held_here"])
        if g["standby"] is None and local and running:
            g["standby"] = local["standby"].get(g["group"])
    st["node"] = cfg.node.id
    st["agent"] = local
    return st


async def store_status(cfg: StoreAgentConfig) -> dict[str, Any]:
    """The cluster as the store has it now (StoreUnavailable when it cannot answer)."""
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

    members = st["members"]
    alive = "store unavailable" if members is None else ", ".join(members) or "none"
    t = Table(title=f"cluster {st['cluster']} at revision {st['revision']}; "
              f"members alive: {alive}")  # fmt: skip
    cols = {"group": "group", "vip": "vip", "master": "master", "standby": "standby",
            "lease_ttl_s": "lease TTL s", "revision": "revision", "switchover_to": "switchover",
            "held_here": f"held by {st['node']}", "failsafe": "failsafe"}  # fmt: skip
    for title in cols.values():
        t.add_column(title)
    for g in st["groups"]:
        t.add_row(*(str(g[k]) if g[k] is not None else "-" for k in cols))
    Console().print(t)
    a = st["agent"]
    if a is None:
        Console().print(f"no groups agent state on {st['node']}")
    else:
        state = "running" if a["running"] else "NOT running (stale state file)"
        Console().print(
            f"agent {a['node']}: {state}; session {a['session']}; lease left "
            f"{a['lease_left_s']} s (last renewal {a['last_renewal_s_ago']} s ago); "
            f"failsafe {'ON' if a['failsafe'] else 'off'}; holds {', '.join(a['holding']) or '-'}"
            f"{'; deferring to ' + a['deferring_to'] if a['deferring_to'] else ''}"
        )


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _cfg(args.config)
    rc, error = EXIT_OK, None
    try:
        store: dict[str, Any] | None = asyncio.run(store_status(cfg))
    except StoreUnavailable as e:
        rc, error, store = EXIT_FAIL, str(e), None
        print(f"nonstop groups: store unavailable: {e}", file=sys.stderr)
    st = merge_local(store, local_status(cfg), cfg)
    st["store_error"] = error
    if args.format == "json":
        print(json.dumps(st, indent=1))
    else:
        _print_status(st)
    return rc


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
