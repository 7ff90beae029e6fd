"""``nonstop agent`` and ``nonstop status``."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import socket
import sys
from typing import Any

from nonstop.cli import EXIT_FAIL, EXIT_OK, EXIT_START, add_format_option
from nonstop.common import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("agent", help="run the node agent")
    p.add_argument("--config", required=True, help="the node's TOML config")
    p.add_argument("--check", action="store_true", help="check the config and exit")
    add_format_option(p)
    p.set_defaults(func=run_agent)

    f = sub.add_parser(
        "fence", help="drop this node's VIPs now (for ExecStopPost, or by hand after a crash)"
    )
    f.add_argument("--config", required=True, help="the node's TOML config")
    add_format_option(f)
    f.set_defaults(func=run_fence)

    s = sub.add_parser(
        "status",
        help="roles and the Active Stations Table of a running agent (every group, for a node "
        "of groups on a store)",
    )
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="the agent's config (its unix socket is found from it)")
    where.add_argument("--socket", help="the agent's unix socket (STATE_DIR/agent.sock)")
    where.add_argument("--url", help="the agent's HTTP API, e.g. http://10.77.0.11:8780")
    add_format_option(s)
    s.set_defaults(func=run_status)


def run_agent(args: argparse.Namespace) -> int:
    import logging

    from nonstop.config import load_agent_config

    cfg, key = load_agent_config(args.config)
    if args.check:
        if args.format == "json":
            print(json.dumps({"config": args.config, "ok": True, "node": cfg.node.id}))
        else:
            print(f"{args.config}: ok (node {cfg.node.id}, {len(cfg.channels)} channels)")
        return EXIT_OK
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    from nonstop.agent.daemon import Agent

    try:
        agent = Agent(cfg, key)
    except OSError as e:
        print(f"nonstop: agent failed to start: {e}", file=sys.stderr)
        return EXIT_START
    try:
        asyncio.run(agent.run())
    except OSError as e:
        print(f"nonstop: agent failed: {e}", file=sys.stderr)
        return EXIT_START
    return EXIT_OK


def run_fence(args: argparse.Namespace) -> int:
    """Remove every configured VIP from this node. Safe to run at any time on a node whose agent
    is not running; on a running master it would take the service down, so it refuses then."""
    from nonstop.config import load_agent_config
    from nonstop.failover.vip import VipManager, VipSpec

    cfg, _ = load_agent_config(args.config)
    try:
        st = fetch_status(socket_path=cfg.socket_path)
    except (OSError, ValueError):
        st = None
    if st is not None and st["role"] == "master":
        print(
            "nonstop: the agent is running here as master; stop it (it hands over) instead",
            file=sys.stderr,
        )
        return EXIT_FAIL
    mgr = VipManager([VipSpec(address=v.address, interface=v.interface) for v in cfg.vips])
    try:
        before = set(mgr.held())
        mgr.release()
        removed = sorted(before - set(mgr.held()))
    finally:
        mgr.close()
    if args.format == "json":
        print(json.dumps({"removed": removed}))
    else:
        print(f"removed: {', '.join(removed) or 'nothing (no VIP was held)'}")
    return EXIT_OK


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 3.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def agent_request(
    method: str, path: str, *, socket_path: str | None = None, url: str | None = None
) -> tuple[int, bytes]:
    """One request to an agent's API: (status, body). OSError when it cannot be reached."""
    if socket_path is not None:
        conn: http.client.HTTPConnection = _UnixHTTPConnection(socket_path)
    else:
        assert url is not None
        from urllib.parse import urlsplit

        u = urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname or "localhost", u.port or 80, timeout=3.0)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def fetch_status(*, socket_path: str | None = None, url: str | None = None) -> dict[str, Any]:
    """GET /status from an agent; raises OSError when it cannot be reached."""
    status, body = agent_request("GET", "/status", socket_path=socket_path, url=url)
    if status != 200:
        raise OSError(f"agent answered {status}")
    return json.loads(body)


