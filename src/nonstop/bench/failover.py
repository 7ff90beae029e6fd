"""``nonstop bench failover``: our agent and keepalived, in turn, in the same lab, same interval.

Per tool: build the demo lab, start the tool on node-a (priority 200) and node-b (100), start the
probes (a netlink address monitor and a UDP echo responder on each node), then N runs of:
settle -> prober in the peer -> quiet window -> fault on the master -> VIP seen on the backup
(``detect_ms``) -> first echo reply from the new master (``vip_move_ms``) -> ARP who-has VIP from
the peer (``dual_masters``) -> heal -> settle. Optionally a soak (no fault; CPU hogs and 5 % loss
on ``hb``) counts role changes nobody asked for (``false_failovers``). See bench/README.md.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nonstop.bench.drivers import (
    NODES,
    VIP,
    Driver,
    KeepalivedDriver,
    NonstopDriver,
    wait_settled,
)

ECHO_PORT = 7709
VIP_IP = VIP.split("/")[0]


@dataclass
class FailoverConfig:
    runs: int = 20
    interval_ms: int = 10
    fault: str = "kill"  # kill | node
    baseline: str | None = "keepalived"
    soak_s: float = 0.0
    soak_loss_channel: str = "hb"
    witness: bool = True
    ours: bool = True  # False: the baseline only (for checking the harness itself)
    settle_timeout_s: float = 20.0


# -- statistics --------------------------------------------------------------------------------


def nearest_rank(values: list[float], q: float) -> float | None:
    """The q-th percentile by nearest rank: the ceil(q/100 * n)-th smallest value. With fewer than
    100 samples p99 is the largest one."""
    if not values:
        return None
    v = sorted(values)
    k = max(1, math.ceil(q / 100.0 * len(v)))
    return v[k - 1]


def summary(values: list[float]) -> dict[str, float | int | None]:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return {
        "n": len(values),
        "p50": r(nearest_rank(values, 50)),
        "p99": r(nearest_rank(values, 99)),
        "min": r(min(values)) if values else None,
        "max": r(max(values)) if values else None,
        "mean": r(sum(values) / len(values)) if values else None,
    }


# -- probe output ------------------------------------------------------------------------------


class JsonLines:
    """Reads the JSON lines a probe appends to its file, from where the last read stopped."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.items = path, 0, []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        new = []
        for line in data[:end].splitlines():
            try:
                new.append(json.loads(line))
            except ValueError:
                continue
        self.items.extend(new)
        return new


def _probe_argv(mode: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "nonstop.bench.probes", mode, *args]


def _wait_for(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.002) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(poll)


# -- one tool ----------------------------------------------------------------------------------


