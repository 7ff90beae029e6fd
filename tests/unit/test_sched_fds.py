"""common.reserve_fds (the fd table grown ahead of a takeover) and common.normal_priority (no
thread of the packet path inherits the promotion's real-time policy)."""

from __future__ import annotations

import fcntl
import os
import resource
import threading

import pytest

from nonstop import common
from nonstop.common import normal_priority, reserve_fds


def _table_has_room_for(n: int) -> bool:
    """fd n-1 can be taken without growing past the limit (and is given back)."""
    base = os.open(os.devnull, os.O_RDONLY)
    try:
        fd = fcntl.fcntl(base, fcntl.F_DUPFD_CLOEXEC, n - 1)
        os.close(fd)
        return fd >= n - 1
    finally:
        os.close(base)


def test_reserve_grows_once_and_leaves_no_fd_open() -> None:
    before = sorted(os.listdir("/proc/self/fd"))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    n = min(soft, 3000)
    assert reserve_fds(n) >= n
    assert sorted(os.listdir("/proc/self/fd")) == before  # the probe fds are closed again
    assert _table_has_room_for(n)
    room = common._fd_room
    assert reserve_fds(n // 2) == room  # already there: nothing done


def test_reserve_is_capped_at_the_soft_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    monkeypatch.setattr(common, "_fd_room", 0)
    assert reserve_fds(soft + 10_000) == soft  # as much as the process may open, no error


def test_reserve_failure_leaves_the_room_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "_fd_room", 7)

    def no_open(*a: object, **k: object) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(common.os, "open", no_open)
    assert reserve_fds(100) == 7


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root")
def test_a_thread_started_by_a_realtime_thread_goes_back_to_normal() -> None:
    seen: dict[str, int] = {}

    def child() -> None:
        seen["inherited"] = os.sched_getscheduler(0)
        normal_priority()
        seen["after"] = os.sched_getscheduler(0)

    def parent() -> None:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        t = threading.Thread(target=child)
        t.start()
        t.join()
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))

    p = threading.Thread(target=parent)
    p.start()
    p.join()
    assert seen == {"inherited": os.SCHED_FIFO, "after": os.SCHED_OTHER}


def test_normal_priority_leaves_a_normal_thread_alone() -> None:
    normal_priority()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
