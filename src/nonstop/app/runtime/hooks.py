"""Service hooks and event logging for the Supervisor (the agent's role hooks are its own).

A service's ``hook`` command runs on every state change, crash loop and crash-loop reset, without
a shell, as ``HOOK... EVENT SERVICE STATE REASON`` with NONSTOP_SERVICE, NONSTOP_EVENT (``state``,
``crash-loop`` or ``crash-loop-cleared``), NONSTOP_STATE and NONSTOP_REASON in the environment;
it is killed after ``hook_timeout_ms``. A hook never blocks supervision: each runs as its own
task.
"""

from __future__ import annotations

import asyncio
import logging
import os

from nonstop.app.runtime.spec import ServiceConfig
from nonstop.app.supervisor import (
    CrashLoopCleared,
    CrashLoopDetected,
    Event,
    InstanceExited,
    StateChanged,
)
from nonstop.spawn import DEVNULL, spawn

log = logging.getLogger("nonstop.service")


def log_event(ev: Event) -> None:
    if isinstance(ev, StateChanged):
        log.info("service %s: %s -> %s: %s", ev.service, ev.old, ev.new, ev.reason)
    elif isinstance(ev, CrashLoopDetected):
        log.error("service %s: crash loop, %d deaths within %g s", ev.service, ev.deaths, ev.window)
    elif isinstance(ev, CrashLoopCleared):
        log.warning(
            "service %s: crash loop cleared (%s), %d deaths forgotten, starting it again",
            ev.service, ev.reason, ev.deaths,
        )  # fmt: skip
    elif isinstance(ev, InstanceExited) and ev.death:
        log.warning("service %s: instance %d died: %s", ev.service, ev.generation, ev.status)


async def run_service_hook(
    cfg: ServiceConfig, ev: StateChanged | CrashLoopDetected | CrashLoopCleared
) -> None:
    if isinstance(ev, CrashLoopDetected):
        kind, state, reason = "crash-loop", "crash-loop", f"{ev.deaths} deaths in {ev.window:g} s"
    elif isinstance(ev, CrashLoopCleared):  # a start follows at once: the state is starting
        kind, state = "crash-loop-cleared", "starting"
        reason = f"{ev.reason} ({ev.deaths} deaths forgotten)"
    else:
        kind, state, reason = "state", str(ev.new), ev.reason
    env = dict(
        os.environ,
        NONSTOP_SERVICE=ev.service,
        NONSTOP_EVENT=kind,
        NONSTOP_STATE=state,
        NONSTOP_REASON=reason,
    )
    try:
        proc = await spawn(
            [*cfg.hook, kind, ev.service, state, reason],
            env=env, cwd=cfg.cwd or None, stdin=DEVNULL,
        )  # fmt: skip
    except OSError as e:
        log.error("service %s: hook %s could not start: %s", ev.service, cfg.hook, e)
        return
    try:
        async with asyncio.timeout(cfg.hook_timeout_ms / 1000):
            rc = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.error("service %s: hook killed after %d ms", ev.service, cfg.hook_timeout_ms)
        return
    if rc:
        log.warning("service %s: hook exited with status %d", ev.service, rc)
