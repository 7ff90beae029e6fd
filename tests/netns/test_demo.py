"""`make demo` is the main job: run it as the README does and check its report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nonstop.lab import Lab

pytestmark = [pytest.mark.netns]


def test_demo_runs_to_its_report(tmp_path, lab_factory):
    del lab_factory  # only for its root/netns skip
    before = {s["prefix"] for s in Lab.states()}
    out = tmp_path / "demo.json"
    r = subprocess.run(
        [sys.executable, "-m", "nonstop", "demo", "--format", "json", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True
    kill, node = report["scenarios"]
    for sc in (kill, node):
        assert sc["new_master"] == "node-b" and sc["vip_holders_after"] == ["node-b"]
        assert 0 < sc["detect_ms"] < 2000
        assert sc["old_master_vip_gone_ms"] is not None
    assert "EOF" in kill["why"]  # the agent link, not the dead interval
    assert "no heartbeat" in node["why"]
    assert json.loads(r.stdout)["ok"] is True
    # the demo's own lab is gone (other labs may come and go meanwhile: parallel runs)
    assert report["lab"] not in {s["prefix"] for s in Lab.states()}
    assert report["lab"] not in before
    sessions = report["tcp_sessions"]  # the protected streams went through every fault
    assert sessions["kept"] == sessions["connections"] > 0 and sessions["resets"] == 0, sessions
    assert sessions["lost"] == 0 and sessions["duplicated"] == 0, sessions
