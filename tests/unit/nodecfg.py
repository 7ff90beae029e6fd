"""A node config file for the config tests (test_config, test_ipv6_service; their ``cfgdir``
fixture is in conftest.py)."""

from __future__ import annotations

import textwrap


def write(d, text: str) -> str:
    """``text`` (dedented) as ``d/node.toml``; returns its path."""
    p = d / "node.toml"
    p.write_text(textwrap.dedent(text))
    return str(p)
