"""Smoke test of ``nonstop bench failover``: a short real run of both tools, both faults, through
the CLI, checking the JSON's shape and sanity and that the labs are gone afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nonstop.lab import Lab

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(120)]

TOP = ("runs", "interval_ms", "fault", "detect_ms", "vip_move_ms", "false_failovers",
       "dual_masters", "baseline", "ratio_p50", "samples", "host")  # fmt: skip
STATS = ("p50", "p99", "min", "max")


def _namespaces() -> set[str]:
    d = Path("/run/netns")
    return set(os.listdir(d)) if d.is_dir() else set()


def _keepalived_pids_in_labs() -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"keepalived") and any(b"nonstop-lab-" in c for c in cmd):
            out.append(int(entry))
    return out


def _check_tool(d: dict, runs: int) -> None:
    for key in ("detect_ms", "vip_move_ms"):
        for s in ("p50", "p99"):
            assert key in d and s in d[key], (key, s)
    assert d["failed_runs"] == 0
    assert d["detect_ms"]["n"] == runs
    assert 0 < d["detect_ms"]["min"] <= d["detect_ms"]["p50"] <= d["detect_ms"]["max"] < 2000
    assert 0 < d["vip_move_ms"]["p50"] < 2000
    assert isinstance(d["false_failovers"], int) and d["false_failovers"] >= 0
    assert isinstance(d["dual_masters"], int) and 0 <= d["dual_masters"] <= runs


@pytest.mark.parametrize("fault", ["kill", "node"])
def test_bench_failover_smoke(fault: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    argv = [sys.executable, "-m", "nonstop", "bench", "failover", "--runs", "2",
            "--interval-ms", "10", "--fault", fault, "--baseline", "keepalived",
            "--format", "json", "--out", str(out), "--no-witness"]  # fmt: skip
    if fault == "node":
        argv += ["--soak", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result

    for key in TOP:
        assert key in result, key
    assert result["runs"] == 2 and result["interval_ms"] == 10 and result["fault"] == fault
    for s in STATS:
        assert s in result["detect_ms"]
    _check_tool(result, 2)
    base = result["baseline"]
    assert base["tool"] == "keepalived"
    _check_tool(base, 2)
    assert result["ratio_p50"] == pytest.approx(
        result["detect_ms"]["p50"] / base["detect_ms"]["p50"], rel=0.01
    )
    assert len(result["samples"]["nonstop"]) == 2 and len(result["samples"]["keepalived"]) == 2
    for sample in result["samples"]["nonstop"] + result["samples"]["keepalived"]:
        assert sample["backup"] != sample["master"]
        assert sample["arp_answered_by"], "nobody answered ARP for the VIP after the move"
    assert result["host"]["cpus"] >= 1 and result["host"]["kernel"]
    if fault == "kill":
        # A SIGKILLed keepalived leaves its VIP configured: the old master still answers ARP.
        assert base["dual_masters"] == 2
    else:
        assert result["soak"]["seconds"] >= 1 and base["soak"]["seconds"] >= 1

    prefixes = {result["config"][t]["lab_prefix"] for t in ("nonstop", "keepalived")}
    assert len(prefixes) == 2
    left = {n for n in _namespaces() if n.split("-")[0] in prefixes}
    assert left == set(), "the benchmark left namespaces behind"
    assert {s["prefix"] for s in Lab.states()} & prefixes == set()
    assert _keepalived_pids_in_labs() == []
