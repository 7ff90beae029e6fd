"""The agent's side of fencing: its own stalls, and what its fence guard says.

``Fencing`` is mixed into ``nonstop.agent.daemon.Agent``: every input of the agent runs
``_woke`` (a loop that woke late past its timer was not running meanwhile: the peers'
silence in that time proves nothing, ``Membership.stalled``) and ``_check_stall`` (a master
whose loop stalled near or past the fence timeout asks its guard, and steps down or rides the
freeze out by rule 9 of ``nonstop.failover.roles``) before anything else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nonstop.common import Role

if TYPE_CHECKING:
    from nonstop.agent.faults import LocalFaults
    from nonstop.config import AgentConfig
    from nonstop.failover import roles as R
    from nonstop.failover.guard import GuardClient
    from nonstop.membership import Membership

log = logging.getLogger("nonstop.agent")

# A loop this late past its timer was not running (_woke); asyncio's own jitter is well under it.
STALL_FLOOR = 0.002


class Fencing:
    """Stall checks and guard notices (attributes: see ``Agent.__init__``)."""

    cfg: AgentConfig
    roles: R.RoleMachine
    membership: Membership
    guard: GuardClient | None
    faults: LocalFaults
    counters: Any
    _due: float | None
    _last_feed: float | None
    _feed_cpu: float

    _pump: Callable[[float], None]

    def _entered(self, now: float) -> None:
        """First on every input but the guard's own: ``_woke``, then ``_check_stall``."""
        self._woke(now)
        self._check_stall(now)

    def _woke(self, now: float) -> None:
        """Run first on every input: a loop that wakes past the timer it armed was not running
        meanwhile (a host freeze, no CPU), and that time is not the peers' silence
        (``Membership.stalled``). Counted once: the next input measures from here."""
        due = self._due
        if due is not None and now - due > STALL_FLOOR:
            self.membership.stalled(now - due, now)
            self.roles.stalled(now - due)
            self._due = now

    def _check_stall(self, now: float) -> None:
        """Run first on every input. A master whose loop was stalled (SIGSTOP, a hang) past the
        fence timeout has been fenced by its guard, whether or not the FENCED notice was read
        yet: act on that before anything else, or a queued heartbeat could make it "win" against
        the new master and re-announce a VIP it no longer holds."""
        if self.roles.role != Role.MASTER or self._last_feed is None:
            return
        stalled = now - self._last_feed
        # a little under the guard's own timeout: never believe we hold a VIP it has dropped
        if stalled > 0.75 * self.cfg.fence_timeout:
            self.counters["stalls"] += 1
            reason = (
                f"the agent stalled for {stalled * 1000:.0f} ms (fence timeout "
                f"{self.cfg.fence_timeout * 1000:.0f} ms)"
            )
            # busy (its own loop ran that long) or starved (waiting for a CPU, a lock, the
            # kernel): what an operator needs to tell a slow hook from an overloaded node
            cpu = (time.thread_time() - self._feed_cpu) * 1000
            if stalled < self.cfg.fence_timeout and self._guard_still_holds():
                self.counters["stalls_ridden_out"] += 1
                self._last_feed, self._feed_cpu = time.monotonic(), time.thread_time()
                log.warning("%s: the fence guard answered a FEED unfenced, so the VIPs are "
                            "still here: carrying on as master (the agent's loop was on a CPU "
                            "for %.1f ms of it)", reason, cpu)
                return
            self._last_feed = None
            if self.roles.role != Role.MASTER:  # the guard's FENCED, read meanwhile, did it
                return
            log.error("%s: the guard drops or has dropped the VIPs (the agent's loop was on a "
                      "CPU for %.1f ms of it)", reason, cpu)
            self.roles.fenced(reason, now)

    def _guard_still_holds(self) -> bool:
        """After a stall shorter than the guard's timeout: FEED the guard and wait for its
        answer. It can only have fenced before reading that FEED, and then its FENCED comes
        first (handled here as always). Shorter than the timeout, no backup can have taken over
        meanwhile either (it waits out ``dead_after`` intervals, longer than the fence
        timeout), so a stall the guard rode out costs nothing; a step-down costs every
        protected stream a second and the service its instance (15-17 ms stalls, the agent's
        loop on a CPU 0.3-0.7 ms of it, fenced a healthy master 3 times in 200 s of 256 busy
        connections on 2 CPUs). No answer within the timeout: False."""
        if self.guard is None:
            return False
        answered, notices = self.guard.confirm(self.cfg.fence_timeout)
        self._guard_notices(notices, time.monotonic())
        return answered and not any(n.startswith("FENCED") for n in notices)

    def _guard_readable(self) -> None:
        assert self.guard is not None
        now = time.monotonic()
        self._woke(now)
        self._guard_notices(self.guard.read_notices(), now)
        self._pump(now)

    def _guard_notices(self, notices: list[str], now: float) -> None:
        assert self.guard is not None
        for notice in notices:
            if notice.startswith("FENCED"):
                self.counters["fenced"] += 1
                reason = notice.partition(" ")[2] or "the guard dropped the VIPs"
                log.error("fence guard: %s", reason)
                self.roles.fenced(f"fence guard dropped the VIPs: {reason}", now)
            elif notice == "EOF":
                asyncio.get_running_loop().remove_reader(self.guard.fileno())
                log.critical("fence guard exited: this node can no longer fence itself")
                self.faults.declare(self.roles, "fence guard", "fence guard exited", now)