def _is_groups_config(path: str) -> bool:
    """A groups-on-a-store node (``[store]`` + ``[[groups]]``, nonstop.store) rather than a pair."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return False  # the pair's loader reports it with file, field and reason
    return "store" in data and "groups" in data


def run_status(args: argparse.Namespace) -> int:
    sock = args.socket
    if args.config and _is_groups_config(args.config):
        from nonstop.store.cli import cmd_status  # every group: the store's view + this node's

        return cmd_status(args)
    if args.config:
        from nonstop.config import load_agent_config

        cfg, _ = load_agent_config(args.config)
        sock = cfg.socket_path
    try:
        st = fetch_status(socket_path=sock, url=args.url)
    except OSError as e:
        where = sock or args.url
        if args.format == "json":
            print(json.dumps({"error": f"cannot reach the agent at {where}: {e}"}))
        else:
            print(f"nonstop: cannot reach the agent at {where}: {e}", file=sys.stderr)
        return EXIT_FAIL
    if args.format == "json":
        print(json.dumps(st, indent=2))
    else:
        print_status(st)
    return EXIT_OK


def print_status(st: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    role_style = {"master": "bold green", "backup": "cyan", "fault": "bold red"}.get(st["role"], "")
    con.print(
        f"[bold]{st['node']}[/] group {st['group']}  role [{role_style}]{st['role']}[/] "
        f"for {st['since_s']:.1f} s  priority {st['priority']}"
    )
    con.print(f"  why: {st['reason']}")
    vips = (
        ", ".join(
            f"{v['address']}@{v['interface']}{' (held)' if v['held'] else ''}" for v in st["vips"]
        )
        or "none"
    )
    con.print(f"  VIPs: {vips}")
    if st.get("witness"):
        left = st["witness"]["lease_ms_left"]
        con.print(f"  witness lease: {'none' if left is None else f'{left} ms left'}")
    if st["realtime"]["requested"] and st["realtime"]["failed"]:
        con.print(f"  [yellow]realtime not applied: {'; '.join(st['realtime']['failed'])}[/]")

    peers = Table(title="Members", title_justify="left")
    for col in ("node", "alive", "role", "priority"):
        peers.add_column(col)
    peers.add_row(st["node"] + " (self)", "yes", st["role"], str(st["priority"]))
    for p in st["peers"]:
        peers.add_row(
            p["id"],
            "yes" if p["alive"] else "[red]no[/]",
            str(p["role"] or "-"),
            str(p["priority"] if p["priority"] is not None else "-"),
        )
    con.print(peers)

    ast = Table(title="Active Stations Table", title_justify="left")
    for col in ("peer", "channel", "state", "last heard ms", "rtt ms", "loss"):
        ast.add_column(col)
    for r in st["stations"]:
        state = r["state"] if r["state"] == "up" else f"[red]{r['state']}[/]"
        ast.add_row(
            r["peer"],
            r["channel"],
            state,
            "-" if r["last_heard_ms"] is None else f"{r['last_heard_ms']:.1f}",
            "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:.3f}",
            "-" if r["loss"] is None else f"{100 * r['loss']:.1f}%",
        )
    con.print(ast)
    print_services(con, st.get("services") or {})
    if st["history"]:
        hist = Table(title="Recent role decisions", title_justify="left")
        for col in ("from", "to", "why"):
            hist.add_column(col)
        for h in st["history"][-5:]:
            hist.add_row(h["old"], h["new"], h["reason"])
        con.print(hist)


def print_services(con: Any, services: dict[str, Any]) -> None:
    """The supervised services (``[[services]]`` with a command) of ``nonstop status``."""
    from rich.markup import escape
    from rich.table import Table

    rows = services.get("instances") or []
    if not rows:
        return
    styles = {
        "ready": "green", "unhealthy": "yellow", "backoff": "yellow", "crash-loop": "bold red",
    }  # fmt: skip
    t = Table(title="Supervised services", title_justify="left")
    for col in ("service", "instance", "state", "pid / container", "restarts", "last exit"):
        t.add_column(col)
    t.add_column("crash loop")
    t.add_column("why")
    for r in rows:
        state = r["state"]
        style = styles.get(state, "")
        t.add_row(
            escape(str(r.get("service", r["name"]))),
            escape(r["name"]),  # what `nonstop service reset` takes, as the service name does
            f"[{style}]{state}[/]" if style else state,
            escape(str(r.get("container") or r.get("pid") or "-")),
            str(r["restarts"]),
            escape(r.get("last_exit") or "-"),
            "[bold red]yes[/]" if state == "crash-loop" else "no",
            escape(r.get("reason", "")),
        )
    con.print(t)
    looping = sorted({str(r.get("service", r["name"])) for r in rows if r["state"] == "crash-loop"})
    for name in looping:
        con.print(
            f"  {escape(name)} is in a crash loop; once its cause is fixed, "
            f"`nonstop service reset {escape(name)} --config NODE.toml` starts it again"
        )


__all__ = [
    "ConfigError", "add_parser", "agent_request", "fetch_status", "print_services", "print_status",
]  # fmt: skip
