"""The groups agent's side of TCP session takeover: one session worker per node, every group.

The worker (:mod:`nonstop.session.worker`) runs every protected service of every group this node
may serve, each on its group's VIP, on the backup side at start. Per group G:

- taking G: ``promote(G, proof, done)`` restores G's services only (the worker's ``services``
  filter); the agent adds G's VIP in ``done``, so no segment of a peer meets this node without
  its connection, and its loop runs on meanwhile;
- after G's VIP is dropped: ``demote(G, proof)`` silences G's copies and parks their state;
- a later promotion restores the parked copies (``own``) only if the proof given at the
  step-down, (session, revision of G's master key), is the proof at the promotion: the key was
  never deleted in between, so no other node held G. Otherwise only what a master synced here;
- ``set_backups({service: (host, port, incarnation) | None})`` points each service's sync at its
  group's standby; a target that restarted (new incarnation) gets a whole copy.

Requests never block the agent's loop: replies are read by ``loop.add_reader``, in order.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any

from nonstop.session.driver import Reply, WorkerDriver
from nonstop.store.config import StoreAgentConfig

log = logging.getLogger("nonstop.groups")

Proof = tuple[int, int]  # (store session, revision of the group's master key)
Target = tuple[str, int, int]  # host, UDP port, the target's incarnation


class GroupSessions(WorkerDriver):
    def __init__(
        self, cfg: StoreAgentConfig, key: bytes, groups: Iterable[str], *, verbose: int = 0
    ) -> None:
        super().__init__(key, verbose=verbose)
        self.cfg = cfg
        mine = set(groups)
        self.entries = [(i, g.name, s) for i, (g, s) in enumerate(cfg.services()) if g.name in mine]
        self.by_group: dict[str, list[str]] = {}
        for _, g, s in self.entries:
            self.by_group.setdefault(g, []).append(s.name)
        self._sent: dict[str, Target | None] = {s.name: None for _, _, s in self.entries}
        self._park: dict[str, Proof] = {}
        self.last_promotion: dict[str, list[dict[str, Any]]] = {}

    def specs(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        addr = {c.name: c.address for c in cfg.channels}
        vip = {g.name: g.vip.split("/")[0] for g in cfg.groups}
        return [
            {
                "name": s.name, "vip": vip[g], "port": s.port,
                "family": ipaddress.ip_address(vip[g]).version, "queue": cfg.service_queue(i),
                "endpoint": cfg.service_endpoint(s), "sync_addr": addr[cfg.sync_channel(s)],
                "sync_port": cfg.sync_port(i),
            }
            for i, g, s in self.entries
        ]

    def target(self, service: str, node: str, incarnation: int) -> Target | None:
        """Where ``service``'s sync goes when ``node`` is its group's standby."""
        for i, _, s in self.entries:
            if s.name == service:
                m = next(m for m in self.cfg.members if m.id == node)
                host = m.addresses.get(self.cfg.sync_channel(s))
                return None if host is None else (host, self.cfg.sync_port(i), incarnation)
        return None

    # -- what the agent asks --
    def promote(self, group: str, proof: Proof | None, done: Callable[[], None]) -> bool:
        """Restore ``group``'s connections, then call ``done``. False: nothing to restore here
        (no services, no worker): call ``done`` yourself."""
        names = self.by_group.get(group)
        parked = self._park.pop(group, None)
        if not names:
            return False
        own = parked is not None and parked == proof
        if parked is not None and not own:
            log.info("%s: connections parked here are not restored: master key %s at the "
                     "step-down, %s now", group, parked, proof)  # fmt: skip

        def on_reply(r: Reply | None) -> None:
            if r is None:
                self.counters["promote_errors"] += 1
                log.error("%s: session takeover failed: the VIP is taken without its "
                          "connections", group)  # fmt: skip
            else:
                self.last_promotion[group] = r["services"]
                for p in r["services"]:
                    if not p.get("already"):
                        log.warning(
                            "%s: service %s: %d connections restored (%.2f ms, from %s), "
                            "%d handed over", group, p["service"], p["restored"],
                            p["restore_ms"], p["from"], p["handed_to_service"],
                        )  # fmt: skip
            done()

        return self._send({"op": "promote", "own": own, "services": names}, on_reply)

    def demote(self, group: str, proof: Proof | None) -> None:
        """After ``group``'s VIP is gone: silence its connections, park them with ``proof``."""
        names = self.by_group.get(group)
        if not names:
            return
        if proof is None:
            self._park.pop(group, None)
        else:
            self._park[group] = proof
        self._send({"op": "demote", "services": names}, None)

    def set_backups(self, want: dict[str, Target | None]) -> None:
        """Point each service's sync at its target (None: stop). A target whose incarnation
        changed (the standby restarted, its copy is gone) gets a whole copy."""
        if self.worker is None:
            return
        order = [s.name for _, _, s in self.entries]
        new = {n: want.get(n) for n in order}
        if new == self._sent:
            return

        def peers(m: dict[str, Target | None]) -> list[list[Any] | None]:
            return [None if (t := m[n]) is None else [t[0], t[1]] for n in order]

        def restarted(n: str) -> bool:
            a, b = new[n], self._sent[n]
            return a is not None and b is not None and a[:2] == b[:2] and a != b

        if any(restarted(n) for n in order):  # stop first: the next set_backup resyncs
            gone = {n: None for n in order if restarted(n)}
            if not self._send({"op": "set_backup", "peers": peers({**new, **gone})}, None):
                return
        if self._send({"op": "set_backup", "peers": peers(new)}, None):
            self._sent = new
            log.info("session sync: %s", {n: t and f"{t[0]}:{t[1]}" for n, t in new.items()})

    def synced_to(self, group: str, node: str, incarnation: int) -> bool:
        """Every service of ``group`` is master here, syncing to ``node`` with a whole copy
        acknowledged (by the last status the worker gave)."""
        names = self.by_group.get(group)
        if not names:
            return True
        by_name = {s.get("name"): s for s in self.cached}
        for n in names:
            t = self.target(n, node, incarnation)
            s = by_name.get(n)
            if t is None or s is None or s.get("role") != "master" or self._sent.get(n) != t:
                return False
            sync = s.get("sync", {})
            if sync.get("backup") != f"{t[0]}:{t[1]}" or not sync.get("protecting"):
                return False
        return True

    def status(self) -> dict[str, Any]:
        return {
            "worker_pid": None if self.worker is None else self.worker.pid,
            "counters": dict(self.counters),
            "last_promotion": self.last_promotion,
            "parked": {g: list(p) for g, p in self._park.items()},
            "services": self.cached,
        }
