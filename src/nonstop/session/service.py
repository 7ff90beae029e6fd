"""One protected service (VIP:port) inside the session worker: the backup or the master side.

- **backup** (the start, and after a demotion): a :class:`BackupSession` receives the master's
  sync on this node's sync address; the app endpoint holds ADOPT_REQUESTs, so a standby service
  started here waits for the connections.
- **promote()** (before the agent adds the VIP): every connection the backup holds is restored
  with TCP_REPAIR, a :class:`MasterSession` starts (rules in place, no backup yet: nothing is
  clamped) and tracks them, the endpoint holds them as orphans and answers the waiting standby.
- **master**: the service's COMMITs go to ``MasterSession.commit``; ``set_backup(addr)`` starts
  syncing a (re)joined backup from a whole copy; ``set_backup(None)`` stops.
- **demote()** / **silence()**: this node no longer serves the VIP (stepped down, fenced, agent
  gone): every held connection is put in repair mode and closed, so neither FIN nor RST reaches
  the peer that a new master now serves; the sockets the service still has are dead too.

Thread safety: the endpoint's thread (``_serve``) and the worker's control thread both call in;
``self._lock`` orders role changes against commits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from nonstop.app.channel import AgentEndpoint, CommitRecord, HeldConn
from nonstop.common import gc_paused
from nonstop.session.backup import BackupSession
from nonstop.session.kick import deliver_fins, send_kicks
from nonstop.session.manager import MasterSession
from nonstop.session.mirror import ConnState
from nonstop.session.nfnl import kernel_queue
from nonstop.session.nfq import FourTuple
from nonstop.session.quiet import QuietRule
from nonstop.session.repair import RepairError, disconnect_silently, engine

log = logging.getLogger("nonstop.session")
_OVERLOAD_LOG_S = 10.0  # the kernel queue's drops are logged this often at most
_KQ_EVERY = 0.5  # its figures are read this often at most (s)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    vip: str
    port: int
    family: int  # 4 or 6: the VIP's (the clamp's and quiet rule's iptables or ip6tables)
    queue: int  # NFQUEUE number
    endpoint: str  # unix socket path of the app channel
    sync_addr: str  # this node's address on the sync channel
    sync_port: int
    md5: dict[str, str] = dataclasses.field(default_factory=dict)  # peer -> TCP-MD5 password

    @property
    def sync_family(self) -> int:
        """4 or 6: the sync channel's, which need not be the VIP's (an IPv6 service synced over
        an IPv4 channel: the sync sockets used to take the VIP's family and failed to bind)."""
        return ipaddress.ip_address(self.sync_addr).version


class ProtectedService:
    def __init__(self, spec: ServiceSpec, key: bytes) -> None:
        self.spec, self._key = spec, key
        self._md5 = {a: pw.encode() for a, pw in spec.md5.items()}
        self._lock = threading.RLock()
        self.role = "backup"
        self.master: MasterSession | None = None
        self.backup: BackupSession | None = None
        self.peer: tuple[str, int] | None = None
        self._queue_dropped: int | None = None  # the kernel queue's drops at the last look
        self._kq: dict[str, int] | None = None  # its figures then, and when to look again
        self._kq_next = 0.0
        self._overload_said, self._overload_unsaid = -_OVERLOAD_LOG_S, 0
        self.counters: dict[str, int] = {
            "promotions": 0, "demotions": 0, "restored": 0, "restore_failures": 0,
            "silenced": 0, "commit_errors": 0, "parked": 0, "parked_dropped": 0,
            "reaped": 0, "kicked": 0, "kick_packets": 0, "fins_delivered": 0,
            "hushed": 0, "unhushed": 0,
        }  # fmt: skip
        self.last_promotion: dict[str, Any] | None = None
        self.endpoint = AgentEndpoint(
            spec.endpoint, on_commit=self._on_commit, hold_adoption=True
        )
        # the clamp's rules, standing: with nobody bound (not master) they drop everything
        self.quiet = QuietRule(spec.vip, spec.port, spec.family, spec.queue)
        self._keep_quiet = False  # the agent died: the rule outlives this worker
        self._to_kick: list[tuple[FourTuple, socket.socket]] = []  # restored, not yet kicked
        self._to_fin: list[FourTuple] = []  # restored after their peers' FIN, not yet handed it
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name=f"nonstop-app-{spec.name}", daemon=True
        )

    # -- lifecycle --
    def start(self) -> ProtectedService:
        self.quiet.add()
        self._start_backup()
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop; held connections are silenced (this node does not serve them any more)."""
        self._stop.set()
        self._thread.join(timeout=2)
        with self._lock:
            self._stop_master()
            self._stop_backup()
            self._silence_held()
            self.endpoint.close()
            if not self._keep_quiet:
                self.quiet.remove()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self.endpoint.step(0.1)
            except OSError as e:  # pragma: no cover - the listener went away under us
                log.error("%s: app endpoint: %s", self.spec.name, e)
                time.sleep(0.1)

    def _start_backup(self, parked: list[tuple[ConnState, float]] | None = None) -> None:
        """The backup side, holding ``parked`` (this node's own connections at a step-down)
        before it reads its first datagram: a new master's RESET that came in first used to be
        overwritten by the seed, and the next promotion dropped the stale copy (8 resets)."""
        s = self.spec
        backup = BackupSession(
            self._key, bind=(s.sync_addr, s.sync_port), family=s.sync_family, md5=self._md5
        )  # bound: datagrams wait in its socket until open()
        if parked:
            backup.seed(parked)
            self.counters["parked"] += len(parked)
        self.backup = backup.open()
        self.role = "backup"

    def _stop_backup(self) -> None:
        if self.backup is not None:
            self.backup.close()
            self.backup = None

    def _stop_master(self) -> None:
        if self.master is not None:
            self.master.close()
            self.master = None

    # -- role changes (the agent, through the worker) --
    def promote(self, own: bool = False) -> dict[str, Any]:
        """Restore every connection the backup holds and become the master side. Call before
        the VIP is added. ``own``: the agent knows no other node served since this one stepped
        down, so the connections it parked then are still the truth (else they are dropped).
        Returns what was done (counts and timings)."""
        with self._lock, gc_paused():
            if self.role == "master":
                return {"service": self.spec.name, "restored": 0, "already": True}
            t0 = time.monotonic()
            restored = []
            assert self.backup is not None
            resumed = self.backup.seeded and own
            if not own and (dropped := self.backup.discard_seed()):
                self.counters["parked_dropped"] += dropped
                log.warning("%s: %d connections parked at the step-down dropped: another node "
                            "may have served them since", self.spec.name, dropped)
            try:  # their first segments (a window probe, the bytes in flight again) die in the
                # standing rules, nobody bound yet: cheaper than through the queue, and useless
                # before the VIP moves (the peer's answers go to the old master)
                restored = self.backup.promote()
            except (RepairError, OSError) as e:
                self.counters["restore_failures"] += 1
                log.error("%s: restore failed, its connections are lost: %s", self.spec.name, e)
            t1 = time.monotonic()
            if self.backup.restore_failures:
                self.counters["restore_failures"] += len(self.backup.restore_failures)
                log.error("%s: %d connections could not be restored: %s", self.spec.name,
                          len(self.backup.restore_failures), self.backup.restore_failures[:3])
            phases = dict(self.backup.phases_ms)
            closing = self.backup.closing
            self._stop_backup()
            s = self.spec
            self.master = MasterSession(
                s.vip, s.port, self._key, backup=None, queue_num=s.queue, family=s.family,
                sync_family=s.sync_family, sync_bind=(s.sync_addr, 0), md5=self._md5,
                standing_rules=True,  # session.quiet's: open() only binds their queue
            )  # fmt: skip
            # adopted before the clamp and its threads start: nothing else in this process wants
            # the GIL meanwhile (the clamp's thread, at normal priority, would take it for every
            # packet and stall this real-time thread for milliseconds at a time)
            self._queue_dropped, self._kq, self._kq_next = None, None, 0.0  # a new binding
            self.master.adopt_many(restored)
            with self.endpoint.lock:
                for rc in restored:
                    self.endpoint.add(
                        rc.conn_id, rc.sock, CommitRecord(rc.read_pos, rc.write_pos, rc.state),
                        sent_pos=rc.sent_pos,
                    )
            t2 = time.monotonic()
            try:
                self.master.open()  # before the service has them: the mirror sees all it sends
            except BaseException:
                self.master.close()
                self.master = None
                raise
            t3 = time.monotonic()
            with self.endpoint.lock:
                woken = self.endpoint.release_adoptions()
            # those restored with bytes in flight: the kick makes the peer acknowledge them
            self._to_kick = [(rc.four_tuple, rc.sock) for rc in restored if rc.tcp.send_queue]
            self._to_fin = [rc.four_tuple for rc in restored if rc.peer_fin is not None]
            self.role = "master"
            self.counters["promotions"] += 1
            self.counters["restored"] += len(restored)
            n = len(restored)
            self.last_promotion = {
                "service": s.name,
                "restored": n,
                "restore_ms": round((t1 - t0) * 1000, 3),
                "restore_us_per_session": round((t1 - t0) * 1e6 / n, 1) if n else None,
                "restore_engine": engine(),  # the restore's system calls from C or Python
                "total_ms": round((time.monotonic() - t0) * 1000, 3),
                "handed_to_service": woken,
                "resent_bytes": sum(rc.resent for rc in restored),
                "pending_bytes": sum(rc.pending for rc in restored),
                "closing": closing,  # the service had closed them: restored only to finish
                "from": "parked" if resumed else "sync",
                "phases_ms": {
                    **phases,
                    "adopt": round((t2 - t1) * 1000, 3),
                    "master_open": round((t3 - t2) * 1000, 3),
                    "hand_over": round((time.monotonic() - t3) * 1000, 3),
                },
            }
            log.warning("%s: promoted, %d connections restored in %.1f ms%s", s.name, n,
                        (t1 - t0) * 1000, " (parked here at the step-down)" if resumed else "")
            if self.peer is not None:
                self.master.set_backup(self.peer)
            return self.last_promotion

    def _note_overload(self, kq: dict[str, int], now: float) -> None:
        """Count the segments the kernel's queue dropped since the last look (a status every
        ``_KQ_EVERY`` at most) and say so, once per ``_OVERLOAD_LOG_S`` at most: nothing else
        shows a packet path that cannot keep up (the connections just stall on their peers'
        retransmission timers, backed off)."""
        dropped = kq["dropped_full"] + kq["dropped_user"]
        base = self._queue_dropped
        self._queue_dropped = dropped
        if base is None or dropped <= base:  # first look, or a new binding (counts from 0)
            return
        self.counters["queue_dropped"] = self.counters.get("queue_dropped", 0) + dropped - base
        self._overload_unsaid += dropped - base
        if now - self._overload_said >= _OVERLOAD_LOG_S:
            log.warning(
                "%s: the kernel queue dropped %d segments (%d waiting for a verdict): this "
                "node's packet path cannot keep up with its connections; they stall until the "
                "peers retransmit", self.spec.name, self._overload_unsaid, kq["waiting"])
            self._overload_said, self._overload_unsaid = now, 0

    def kick(self) -> int:
        """Probe the peers of the connections the last promotion restored with bytes in flight,
        and hand the restored sockets whose peers had half-closed their FIN (once: the agent asks
        right after its first gratuitous ARP, when the VIP is here; ``nonstop.session.kick``).
        Returns how many connections were probed."""
        with self._lock:
            todo, self._to_kick = self._to_kick, []
            fins, self._to_fin = self._to_fin, []
            if self.master is None or self.role != "master":
                return 0
            targets = self.master.kick_targets(todo) if todo else []
            fin_targets = self.master.fin_targets(fins) if fins else []
        if fin_targets:
            self.counters["fins_delivered"] += deliver_fins(fin_targets)
        if not targets:
            return 0
        self.counters["kicked"] += len(targets)
        self.counters["kick_packets"] += send_kicks(targets)
        return len(targets)

    def demote(self) -> dict[str, Any]:
        """Back to the backup side: the connections here are silenced (a new master has them, or
        will). Their state is parked in the new backup side: if the agent finds that no other
        node served since (a lone master that stepped down and took over again, e.g. after a
        stall fenced it), ``promote(own=True)`` restores them."""
        with self._lock:
            if self.role == "backup":
                return {"service": self.spec.name, "silenced": 0}
            self._to_kick, self._to_fin = [], []
            self._quiet()
            parked = self.master.parked() if self.master is not None else []
            self._stop_master()
            n = self._silence_held()
            if reaped := self.quiet.reap():
                self.counters["reaped"] += reaped
                log.warning("%s: %d connections the worker did not hold were aborted silently",
                            self.spec.name, reaped)
            self._start_backup(parked)
            with self.endpoint.lock:
                for c in list(self.endpoint.clients):  # the service must restart as a standby
                    self.endpoint.drop(c)
                self.endpoint.hold_adoption = True
            self.counters["demotions"] += 1
            return {"service": self.spec.name, "silenced": n}

    def hush(self, on: bool) -> bool:
        """Drop every segment of this service's connections both ways (``on``), or let them
        flow again: a master whose VIPs are down while the agent asks the witness whether
        another node held the lease (rule 9 of nonstop.failover.roles). Its restored sockets
        may send from the VIP without it (IP_TRANSPARENT), and another node may be serving the
        same connections: nothing of them may leave here until the agent knows. True if a
        master side was there to hush."""
        with self._lock:
            if self.master is None or self.role != "master":
                return False
            clamp = self.master.clamp
            clamp.hushed = on
            if not on:
                clamp.kick()  # what was held goes out now, as the hold allows
            self.counters["hushed" if on else "unhushed"] += 1
            return True

    def set_backup(self, peer: tuple[str, int] | None) -> None:
        with self._lock:
            self.peer = peer
            if self.master is not None:
                self.master.set_backup(peer)

    def silence(self, *, agent_gone: bool = False) -> int:
        """Stop everything, let no FIN or RST out. ``agent_gone``: the quiet rule stays after
        this worker exits (this node may have been master; nothing of it may speak now)."""
        with self._lock:
            if agent_gone:
                self._keep_quiet = True
                self._quiet()
            self._stop_master()
            return self._silence_held()

    def _quiet(self) -> None:
        try:
            self.quiet.add()
        except (OSError, subprocess.CalledProcessError) as e:  # the silencing below still runs
            log.error("%s: quiet rule not installed: %s", self.spec.name, e)

    def _silence_held(self) -> int:
        with self.endpoint.lock:
            held = list(self.endpoint.conns.values())
            self.endpoint.conns.clear()
        for h in held:  # also dead in the service's hands: the 4-tuple can be restored again
            with contextlib.suppress(RepairError, OSError):
                disconnect_silently(h.sock)
        self.counters["silenced"] += len(held)
        return len(held)

    # -- the service's commits (endpoint thread) --
    def _on_commit(self, helds: list[HeldConn]) -> None:
        """The COMMITs of one read from a service: synced under one lock, in one batch (a
        connection committed twice in the read goes once, at its last record)."""
        master = self.master
        if master is None:
            return
        batch = {}
        for held in helds:
            r = held.record
            ft = (held.local[0], held.local[1], held.remote[0], held.remote[1])
            batch[ft] = (r.read_pos, r.write_pos, r.state)
        for ft, e in master.commit_many(batch.items()).items():
            self.counters["commit_errors"] += 1
            if self.counters["commit_errors"] == 1:
                log.error("%s: commit of %s not synced: %s", self.spec.name, ft, e)

    # -- views --
    def status(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "name": self.spec.name,
                "vip": self.spec.vip,
                "port": self.spec.port,
                "role": self.role,
                "connections": len(self.endpoint.conns),
                "service_clients": len(self.endpoint.clients),
                "standby_waiting": len(self.endpoint.waiting),
                "counters": dict(self.counters),
                "endpoint_counters": dict(self.endpoint.counters),
                "last_promotion": self.last_promotion,
                "restore_engine": engine(),  # "c", or "python" when _repair.c was not built
            }
            if self.master is not None:
                m = self.master
                out["sync"] = {
                    "backup": None if m.backup is None else f"{m.backup[0]}:{m.backup[1]}",
                    "protecting": m.protecting,
                    "adopted": m.adopted,
                    "tracked": m.tracked,
                    "finished": m.finished,  # closed by the service, all delivered: forgotten
                    "reset": m.resets,
                    "tx_bytes": m.tx_bytes,
                    "srtt_ms": None if m.sender.srtt is None else round(m.sender.srtt * 1e3, 3),
                    "rto_ms": round(m.sender.current_rto * 1e3, 3),
                    **m.sender.counters,
                }
                out["clamp"] = dataclasses.asdict(m.clamp.stats)
                out["clamp"]["hushed_now"] = m.clamp.hushed
                now = time.monotonic()
                if now >= self._kq_next:  # the agent asks every 50 ms: /proc at most every 0.5 s
                    self._kq, self._kq_next = kernel_queue(m.clamp.queue_num), now + _KQ_EVERY
                    if self._kq is not None:
                        self._note_overload(self._kq, now)
                if self._kq is not None:
                    out["clamp"]["kernel_queue"] = self._kq
                if m.clamp.error is not None:
                    out["clamp"]["error"] = f"{type(m.clamp.error).__name__}: {m.clamp.error}"
            elif self.backup is not None:
                out["sync"] = {
                    "held_connections": self.backup.receiver.open_connections,
                    "parked": self.backup.seeded,
                    **self.backup.receiver.counters,
                }
            return out
