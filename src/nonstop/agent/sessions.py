"""The agent's side of TCP session takeover: it drives the session worker on role changes.

- At start the worker runs every ``[[services]]`` entry on the backup side (receiving sync).
- Before the VIPs are added (promotion): ``promote`` restores the connections; only then the VIP
  and the gratuitous ARP, so no segment of the peer meets a node without the connection.
- After the VIPs are released: ``demote`` silences this node's copies.
- While master: ``peers_changed`` points the sync at the peer when it is up and not master (a
  rejoined node gets a whole copy), or stops it when the peer is gone.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from nonstop.common import LocalProtocolError, Role
from nonstop.config import AgentConfig
from nonstop.session.worker import SessionWorker

log = logging.getLogger("nonstop.agent")


class Sessions:
    def __init__(self, cfg: AgentConfig, key: bytes, *, verbose: int = 0) -> None:
        self.cfg, self._key, self._verbose = cfg, key, verbose
        self.worker: SessionWorker | None = None
        self._peers: list[list[Any] | None] = [None] * len(cfg.services)
        self.counters: dict[str, int] = {"promote_errors": 0, "worker_errors": 0}
        self.last_promotion: list[dict[str, Any]] = []

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

    def start(self) -> None:
        if self.cfg.services:
            self.worker = SessionWorker.spawn(self.specs(), self._key, verbose=self._verbose)

    def fileno(self) -> int | None:
        return None if self.worker is None else self.worker.fileno()

    def promote(self) -> None:
        if self.worker is None:
            return
        try:
            reply = self.worker.call({"op": "promote"}, timeout=5.0)
        except LocalProtocolError as e:
            self.counters["promote_errors"] += 1
            log.error("session takeover failed, taking the VIPs anyway: %s", e)
            return
        self.last_promotion = reply["services"]
        for p in self.last_promotion:
            if not p.get("already"):
                log.warning(
                    "service %s: %d connections restored (%.2f ms), handed to %d service(s)",
                    p["service"], p["restored"], p["restore_ms"], p["handed_to_service"] > 0,
                )

    def demote(self) -> None:
        self._call({"op": "demote"})

    def peers_changed(self, role: Role, peer_views: dict[str, Any]) -> None:
        """Sync each service to the first peer that is alive and not master (when we are)."""
        want: list[list[Any] | None] = []
        target = None
        if role == Role.MASTER:
            for p in self.cfg.peers:
                v = peer_views.get(p.id)
                if v is not None and v.alive and v.role != Role.MASTER:
                    target = p
                    break
        for s in self.cfg.services:
            ch = self.cfg.sync_channel(s)
            addr = None if target is None else target.addresses.get(ch)
            want.append(None if addr is None else [addr, s.sync_port])
        if want != self._peers:
            self._peers = want
            if self._call({"op": "set_backup", "peers": want}) is not None:
                log.info("session sync to %s", [w and f"{w[0]}:{w[1]}" for w in want])

    def status(self) -> list[dict[str, Any]]:
        reply = self._call({"op": "status"}, timeout=2.0)
        return [] if reply is None else reply["services"]

    def _call(self, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any] | None:
        if self.worker is None:
            return None
        try:
            return self.worker.call(req, timeout=timeout)
        except LocalProtocolError as e:
            self.counters["worker_errors"] += 1
            log.error("%s", e)
            return None

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
