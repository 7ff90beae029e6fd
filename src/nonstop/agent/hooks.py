"""Hooks run on role changes, like keepalived's notify scripts.

The command is split with shlex and run without a shell. It gets the new role, the node id and the
reason as arguments (``CMD ROLE NODE REASON``) and in the environment (NONSTOP_ROLE,
NONSTOP_OLD_ROLE, NONSTOP_NODE, NONSTOP_GROUP, NONSTOP_REASON). Hooks never block the agent's loop:
each runs as its own task, is killed after ``timeout_ms``, and its exit status is logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex

from nonstop.common import Role
from nonstop.config import HooksConfig
from nonstop.spawn import DEVNULL, spawn

log = logging.getLogger("nonstop.hooks")


class Hooks:
    def __init__(self, cfg: HooksConfig, *, node_id: str, group: int) -> None:
        self._cfg, self._node_id, self._group = cfg, node_id, group
        self._tasks: set[asyncio.Task[None]] = set()
        self.runs = 0
        self.failures = 0

    def command_for(self, role: Role) -> str:
        return {
            Role.MASTER: self._cfg.master,
            Role.BACKUP: self._cfg.backup,
            Role.FAULT: self._cfg.fault,
            Role.STOPPING: self._cfg.stopping,
        }.get(role, "")

    def role_changed(self, old: Role, new: Role, reason: str) -> None:
        cmd = self.command_for(new)
        if not cmd:
            return
        t = asyncio.get_running_loop().create_task(self._run(cmd, old, new, reason))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _run(self, cmd: str, old: Role, new: Role, reason: str) -> None:
        argv = [*shlex.split(cmd), str(new), self._node_id, reason]
        env = dict(
            os.environ,
            NONSTOP_ROLE=str(new),
            NONSTOP_OLD_ROLE=str(old),
            NONSTOP_NODE=self._node_id,
            NONSTOP_GROUP=str(self._group),
            NONSTOP_REASON=reason,
        )
        self.runs += 1
        try:
            proc = await spawn(argv, env=env, stdin=DEVNULL)
        except OSError as e:
            self.failures += 1
            log.error("hook %r for %s could not start: %s", cmd, new, e)
            return
        try:
            rc = await asyncio.wait_for(proc.wait(), self._cfg.timeout_ms / 1000)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            self.failures += 1
            log.error("hook %r for %s killed after %d ms", cmd, new, self._cfg.timeout_ms)
            return
        if rc != 0:
            self.failures += 1
            log.warning("hook %r for %s exited with status %d", cmd, new, rc)

    async def wait(self) -> None:
        """Wait for running hooks (used at shutdown, bounded by their own timeouts)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