class ToolBench:
    """Runs the benchmark for one tool in one lab."""

    def __init__(self, lab: Any, driver: Driver, cfg: FailoverConfig, tick: Callable[[], None]):
        self.lab, self.driver, self.cfg, self.tick = lab, driver, cfg, tick
        self.mon: dict[str, JsonLines] = {}
        self.stable_s = max(0.3, 30 * cfg.interval_ms / 1000)
        self.quiet_s = max(0.1, 10 * cfg.interval_ms / 1000)

    def start_probes(self) -> None:
        for n in NODES:
            h = self.lab.host(n)
            path = Path(h.workdir) / "addrmon.jsonl"
            with open(path, "ab") as out:
                h.run(_probe_argv("addrmon"), stdout=out, stderr=None, name=f"addrmon-{n}")
            self.mon[n] = JsonLines(path)
            h.run(_probe_argv("echo", "--name", n, "--port", str(ECHO_PORT)), name=f"echo-{n}")
        for n in NODES:
            mon = self.mon[n]
            _wait_for(lambda mon=mon: mon.poll() or mon.items, 10, f"address monitor on {n}")

    def vip_events(self, node: str, since: float, until: float = math.inf) -> list[dict[str, Any]]:
        self.mon[node].poll()
        return [
            e
            for e in self.mon[node].items
            if e["ev"] in ("add", "del") and e.get("addr") == VIP_IP and since < e["t"] <= until
        ]

    def vip_adds(self, since: float, until: float) -> int:
        return sum(1 for n in NODES for e in self.vip_events(n, since, until) if e["ev"] == "add")

    def one_run(self, i: int, master: str) -> dict[str, Any]:
        backup = next(n for n in NODES if n != master)
        peer = self.lab.host("peer")
        base = Path(peer.workdir) / f"{self.driver.name}-run{i}"
        out_path, err_path = base.with_suffix(".json"), base.with_suffix(".err")
        sample: dict[str, Any] = {"run": i, "master": master, "backup": backup}
        max_s = 3.0 + 100 * self.cfg.interval_ms / 1000
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            prober = peer.run(
                _probe_argv(
                    "probe",
                    "--vip",
                    VIP_IP,
                    "--port",
                    str(ECHO_PORT),
                    "--ifname",
                    peer.ifname("lan"),
                    "--max-s",
                    f"{max_s:.1f}",
                ),
                stdout=out,
                stderr=err,
                name=f"prober-{self.driver.name}-{i}",
            )
        fault = None
        try:
            _wait_for(lambda: b"ready" in err_path.read_bytes(), 5, "the prober's first replies")
            t_quiet = time.monotonic()
            time.sleep(self.quiet_s)
            if self.cfg.fault == "kill":
                t_fault = self.driver.kill(master)
            else:
                t_fault = time.monotonic()
                fault = self.lab.isolate(master)
            sample["quiet_changes"] = self.vip_adds(t_quiet, t_fault)
            add = _wait_for(
                lambda: [e for e in self.vip_events(backup, t_fault) if e["ev"] == "add"],
                5,
                f"the VIP on {backup}",
            )[0]
            sample["detect_ms"] = (add["t"] - t_fault) * 1000
            promo = self.driver.promotion_time(backup, t_fault)
            if promo is not None:
                sample["promotion_ms"] = (promo - t_fault) * 1000
                sample["promotion_minus_detect_ms"] = (promo - add["t"]) * 1000
                sample["promotion_reason"] = self.driver.promotion_reason(backup, t_fault)
            prober.wait(timeout=max_s + 5)
            result = json.loads(out_path.read_text())
            self._judge_probe(sample, result, t_fault, master, backup)
        finally:
            if prober.alive:
                prober.kill()
            prober.reap()
            if fault is not None:
                fault.heal()
            elif self.cfg.fault == "kill":
                self.driver.restart(master)
        return sample

    def _judge_probe(
        self, sample: dict[str, Any], result: dict[str, Any], t_fault: float, old: str, new: str
    ) -> None:
        after = [r for r in result["replies"] if r[2] > t_fault]
        first_new = next((r for r in after if r[3] == new), None)
        sample["vip_move_ms"] = None if first_new is None else (first_new[2] - t_fault) * 1000
        if first_new is not None and first_new[1] is not None:
            sample["vip_move_sent_ms"] = (first_new[1] - t_fault) * 1000
        # The peer reached two masters if a probe it SENT after the first one that reached the new
        # master still reached the old one. (A reply to an earlier probe can arrive after the new
        # master's first reply when the old node is busy: that is a late reply, not a second
        # master.)
        late_old = [
            r
            for r in after
            if r[3] == old
            and first_new
            and r[1] is not None
            and first_new[1] is not None
            and r[1] > first_new[1]
        ]
        sample["old_replies_after_move"] = len(late_old)
        sample["old_replies_received_after_move"] = sum(
            1 for r in after if r[3] == old and first_new and r[2] > first_new[2]
        )
        sample["probes_sent"] = result["sent"]
        sample["probes_lost"] = result["sent"] - len({r[0] for r in result["replies"]})
        macs = {self.lab.host(n).mac("lan"): n for n in NODES}
        arp = result.get("arp", {})
        sample["arp_answered_by"] = sorted(macs.get(m, m) for m in arp)
        sample["dual_master"] = len(arp) > 1 or bool(late_old)

    def run_all(self) -> dict[str, Any]:
        self.driver.start()
        self.start_probes()
        master = wait_settled(
            self.driver, self.lab, stable_s=self.stable_s, timeout=self.cfg.settle_timeout_s
        )
        samples: list[dict[str, Any]] = []
        for i in range(self.cfg.runs):
            try:
                s = self.one_run(i, master)
            except (TimeoutError, OSError, ValueError) as e:
                s = {"run": i, "master": master, "error": f"{type(e).__name__}: {e}"}
            samples.append(s)
            self.tick()
            master = wait_settled(
                self.driver, self.lab, stable_s=self.stable_s, timeout=self.cfg.settle_timeout_s
            )
            s["next_master"] = master
        soak = self.soak(self.cfg.soak_s) if self.cfg.soak_s > 0 else None
        return self.report(samples, soak)

    def soak(self, seconds: float) -> dict[str, Any]:
        hogs = [self.lab.cpu_hog(n, workers=1) for n in NODES]
        ch = self.cfg.soak_loss_channel
        faults = [self.lab.loss(n, ch, 5) for n in NODES]
        t0 = time.monotonic()
        try:
            end = t0 + seconds
            while (now := time.monotonic()) < end:
                time.sleep(min(1.0, end - now))
                self.tick()
        finally:
            t1 = time.monotonic()
            for f in faults:
                f.heal()
            for h in hogs:
                h.terminate(timeout=2.0)
                h.reap()
        vip_adds = self.vip_adds(t0, t1)
        hist = self.driver.master_changes(t0, t1)
        return {
            "seconds": round(t1 - t0, 3),
            "master_changes": hist if hist is not None else vip_adds,
            "vip_add_events": vip_adds,
            "load": f"cpu_hog 1 worker on each node; 5 % inbound loss on {ch} of each node",
        }

    def report(self, samples: list[dict[str, Any]], soak: dict[str, Any] | None) -> dict[str, Any]:
        ok = [s for s in samples if "error" not in s and s.get("detect_ms") is not None]
        detect = [s["detect_ms"] for s in ok]
        move = [s["vip_move_ms"] for s in ok if s.get("vip_move_ms") is not None]
        promo = [s["promotion_ms"] for s in ok if "promotion_ms" in s]
        agree = [
            abs(s["promotion_minus_detect_ms"]) for s in ok if "promotion_minus_detect_ms" in s
        ]
        quiet = sum(s.get("quiet_changes", 0) for s in samples)
        out: dict[str, Any] = {
            "tool": self.driver.name,
            "detect_ms": summary(detect),
            "vip_move_ms": summary(move),
            "false_failovers": quiet + (soak["master_changes"] if soak else 0),
            "dual_masters": sum(1 for s in ok if s.get("dual_master")),
            "failed_runs": len(samples) - len(ok),
            "soak": soak,
            "config": self.driver.describe(),
            "samples": [
                {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()}
                for s in samples
            ],
        }
        if promo:
            out["promotion_ms"] = summary(promo)
            out["promotion_vs_detect_max_abs_ms"] = round(max(agree), 3) if agree else None
        return out


