"""The worker pool: Active Stations Table of the workers, health, ejection, draining, balancing.

Sans-IO: every entry point that depends on time takes ``now`` (``time.monotonic()`` seconds).

A worker has one address per channel (seed 003: every worker sits on two independent channels).
Its state is derived from three sources:

- heartbeats, per channel (``heard(worker, channel, now)``): a channel is up while heard within
  ``dead_interval``; a worker with every channel down is ``down``, with some down ``degraded``
  (still used, through a channel that is up). Workers without heartbeats (``heartbeat=False``,
  e.g. a plain web server) skip this source.
- active checks (``check_result``): ``fall`` consecutive failures make it ``down``, ``rise``
  successes bring it back.
- passive observation by the proxy (``report_failure`` / ``report_success``): ``max_fails``
  consecutive failed requests eject it for ``cooldown`` seconds (nginx's max_fails/fail_timeout).

``leave`` puts a worker in ``draining``: no new requests; it is removed when its last connection
ends or the drain timeout passes. ``pick`` chooses among ``up`` and ``degraded`` workers with one of
four policies: round robin, least connections, smooth weighted round robin, consistent hash.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

UP, DEGRADED, DOWN, EJECTED, DRAINING = "up", "degraded", "down", "ejected", "draining"
USABLE = frozenset({UP, DEGRADED})


class Policy(enum.StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_CONN = "least_conn"
    WEIGHTED = "weighted"
    CONSISTENT_HASH = "consistent_hash"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What is known of a worker from the config or its registration message."""

    id: str
    addresses: dict[str, str]  # channel -> address, in order of preference
    port: int
    weight: int = 1
    rpc_port: int | None = None
    heartbeat: bool = False  # True: it sends heartbeats on its channels; watch them

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError(f"worker {self.id!r} needs at least one address")
        if not 1 <= self.weight <= 1000:
            raise ValueError(f"worker {self.id!r}: weight {self.weight} outside 1..1000")


@dataclass(frozen=True, slots=True)
class WorkerStateChanged:
    worker: str
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class WorkerJoined:
    worker: str
    how: str  # "config" | "registration"


@dataclass(frozen=True, slots=True)
class WorkerRemoved:
    worker: str
    reason: str


@dataclass(frozen=True, slots=True)
class StationRow:
    """One row of the Active Stations Table: a (worker, channel) pair."""

    worker: str
    channel: str
    address: str
    state: str  # up | down | unknown (no heartbeats expected or none yet)
    last_heard: float | None  # seconds ago


@dataclass(slots=True, eq=False)
class Worker:
    spec: WorkerSpec
    joined_at: float
    heard: dict[str, float] = field(default_factory=dict)  # channel -> last heard
    active_down: bool = False
    active_fails: int = 0
    active_oks: int = 0
    active_reason: str = ""
    passive_fails: int = 0
    ejected_until: float = 0.0
    draining_since: float | None = None
    conns: int = 0  # requests/connections in flight (least_conn, draining)
    state: str = UP
    how: str = "config"  # config | registration
    current_weight: int = 0  # smooth weighted round robin

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    policy: Policy = Policy.ROUND_ROBIN
    dead_interval: float = 0.06  # heartbeat silence that takes a channel down
    fall: int = 2
    rise: int = 1
    max_fails: int = 2
    cooldown: float = 2.0
    drain_timeout: float = 10.0
    vnodes: int = 64  # consistent hash points per unit of weight


