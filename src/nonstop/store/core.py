"""The groups core: which groups this node should master, sans-IO (time is an input).

Inputs: the last store read (``set_view``), lease renewals and losses, what the heartbeats say
about the other members (``set_peers``), and the results of the compare-and-set calls. Output:
actions (take/drop a group's VIP, acquire/release its master key, clear a switchover) and one
sentence per decision (Patroni's ``ha.py`` style), kept as :class:`GroupChanged` events.

Rules, per group G this node may serve (it has a priority for G):

1. A node holds G's VIP only while it holds G's master key on its own lease *and* its lease is
   surely alive: ``now < lease_until - drop_margin`` (``lease_until`` = when the renewal was sent +
   TTL, so it ends before the store's own clock does).
2. Lease not renewed in time (no renewal sent ``interval * misses`` ago): with failsafe on, the
   master is in *failsafe mode* while it hears every member directly, every member says it hears
   this node (a bit per node in the heartbeat flags), and no member says it still reaches the
   store (then the group should move there instead). Each such cycle grants it the VIPs until
   ``now + fence_timeout``. It sets ``FLAG_FAILSAFE`` in its heartbeats while in that mode.
   Failsafe starts while the lease is still good, so its grant overlaps the lease's: the guard
   (armed with :meth:`GroupsCore.hold_deadline`) never fires in between. A member that goes
   quiet (or stops hearing us) ends the extensions but not the grant already given: one stall
   of a loaded box is not a reason to drop, and the guard enforces the grant's end anyway. A
   member that reaches the store ends the grant at once (the group should move there).
3. A node never acquires anything while it heard a failsafe master within ``failsafe_hold``
   (longer than that master's fence timeout + detection): never two masters.
4. A free group is acquired by the switchover target when there is a live one, else by the live
   candidate of highest priority (ties: node id); the next ones wait ``stagger`` per rank, in
   case the best one cannot act. Live = its member key is in the store (its lease lives). For
   ``startup_grace`` after its first renewal a node takes no group that nobody held yet (a cold
   start) while a better configured candidate exists, live or not (a live one may be holding
   back: a slow first lease grant put a starting node in failsafe mode, its peers deferred, and
   it took their groups by stagger), so the groups spread by priority when the nodes start
   together; a group that had a master fails over at once.
5. Switchover: the master drops the VIP first, then releases the key at the revision it holds.
   No automatic preemption: a healthy master keeps its groups until asked. A group with
   protected services (``synced``) is handed over only once its session sync reaches the target
   with a whole copy (``sync_ready``), or after ``handover_timeout`` (said in the reason).
6. Session sync: as G's master, this node syncs G's connections to ``sync_target(G)`` (the node
   that takes G next, among those the heartbeats hear). Its connections parked at a step-down are
   restored later only if the key is still ours at the same revision on the same session
   (``held_revision``): a key nobody deleted is a key nobody else held.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from nonstop.store.base import ClusterView, GroupRecord

FLAG_FAILSAFE = 1 << 2  # bits 0-1 and 4 are membership's (witness lease, handover request,
# sync ready)
FLAG_STORE_OK = 1 << 3
HEAR_SHIFT = 8  # bit HEAR_SHIFT + i: "I hear node i" (i = index in the members list)


@dataclass(frozen=True, slots=True)
class TakeVip:
    group: str


@dataclass(frozen=True, slots=True)
class DropVip:
    group: str


@dataclass(frozen=True, slots=True)
class Acquire:
    group: str


@dataclass(frozen=True, slots=True)
class Release:
    group: str
    revision: int


@dataclass(frozen=True, slots=True)
class ClearSwitchover:
    group: str
    revision: int


Action = TakeVip | DropVip | Acquire | Release | ClearSwitchover


@dataclass(frozen=True, slots=True)
class GroupChanged:
    group: str
    master: bool  # this node now holds (True) or no longer holds (False) the group's VIP
    reason: str
    at: float

    def __post_init__(self) -> None:
        if not self.reason:
            raise ValueError("GroupChanged needs a reason")


@dataclass(frozen=True, slots=True)
class PeerHeard:
    alive: bool
    flags: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreConfig:
    node: str
    nodes: tuple[str, ...]
    groups: Mapping[str, Mapping[str, int]]  # group -> node -> priority
    ttl: float = 1.0
    interval: float = 0.1  # keep-alive interval
    misses: int = 3
    margin: float = 0.2
    failsafe: bool = True
    failsafe_hold: float = 1.0
    fence_timeout: float = 0.7  # how long one failsafe cycle lets this node keep its VIPs
    stagger: float = 0.2
    startup_grace: float = 1.0  # after our first renewal, rank among every candidate, live or not
    synced: frozenset[str] = frozenset()  # groups with protected services (session sync)
    handover_timeout: float = 5.0  # a switchover waits this long at most for the sync

    def __post_init__(self) -> None:
        if self.node not in self.nodes:
            raise ValueError(f"{self.node!r} is not among the nodes {self.nodes!r}")
        if self.ttl <= self.interval * self.misses + self.margin:
            raise ValueError("ttl must exceed interval * misses + margin")
        if self.failsafe_hold <= self.fence_timeout:
            raise ValueError("failsafe_hold must exceed fence_timeout")
        if self.fence_timeout <= self.interval * self.misses:
            raise ValueError("fence_timeout must exceed interval * misses")


def hear_bit(nodes: tuple[str, ...], node: str) -> int:
    return 1 << (HEAR_SHIFT + nodes.index(node))


@dataclass
class _State:
    view: ClusterView | None = None
    view_at: float = float("-inf")
    session: int | None = None
    lease_until: float | None = None
    renewed_at: float | None = None  # when the last successful renewal was sent
    failsafe_until: float = float("-inf")  # the last failsafe grant
    store_ok_at: float = float("-inf")
    peers: dict[str, PeerHeard] = field(default_factory=dict)
    failsafe_seen: dict[str, float] = field(default_factory=dict)
    holding: set[str] = field(default_factory=set)
    acquired: dict[str, int] = field(default_factory=dict)  # group -> revision we got it at
    released: dict[str, tuple[int, float]] = field(default_factory=dict)  # group -> (rev, when)
    pending: set[str] = field(default_factory=set)
    free_since: dict[str, float] = field(default_factory=dict)
    seen_held: set[str] = field(default_factory=set)  # groups some node held since we started
    failsafe_active: bool = False
    started_at: float | None = None
    sync_ready: dict[str, str] = field(default_factory=dict)  # group -> node with a whole copy
    quiet_since: dict[str, float] = field(default_factory=dict)  # peer -> not heard since
    handover_since: dict[tuple[str, str], float] = field(default_factory=dict)


class GroupsCore:
    def __init__(self, cfg: CoreConfig) -> None:
        self.cfg = cfg
        self.s = _State()
        self.events: list[GroupChanged] = []
        self.notes: list[str] = []  # decisions that change no group (failsafe entered, left)
        self.mine = [g for g, prio in cfg.groups.items() if cfg.node in prio]

    # -- inputs -------------------------------------------------------------------------
    def set_view(self, view: ClusterView, now: float, sent: float | None = None) -> None:
        """``sent``: when the read was sent. A read that answers late proves the store was
        reachable when it was sent, not now (``FLAG_STORE_OK`` must not outlive it)."""
        s = self.s
        if s.view is not None and view.revision < s.view.revision:
            return  # an older read finishing late
        at = now if sent is None else min(sent, now)
        s.view, s.view_at, s.store_ok_at = view, at, max(s.store_ok_at, at)
        for g in self.cfg.groups:
            if g in view.groups:
                s.free_since.pop(g, None)
                s.seen_held.add(g)
            else:
                s.free_since.setdefault(g, now)

    def lease_renewed(self, session: int, until: float, now: float) -> None:
        s = self.s
        if s.session != session:
            s.acquired.clear()
        if s.started_at is None:
            s.started_at = now
        s.session, s.lease_until, s.renewed_at = session, until, now
        s.store_ok_at = max(s.store_ok_at, now)

    def lease_lost(self, now: float) -> None:
        """The store said our session is gone: every key on it is gone too (and any failsafe
        grant: someone else may take them now)."""
        s = self.s
        s.session = s.lease_until = s.renewed_at = None
        s.failsafe_until = float("-inf")
        s.acquired.clear()

    def fenced(self, reason: str, now: float) -> None:
        """The guard deleted every VIP (the agent was too late to renew or drop them)."""
        s = self.s
        for g in sorted(s.holding):
            self._say(g, False, f"fenced {g}: {reason}", now)
        s.holding.clear()
        s.failsafe_active = False
        s.failsafe_until = float("-inf")

    def set_peers(self, peers: Mapping[str, PeerHeard], now: float) -> None:
        self.s.peers = dict(peers)
        for p, h in peers.items():
            if h.alive and h.flags & FLAG_FAILSAFE:
                self.s.failsafe_seen[p] = now
            if h.alive:
                self.s.quiet_since.pop(p, None)
            else:
                self.s.quiet_since.setdefault(p, now)

    def acquire_done(self, group: str, revision: int | None, now: float) -> None:
        self.s.pending.discard(group)
        if revision is not None:
            self.s.acquired[group] = revision

    def set_sync_ready(self, group: str, node: str | None) -> None:
        """The session worker says ``node`` holds a whole copy of ``group``'s connections."""
        if node is None:
            self.s.sync_ready.pop(group, None)
        else:
            self.s.sync_ready[group] = node

    def release_done(self, group: str, revision: int, now: float) -> None:
        """The release call returned (whatever its result): until a read sent after ``now``
        says otherwise, the key at ``revision`` is no longer ours."""
        self.s.pending.discard(group)
        self.s.acquired.pop(group, None)
        self.s.released[group] = (revision, now)

    # -- views --------------------------------------------------------------------------
    def lease_ok(self, now: float) -> bool:
        u = self.s.lease_until
        return u is not None and now < u - self.cfg.margin

    def store_ok(self, now: float) -> bool:
        return now - self.s.store_ok_at <= self.cfg.interval * self.cfg.misses

    def renewal_late(self, now: float) -> bool:
        r = self.s.renewed_at
        return r is None or now - r > self.cfg.interval * self.cfg.misses

    def hold_deadline(self) -> float:
        """The last instant this node may hold its VIPs without new input: the lease's end
        less the margin, or the last failsafe grant, whichever is later. The guard is armed
        with it, so a hung agent's VIPs go then."""
        u = self.s.lease_until
        lease = u - self.cfg.margin if u is not None else float("-inf")
        return max(lease, self.s.failsafe_until)

    @property
    def holding(self) -> frozenset[str]:
        return frozenset(self.s.holding)

    @property
    def failsafe_active(self) -> bool:
        return self.s.failsafe_active

    def live(self) -> set[str]:
        return set(self.s.view.members) if self.s.view is not None else set()

    def candidates(self, group: str) -> list[str]:
        """Live nodes that may serve ``group``, best first."""
        prio = self.cfg.groups[group]
        live = self.live()
        return sorted((n for n in prio if n in live), key=lambda n: (-prio[n], n))

    def master_of(self, group: str) -> str | None:
        rec = self.s.view.groups.get(group) if self.s.view is not None else None
        return rec.holder if rec is not None else None

    def standby_of(self, group: str) -> str | None:
        """The node that takes ``group`` if its master goes: the one to receive its session
        sync. A live switchover target first, else the best live candidate but the master."""
        master = self.master_of(group)
        sw = self.s.view.switchovers.get(group) if self.s.view is not None else None
        cands = [n for n in self.candidates(group) if n != master]
        if sw is not None and sw.target in cands:
            return sw.target
        return cands[0] if cands else None

    def sync_target(self, group: str, now: float) -> str | None:
        """Where this node, as ``group``'s master, sends its session sync: the live switchover
        target, else the best live candidate (``standby_of``), leaving out a node the heartbeats
        have not heard for ``interval * misses`` (a dead standby would stall the clamp until
        its lease expires; a shorter blip of a loaded box must not move the sync: each move
        costs a whole copy). None: not ours, or nobody."""
        if group not in self.s.holding:
            return None
        grace = self.cfg.interval * self.cfg.misses
        quiet = {p for p, t in self.s.quiet_since.items() if now - t > grace}
        quiet |= {n for n in self.cfg.nodes if n not in self.s.peers and n != self.cfg.node}
        cands = [n for n in self.candidates(group) if n != self.cfg.node and n not in quiet]
        sw = self.s.view.switchovers.get(group) if self.s.view is not None else None
        if sw is not None and sw.target in cands:
            return sw.target
        return cands[0] if cands else None

    def held_revision(self, group: str) -> int | None:
        """The revision of ``group``'s master key if it is ours on this session (None: not
        ours). With the session, the proof used for parked connections."""
        s = self.s
        rec = s.view.groups.get(group) if s.view is not None else None
        if rec is not None:
            ours = rec.holder == self.cfg.node and rec.lease == s.session
            return rec.revision if ours and s.session is not None else None
        return s.acquired.get(group)

    def _handover_ready(self, group: str, target: str, now: float) -> bool:
        if group not in self.cfg.synced or self.s.sync_ready.get(group) == target:
            return True
        since = self.s.handover_since.setdefault((group, target), now)
        if now - since < self.cfg.handover_timeout:
            return False
        self.notes.append(f"{group}: no whole session copy on {target} after "
                          f"{self.cfg.handover_timeout:.1f} s: handing over anyway")  # fmt: skip
        return True

    def flags(self, now: float) -> int:
        f = 0
        for p, h in self.s.peers.items():
            if h.alive and p in self.cfg.nodes:
                f |= hear_bit(self.cfg.nodes, p)
        if self.s.failsafe_active:
            f |= FLAG_FAILSAFE
        if self.store_ok(now) and self.lease_ok(now):
            f |= FLAG_STORE_OK
        return f

    def failsafe_check(self) -> tuple[bool, str, bool]:
        """(ok, why, yield): ``yield`` when a member reaches the store (end any grant now)."""
        if not self.cfg.failsafe:
            return False, "failsafe mode is off", True
        me = hear_bit(self.cfg.nodes, self.cfg.node)
        quiet = ""
        for n in self.cfg.nodes:
            if n == self.cfg.node:
                continue
            h = self.s.peers.get(n)
            if h is None or not h.alive:
                quiet = quiet or f"{n} is not heard"
            elif h.flags & FLAG_STORE_OK:
                return False, f"{n} still reaches the store", True
            elif not h.flags & me:
                quiet = quiet or f"{n} does not hear this node"
        if quiet:
            return False, quiet, False
        return True, "every member is heard and hears this node", False

    def deferring(self, now: float) -> str | None:
        for p, t in self.s.failsafe_seen.items():
            if now - t < self.cfg.failsafe_hold:
                return p
        return None

    def get_timer(self, now: float) -> float:
        """The next instant a decision may change without any input."""
        t = [now + self.cfg.interval]
        if self.s.holding:
            if self.hold_deadline() > now:
                t.append(self.hold_deadline())
            if self.s.renewed_at is not None and not self.renewal_late(now):
                t.append(self.s.renewed_at + self.cfg.interval * self.cfg.misses + 1e-6)
        return min(t)

    # -- the cycle ----------------------------------------------------------------------
    def _is_mine(self, group: str, rec: GroupRecord | None) -> bool:
        s = self.s
        if rec is not None and rec.holder == self.cfg.node and rec.lease == s.session:
            rel = s.released.get(group)
            if rel is not None and rel[0] == rec.revision:
                if s.view_at <= rel[1]:
                    return False  # a view from before our release: the key is not ours
                del s.released[group]  # read after the release and still ours: it failed
            return True
        rev = s.acquired.get(group)
        return rec is None and rev is not None and (s.view is None or s.view.revision < rev)

    def _say(self, group: str, master: bool, reason: str, now: float) -> None:
        self.events.append(GroupChanged(group, master, reason, now))

    def _failsafe_step(self, now: float) -> str:
        """Enter, extend, hold or leave failsafe mode; return why failsafe is (not) possible."""
        s, cfg = self.s, self.cfg
        ok, why, yields = self.failsafe_check()
        was = s.failsafe_active
        if not s.holding or s.session is None or not self.renewal_late(now):
            s.failsafe_active = False
        elif ok:
            s.failsafe_active = True
            s.failsafe_until = now + cfg.fence_timeout
        elif yields:
            s.failsafe_active = False
            s.failsafe_until = float("-inf")
        else:  # a member went quiet: no extension, the grant already given still holds
            s.failsafe_active = now < s.failsafe_until
        if s.failsafe_active and not was:
            late = 1000 * (now - s.renewed_at) if s.renewed_at is not None else float("nan")
            held = ", ".join(sorted(s.holding))
            self.notes.append(f"failsafe mode: no lease renewal for {late:.0f} ms, {why}; "
                              f"keeping {held}")  # fmt: skip
        elif was and not s.failsafe_active:
            cause = why if self.renewal_late(now) else "lease renewed"
            self.notes.append(f"left failsafe mode: {cause}")
        return why

    def cycle(self, now: float) -> list[Action]:
        s, cfg = self.s, self.cfg
        acts: list[Action] = []
        lease_ok = self.lease_ok(now)
        fs_why = self._failsafe_step(now)
        keep = now < self.hold_deadline()
        for g in self.mine:
            rec = s.view.groups.get(g) if s.view is not None else None
            mine = self._is_mine(g, rec)
            sw = s.view.switchovers.get(g) if s.view is not None else None
            if g in s.holding:
                if lease_ok and not mine and s.view is not None:
                    s.holding.discard(g)
                    acts.append(DropVip(g))
                    who = rec.holder if rec else "nobody"
                    self._say(g, False, f"dropped {g}: the store names {who} its master", now)
                elif lease_ok:
                    if (
                        sw is not None
                        and sw.target != cfg.node
                        and sw.target in self.candidates(g)
                        and rec is not None
                        and g not in s.pending
                        and self._handover_ready(g, sw.target, now)
                    ):
                        s.holding.discard(g)
                        s.pending.add(g)
                        s.handover_since.pop((g, sw.target), None)
                        acts += [DropVip(g), Release(g, rec.revision)]
                        synced = " with its sessions synced there" if (
                            s.sync_ready.get(g) == sw.target) else ""  # fmt: skip
                        self._say(g, False, f"handed {g} over to {sw.target} (switchover)"
                                  f"{synced}", now)  # fmt: skip
                elif not keep:
                    s.holding.discard(g)
                    acts.append(DropVip(g))
                    late = (
                        "no lease"
                        if s.renewed_at is None
                        else f"lease renewal {1000 * (now - s.renewed_at):.0f} ms old"
                    )
                    self._say(g, False, f"dropped {g}: {late} and {fs_why}", now)
                continue
            if g in s.pending or not lease_ok:
                continue
            if mine:
                s.holding.add(g)
                acts.append(TakeVip(g))
                rev = rec.revision if rec is not None else s.acquired.get(g)
                self._say(g, True, f"took {g}: master key held at revision {rev}", now)
                if sw is not None and sw.target == cfg.node:
                    acts.append(ClearSwitchover(g, sw.revision))
                continue
            if rec is not None or s.view is None or not self.store_ok(now):
                continue
            if self.deferring(now) is not None:
                continue  # a master heard in failsafe mode may still hold the VIP
            cands = self.candidates(g)
            if sw is not None and sw.target in cands:
                target_is_me = sw.target == cfg.node
            elif cfg.node in cands:
                rank = cands.index(cfg.node)
                target_is_me = now - s.free_since.get(g, now) >= rank * cfg.stagger
                in_grace = s.started_at is not None and now - s.started_at < cfg.startup_grace
                if in_grace and g not in s.seen_held:  # a cold start, not a failover
                    # just started: a better node may be starting too, or be live but holding
                    # back (it heard a failsafe master: ours, when the store was slow to grant
                    # our first lease); let it come up and act first
                    prio = cfg.groups[g]
                    mine_key = (-prio[cfg.node], cfg.node)
                    if any((-p, n) < mine_key for n, p in prio.items()):
                        target_is_me = False
            else:
                target_is_me = False
            if target_is_me:
                s.pending.add(g)
                acts.append(Acquire(g))
        return acts

    def take_events(self) -> list[GroupChanged]:
        ev, self.events = self.events, []
        return ev

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes
