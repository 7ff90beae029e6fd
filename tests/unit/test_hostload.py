"""The benchmarks' note of how fast the box was (nonstop.bench.hostload)."""

from __future__ import annotations

import time

from nonstop.bench.hostload import HostLoad, python_loop_ms


def test_the_loop_is_timed_and_the_cpu_shares_add_up() -> None:
    assert 0 < python_loop_ms(repeat=1) < 10_000
    load = HostLoad().start()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # this process keeps one CPU busy
        pass
    got = load.stop()
    assert got["python_loop_ms"] is not None and got["python_loop_ms"] > 0
    assert 0 <= got["steal_pct"] <= 100
    assert 0 < got["busy_pct"] <= 100
    assert got["steal_pct"] + got["busy_pct"] <= 100
