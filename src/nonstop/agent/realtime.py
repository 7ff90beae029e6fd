"""Riding out CPU contention: a Python agent needs its ticks on time even when the node is busy.

keepalived gives its VRRP process real-time priority; so do we, when the config asks for it:
SCHED_FIFO (the agent preempts every normal task, e.g. a CPU hog), mlockall (no page faults
on the hot path), and a frozen GC heap after start-up (the collector has less to walk).
Each step is best effort: failure is reported, never fatal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os

log = logging.getLogger("nonstop.realtime")

AGENT_PRIORITY = 50  # the fence guard runs above this
MCL_CURRENT, MCL_FUTURE = 1, 2


def make_realtime(priority: int = AGENT_PRIORITY) -> list[str]:
    """Apply what can be applied; return a list of what failed (empty when all took)."""
    failed: list[str] = []
    try:
        # RESET_ON_FORK: hooks and other children go back to normal scheduling.
        policy = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
        os.sched_setscheduler(0, policy, os.sched_param(priority))
    except (OSError, AttributeError) as e:
        failed.append(f"SCHED_FIFO: {e}")
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
            failed.append(f"mlockall: {os.strerror(ctypes.get_errno())}")
    except OSError as e:
        failed.append(f"mlockall: {e}")
    gc.collect()
    gc.freeze()
    for f in failed:
        log.warning("realtime: %s (running without it)", f)
    return failed