# -- the whole benchmark -----------------------------------------------------------------------


def host_info() -> dict[str, Any]:
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def run_tool(name: str, cfg: FailoverConfig, tick: Callable[[], None]) -> dict[str, Any]:
    from nonstop.lab import Lab, demo_topology

    with Lab(demo_topology()) as lab:
        driver: Driver
        if name == "keepalived":
            driver = KeepalivedDriver(lab, interval_ms=cfg.interval_ms)
        else:
            driver = NonstopDriver(lab, interval_ms=cfg.interval_ms, witness=cfg.witness)
        try:
            out = ToolBench(lab, driver, cfg, tick).run_all()
            out["config"]["lab_prefix"] = lab.prefix
            return out
        finally:
            driver.stop()


def _empty(tool: str) -> dict[str, Any]:
    return {
        "tool": tool,
        "detect_ms": summary([]),
        "vip_move_ms": summary([]),
        "false_failovers": None,
        "dual_masters": None,
        "failed_runs": None,
        "soak": None,
        "config": None,
        "samples": [],
    }


def run_failover(cfg: FailoverConfig, tick: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready result."""
    if not cfg.ours and not cfg.baseline:
        raise ValueError("nothing to run: no baseline and --no-ours")
    ours = run_tool("nonstop", cfg, tick) if cfg.ours else _empty("nonstop")
    base = run_tool(cfg.baseline, cfg, tick) if cfg.baseline else None
    p50_ours, p50_base = ours["detect_ms"]["p50"], base["detect_ms"]["p50"] if base else None
    result: dict[str, Any] = {
        "bench": "failover",
        "runs": cfg.runs,
        "interval_ms": cfg.interval_ms,
        "fault": cfg.fault if cfg.runs else "none",
        "witness": cfg.witness,
        "soak_s": cfg.soak_s,
        "detect_ms": ours["detect_ms"],
        "vip_move_ms": ours["vip_move_ms"],
        "promotion_ms": ours.get("promotion_ms"),
        "promotion_vs_detect_max_abs_ms": ours.get("promotion_vs_detect_max_abs_ms"),
        "false_failovers": ours["false_failovers"],
        "dual_masters": ours["dual_masters"],
        "failed_runs": ours["failed_runs"],
        "soak": ours["soak"],
        "baseline": None,
        "ratio_p50": None,
        "samples": {"nonstop": ours["samples"]},
        "config": {"nonstop": ours["config"]},
        "host": host_info(),
        "percentiles": "nearest rank; with fewer than 100 samples p99 is the maximum",
    }
    if base is not None:
        result["baseline"] = {
            k: base[k]
            for k in (
                "tool",
                "detect_ms",
                "vip_move_ms",
                "false_failovers",
                "dual_masters",
                "failed_runs",
                "soak",
            )
        }
        result["samples"]["keepalived"] = base["samples"]
        result["config"]["keepalived"] = base["config"]
        if p50_ours is not None and p50_base:
            result["ratio_p50"] = round(p50_ours / p50_base, 3)
    return result
