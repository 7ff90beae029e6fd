"""The ``nonstop`` command: a thin layer over keyword-only APIs (uvicorn's main.py is the model).

Each sub-command lives with its package and registers itself through ``add_parser(subparsers)``,
setting ``func(args) -> int``. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error,
3 failed start.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nonstop.common import ConfigError

# module path -> it registers one or more sub-commands
_COMMANDS = (
    "nonstop.agent.cli",
    "nonstop.failover.witness_cli",
    "nonstop.lab.cli",
    "nonstop.bench.cli",
    "nonstop.demo",
    "nonstop.bgp.cli",  # nonstop bgp summary|routes|speaker
    "nonstop.vs.cli",  # nonstop vs ...
    "nonstop.store.cli",  # nonstop groups ... (store-backed groups)
    "nonstop.app.cli",  # nonstop service ... (supervisor)
)

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_START = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nonstop",
        description="Keeps network services on the air when a process, a link or a node dies.",
        epilog="Every command that prints state takes --format json. See README.md.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _COMMANDS:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue  # not written yet
        module.add_parser(sub)
    return parser


def add_format_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        choices=("pretty", "json"),
        default="pretty",
        help="output format (default pretty)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"nonstop: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
