"""The groups core: which groups this node should master, sans-IO (time is an input).

Inputs: the last store read (``set_view``), lease renewals and losses, what the heartbeats say
about the other members (``set_peers``), and the results of the compare-and-set calls. Output:
actions (take/drop a group's VIP, acquire/release its master key, clear a switchover) and one
sentence per decision (Patroni's ``ha.py`` style), kept as :class:`GroupChanged` events.

Rules, per group G this node may serve (it has a priority for G):

1. A node holds G's VIP only while it holds G's master key on its own lease *and* its lease is
   surely alive: ``now < lease_until - drop_margin`` (``lease_until`` = when the renewal was sent +
   TTL, so it ends before the store's own clock does).
2. Lease not renewed in time: with failsafe on, the master keeps its VIPs while it hears every
   member directly, every member says it hears this node (a bit per node in the heartbeat flags),
   and no member says it still reaches the store (then the group should move there instead).
   Otherwise it drops the VIPs. A master in failsafe mode sets ``FLAG_FAILSAFE`` in its heartbeats.
3. A node never acquires anything while it heard a failsafe master within ``failsafe_hold``
   (longer than that master's fence timeout + detection): never two masters.
4. A free group is acquired by the switchover target when there is a live one, else by the live
   candidate of highest priority (ties: node id); the next ones wait ``stagger`` per rank, in
   case the best one cannot act. Live = its member key is in the store (its lease lives). For
   ``startup_grace`` after its first renewal a node ranks itself among every configured
   candidate, live or not, so the groups spread by priority when the nodes start together.
5. Switchover: the master drops the VIP first, then releases the key at the revision it holds.
   No automatic preemption: a healthy master keeps its groups until asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from nonstop.store.base import ClusterView, GroupRecord

FLAG_FAILSAFE = 1 << 2  # bits 0-1 are membership's (witness lease, handover request)
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
    stagger: float = 0.2
    startup_grace: float = 1.0  # after our first renewal, rank among every candidate, live or not

    def __post_init__(self) -> None:
        if self.node not in self.nodes:
            raise ValueError(f"{self.node!r} is not among the nodes {self.nodes!r}")
        if self.ttl <= self.interval * self.misses + self.margin:
            raise ValueError("ttl must exceed interval * misses + margin")


def hear_bit(nodes: tuple[str, ...], node: str) -> int:
    return 1 << (HEAR_SHIFT + nodes.index(node))


@dataclass
class _State:
    view: ClusterView | None = None
    view_at: float = float("-inf")
    session: int | None = None
    lease_until: float | None = None
    store_ok_at: float = float("-inf")
    peers: dict[str, PeerHeard] = field(default_factory=dict)
    failsafe_seen: dict[str, float] = field(default_factory=dict)
    holding: set[str] = field(default_factory=set)
    acquired: dict[str, int] = field(default_factory=dict)  # group -> revision we got it at
    pending: set[str] = field(default_factory=set)
    free_since: dict[str, float] = field(default_factory=dict)
    failsafe_active: bool = False
    started_at: float | None = None


class GroupsCore:
    def __init__(self, cfg: CoreConfig) -> None:
        self.cfg = cfg
        self.s = _State()
        self.events: list[GroupChanged] = []
        self.mine = [g for g, prio in cfg.groups.items() if cfg.node in prio]

    # -- inputs -------------------------------------------------------------------------
    def set_view(self, view: ClusterView, now: float) -> None:
        s = self.s
        if s.view is not None and view.revision < s.view.revision:
            return  # an older read finishing late
        s.view, s.view_at, s.store_ok_at = view, now, now
        for g in self.cfg.groups:
            if g in view.groups:
                s.free_since.pop(g, None)
            else:
                s.free_since.setdefault(g, now)

    def lease_renewed(self, session: int, until: float, now: float) -> None:
        s = self.s
        if s.session != session:
            s.acquired.clear()
        if s.started_at is None:
            s.started_at = now
        s.session, s.lease_until, s.store_ok_at = session, until, now

    def lease_lost(self, now: float) -> None:
        """The store said our session is gone: every key on it is gone too."""
        self.s.session = self.s.lease_until = None
        self.s.acquired.clear()

    def set_peers(self, peers: Mapping[str, PeerHeard], now: float) -> None:
        self.s.peers = dict(peers)
        for p, h in peers.items():
            if h.alive and h.flags & FLAG_FAILSAFE:
                self.s.failsafe_seen[p] = now

    def acquire_done(self, group: str, revision: int | None, now: float) -> None:
        self.s.pending.discard(group)
        if revision is not None:
            self.s.acquired[group] = revision

    def release_done(self, group: str, now: float) -> None:
        self.s.pending.discard(group)
        self.s.acquired.pop(group, None)

    # -- views --------------------------------------------------------------------------
    def lease_ok(self, now: float) -> bool:
        u = self.s.lease_until
        return u is not None and now < u - self.cfg.margin

    def store_ok(self, now: float) -> bool:
        return now - self.s.store_ok_at <= self.cfg.interval * self.cfg.misses

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

    def failsafe_check(self) -> tuple[bool, str]:
        if not self.cfg.failsafe:
            return False, "failsafe mode is off"
        me = hear_bit(self.cfg.nodes, self.cfg.node)
        for n in self.cfg.nodes:
            if n == self.cfg.node:
                continue
            h = self.s.peers.get(n)
            if h is None or not h.alive:
                return False, f"{n} is not heard"
            if not h.flags & me:
                return False, f"{n} does not hear this node"
            if h.flags & FLAG_STORE_OK:
                return False, f"{n} still reaches the store"
        return True, "every member is heard and hears this node"

    def deferring(self, now: float) -> str | None:
        for p, t in self.s.failsafe_seen.items():
            if now - t < self.cfg.failsafe_hold:
                return p
        return None

    def get_timer(self, now: float) -> float:
        """The next instant a decision may change without any input."""
        t = [now + self.cfg.interval]
        if self.s.lease_until is not None and self.s.holding:
            t.append(self.s.lease_until - self.cfg.margin)
        return min(t)

    # -- the cycle ----------------------------------------------------------------------
    def _is_mine(self, group: str, rec: GroupRecord | None) -> bool:
        s = self.s
        if rec is not None and rec.holder == self.cfg.node and rec.lease == s.session:
            return True
        rev = s.acquired.get(group)
        return rec is None and rev is not None and (s.view is None or s.view.revision < rev)

    def _say(self, group: str, master: bool, reason: str, now: float) -> None:
        self.events.append(GroupChanged(group, master, reason, now))

    def cycle(self, now: float) -> list[Action]:
        s, cfg = self.s, self.cfg
        acts: list[Action] = []
        lease_ok = self.lease_ok(now)
        fs_ok, fs_why = self.failsafe_check()
        was_failsafe, s.failsafe_active = s.failsafe_active, False
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
                    ):
                        s.holding.discard(g)
                        s.pending.add(g)
                        acts += [DropVip(g), Release(g, rec.revision)]
                        self._say(g, False, f"handed {g} over to {sw.target} (switchover)", now)
                elif fs_ok:
                    s.failsafe_active = True
                    if not was_failsafe:
                        self._say(g, True, f"kept {g} in failsafe mode: store unreachable, "
                                  f"{fs_why}", now)  # fmt: skip
                else:
                    s.holding.discard(g)
                    acts.append(DropVip(g))
                    late = (
                        "no lease"
                        if s.lease_until is None
                        else (f"lease renewal {1000 * (now - s.lease_until + cfg.ttl):.0f} ms old")
                    )
                    self._say(g, False, f"dropped {g}: {late} and {fs_why}", now)  # fmt: skip
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
                if s.started_at is not None and now - s.started_at < cfg.startup_grace:
                    # just started: a better node may be starting too; let it come up first
                    prio = cfg.groups[g]
                    cands = sorted(prio, key=lambda n: (-prio[n], n))
                rank = cands.index(cfg.node)
                target_is_me = now - s.free_since.get(g, now) >= rank * cfg.stagger
            else:
                target_is_me = False
            if target_is_me:
                s.pending.add(g)
                acts.append(Acquire(g))
        return acts

    def take_events(self) -> list[GroupChanged]:
        ev, self.events = self.events, []
        return ev
