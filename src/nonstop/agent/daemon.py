"""The node agent: asyncio adapters around the sans-IO cores.

One UDP socket per channel carries heartbeats (NSHB) and witness traffic (NSWT). The membership
core turns datagrams and time into peer events; the role machine turns those into actions (take
or release the VIPs, announce them, ask the witness for the lease); this module performs the
actions and keeps a single ``loop.call_at`` timer armed at the earliest deadline of both cores
(aioquic's protocol.py is the model). Every role decision is logged as one sentence, kept in the
history shown by ``nonstop status``, and passed to the hooks.

Lifecycle (uvicorn's server.py is the model): start-up (sockets, guard, links, API, real-time
priority), the loop, then shutdown on SIGTERM/SIGINT with an explicit handover: VIPs released, the
lease given back, a LEAVE sent on every channel so the backup promotes at once. A second signal
skips the grace period.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import time
from typing import Any

from nonstop import __version__
from nonstop.agent.faults import LocalFaults
from nonstop.agent.fencing import Fencing
from nonstop.agent.hooks import Hooks
from nonstop.agent.link import AgentLinks
from nonstop.agent.realtime import make_realtime
from nonstop.agent.services import AgentServices
from nonstop.agent.sessions import Sessions
from nonstop.agent.status import agent_status
from nonstop.common import RemoteProtocolError, Role
from nonstop.config import AgentConfig
from nonstop.failover import roles as R
from nonstop.failover.guard import GuardClient
from nonstop.failover.vip import VipManager, VipSpec
from nonstop.failover.witness import LeaseDenied, LeaseGranted, WitnessClient
from nonstop.membership import (
    FLAG_SYNC_READY,
    ChannelFaulted,
    ChannelRecovered,
    Membership,
    MembershipConfig,
    PeerJoined,
    PeerLeft,
    PeerLost,
    PeerRestarted,
    PeerStateChanged,
)

log = logging.getLogger("nonstop.agent")

HISTORY = 100


def next_incarnation(state_dir: str) -> int:
    """Strictly greater than every earlier incarnation of this node (peers' replay windows need it):
    microseconds of wall time, bumped past the last one recorded in the state directory."""
    path = os.path.join(state_dir, "incarnation")
    last = 0
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        last = int(f.read().strip())
    inc = max(time.time_ns() // 1000, last + 1)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(inc))
    os.replace(tmp, path)
    return inc


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, agent: Agent, channel: str) -> None:
        self.agent, self.channel = agent, channel

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.agent.datagram_received(data, self.channel)

    def error_received(self, exc: Exception) -> None:
        self.agent.counters["udp_errors"] += 1


class Agent(Fencing):
    """One node of an HA group: ``await Agent(cfg, key).run()`` until SIGTERM."""

    def __init__(self, cfg: AgentConfig, key: bytes, *, install_signals: bool = True) -> None:
        self.cfg, self._key = cfg, key
        self._install_signals = install_signals
        hb, node = cfg.heartbeat, cfg.node
        os.makedirs(node.state_dir, exist_ok=True)
        self.incarnation = next_incarnation(node.state_dir)
        now = time.monotonic()
        self.started = now
        self._make_cores(now)
        self.witness = (
            WitnessClient(key, node.group, node.id, self.incarnation, lease=cfg.lease)
            if cfg.witness
            else None
        )
        self.vips = VipManager(
            [
                VipSpec(
                    address=v.address,
                    interface=v.interface,
                    garp_count=v.garp_count,
                    garp_interval=v.garp_interval_ms / 1000,
                )
                for v in cfg.vips
            ]
        )
        self.hooks = Hooks(cfg.hooks, node_id=node.id, group=node.group)
        self.links = AgentLinks(
            key=key,
            node_id=node.id,
            group=node.group,
            incarnation=self.incarnation,
            port=hb.port,
            channels={c.name: c.address for c in cfg.channels},
            peers={p.id: dict(p.addresses) for p in cfg.peers},
            on_closed=self._link_closed,
        )
        self.guard: GuardClient | None = None
        verbose = 2 if log.isEnabledFor(logging.DEBUG) else int(log.isEnabledFor(logging.INFO))
        self.sessions = Sessions(cfg, key, verbose=verbose)
        self.faults = LocalFaults()  # why the node is in FAULT, by source
        # [[services]] with a command; a crash loop is a local fault until it is reset
        self.services = AgentServices(cfg, self._local_fault, self._local_fault_cleared)
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self.role_since = now
        self.counters: collections.Counter[str] = collections.Counter()
        self.realtime_failed: list[str] = []
        self.neigh_tuned: list[str] = []
        self._peer_addr = {(p.id, ch): a for p in cfg.peers for ch, a in p.addresses.items()}
        self._transports: dict[str, asyncio.DatagramTransport] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._due: float | None = None  # when the armed timer should fire (_woke)
        self._next_feed = float("inf")
        self._last_feed: float | None = None  # when the guard was last fed (armed: master)
        self._feed_cpu = 0.0  # this thread's CPU time then (a stall says busy or starved)
        self._stop = asyncio.Event()
        self._stopping = False
        self._ready = False
        self._acquiring = self._announce_pending = False  # VIPs wait for the session restore
        self._api: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _make_cores(self, now: float) -> None:
        """(Re)create the sans-IO cores with their clocks starting at ``now``. run() calls it
        again once the sockets are open, so the INIT listening window really is spent listening
        and not in start-up (imports, the guard, the API)."""
        cfg, hb, node = self.cfg, self.cfg.heartbeat, self.cfg.node
        self.membership = Membership(
            MembershipConfig.from_agent_config(cfg), key=self._key, incarnation=self.incarnation,
            now=now,
        )  # fmt: skip
        self.roles = R.RoleMachine(
            R.RoleConfig(
                node_id=node.id,
                priority=node.priority,
                preempt=cfg.failover.preempt,
                preempt_delay=cfg.failover.preempt_delay_ms / 1000,
                interval=hb.interval,
                dead_after=hb.dead_after,
                witness=cfg.witness is not None,
                lease=cfg.lease if cfg.witness is not None else 0.0,
            ),
            now=now,
        )

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        # First, before any other socket: see VipManager.prepare (a prompt EOF when killed).
        self.vips.prepare()
        # We are INIT: whatever a crashed predecessor left on this node is not ours to serve.
        self.vips.release()
        for ch in cfg.channels:
            transport, _ = await loop.create_datagram_endpoint(
                lambda ch=ch.name: _Udp(self, ch), local_addr=(ch.address, cfg.heartbeat.port)
            )
            self._transports[ch.name] = transport
        if cfg.heartbeat.tune_neighbours:
            from nonstop.agent.neigh import interfaces_of, tune_retrans

            ifaces = interfaces_of([c.address for c in cfg.channels])
            self.neigh_tuned = tune_retrans(set(ifaces.values()), cfg.heartbeat.interval_ms)
        self.guard = GuardClient.spawn()
        loop.add_reader(self.guard.fileno(), self._guard_readable)
        # the backup side of every protected service, from the start
        self.sessions.start(loop, self._worker_exited)
        await self.services.start()  # after the worker: its endpoints exist
        if cfg.services:
            self._spawn(self._watch_sessions())
        await self.links.start()
        from nonstop.agent.api import AgentApi

        self._api = AgentApi(self)
        await self._api.start()
        if cfg.failover.realtime:
            self.realtime_failed = make_realtime(lock_memory=cfg.failover.lock_memory)
        if self._install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        log.info(
            "nonstop %s agent %s (group %d, priority %d, incarnation %d) up on %s, "
            "heartbeat %d ms x %d",
            __version__,
            cfg.node.id,
            cfg.node.group,
            cfg.node.priority,
            self.incarnation,
            ", ".join(c.name for c in cfg.channels),
            cfg.heartbeat.interval_ms,
            cfg.heartbeat.dead_after,
        )
        now = time.monotonic()
        self._make_cores(now)
        self.faults.reapply(self.roles, now)  # a crash loop during start-up stays a fault
        self.role_since = now
        self._ready = True
        self._pump(now)
        try:
            await self._stop.wait()
        finally:
            await self._shutdown()
            if self._install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    def request_stop(self) -> None:
        """Graceful stop: hand over explicitly. A second call stops without waiting."""
        if self._stopping:
            self._stop.set()
            return
        self._stopping = True
        now = time.monotonic()
        self.roles.stop(now)
        self._pump(now)
        self.membership.leave(now)
        self._send_heartbeats(now)
        self._stop.set()

    async def _shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._stopping:  # stopped by an exception: still hand over
            self._stopping = True
            with contextlib.suppress(Exception):
                self.roles.stop(time.monotonic())
                self._pump(time.monotonic())
        self.vips.release()
        await self.services.stop()  # before the worker goes: no restarts for a lost endpoint
        self.sessions.close(asyncio.get_running_loop())
        if self.guard is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.guard.fileno())
            self.guard.disarm()
            self.guard.close()
        await self.links.close()
        if self._api is not None:
            await self._api.close()
        for t in self._transports.values():
            t.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.hooks.wait()
        self.vips.close()
        log.info("agent %s stopped", self.cfg.node.id)

    # -- inputs ---------------------------------------------------------------------------
    def datagram_received(self, data: bytes, channel: str) -> None:
        if not self._ready:  # start-up: the cores are re-made when the loop begins
            return
        now = time.monotonic()
        self._entered(now)
        if data[:4] == b"NSWT":
            if self.witness is not None:
                try:
                    reply = self.witness.receive(data, now)
                except RemoteProtocolError as e:
                    self.counters[f"witness_{e.counter}"] += 1
                    return
                log.debug("witness: %s", reply)
                if isinstance(reply, LeaseGranted):
                    self.sessions.lease_term = reply.term
                    self.roles.lease_granted(reply.until, now, reply.term)
                elif isinstance(reply, LeaseDenied):
                    self.roles.lease_denied(reply.holder, now, reply.remaining)
        else:
            self.membership.receive_datagram(data, channel, now)
        self._pump(now)

    def _link_closed(self, peer: str, channel: str, reason: str) -> None:
        if not self._ready:
            return
        now = time.monotonic()
        self._entered(now)
        self.counters["link_closed"] += 1
        self.membership.link_closed(peer, now, reason)
        self._pump(now)

    async def _watch_sessions(self) -> None:
        """Refresh the worker's status; hold a planned handover (preemption) until the backup
        holds a whole copy of every protected connection."""
        while not self._stopping:
            was_master = self.roles.role == Role.MASTER
            services = await self.sessions.refresh()
            masters = [s for s in services if s.get("role") == "master"]
            # only a status taken while master, with every service's worker side master and
            # protecting: a status from before a promotion (every service a backup: all() of
            # nothing) let a handover through at once, to a node holding no copy (8 resets)
            self.roles.handover_ready = not self.cfg.services or (
                was_master and self.roles.role == Role.MASTER
                and len(masters) == len(self.cfg.services)
                and all(s.get("sync", {}).get("protecting", False) for s in masters)
            )
            await asyncio.sleep(0.05)

    def _worker_exited(self) -> None:
        now = time.monotonic()
        log.critical("session worker exited: this node can no longer keep TCP sessions")
        self.faults.declare(self.roles, "session worker", "session worker exited", now)
        self._pump(now)

    def _local_fault(self, source: str, reason: str) -> None:
        now = time.monotonic()
        self.faults.declare(self.roles, source, reason, now)
        self._pump(now)

    def _local_fault_cleared(self, source: str, why: str) -> None:
        now = time.monotonic()
        if self.faults.clear(self.roles, source, why, now) and self.faults.causes:
            log.warning("%s, but the node stays at fault: %s", why, self.faults.summary())
        self._pump(now)

    def reset_service(self, name: str) -> dict[str, Any]:
        """``nonstop service reset NAME``: clear the crash loop of a supervised service (or of
        one instance) and withdraw the local fault it caused. KeyError if no such service."""
        before, t0 = str(self.roles.role), time.monotonic()
        rows = self.services.reset(name)  # the fault is withdrawn from within, on the event
        return {
            "node": self.cfg.node.id,
            "service": name,
            "instances": rows,
            "changed": any(r["cleared"] for r in rows),
            "role_before": before,
            "role": str(self.roles.role),
            "reason": self.roles.reason,
            "role_changes": [
                {k: h[k] for k in ("old", "new", "reason")}
                for h in self.history
                if h["at_monotonic"] >= t0
            ],
            "faults": list(self.faults.causes.values()),
        }

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic()
        self._entered(now)
        self.membership.handle_timer(now)
        self.roles.handle_timer(now)
        self._pump(now)

    # -- the pump: drain both cores, act, send, re-arm --------------------------------------
    def _pump(self, now: float) -> None:
        m, r = self.membership, self.roles
        for _ in range(100):  # bounded: each pass only drains what the previous one queued
            busy = False
            while (ev := m.next_event()) is not None:
                busy = True
                self._membership_event(ev, now)
            while (act := r.next_action()) is not None:
                busy = True
                self._act(act, now)
            while (rc := r.next_event()) is not None:
                busy = True
                self._role_changed(rc)
            if not busy:
                break
        flags = r.flags_for_heartbeat()
        if r.role != Role.MASTER and self.sessions.sync_ready:
            flags |= FLAG_SYNC_READY  # a master syncs to this node only once it listens
        m.set_local(role=r.role, priority=self.cfg.node.priority, flags=flags)
        if self.cfg.services:
            views = {p.id: self.membership.peer(p.id) for p in self.cfg.peers}
            self.sessions.peers_changed(r.role, views)
        self._send_heartbeats(now)
        if self.guard is not None and self.roles.role == Role.MASTER and now >= self._next_feed:
            self.guard.feed()
            self._last_feed, self._feed_cpu = now, time.thread_time()
            self._next_feed = now + self.cfg.heartbeat.interval / 2
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = min(
            self.membership.get_timer(),
            self.roles.get_timer() or float("inf"),
            self._next_feed if self.roles.role == Role.MASTER else float("inf"),
        )
        if self._timer is not None:
            if self._timer.when() <= deadline:
                return
            self._timer.cancel()
        if self._stopping:
            self._timer = self._due = None
            return
        self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)
        self._due = deadline

    def _send_heartbeats(self, now: float) -> None:
        for out in self.membership.datagrams_to_send(now):
            addr = self._peer_addr.get((out.peer, out.channel))
            t = self._transports.get(out.channel)
            if addr is None or t is None:
                continue
            t.sendto(out.data, (addr, self.cfg.heartbeat.port))

    def _send_witness(self, data: bytes) -> None:
        w = self.cfg.witness
        assert w is not None
        for ch, addr in w.addresses.items():
            t = self._transports.get(ch)
            if t is not None:
                t.sendto(data, (addr, w.port))

    def _membership_event(self, ev: object, now: float) -> None:
        r = self.roles
        if isinstance(ev, PeerJoined | PeerStateChanged):
            view = self.membership.peer(ev.peer)
            if view is not None:
                r.peer_seen(ev.peer, view.role, view.priority, view.flags, now)
                if view.role == Role.MASTER:
                    self.sessions.invalidate_park(f"peer {ev.peer} was seen as master")
            if isinstance(ev, PeerJoined):
                log.info("peer %s joined", ev.peer)
        elif isinstance(ev, PeerLost):
            if ev.reason == "left":  # already handled as PeerLeft
                return
            log.warning("peer %s lost: %s", ev.peer, ev.reason)
            if self.cfg.witness is None:  # out of sight, it may serve: nothing tells us
                self.sessions.invalidate_park(f"peer {ev.peer} was lost from sight")
            r.peer_lost(ev.peer, ev.reason, now, proven_dead=ev.proven_dead)
        elif isinstance(ev, PeerLeft):
            log.info("peer %s left (graceful stop)", ev.peer)
            r.peer_left(ev.peer, now)
        elif isinstance(ev, ChannelFaulted):
            self.counters["channel_faults"] += 1
            log.warning("channel fault: %s silent on %s (other channels up)", ev.peer, ev.channel)
        elif isinstance(ev, ChannelRecovered):
            log.info("channel recovered: %s heard again on %s", ev.peer, ev.channel)
        elif isinstance(ev, PeerRestarted):
            log.info(
                "peer %s restarted (incarnation %d -> %d)",
                ev.peer,
                ev.old_incarnation,
                ev.new_incarnation,
            )

    def _act(self, act: object, now: float) -> None:
        if isinstance(act, R.AcquireVips):
            # the connections first, then the VIPs (in _acquired): no segment of a peer finds
            # this node without its connection; the loop goes on meanwhile
            self._acquiring = True
            if not self.sessions.promote(self._acquired):
                self._acquired()
        elif isinstance(act, R.ReleaseVips):
            self._drop_vips()
            self.sessions.demote()
            if not self._stopping:  # a graceful stop stops them instead
                # each instance's own log line says it; why the node stepped down: the role
                # change's, next
                self.services.restart_running("the node stepped down: back as a standby")
        elif isinstance(act, R.SuspendVips):  # rule 9: the connections and services stay
            self.counters["freezes"] += 1
            log.error("%s: the VIPs go down while the witness is asked whether another node "
                      "held the lease meanwhile", act.reason)
            self.sessions.hush(True)  # restored sockets can send without the VIP
            self._drop_vips()
        elif isinstance(act, R.ResumeVips):
            self.counters["freezes_ridden_out"] += 1
            log.warning("%s", act.reason)
            self.sessions.hush(False)
            self._acquiring = True
            self._acquired()
            self._spawn(self.vips.announce())
        elif isinstance(act, R.Announce):
            if self._acquiring:
                self._announce_pending = True
            else:
                self._spawn(self.vips.announce())
        elif isinstance(act, R.RequestLease):
            log.debug("asking the witness for the lease (%s)", self.roles.reason)
            if self.witness is not None:
                self._send_witness(self.witness.request(now, want=True))
        elif isinstance(act, R.ReleaseLease):
            log.debug("releasing the witness lease (%s, %s)", self.roles.role, self.roles.reason)
            if self.witness is not None:
                self._send_witness(self.witness.request(now, want=False, served=act.served))
        elif isinstance(act, R.SendHeartbeatNow):
            self.membership.send_now()
        else:  # pragma: no cover - a new action the adapter does not know is a bug
            raise TypeError(f"unknown action {act!r}")

    def _drop_vips(self) -> None:
        """The VIPs go (an acquisition under way is dropped) and the guard stands down."""
        self._acquiring = self._announce_pending = False
        self.vips.release()
        if self.guard is not None:
            self.guard.disarm()
        self._next_feed = float("inf")
        self._last_feed = None

    def _acquired(self) -> None:
        """Add the VIPs (the session worker restored the connections, or there are none)."""
        if not self._acquiring:  # released while the worker restored: the worker demotes too
            return
        self._acquiring = False
        if self.guard is not None:  # armed first: a kill right after the add is fenced (EOF)
            # ...with room for the add itself: netlink waits for the kernel's rtnl lock, which
            # namespace or link churn elsewhere on the node can hold for tens of milliseconds
            self.guard.arm(max(1.0, self.cfg.fence_timeout), self.vips.specs)
        self.vips.acquire()
        self.sessions.mark("vips_added")
        now = time.monotonic()
        if self.guard is not None:
            self.guard.arm(self.cfg.fence_timeout, self.vips.specs)
            self._last_feed, self._feed_cpu = now, time.thread_time()
            self._next_feed = now + self.cfg.heartbeat.interval / 2
        if self._announce_pending:
            self._announce_pending = False
            # once the peers know where the VIPs are: provoke both ends of every restored
            # connection (nonstop.session.kick), so neither waits out its backed-off RTO
            self._spawn(self.vips.announce(after_first=self.sessions.kick))
        if self._ready:
            self._arm_timer()

    def _role_changed(self, rc: R.RoleChanged) -> None:
        self.role_since = rc.at
        self.counters[f"became_{rc.new}"] += 1
        entry = {
            "at": time.time(),
            "at_monotonic": rc.at,
            "old": str(rc.old),
            "new": str(rc.new),
            "reason": rc.reason,
        }
        self.history.append(entry)
        log.warning("role %s -> %s: %s", rc.old, rc.new, rc.reason)
        if rc.new == Role.MASTER and self.cfg.services:
            self.roles.handover_ready = False  # until a status taken as master says protecting
        self.hooks.role_changed(rc.old, rc.new, rc.reason)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- views ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return agent_status(self)
