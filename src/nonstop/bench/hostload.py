"""How fast the box was while a benchmark ran.

The figures of a 2-CPU virtual machine move by the hour (2026-11-22: a plain Python loop took
1.0 s at one hour and 1.7 s at another, and the takeover's interruption at 256 connections
moved with it). A benchmark that reports its box's speed next to its figures can be compared
with another run of itself: ``python_loop_ms`` times a fixed Python loop before the run (the
best of three), and ``HostLoad`` reads /proc/stat's CPU times around it: ``steal_pct``, the
share the hypervisor gave to others, and ``busy_pct``, the share this box's own work took.

``freezes`` counts the times the whole box stopped: a process at the top real-time priority
sleeps 2 ms at a time and notes how late it woke (``python -m nonstop.bench.hostload
--probe``). Nothing in the guest can hold it off for long, so a late wake-up is the host's
doing, which steal time does not show: on 2026-11-22 an idle guest froze 16 times over 80 ms in
60 s (the worst 224 ms) with steal at 0-6 %, and every such freeze stalls the agents, their
guards and the witness at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

_LOOP = 200_000


def python_loop_ms(repeat: int = 3) -> float:
    """Milliseconds for a fixed loop of ``_LOOP`` additions, the best of ``repeat``."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        s = 0
        for i in range(_LOOP):
            s += i
        best = min(best, time.perf_counter() - t)
    return round(best * 1000, 2)


def _cpu_times() -> list[int] | None:
    """/proc/stat's aggregate CPU line: user nice system idle iowait irq softirq steal ..."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    return [int(x) for x in fields[1:9]]


PROBE_SLEEP = 0.002  # s between wake-ups
FREEZE_BOUNDS_MS = (20, 50, 100, 200)  # freezes counted over each


def probe(stop_after: float | None = None, *, realtime: bool = True) -> dict[str, Any]:
    """Sleep PROBE_SLEEP at a time for ``stop_after`` seconds, or until SIGTERM (None: the
    probe process); how late the wake-ups came: the worst, and how many were over each of
    FREEZE_BOUNDS_MS. ``realtime``: at SCHED_FIFO 99 (the probe process only)."""
    policy = "other"  # not root: the guest's own load shows too
    if realtime:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(99))
            policy = "fifo:99"
    stopping = False

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    if stop_after is None:
        signal.signal(signal.SIGTERM, on_term)
    counts = dict.fromkeys(FREEZE_BOUNDS_MS, 0)
    worst, wakeups = 0.0, 0
    t_end = None if stop_after is None else time.monotonic() + stop_after
    while not stopping and (t_end is None or time.monotonic() < t_end):
        t = time.monotonic()
        time.sleep(PROBE_SLEEP)
        late = (time.monotonic() - t - PROBE_SLEEP) * 1000
        wakeups += 1
        worst = max(worst, late)
        for b in FREEZE_BOUNDS_MS:
            if late > b:
                counts[b] += 1
    return {
        "policy": policy,
        "wakeups": wakeups,
        "worst_ms": round(worst, 1),
        **{f"over_{b}ms": n for b, n in counts.items()},
    }


class HostLoad:
    """CPU time shares and freezes between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self.loop_ms: float | None = None
        self._t0: list[int] | None = None
        self._probe: subprocess.Popen[bytes] | None = None

    def start(self) -> HostLoad:
        self.loop_ms = python_loop_ms()
        self._t0 = _cpu_times()
        with contextlib.suppress(OSError):
            self._probe = subprocess.Popen(
                [sys.executable, "-m", "nonstop.bench.hostload", "--probe"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        return self

    def _freezes(self) -> dict[str, Any] | None:
        p, self._probe = self._probe, None
        if p is None:
            return None
        p.terminate()
        try:
            out, _ = p.communicate(timeout=5)
            return dict(json.loads(out.decode().strip().splitlines()[-1]))
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            p.kill()
            p.wait()
            return None

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {"python_loop_ms": self.loop_ms, "steal_pct": None,
                               "busy_pct": None, "freezes": self._freezes()}
        t1 = _cpu_times()
        if self._t0 is None or t1 is None:
            return out
        d = [b - a for a, b in zip(self._t0, t1, strict=True)]
        total = sum(d)
        if total > 0:
            idle = d[3] + d[4]
            out["steal_pct"] = round(100 * d[7] / total, 1)
            out["busy_pct"] = round(100 * (total - idle - d[7]) / total, 1)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nonstop.bench.hostload")
    ap.add_argument("--probe", action="store_true", help="count freezes until SIGTERM")
    ap.add_argument("--seconds", type=float, default=None, help="or for this long")
    args = ap.parse_args(argv)
    if args.probe or args.seconds:
        print(json.dumps(probe(args.seconds)), flush=True)
        return 0
    print(json.dumps({"python_loop_ms": python_loop_ms()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

