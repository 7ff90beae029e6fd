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
- While master: ``peers_changed`` points the sync at the peer when it is up and not master (a
  rejoined node gets a whole copy), or stops it when the peer is gone.

Nothing here blocks the agent's loop: requests are sent at once and the replies read by
``loop.add_reader``, in order; a reply-less request (``"reply": False``) is fire-and-forget.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from nonstop.common import LocalProtocolError, Role
from nonstop.config import AgentConfig
from nonstop.session.worker import SessionWorker

log = logging.getLogger("nonstop.agent")

Reply = dict[str, Any]


class Sessions:
    def __init__(self, cfg: AgentConfig, key: bytes, *, verbose: int = 0) -> None:
        self.cfg, self._key, self._verbose = cfg, key, verbose
        self.worker: SessionWorker | None = None
        self._peers: list[list[Any] | None] = [None] * len(cfg.services)
        self._waiting: collections.deque[Callable[[Reply | None], None]] = collections.deque()
        self._on_exit: Callable[[], None] | None = None
        self.counters: dict[str, int] = {"promote_errors": 0, "worker_errors": 0}
        self.last_promotion: list[dict[str, Any]] = []
        self.cached: list[dict[str, Any]] = []  # the last status the worker gave
        self.lease_term: tuple[int, int] | None = None  # (run, term) of the last witness grant
        self._park: tuple[int, int] | None = None  # lease term at the step-down; None: invalid
        self.park_note = ""  # why the parked connections were (or will be) dropped

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

    # -- lifecycle --
    def start(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[], None]) -> None:
        if not self.cfg.services:
            return
        self.worker = SessionWorker.spawn(self.specs(), self._key, verbose=self._verbose)
        self._on_exit = on_exit
        loop.add_reader(self.worker.fileno(), self._readable)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.worker is None:
            return
        loop.remove_reader(self.worker.fileno())
        self._fail_waiting()
        self.worker.close()  # silences what it holds
        self.worker = None

    # -- requests --
    def _send(self, req: dict[str, Any], done: Callable[[Reply | None], None] | None) -> bool:
        if self.worker is None:
            return False
        if done is None:
            req = {**req, "reply": False}
        try:
            self.worker.send(req)
        except LocalProtocolError as e:
            self.counters["worker_errors"] += 1
            log.error("%s", e)
            return False
        if done is not None:
            self._waiting.append(done)
        return True

    def _readable(self) -> None:
        assert self.worker is not None
        replies = self.worker.read_replies()
        if replies is None:  # EOF: the worker died
            asyncio.get_running_loop().remove_reader(self.worker.fileno())
            self._fail_waiting()
            self.worker = None
            if self._on_exit is not None:
                self._on_exit()
            return
        for r in replies:
            if not self._waiting:
                log.error("session worker: unexpected reply %r", r)
                continue
            cb = self._waiting.popleft()
            if not r.get("ok"):
                self.counters["worker_errors"] += 1
                log.error("session worker: %s", r.get("error"))
                r = None
            cb(r)

    def _fail_waiting(self) -> None:
        while self._waiting:
            self._waiting.popleft()(None)

    # -- what the agent asks --
    def promote(self, done: Callable[[], None]) -> bool:
        """Restore the connections, then call ``done`` (add the VIPs there): those a master
        synced here, or those this node parked at its step-down if no other node can have served
        since (see the module doc). False: no worker, call ``done`` yourself."""

        def on_reply(r: Reply | None) -> None:
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
        return self._send({"op": "promote", "own": own}, on_reply)

    def demote(self) -> None:
        """Silence this node's connections; the worker parks their state (see the module doc)."""
        if self.cfg.witness is None:
            self._park, self.park_note = (0, 0), ""
        elif self.lease_term is None or self.lease_term[0] == 0:
            self._park, self.park_note = None, "the witness does not report lease terms"
        else:
            self._park, self.park_note = self.lease_term, ""
        self._send({"op": "demote"}, None)

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
                if v is not None and v.alive and v.role != Role.MASTER:
                    target = p
                    break
        want: list[list[Any] | None] = []
        for s in self.cfg.services:
            addr = None if target is None else target.addresses.get(self.cfg.sync_channel(s))
            want.append(None if addr is None else [addr, s.sync_port])
        if want != self._peers and self._send({"op": "set_backup", "peers": want}, None):
            self._peers = want
            log.info("session sync to %s", [w and f"{w[0]}:{w[1]}" for w in want])

    async def refresh(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Ask the worker for its status (``cached`` keeps the answer)."""
        fut: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()

        def on_reply(r: Reply | None) -> None:
            if not fut.done():
                fut.set_result(r)

        if self._send({"op": "status"}, on_reply):
            try:
                r = await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                r = None
            if r is not None:
                self.cached = r["services"]
        return self.cached

    def status(self) -> dict[str, Any]:
        return {
            "worker_pid": None if self.worker is None else self.worker.pid,
            "counters": dict(self.counters),
            "last_promotion": self.last_promotion,
            "parked_valid": self._park is not None,
            "park_note": self.park_note,
        }