class Pool:
    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config or PoolConfig()
        self.workers: dict[str, Worker] = {}
        self._events: list[WorkerStateChanged | WorkerJoined | WorkerRemoved] = []
        self._rr = 0
        self._ring: list[tuple[int, str]] = []
        self._ring_keys: list[int] = []
        self._ring_members: frozenset[str] = frozenset()

    # -- membership -----------------------------------------------------------------------------
    def add(self, spec: WorkerSpec, now: float, *, how: str = "config") -> None:
        """Add a worker, or update one (a re-registration: same id, maybe new addresses)."""
        old = self.workers.get(spec.id)
        if old is not None:
            old.spec = spec
            old.how = how
            old.draining_since = None
            self._update(old, now, "re-registered")
            return
        self.workers[spec.id] = Worker(spec, now, how=how)
        self._events.append(WorkerJoined(spec.id, how))
        self._update(self.workers[spec.id], now, "joined")

    def leave(self, worker_id: str, now: float, reason: str = "left") -> None:
        w = self.workers.get(worker_id)
        if w is None or w.draining_since is not None:
            return
        w.draining_since = now
        self._update(w, now, reason)
        self._maybe_remove(w, now)

    def remove(self, worker_id: str, reason: str) -> None:
        if self.workers.pop(worker_id, None) is not None:
            self._events.append(WorkerRemoved(worker_id, reason))

    def sync(self, specs: Iterable[WorkerSpec], now: float, *, how: str = "config") -> None:
        """Config reload: add new and changed workers, drain the ones no longer listed (only those
        that came from the config; registered workers stay)."""
        wanted = {s.id: s for s in specs}
        for s in wanted.values():
            w = self.workers.get(s.id)
            if w is None or w.spec != s or w.draining_since is not None:
                self.add(s, now, how=how)
        for wid in list(self.workers):
            if wid not in wanted and self.workers[wid].how == how:
                self.leave(wid, now, "removed from config")

    # -- inputs ---------------------------------------------------------------------------------
    def heard(self, worker_id: str, channel: str, now: float) -> bool:
        w = self.workers.get(worker_id)
        if w is None or channel not in w.spec.addresses:
            return False
        w.heard[channel] = now
        self._update(w, now, f"heard on {channel}")
        return True

    def check_result(self, worker_id: str, ok: bool, now: float, reason: str = "") -> None:
        w = self.workers.get(worker_id)
        if w is None:
            return
        c = self.config
        if ok:
            w.active_fails = 0
            w.active_oks += 1
            if w.active_down and w.active_oks >= c.rise:
                w.active_down = False
        else:
            w.active_oks = 0
            w.active_fails += 1
            w.active_reason = reason
            if w.active_fails >= c.fall:
                w.active_down = True
        self._update(w, now, reason or ("check ok" if ok else "check failed"))

    def report_failure(self, worker_id: str, now: float, reason: str) -> None:
        w = self.workers.get(worker_id)
        if w is None:
            return
        w.passive_fails += 1
        if w.passive_fails >= self.config.max_fails:
            w.passive_fails = 0
            w.ejected_until = now + self.config.cooldown
            self._update(w, now, f"{self.config.max_fails} failures in a row, last: {reason}")

    def report_success(self, worker_id: str) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            w.passive_fails = 0

    def acquire(self, worker: Worker) -> None:
        worker.conns += 1

    def release(self, worker: Worker, now: float) -> None:
        worker.conns = max(0, worker.conns - 1)
        if worker.draining_since is not None:
            self._maybe_remove(worker, now)

    # -- time -----------------------------------------------------------------------------------
    def handle_timer(self, now: float) -> None:
        for w in list(self.workers.values()):
            self._update(w, now, "timer")
            self._maybe_remove(w, now)

    def get_timer(self, now: float) -> float:
        """Next time a state may change without input (heartbeat deadline, cooldown end)."""
        t = now + 1.0
        dead = self.config.dead_interval
        for w in self.workers.values():
            if w.spec.heartbeat:
                for ch in w.spec.addresses:
                    last = w.heard.get(ch, w.joined_at)
                    if last + dead > now:
                        t = min(t, last + dead)
            if w.ejected_until > now:
                t = min(t, w.ejected_until)
            if w.draining_since is not None:
                t = min(t, w.draining_since + self.config.drain_timeout)
        return t

    # -- derived --------------------------------------------------------------------------------
    def channels_up(self, w: Worker, now: float) -> list[str]:
        if not w.spec.heartbeat:
            return list(w.spec.addresses)
        dead = self.config.dead_interval
        return [ch for ch in w.spec.addresses if now - w.heard.get(ch, w.joined_at) < dead]

    def _state(self, w: Worker, now: float) -> tuple[str, str]:
        if w.draining_since is not None:
            return DRAINING, "draining"
        if w.active_down:
            return DOWN, f"active check: {w.active_reason or 'failed'}"
        up = self.channels_up(w, now)
        if not up:
            return DOWN, f"no heartbeat on {', '.join(w.spec.addresses)}"
        if w.ejected_until > now:
            return EJECTED, "passive ejection"
        if len(up) < len(w.spec.addresses):
            down = [c for c in w.spec.addresses if c not in up]
            return DEGRADED, f"channel {', '.join(down)} down"
        return UP, "all channels up"

    def _update(self, w: Worker, now: float, cause: str) -> None:
        new, why = self._state(w, now)
        if new != w.state:
            old, w.state = w.state, new
            self._events.append(WorkerStateChanged(w.id, old, new, f"{why} ({cause})"))

    def _maybe_remove(self, w: Worker, now: float) -> None:
        if w.draining_since is None:
            return
        if w.conns == 0:
            self.remove(w.id, "drained")
        elif now - w.draining_since >= self.config.drain_timeout:
            self.remove(w.id, f"drain timeout with {w.conns} in flight")

    def next_event(self) -> WorkerStateChanged | WorkerJoined | WorkerRemoved | None:
        return self._events.pop(0) if self._events else None

    def address(self, w: Worker, now: float) -> str:
        """The worker's address on the first channel (in preference order) that is up."""
        up = self.channels_up(w, now)
        ch = up[0] if up else next(iter(w.spec.addresses))
        return w.spec.addresses[ch]

    def usable(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.state in USABLE]

    def table(self, now: float) -> list[StationRow]:
        rows = []
        dead = self.config.dead_interval
        for w in self.workers.values():
            for ch, addr in w.spec.addresses.items():
                last = w.heard.get(ch)
                if not w.spec.heartbeat:
                    st = "unknown"
                else:
                    st = (
                        "up" if now - (last if last is not None else w.joined_at) < dead else "down"
                    )
                rows.append(StationRow(w.id, ch, addr, st, None if last is None else now - last))
        return rows

    # -- balancing ------------------------------------------------------------------------------
    def pick(
        self,
        *,
        key: bytes | None = None,
        exclude: Iterable[str] = (),
        policy: Policy | None = None,
    ) -> Worker | None:
        """A usable worker not in ``exclude`` by ``policy`` (default: the pool's), or None."""
        skip = set(exclude)
        cands = [w for w in self.workers.values() if w.state in USABLE and w.id not in skip]
        if not cands:
            return None
        p = policy or self.config.policy
        if p is Policy.CONSISTENT_HASH and key is not None:
            return self._hash_pick(key, {w.id: w for w in cands})
        if p is Policy.LEAST_CONN:
            self._rr += 1
            n = len(cands)
            order = cands[self._rr % n :] + cands[: self._rr % n]
            return min(order, key=lambda w: w.conns / w.spec.weight)
        if p is Policy.WEIGHTED:
            total = 0
            best = cands[0]
            for w in cands:  # nginx's smooth weighted round robin
                w.current_weight += w.spec.weight
                total += w.spec.weight
                if w.current_weight > best.current_weight:
                    best = w
            best.current_weight -= total
            return best
        self._rr += 1
        return cands[self._rr % len(cands)]

    def _hash_pick(self, key: bytes, cands: dict[str, Worker]) -> Worker:
        members = frozenset(self.workers)
        if members != self._ring_members:
            ring = []
            for w in self.workers.values():
                for i in range(self.config.vnodes * w.spec.weight):
                    ring.append((_h(f"{w.id}#{i}".encode()), w.id))
            ring.sort()
            self._ring, self._ring_keys = ring, [k for k, _ in ring]
            self._ring_members = members
        i = bisect.bisect(self._ring_keys, _h(key))
        n = len(self._ring)
        for j in range(n):
            wid = self._ring[(i + j) % n][1]
            if wid in cands:
                return cands[wid]
        return next(iter(cands.values()))


def _h(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
