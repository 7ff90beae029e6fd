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
    freezes = got["freezes"]  # the probe process ran the whole time and reported
    assert freezes is not None and freezes["wakeups"] > 10, freezes
    assert freezes["worst_ms"] >= 0 and freezes["over_20ms"] >= freezes["over_200ms"] >= 0


def test_the_probe_counts_a_late_wake_up_as_a_freeze() -> None:
    """In-process, a SIGSTOP cannot be simulated: hold the probe's own loop from a timer
    signal instead (what a host freeze looks like from inside: a sleep that ends late)."""
    import signal

    from nonstop.bench.hostload import probe

    def hog(*_: object) -> None:
        time.sleep(0.06)

    old = signal.signal(signal.SIGALRM, hog)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        got = probe(stop_after=0.2, realtime=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert got["over_50ms"] >= 1 and got["worst_ms"] >= 50, got
