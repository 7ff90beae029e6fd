"""The agent's side of TCP session takeover: it drives the session worker on role changes.

- At start the worker runs every ``[[services]]`` entry on the backup side (receiving sync).
- Promotion: ``promote(done)`` asks the worker to restore the connections; the agent adds the
  VIPs only in ``done`` (so no segment of the peer meets a node without its connection), and its
  loop keeps running meanwhile (heartbeats, the witness): a restore of thousands of connections
  takes tens of milliseconds.
- After the VIPs are released: ``demote`` silences this node's copies.
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

    def specs(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        addr = {c.name: c.address for c in cfg.channels}
        out = []
        for i, s in enumerate(cfg.services):
            out.append({
                "name": s.name, "vip": s.vip, "port": s.port,
                "family": ipaddress.ip_address(s.vip).version, "queue": cfg.service_queue(i),
                "endpoint": cfg.service_endpoint(s), "sync_addr": addr[cfg.sync_channel(s)],
                "sync_port": s.sync_port,
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
        """Restore the connections, then call ``done`` (add the VIPs there). False: no worker,
        call it yourself."""

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

        return self._send({"op": "promote"}, on_reply)

    def demote(self) -> None:
        self._send({"op": "demote"}, None)

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
        }
