"""``nonstop service run|status|check|reset|image|clean``: the supervisor from the command line.

``run`` supervises every ``[[service]]`` of a services file until SIGTERM/SIGINT, then stops
them (stop signal, SIGKILL after stop_timeout). It keeps ``<state_dir>/status.json`` current on
every event; ``status`` reads it. ``image build`` makes the local python base image for
containers (cached by name); ``clean`` removes every container a supervisor started and, with
``--image``, that image. ``reset NAME`` asks a running *agent* (over its unix socket) to clear
the crash loop of a service it supervises: the service starts again and the node's local fault
is withdrawn. Exit 0 when it was cleared, and also when it was not in a crash loop (nothing to
do; the output says so); 1 when the agent cannot be reached; 2 for an unknown service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

from nonstop.cli import EXIT_FAIL, EXIT_OK, EXIT_START, EXIT_USAGE, add_format_option


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("service", help="supervise services: processes or containers")
    ss = p.add_subparsers(dest="service_command", required=True, metavar="ACTION")

    r = ss.add_parser("run", help="supervise the services of a file until SIGTERM")
    r.add_argument("--config", required=True, help="services file (TOML, [[service]] tables)")
    add_format_option(r)
    r.set_defaults(func=run_services)

    s = ss.add_parser("status", help="the state of each service of a running `service run`")
    s.add_argument("--config", required=True, help="the services file `service run` was given")
    add_format_option(s)
    s.set_defaults(func=run_status)

    c = ss.add_parser("check", help="check a services file and exit")
    c.add_argument("--config", required=True)
    add_format_option(c)
    c.set_defaults(func=run_check)

    z = ss.add_parser(
        "reset",
        help="clear a crash loop in a running agent: the service starts again and the node "
        "may be master again",
    )
    z.add_argument("name", help="the service (every instance) or one instance, e.g. stream-1")
    where = z.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="the agent's config (its unix socket is found from it)")
    where.add_argument("--socket", help="the agent's unix socket (STATE_DIR/agent.sock)")
    add_format_option(z)
    z.set_defaults(func=run_reset)

    i = ss.add_parser("image", help="the local python base image for containers")
    i.add_argument("action", choices=("build", "rm"))
    i.add_argument("--rebuild", action="store_true", help="build even if it exists")
    add_format_option(i)
    i.set_defaults(func=run_image)

    k = ss.add_parser("clean", help="remove every container a supervisor started")
    k.add_argument("--image", action="store_true", help="remove the base image too")
    add_format_option(k)
    k.set_defaults(func=run_clean)


def status_path(state_dir: str) -> str:
    return os.path.join(state_dir, "status.json")


def _write_status(path: str, config: str, sups: list[Any]) -> None:
    doc = {
        "pid": os.getpid(),
        "config": config,
        "written_at": time.time(),  # wall clock: for people only
        "services": [dict(s.status(), since_monotonic=s.core.since) for s in sups],
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def run_services(args: argparse.Namespace) -> int:
    from nonstop.app.runtime.spec import load_services, log_dir
    from nonstop.app.supervisor_io import Supervisor

    cfg = load_services(args.config)
    os.makedirs(cfg.state_dir, exist_ok=True)
    path = status_path(cfg.state_dir)

    async def main() -> int:
        sups: list[Supervisor] = []

        def changed(_ev: object) -> None:
            _write_status(path, args.config, sups)

        for svc in cfg.service:
            sups.append(Supervisor(svc, on_event=changed, log_dir=log_dir(svc, cfg.state_dir)))
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        try:
            for s in sups:
                await s.start()
            _write_status(path, args.config, sups)
            if args.format == "json":
                print(json.dumps({"running": [s.config.name for s in sups], "pid": os.getpid()}))
            else:
                print(f"supervising {', '.join(s.config.name for s in sups)} (pid {os.getpid()})")
            sys.stdout.flush()
            await done.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await asyncio.gather(*(s.stop() for s in sups), return_exceptions=True)
            _write_status(path, args.config, sups)
        return EXIT_OK

    try:
        return asyncio.run(main())
    except OSError as e:
        print(f"nonstop: service run failed to start: {e}", file=sys.stderr)
        return EXIT_START


def read_status(state_dir: str) -> dict[str, Any] | None:
    """The status file, with ``running`` (its writer is alive) and fresh ``since_s``."""
    try:
        with open(status_path(state_dir)) as f:
            doc: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(doc["pid"]), 0)
        doc["running"] = True
    except (ProcessLookupError, KeyError, ValueError):
        doc["running"] = False
    now = time.monotonic()
    for s in doc.get("services", []):
        if doc["running"] and "since_monotonic" in s:
            s["since_s"] = round(now - s.pop("since_monotonic"), 3)
    return doc


def run_status(args: argparse.Namespace) -> int:
    from nonstop.app.runtime.spec import load_services

    cfg = load_services(args.config)
    doc = read_status(cfg.state_dir)
    if doc is None:
        doc = {"running": False, "services": [], "error": "no status file: not running"}
    if args.format == "json":
        print(json.dumps(doc, indent=1))
    else:
        print(f"supervisor: {'running, pid ' + str(doc['pid']) if doc['running'] else 'down'}")
        for s in doc["services"]:
            pid = s.get("pid") or "-"
            print(
                f"  {s['name']:<16} {s['state']:<11} pid {pid!s:<8} restarts {s['restarts']:<4}"
                f" for {s.get('since_s', 0):.1f}s  {s['reason']}"
            )
    return EXIT_OK if doc["running"] else EXIT_FAIL


def _agent_socket(config: str) -> str:
    """The unix socket of the agent whose config this is; ConfigError for a services file."""
    import tomllib

    from nonstop.common import ConfigError
    from nonstop.config import load_agent_config

    with contextlib.suppress(OSError, tomllib.TOMLDecodeError), open(config, "rb") as f:
        data = tomllib.load(f)
        if "service" in data and "node" not in data:
            raise ConfigError(
                config, "service", "a services file: `service reset` acts on a running agent "
                "(give the agent's config); a `service run` supervisor clears its crash loops "
                "when it is restarted",
            )  # fmt: skip
    cfg, _ = load_agent_config(config)
    return cfg.socket_path


def run_reset(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from nonstop.agent.cli import agent_request

    sock = args.socket or _agent_socket(args.config)

    def fail(msg: str, code: int) -> int:
        if args.format == "json":
            print(json.dumps({"error": msg}))
        else:
            print(f"nonstop: {msg}", file=sys.stderr)
        return code

    path = f"/services/{quote(args.name, safe='')}/reset"
    try:
        status, body = agent_request("POST", path, socket_path=sock)
    except OSError as e:
        return fail(f"cannot reach the agent at {sock}: {e} (is it running?)", EXIT_FAIL)
    try:
        out: dict[str, Any] = json.loads(body)
    except ValueError:
        out = {}
    if status == 404 and "error" in out:
        return fail(out["error"], EXIT_USAGE)
    if status != 200 or "instances" not in out:
        return fail(f"the agent at {sock} answered {status} (an older agent?)", EXIT_FAIL)
    if args.format == "json":
        print(json.dumps(out, indent=1))
        return EXIT_OK
    node = out["node"]
    for r in out["instances"]:
        if r["cleared"]:
            print(f"{node}: {r['instance']}: crash loop cleared, starting again (now {r['state']})")
        else:
            print(f"{node}: {r['instance']}: not in a crash loop ({r['state']}), nothing to reset")
    for ch in out.get("role_changes", []):
        print(f"{node}: role {ch['old']} -> {ch['new']}: {ch['reason']}")
    if out["role"] == "fault":
        print(f"{node}: still fault: {out['reason']}")
    return EXIT_OK


def run_check(args: argparse.Namespace) -> int:
    from nonstop.app.runtime.spec import load_services

    cfg = load_services(args.config)
    names = [s.name for s in cfg.service]
    if args.format == "json":
        print(json.dumps({"config": args.config, "ok": True, "services": names}))
    else:
        print(f"{args.config}: ok ({', '.join(names)})")
    return EXIT_OK


def run_image(args: argparse.Namespace) -> int:
    from nonstop.app.runtime import LaunchError
    from nonstop.app.runtime.container import (
        PYTHON_IMAGE,
        ensure_python_image,
        remove_python_image,
    )

    if args.action == "rm":
        remove_python_image()
        out = {"image": PYTHON_IMAGE, "removed": True}
    else:
        try:
            out = {"image": ensure_python_image(rebuild=args.rebuild), "built": True}
        except LaunchError as e:
            print(f"nonstop: {e}", file=sys.stderr)
            return EXIT_FAIL
    print(json.dumps(out) if args.format == "json" else f"{out['image']}: {args.action} ok")
    return EXIT_OK


def run_clean(args: argparse.Namespace) -> int:
    from nonstop.app.runtime.container import remove_containers, remove_python_image

    names = remove_containers()
    if args.image:
        remove_python_image()
    with contextlib.suppress(BrokenPipeError):
        if args.format == "json":
            print(json.dumps({"removed_containers": names, "removed_image": args.image}))
        else:
            print(
                f"removed {len(names)} containers" + (" and the base image" if args.image else "")
            )
    return EXIT_OK
