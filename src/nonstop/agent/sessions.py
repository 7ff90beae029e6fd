"""The agent's side of TCP session takeover: it drives the session worker on role changes.

- At start the worker runs every ``[[services]]`` entry on the backup side (receiving sync).
- Promotion: ``promote(done)`` asks the worker to restore the connections; the agent adds the
  VIPs only in ``done`` (so no segment of the peer meets a node without its connection), and its
  loop keeps running meanwhile (heartbeats, the witness): a restore of thousands of connections
  takes tens of milliseconds.
- After the VIPs are released: ``demote`` silences this node's copies.
- A step-down parks this node's connections in its worker. A later promotion restores them
  (``own``) only if no other node can have served meanwhile: with a witness, the lease comes back
  under the same (run, term); without one, no peer was seen as master nor lost from sight.
  Otherwise only what a master synced here is restored.
- While master: ``peers_changed`` points the sync at the peer when it is up, not master and its
  worker listens (``FLAG_SYNC_READY`` in its heartbeats: after its worker started, after a
  demote's reply), so a rejoined node gets a whole copy at once; or stops it when the peer is
  gone.

Nothing here blocks the agent's loop: requests are sent at once and the replies read by
``loop.add_reader``, in order; a reply-less request (``"reply": False``) is fire-and-forget.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

from nonstop.common import Role
from nonstop.config import AgentConfig
from nonstop.membership.wire import FLAG_SYNC_READY
from nonstop.session.driver import Reply, WorkerDriver

log = logging.getLogger("nonstop.agent")
PROMOTE_LATE_S = 2.0  # a promote unanswered this long is logged as an error



class Sessions(WorkerDriver):
    def __init__(self, cfg: AgentConfig, key: bytes, *, verbose: int = 0) -> None:
        super().__init__(key, verbose=verbose)
        self.cfg = cfg
        self._peers: list[list[Any] | None] = [None] * len(cfg.services)
        self.last_promotion: list[dict[str, Any]] = []
        self.lease_term: tuple[int, int] | None = None  # (run, term) of the last witness grant
        self._park: tuple[int, int] | None = None  # lease term at the step-down; None: invalid
        self.park_note = ""  # why the parked connections were (or will be) dropped
        self._backup_side = False  # the worker's backup side listens (after start, a demote)
        self.counters["promote_late"] = 0
        # the last takeover's steps, CLOCK_MONOTONIC seconds (the same clock as the role
        # history's at_monotonic): where its time went, as the peer's silence is made of it
        self.takeover: dict[str, float] = {}

    def start(self, loop: Any, on_exit: Callable[[], None]) -> None:
        super().start(loop, on_exit)
        self._backup_side = self.worker is not None  # spawn waits for its init: bound

    @property
    def sync_ready(self) -> bool:
        """A master's sync reaches this node's worker now (FLAG_SYNC_READY in the heartbeats): a
        master that synced to a node still starting its worker, or still demoting, lost its
        first datagrams, and its clamp held every stream for the retransmissions (60-300 ms)."""
        return self.worker is not None and self._backup_side

    def specs(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        addr = {c.name: c.address for c in cfg.channels}
        out = []
        for i, s in enumerate(cfg.services):
            out.append({
                "name": s.name, "vip": s.vip, "port": s.port,
                "family": ipaddress.ip_address(s.vip).version, "queue": cfg.service_queue(i),
                "endpoint": cfg.service_endpoint(s), "sync_addr": addr[cfg.sync_channel(s)],
                "sync_port": s.sync_port, "md5": dict(s.md5),
            })  # fmt: skip
        return out

    # -- what the agent asks --
    def promote(self, done: Callable[[], None]) -> bool:
        """Restore the connections, then call ``done`` (add the VIPs there): those a master
        synced here, or those this node parked at its step-down if no other node can have served
        since (see the module doc). False: no worker, call ``done`` yourself."""

        steps = self.takeover = {"promote_asked": time.monotonic()}  # this promote's

        def on_reply(r: Reply | None) -> None:
            steps.setdefault("promote_answered", time.monotonic())
            if r is None:
                self.counters["promote_errors"] += 1
                log.error("session takeover failed: the VIPs are taken without the connections")
            else:
                self.last_promotion = r["services"]
                for p in self.last_promotion:
                    if not p.get("already"):
                        log.warning(
                            "service %s: %d connections restored (%.2f ms), %d handed over",
                            p["service"], p["restored"], p["restore_ms"], p["handed_to_service"],
                        )  # fmt: skip
            done()

        own = False
        if self._park is not None:
            if self.cfg.witness is None or self.lease_term == self._park:
                own = True
            else:
                self.park_note = f"the witness term moved from {self._park} to {self.lease_term}"
        if self.park_note and not own:
            log.info("connections parked here, if any, are not restored: %s", self.park_note)
        self._park = None
        self._backup_side = False
        sent = self._send({"op": "promote", "own": own}, on_reply)

        def late() -> None:  # master without its VIPs meanwhile: say so, loudly
            if "promote_answered" not in steps:
                self.counters["promote_late"] += 1
                log.error("session worker: no answer to promote after %.0f s: the VIPs wait "
                          "for it (%d requests queued)", PROMOTE_LATE_S, len(self._queued))
        if sent and self._loop is not None:
            self._loop.call_later(PROMOTE_LATE_S, late)
        return sent

    def kick(self) -> None:
        """The VIPs answer here (the first gratuitous ARP is out): the worker provokes both ends
        of the connections it just restored (``nonstop.session.kick``). Fire and forget."""
        self.mark("kick_asked")
        self._send({"op": "kick", "reply": False}, None)

    def hush(self, on: bool) -> None:
        """Drop every segment of the protected connections both ways (``on``), or let them
        flow again: the VIPs are down while the witness is asked whether another node held
        the lease (rule 9 of nonstop.failover.roles). Fire and forget, like kick."""
        self._send({"op": "hush", "on": on, "reply": False}, None)

    def demote(self) -> None:
        """Silence this node's connections; the worker parks their state (see the module doc)."""
        if self.cfg.witness is None:
            self._park, self.park_note = (0, 0), ""
        elif self.lease_term is None or self.lease_term[0] == 0:
            self._park, self.park_note = None, "the witness does not report lease terms"
        else:
            self._park, self.park_note = self.lease_term, ""
        self._backup_side = False

        def on_reply(r: Reply | None) -> None:
            self._backup_side = r is not None  # listening again (None: the worker is gone)

        self._send({"op": "demote"}, on_reply)

    def invalidate_park(self, why: str) -> None:
        """Another node may serve (or have served) the connections: never restore what was
        parked here at the step-down."""
        if self._park is not None:
            self._park, self.park_note = None, why

    def peers_changed(self, role: Role, peer_views: dict[str, Any]) -> None:
        """Sync each service to the first peer that is alive and not master (when we are)."""
        target = None
        if role == Role.MASTER:
            for p in self.cfg.peers:
                v = peer_views.get(p.id)
                if (v is not None and v.alive and v.role != Role.MASTER
                        and (v.flags or 0) & FLAG_SYNC_READY):
                    target = p
                    break
        want: list[list[Any] | None] = []
        for s in self.cfg.services:
            addr = None if target is None else target.addresses.get(self.cfg.sync_channel(s))
            want.append(None if addr is None else [addr, s.sync_port])
        if want != self._peers and self._send({"op": "set_backup", "peers": want}, None):
            self._peers = want
            log.info("session sync to %s", [w and f"{w[0]}:{w[1]}" for w in want])

    def mark(self, step: str) -> None:
        """Note when a step of the takeover under way happened (the first time only)."""
        if self.takeover:
            self.takeover.setdefault(step, time.monotonic())

    def status(self) -> dict[str, Any]:
        return {
            "worker_pid": None if self.worker is None else self.worker.pid,
            "counters": dict(self.counters),
            "last_promotion": self.last_promotion,
            "last_takeover_at": dict(self.takeover),
            "parked_valid": self._park is not None,
            "park_note": self.park_note,
        }
