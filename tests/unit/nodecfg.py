"""A node config file for the config tests (test_config, test_ipv6_service; their ``cfgdir``
fixture is in conftest.py)."""

from __future__ import annotations

import textwrap

NODE_A = """
[node]
id = "node-a"
key_file = "key"
state_dir = "state"
"""  # the node table of a config test's node-a: its channels, peers... follow


def write(d, text: str) -> str:
    """``text`` (dedented) as ``d/node.toml``; returns its path."""
    p = d / "node.toml"
    p.write_text(textwrap.dedent(text))
    return str(p)
