"""How fast the box was while a benchmark ran.

The figures of a 2-CPU virtual machine move by the hour (2026-11-22: a plain Python loop took
1.0 s at one hour and 1.7 s at another, and the takeover's interruption at 256 connections
moved with it). A benchmark that reports its box's speed next to its figures can be compared
with another run of itself: ``python_loop_ms`` times a fixed Python loop before the run (the
best of three), and ``HostLoad`` reads /proc/stat's CPU times around it: ``steal_pct``, the
share the hypervisor gave to others, and ``busy_pct``, the share this box's own work took.
"""

from __future__ import annotations

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


class HostLoad:
    """CPU time shares between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self.loop_ms: float | None = None
        self._t0: list[int] | None = None

    def start(self) -> HostLoad:
        self.loop_ms = python_loop_ms()
        self._t0 = _cpu_times()
        return self

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {"python_loop_ms": self.loop_ms, "steal_pct": None,
                               "busy_pct": None}
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
