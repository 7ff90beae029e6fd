"""The store-backed node agent (``nonstop groups agent --config node.toml``).

Thin asyncio adapters around :class:`nonstop.store.core.GroupsCore`: heartbeats between the
members (``nonstop.membership``, one UDP socket per channel), the store session (keep-alive every
``keepalive_interval_ms`` with a deadline of one interval; a failed one is retried at the next
tick), a watch that re-reads the cluster on every change (plus a read after every renewal), one
:class:`~nonstop.failover.vip.VipManager` per group, and the fence guard
(:mod:`nonstop.failover.guard`), armed with every VIP held and the core's own hold deadline
(:meth:`~nonstop.store.core.GroupsCore.hold_deadline`: the lease's end less the drop margin, or
the last failsafe grant) plus half the drop margin, re-armed each time that deadline moves. So a
live agent drops its VIPs itself and says why, a hung agent's VIPs go half a margin before its
lease can expire at the store, and the guard never fires between the lease's end and failsafe
mode taking over (one deadline, not two clocks racing).

Protected services (``services`` in a ``[[groups]]`` entry) run in one session worker
(:mod:`nonstop.store.sessions`): a group's services are promoted before its VIP is added, demoted
after it is dropped (also by the guard), and synced to the group's next taker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from typing import Any

from nonstop.agent.daemon import next_incarnation
from nonstop.agent.hooks import Hooks
from nonstop.common import Role
from nonstop.failover.guard import GuardClient
from nonstop.failover.vip import VipManager, VipSpec
from nonstop.membership import Membership, MembershipConfig
from nonstop.store import core as C
from nonstop.store.base import AbstractStore, SessionLost, StoreUnavailable
from nonstop.store.config import StoreAgentConfig
from nonstop.store.sessions import GroupSessions, Proof

log = logging.getLogger("nonstop.groups")

STATUS_FILE = "groups-status.json"  # in node.state_dir: what this agent decided, for the CLI


def status_path(cfg: StoreAgentConfig) -> str:
    return os.path.join(cfg.node.state_dir, STATUS_FILE)


def core_config(cfg: StoreAgentConfig) -> C.CoreConfig:
    st = cfg.store
    return C.CoreConfig(
        node=cfg.node.id,
        nodes=tuple(cfg.node_ids),
        groups={g.name: dict(g.priorities) for g in cfg.groups},
        ttl=st.ttl,
        interval=st.interval,
        misses=st.keepalive_misses,
        margin=st.margin,
        failsafe=st.failsafe,
        failsafe_hold=cfg.failsafe_hold,
        fence_timeout=st.fence_timeout,
        stagger=2 * st.interval,
        startup_grace=st.startup_grace,
        synced=frozenset(g.name for g in cfg.groups if g.services),
    )


def make_store(cfg: StoreAgentConfig) -> AbstractStore:
    if cfg.store.kind == "etcd":
        from nonstop.store.etcd import EtcdStore

        return EtcdStore(
            cfg.store.endpoints,
            cluster=cfg.node.cluster,
            node=cfg.node.id,
            timeout=cfg.store.timeout_ms / 1000,
        )
    raise ValueError(f"store kind {cfg.store.kind!r} has no group agent (embedded: nonstop agent)")


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, agent: GroupsAgent, channel: str) -> None:
        self.agent, self.channel = agent, channel

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.agent.datagram_received(data, self.channel)


class GroupsAgent:
    def __init__(self, cfg: StoreAgentConfig, key: bytes, store: AbstractStore | None = None):
        self.cfg, self._key = cfg, key
        os.makedirs(cfg.node.state_dir, exist_ok=True)
        self.incarnation = next_incarnation(cfg.node.state_dir)
        self.core = C.GroupsCore(core_config(cfg))
        self.store = store or make_store(cfg)
        self.vips = {
            g.name: VipManager(
                [VipSpec(g.vip, g.interface, g.garp_count, g.garp_interval_ms / 1000)]
            )
            for g in cfg.groups
            if cfg.node.id in g.priorities
        }
        self.hooks = {
            g: Hooks(cfg.hooks, node_id=cfg.node.id, group=i) for i, g in enumerate(self.vips)
        }
        self.sessions = GroupSessions(cfg, key, self.vips)
        self._serving: set[str] = set()  # groups whose services are promoted (or being)
        self._take_gen: dict[str, int] = {}  # a promotion's VIP add is void once this moved
        self._peer_addr = {
            (m.id, ch): a
            for m in cfg.members
            if m.id != cfg.node.id
            for ch, a in m.addresses.items()
        }
        self.membership: Membership | None = None
        self.guard: GuardClient | None = None
        self._armed: frozenset[str] = frozenset()
        self._armed_until = float("-inf")
        self._transports: dict[str, asyncio.DatagramTransport] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self._read_wanted = asyncio.Event()
        self._flags = -1
        self.counters: dict[str, int] = {}
        self._status_key: object = None
        self._status_at = float("-inf")

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self, *, install_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        for v in self.vips.values():
            v.prepare()
            v.release()  # INIT: whatever a crashed predecessor left is not ours
        peers = {
            m.id: tuple(ch for ch in (c.name for c in cfg.channels) if ch in m.addresses)
            for m in cfg.members
            if m.id != cfg.node.id
        }
        for c in cfg.channels:
            t, _ = await loop.create_datagram_endpoint(
                lambda ch=c.name: _Udp(self, ch), local_addr=(c.address, cfg.heartbeat.port)
            )
            self._transports[c.name] = t
        self.guard = GuardClient.spawn()
        loop.add_reader(self.guard.fileno(), self._guard_readable)
        self.sessions.start(loop, self._worker_exited)  # before any group can be taken
        if self.sessions.worker is not None:
            self._spawn(self._watch_sessions())
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
        self.membership = Membership(
            MembershipConfig(
                node_id=cfg.node.id,
                channels=tuple(c.name for c in cfg.channels),
                peers=peers,
                interval=cfg.heartbeat.interval,
                dead_after=cfg.heartbeat.dead_after,
                copies=cfg.heartbeat.copies,
                group=0,
            ),
            key=self._key,
            incarnation=self.incarnation,
            now=time.monotonic(),
        )
        log.info("groups agent %s up: groups %s", cfg.node.id, ", ".join(self.vips) or "none")
        for coro in (self._keepalive_loop(), self._watch_loop(), self._read_loop()):
            self._spawn(coro)
        self._pump(time.monotonic())
        try:
            await self._stop.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for g, v in self.vips.items():
            v.release()
            if g in self.core.s.holding:
                self._say(C.GroupChanged(g, False, f"released {g}: agent stopping", 0.0))
        self.core.s.holding.clear()
        self._serving.clear()
        self.sessions.close(asyncio.get_running_loop())  # silences what it holds
        if self.guard is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.guard.fileno())
            self.guard.disarm()
            self.guard.close()
        if self.membership is not None:
            self.membership.leave(time.monotonic())
            self._send_heartbeats(time.monotonic())
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()  # revokes the lease: the groups are free at once
        for t in self._transports.values():
            t.close()
        for h in self.hooks.values():
            await h.wait()
        for v in self.vips.values():
            v.close()

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- the store ------------------------------------------------------------------------
    async def _keepalive_loop(self) -> None:
        st = self.cfg.store
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            sent = time.monotonic()
            try:
                if self.store.session is None:
                    session = await self.store.open_session(st.ttl)
                    ttl = st.ttl
                    await self.store.register_member()
                    log.info("store session %x opened", session)
                else:
                    ttl = await self.store.keepalive(sent + st.interval)
                assert self.store.session is not None
                self.core.lease_renewed(self.store.session, sent + min(ttl, st.ttl), sent)
                self._read_wanted.set()
            except SessionLost as e:
                self._count("session_lost")
                log.warning("store session lost: %s", e)
                self.store.session = None
                self.core.lease_lost(time.monotonic())
            except StoreUnavailable as e:
                self._count("keepalive_failed")
                log.debug("keep-alive failed: %s", e)
            self._pump(time.monotonic())
            next_at += st.interval
            now = loop.time()
            if next_at < now:
                next_at = now + st.interval  # missed ticks are skipped, not bunched
            await asyncio.sleep(next_at - now)

    async def _read_loop(self) -> None:
        while True:
            await self._read_wanted.wait()
            self._read_wanted.clear()
            sent = time.monotonic()
            try:
                view = await self.store.read()
            except StoreUnavailable as e:
                self._count("read_failed")
                log.debug("read failed: %s", e)
                continue
            self.core.set_view(view, time.monotonic(), sent)
            self._pump(time.monotonic())

    async def _watch_loop(self) -> None:
        while True:
            try:
                async for _rev in self.store.watch():
                    self._read_wanted.set()
            except StoreUnavailable as e:
                log.debug("watch ended: %s", e)
            self._count("watch_restarts")
            await asyncio.sleep(self.cfg.store.interval)

    async def _acquire(self, group: str) -> None:
        try:
            rev = await self.store.acquire(group)
        except StoreUnavailable as e:
            log.warning("acquire %s failed: %s", group, e)
            rev = None
        self.core.acquire_done(group, rev, time.monotonic())
        self._read_wanted.set()
        self._pump(time.monotonic())

    async def _release(self, group: str, revision: int) -> None:
        try:
            await self.store.release(group, revision)
        except StoreUnavailable as e:
            log.warning("release %s failed: %s", group, e)
        self.core.release_done(group, revision, time.monotonic())
        self._read_wanted.set()
        self._pump(time.monotonic())

    async def _clear(self, group: str, revision: int) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.store.clear_switchover(group, revision)

    # -- sessions -----------------------------------------------------------------------------
    def _proof(self, group: str) -> Proof | None:
        rev, session = self.core.held_revision(group), self.core.s.session
        return None if rev is None or session is None else (session, rev)

    def _take(self, group: str, gen: int) -> None:
        """The group's connections are restored (or it has none): add its VIP, if still ours."""
        if self._take_gen.get(group) != gen or group not in self.core.holding:
            return
        v = self.vips[group]
        v.acquire()
        self._spawn(v.announce())

    def _standby(self, group: str) -> tuple[str, int] | None:
        """(node, incarnation) of the group's sync target, if this node is its master."""
        node = self.core.sync_target(group, time.monotonic())
        view = self.membership.peer(node) if node and self.membership else None
        return None if node is None or view is None else (node, view.incarnation)

    def _sync_targets(self) -> None:
        want = {}
        for g, names in self.sessions.by_group.items():
            to = self._standby(g) if g in self._serving else None
            for n in names:
                want[n] = None if to is None else self.sessions.target(n, *to)
        self.sessions.set_backups(want)

    async def _watch_sessions(self) -> None:
        """Refresh the worker's status; tell the core which groups' standbys hold a whole copy
        (a switchover waits for it)."""
        while True:
            await self.sessions.refresh()
            changed = False
            for g in self.sessions.by_group:
                to = self._standby(g)
                ready = to[0] if to is not None and self.sessions.synced_to(g, *to) else None
                if self.core.s.sync_ready.get(g) != ready:
                    self.core.set_sync_ready(g, ready)
                    changed = True
            if changed:
                self._pump(time.monotonic())
            await asyncio.sleep(0.1)

    def _worker_exited(self) -> None:
        log.critical("session worker exited: this node can no longer keep TCP sessions; stopping")
        self._stop.set()

    # -- heartbeats and the guard ---------------------------------------------------------------
    def datagram_received(self, data: bytes, channel: str) -> None:
        if self.membership is None:
            return
        now = time.monotonic()
        self.membership.receive_datagram(data, channel, now)
        self._pump(now)

    def _send_heartbeats(self, now: float) -> None:
        assert self.membership is not None
        for out in self.membership.datagrams_to_send(now):
            addr = self._peer_addr.get((out.peer, out.channel))
            t = self._transports.get(out.channel)
            if addr is not None and t is not None:
                t.sendto(out.data, (addr, self.cfg.heartbeat.port))

    def _guard_readable(self) -> None:
        assert self.guard is not None
        for notice in self.guard.read_notices():
            if notice.startswith("FENCED"):
                self._count("fenced")
                log.error("fence guard: %s", notice)
                self.core.fenced(notice, time.monotonic())
                self._armed, self._armed_until = frozenset(), float("-inf")
                self._pump(time.monotonic())
            elif notice == "EOF":
                asyncio.get_running_loop().remove_reader(self.guard.fileno())
                log.critical("fence guard exited: stopping")
                self._stop.set()

    def _rearm_guard(self, now: float) -> None:
        """Keep the guard's deadline equal to the core's (re-armed when it moved by half a
        keep-alive interval or more, or when the set of held VIPs changed)."""
        held = self.core.holding
        if self.guard is None:
            return
        if not held:
            if self._armed:
                self.guard.disarm()
                self._armed, self._armed_until = frozenset(), float("-inf")
            return
        until = self.core.hold_deadline()
        moved = abs(until - self._armed_until) >= self.cfg.store.interval / 2
        if held == self._armed and not moved:
            return
        # the backstop fires half a drop margin after the core's own deadline (so a live agent
        # drops first and says why), still half a margin before the store can expire the lease
        left = until + self.cfg.store.margin / 2 - now
        if left <= 0:
            return  # the core drops them on this very cycle
        specs = [s for g in sorted(held) for s in self.vips[g].specs]
        self.guard.arm(left, specs)
        self._armed, self._armed_until = held, until

    # -- the pump ---------------------------------------------------------------------------
    def _pump(self, now: float) -> None:
        m = self.membership
        if m is None or self._stop.is_set():
            return
        while m.next_event() is not None:
            pass
        peers = {}
        for n in self.cfg.node_ids:
            if n != self.cfg.node.id:
                v = m.peer(n)
                peers[n] = C.PeerHeard(bool(v and v.alive), (v.flags or 0) if v else 0)
        self.core.set_peers(peers, now)
        for act in self.core.cycle(now):
            self._act(act)
        for g in sorted(self._serving - self.core.holding):  # dropped, fenced: VIP gone first
            self._serving.discard(g)
            self.core.set_sync_ready(g, None)
            self.sessions.demote(g, self._proof(g))
        self._sync_targets()
        for ev in self.core.take_events():
            self._say(ev)
        for note in self.core.take_notes():
            log.warning("%s", note)
        self._rearm_guard(now)
        self._write_status(now)
        flags = self.core.flags(now)
        role = Role.MASTER if self.core.holding else Role.BACKUP
        m.set_local(role=role, priority=1, flags=flags)
        if flags != self._flags:
            self._flags = flags
            m.send_now()
        self._send_heartbeats(now)
        deadline = min(m.get_timer(), self.core.get_timer(now))
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def snapshot(self, now: float) -> dict[str, Any]:
        """This agent's own decisions (times are ``time.monotonic()``, shared by the host)."""
        c, s = self.core, self.core.s
        return {
            "node": self.cfg.node.id,
            "pid": os.getpid(),
            "at": now,
            "session": f"{s.session:x}" if s.session is not None else None,
            "renewed_at": s.renewed_at,
            "lease_until": s.lease_until,
            "hold_deadline": c.hold_deadline() if s.holding else None,
            "store_ok": c.store_ok(now) and c.lease_ok(now),
            "failsafe": c.failsafe_active,
            "deferring_to": c.deferring(now),
            "holding": sorted(s.holding),
            "standby": {g: c.standby_of(g) for g in c.mine},
            "sync_ready": dict(s.sync_ready),
            "peers": {p: h.alive for p, h in s.peers.items()},
            "counters": dict(self.counters),
            "sessions": self.sessions.status() if self.sessions.entries else None,
        }

    def _write_status(self, now: float) -> None:
        """On every change of what matters, else once a second (``at`` shows it is alive)."""
        c = self.core
        key = (c.holding, c.failsafe_active, c.s.session, c.store_ok(now), c.deferring(now),
               tuple(sorted(c.s.peers.items())))  # fmt: skip
        if key == self._status_key and now - self._status_at < 1.0:
            return
        self._status_key, self._status_at = key, now
        path = status_path(self.cfg)
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(self.snapshot(now), f)
            os.replace(path + ".tmp", path)
        except OSError as e:
            self._count("status_write_failed")
            log.debug("status file: %s", e)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic()
        if self.membership is not None:
            self.membership.handle_timer(now)
        self._pump(now)

    def _act(self, act: C.Action) -> None:
        if isinstance(act, C.TakeVip):
            # the connections first, then the VIP (in _take): no segment of a peer finds this
            # node without its connection; the loop goes on meanwhile
            g = act.group
            gen = self._take_gen[g] = self._take_gen.get(g, 0) + 1
            self._serving.add(g)
            if not self.sessions.promote(g, self._proof(g), lambda: self._take(g, gen)):
                self._take(g, gen)
        elif isinstance(act, C.DropVip):
            self._take_gen[act.group] = self._take_gen.get(act.group, 0) + 1
            self.vips[act.group].release()
        elif isinstance(act, C.Acquire):
            self._spawn(self._acquire(act.group))
        elif isinstance(act, C.Release):
            self._spawn(self._release(act.group, act.revision))
        elif isinstance(act, C.ClearSwitchover):
            self._spawn(self._clear(act.group, act.revision))

    def _say(self, ev: C.GroupChanged) -> None:
        log.warning("%s", ev.reason)
        old, new = (Role.BACKUP, Role.MASTER) if ev.master else (Role.MASTER, Role.BACKUP)
        with contextlib.suppress(RuntimeError):
            self.hooks[ev.group].role_changed(old, new, ev.reason)


async def run_agent(cfg: StoreAgentConfig, key: bytes) -> None:
    await GroupsAgent(cfg, key).run()
