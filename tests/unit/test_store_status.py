"""``nonstop groups status``: the store's columns merged with this node's agent state file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nonstop.store.cli import local_status, merge_local
from nonstop.store.config import parse_store_config
from nonstop.store.daemon import status_path

CONFIG = """
[node]
id = "n1"
key_file = "k"
state_dir = "{state}"

[store]
endpoints = ["http://10.77.2.21:2379"]

[[channels]]
name = "hb"
address = "10.77.1.11"

[[members]]
id = "n1"
addresses = {{ hb = "10.77.1.11" }}

[[members]]
id = "n2"
addresses = {{ hb = "10.77.1.12" }}

[[groups]]
name = "g0"
vip = "10.77.0.100/24"
interface = "lan"
priorities = {{ n1 = 200, n2 = 150 }}

[[groups]]
name = "g1"
vip = "10.77.0.101/24"
interface = "lan"
priorities = {{ n1 = 150, n2 = 200 }}
"""


def test_without_store_the_local_agent_state_still_shows(tmp_path: Path) -> None:
    cfg = parse_store_config("node.toml", CONFIG.format(state=tmp_path).encode())
    assert local_status(cfg) is None
    now = time.monotonic()
    with open(status_path(cfg), "w") as f:
        json.dump({"node": "n1", "at": now, "session": "7", "renewed_at": now - 2.0,
                   "lease_until": now - 1.0, "hold_deadline": now + 0.5, "store_ok": False,
                   "failsafe": True, "deferring_to": None, "holding": ["g0"],
                   "standby": {"g0": "n2", "g1": "n1"}, "peers": {"n2": True}}, f)  # fmt: skip
    local = local_status(cfg, now)
    assert local is not None and local["running"] and local["failsafe"]
    assert local["lease_left_s"] == -1.0 and local["holds_until_s"] == 0.5
    st = merge_local(None, local, cfg)
    g0, g1 = st["groups"]
    assert g0["held_here"] and g0["failsafe"] and g0["standby"] == "n2" and g0["master"] is None
    assert not g1["held_here"] and not g1["failsafe"]
    assert st["members"] is None  # the store's part is unknown, not empty
    stale = local_status(cfg, now + 5.0)
    assert stale is not None and not stale["running"]
    assert not merge_local(None, stale, cfg)["groups"][0]["held_here"]
    os.unlink(status_path(cfg))
