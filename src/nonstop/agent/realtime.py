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


def make_realtime(priority: int = AGENT_PRIORITY, *, lock_memory: bool = False) -> list[str]:
    """Apply what can be applied; return a list of what failed (empty when all took).

    ``lock_memory`` (mlockall) is off by default: a process with every page locked takes ~10 ms
    longer to die, and its sockets close only after its memory is torn down, which delays the
    agent link's EOF, i.e. the backup's instant crash detection."""
    failed: list[str] = []
    # The costly steps first, at normal priority: a task at SCHED_FIFO holds every task below it
    # off its CPU (the kernel does not preempt it for them), so its own start-up work there is a
    # stall for the others. CI showed it: a fence guard and an address monitor that raised their
    # priority before importing and locking kept a FIFO 50 task waiting 134 ms.
    gc.collect()
    gc.freeze()
    if lock_memory:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
                failed.append(f"mlockall: {os.strerror(ctypes.get_errno())}")
        except OSError as e:
            failed.append(f"mlockall: {e}")
    try:
        # RESET_ON_FORK: hooks and other children go back to normal scheduling.
        policy = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
        os.sched_setscheduler(0, policy, os.sched_param(priority))
    except (OSError, AttributeError) as e:
        failed.append(f"SCHED_FIFO: {e}")
    for f in failed:
        log.warning("realtime: %s (running without it)", f)
    return failed
