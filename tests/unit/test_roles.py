"""RoleMachine scenarios, driven with explicit time (no sleeping).

``Cluster`` joins real RoleMachines with a fake network (instant delivery, links that can be cut)
and a real WitnessCore + WitnessClient per node. It plays the membership layer's part: heartbeats
every interval (and at once on SendHeartbeatNow) become peer_seen, silence for dead_after
intervals becomes peer_lost. It records who held the VIPs when.
"""

from __future__ import annotations

import pytest

from nonstop.common import LocalProtocolError, Role
from nonstop.failover import roles as R
from nonstop.failover.cycle import FREEZE_WAIT, PROOF_GRACE
from nonstop.failover.witness import LeaseDenied, LeaseGranted, WitnessClient, WitnessCore

KEY = b"k" * 32
INTERVAL, DEAD_AFTER = 0.010, 3
LEASE = INTERVAL * DEAD_AFTER
STEP = 0.001


class Cluster:
    def __init__(
        self,
        prios: dict[str, int],
        *,
        witness: bool = True,
        preempt: bool = True,
        preempt_delay: float = 0.0,
        start: dict[str, float] | None = None,
    ) -> None:
        self.now = 0.0
        self.prios = prios
        self.witness_on = witness
        self.cfg = {
            n: R.RoleConfig(n, p, preempt, preempt_delay, INTERVAL, DEAD_AFTER, witness)
            for n, p in prios.items()
        }
        self.start = start or {}
        self.m: dict[str, R.RoleMachine] = {}
        self.clients: dict[str, WitnessClient] = {}
        self.witness = WitnessCore(KEY, LEASE, 0.0, grace=0.0)
        self.cut: set[frozenset[str]] = set()  # pairs that cannot hear each other
        self.cut_witness: set[str] = set()
        self.dead: set[str] = set()  # crashed (stopped sending, no inputs)
        self.heard: dict[tuple[str, str], float] = {}  # (rx, tx) -> last time
        self.next_hb: dict[str, float] = {}
        self.vip: dict[str, bool] = dict.fromkeys(prios, False)
        self.log: list[tuple[float, str, str]] = []  # (now, node, what)
        self.events: list[tuple[str, R.RoleChanged]] = []
        self.announces: dict[str, int] = dict.fromkeys(prios, 0)
        self.overlap = False  # two VIP holders that cannot hear each other, ever
        self.max_holders = 0  # most live nodes holding the VIPs at one instant
        self._boot()

    # -- plumbing --------------------------------------------------------------------------
    def _boot(self) -> None:
        for n in self.prios:
            if self.start.get(n, 0.0) <= self.now and n not in self.m:
                self.m[n] = R.RoleMachine(self.cfg[n], now=self.now)
                self.clients[n] = WitnessClient(KEY, 1, n, 1, lease=LEASE, margin=0.001)
                self.next_hb[n] = self.now

    def live(self) -> list[str]:
        return [n for n in self.m if n not in self.dead]

    def linked(self, a: str, b: str) -> bool:
        return frozenset((a, b)) not in self.cut

    def heartbeat(self, tx: str) -> None:
        m = self.m[tx]
        for rx in self.live():
            if rx != tx and self.linked(rx, tx):
                self.heard[(rx, tx)] = self.now
                self.m[rx].peer_seen(tx, m.role, self.prios[tx], m.flags_for_heartbeat(), self.now)

    def act(self, n: str, a: R.Action) -> None:
        if isinstance(a, R.AcquireVips | R.ResumeVips):
            self.vip[n] = True
            self.log.append((self.now, n, "acquire"))
        elif isinstance(a, R.ReleaseVips | R.SuspendVips):
            self.vip[n] = False
            self.log.append((self.now, n, "release"))
        elif isinstance(a, R.Announce):
            self.announces[n] += 1
        elif isinstance(a, R.SendHeartbeatNow):
            self.heartbeat(n)
        elif isinstance(a, R.RequestLease | R.ReleaseLease):
            want = isinstance(a, R.RequestLease)
            served = a.served if isinstance(a, R.ReleaseLease) else True
            data = self.clients[n].request(self.now, want=want, served=served)
            if n in self.cut_witness:
                return
            for _, reply in self.witness.receive(data, n, self.now):
                got = self.clients[n].receive(reply, self.now)
                if isinstance(got, LeaseGranted):
                    self.m[n].lease_granted(got.until, self.now, got.term)
                elif isinstance(got, LeaseDenied):
                    self.m[n].lease_denied(got.holder, self.now)

    def pump(self) -> None:
        for _ in range(1000):
            busy = False
            for n in self.live():
                while (a := self.m[n].next_action()) is not None:
                    busy = True
                    self.act(n, a)
                while (e := self.m[n].next_event()) is not None:
                    self.events.append((n, e))
            if not busy:
                break
        holders = [n for n in self.live() if self.vip[n]]
        self.max_holders = max(self.max_holders, len(holders))
        for i, a in enumerate(holders):
            for b in holders[i + 1 :]:
                if not self.linked(a, b):
                    self.overlap = True

    def tick(self) -> None:
        self.now = round(self.now + STEP, 9)
        self._boot()
        for n in self.live():
            t = self.m[n].get_timer()
            if t is not None and t <= self.now + 1e-12:
                self.m[n].handle_timer(self.now)
        self.pump()
        for n in self.live():
            if self.next_hb[n] <= self.now + 1e-12:
                self.next_hb[n] = self.now + INTERVAL
                self.heartbeat(n)
        for (rx, tx), t in list(self.heard.items()):
            if rx in self.dead:
                continue
            if self.now - t >= INTERVAL * DEAD_AFTER - 1e-9:
                del self.heard[(rx, tx)]
                silent = round((self.now - t) * 1000)
                self.m[rx].peer_lost(tx, f"no heartbeat on lan for {silent} ms", self.now)
        self.pump()

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / STEP)):
            self.tick()

    def until(self, cond, limit: float = 1.0) -> float:
        start = self.now
        while not cond():
            assert self.now - start < limit, "condition not reached"
            self.tick()
        return self.now

    def roles(self) -> dict[str, Role]:
        return {n: self.m[n].role for n in self.m}

    def kill(self, n: str) -> None:
        self.dead.add(n)  # the VIP stays "held" on a dead node only in our log: it is dead
        self.vip[n] = False

    def partition(self, a: str, b: str) -> None:
        self.cut.add(frozenset((a, b)))

    def heal(self, a: str, b: str) -> None:
        self.cut.discard(frozenset((a, b)))

    def reasons(self, n: str) -> list[str]:
        return [e.reason for who, e in self.events if who == n]


M, B = Role.MASTER, Role.BACKUP


# ---- startup ----------------------------------------------------------------------------------


@pytest.mark.parametrize("witness", [False, True])
def test_startup_highest_priority_becomes_master(witness: bool) -> None:
    c = Cluster({"node-a": 200, "node-b": 100}, witness=witness)
    c.run(0.05)
    assert c.roles() == {"node-a": M, "node-b": B}
    assert c.vip == {"node-a": True, "node-b": False}
    assert not c.overlap


def test_startup_tie_broken_by_node_id() -> None:
    c = Cluster({"node-a": 100, "node-b": 100}, witness=False)
    c.run(0.05)
    assert c.roles() == {"node-a": B, "node-b": M}


def test_startup_decides_early_when_a_master_is_seen() -> None:
    c = Cluster({"node-a": 200, "node-b": 100}, start={"node-b": 0.1}, preempt=False)
    c.run(0.101)
    assert c.roles()["node-b"] == B  # decided at its first heartbeat, not after 30 ms
    assert "joined as backup: node-a is master" in c.reasons("node-b")[0]


# ---- master lost -----------------------------------------------------------------------------


def test_master_lost_backup_promotes_without_witness() -> None:
    c = Cluster({"node-a": 200, "node-b": 100}, witness=False)
    c.run(0.05)
    c.kill("node-a")
    t_kill = c.now
    t = c.until(lambda: c.m["node-b"].role == M)
    assert INTERVAL * (DEAD_AFTER - 1) <= t - t_kill <= INTERVAL * DEAD_AFTER + 2 * STEP
    assert c.reasons("node-b")[-1].startswith("promoted: master node-a lost (no heartbeat on lan")


def test_master_lost_backup_waits_for_the_witness_lease() -> None:
    c = Cluster({"node-a": 200, "node-b": 100})
    c.run(0.05)
    c.kill("node-a")
    last_grant = c.witness.leases[1].until  # a's lease at the witness
    t = c.until(lambda: c.m["node-b"].role == M)
    assert t >= last_grant  # denied while a's lease ran, granted after
    assert c.witness.counters["denied"] >= 1
    reason = c.reasons("node-b")[-1]
    assert reason.startswith("promoted: master node-a lost (no heartbeat on lan for")
    assert reason.endswith("and the witness granted the lease")


def test_lease_denied_then_granted_direct_inputs() -> None:
    cfg = R.RoleConfig("node-b", 100, True, 0.0, INTERVAL, DEAD_AFTER, True)
    rm = R.RoleMachine(cfg, now=0.0)
    rm.peer_seen("node-a", Role.MASTER, 200, R.FLAG_HOLDS_LEASE, 0.001)
    assert rm.role == B
    rm.peer_lost("node-a", "no heartbeat on lan, hb for 30 ms", 0.040)
    acts = drain(rm)
    assert R.RequestLease() in acts and rm.role == B
    rm.lease_denied("node-a", 0.041)
    assert rm.role == B and "denied" in rm.reason
    assert rm.get_timer() == pytest.approx(0.050)
    rm.handle_timer(0.050)
    assert R.RequestLease() in drain(rm)  # retried on the next tick
    rm.lease_granted(0.050 + LEASE - 0.001, 0.051)
    assert rm.role == M
    assert drain(rm)[:2] == [R.AcquireVips(), R.Announce()]
    assert rm.reason == (
        "promoted: master node-a lost (no heartbeat on lan, hb for 30 ms) and the witness "
        "granted the lease"
    )
    assert rm.flags_for_heartbeat() & R.FLAG_HOLDS_LEASE


def test_a_master_holding_the_lease_ignores_a_stale_master_of_higher_priority() -> None:
    """The old master, SIGSTOPped in the middle of sending its heartbeats, sends the rest as
    master at SIGCONT, before it sees its own stall. The witness granted the lease to the backup
    since: that claim is stale, and the new master keeps its role (it used to yield at once on
    priority, and the woken master, fenced, promoted again: a second takeover)."""
    cfg = R.RoleConfig("node-b", 100, True, 0.0, INTERVAL, DEAD_AFTER, True)
    rm = R.RoleMachine(cfg, now=0.0)
    rm.peer_seen("node-a", Role.MASTER, 200, R.FLAG_HOLDS_LEASE, 0.001)
    rm.peer_lost("node-a", "no heartbeat on lan, hb for 30 ms", 0.040)
    drain(rm)
    rm.lease_granted(0.041 + LEASE, 0.041)
    assert rm.role == M
    drain(rm)
    rm.peer_seen("node-a", Role.MASTER, 200, R.FLAG_HOLDS_LEASE, 0.050)  # the stale heartbeat
    assert rm.role == M and R.ReleaseVips() not in drain(rm)
    rm.peer_seen("node-a", Role.BACKUP, 200, 0, 0.051)  # it saw its stall: fenced
    assert rm.role == M
    # with no lease of its own (no witness), two masters are settled by priority, as before
    cfg = R.RoleConfig("node-b", 100, True, 0.0, INTERVAL, DEAD_AFTER, False)
    rm = R.RoleMachine(cfg, now=0.0)
    rm.peer_seen("node-a", Role.MASTER, 200, 0, 0.001)
    rm.peer_lost("node-a", "silence", 0.040)
    assert rm.role == M
    drain(rm)
    rm.peer_seen("node-a", Role.MASTER, 200, 0, 0.050)
    assert rm.role == B and R.ReleaseVips() in drain(rm)


def test_a_lone_master_keeps_its_lease_through_a_late_renewal() -> None:
    """A hiccup of the machine (a vCPU descheduled, 10 ms late timers measured on this box)
    delays the renewal; the lease, as the agent derives it ((dead_after - 1/2) * interval,
    renewed every half interval, margin 5 %), must outlast any stall short of the 15 ms at
    which the agent's stall check steps it down anyway. With a lease of 2 intervals renewed
    every interval a 10 ms late timer lapsed it: the lone master demoted itself and dropped
    its service (demo: 1.5 s of silence on every protected connection)."""
    lease = (DEAD_AFTER - 0.5) * INTERVAL
    cfg = R.RoleConfig("node-b", 100, True, 0.0, INTERVAL, DEAD_AFTER, True, lease=lease)
    rm = R.RoleMachine(cfg, now=0.0)
    rm.peer_seen("node-a", Role.MASTER, 200, R.FLAG_HOLDS_LEASE, 0.001)
    rm.peer_lost("node-a", "no heartbeat on lan, hb for 30 ms", 0.040)
    drain(rm)
    sent = 0.040
    rm.lease_granted(sent + 0.95 * lease, 0.041)
    assert rm.role == M
    drain(rm)
    due = rm.get_timer()
    assert due == pytest.approx(0.041 + INTERVAL / 2)  # the master's schedule from the promotion
    rm.handle_timer(due + 0.0149)  # 14.9 ms late: still inside the lease
    assert rm.role == M and R.RequestLease() in drain(rm)
    assert rm.get_timer() == pytest.approx(sent + 0.95 * lease)  # before the next renewal
    # nothing answers: it steps down when the last grant runs out, and says so
    rm.handle_timer(sent + 0.95 * lease)
    assert rm.role == B and R.ReleaseVips() in drain(rm)
    events = []
    while (ev := rm.next_event()) is not None:
        events.append(ev)
    assert events[-1].new == B
    assert "lease expired (last granted 23 ms ago; 1 requests since)" in events[-1].reason


def test_proven_dead_master_is_replaced_without_waiting_for_its_lease() -> None:
    """The agent link's EOF proves the master's agent died (its guard fenced the VIPs): the
    backup promotes at once and takes the lease over once the dead holder's grant runs out."""
    cfg = R.RoleConfig("node-b", 100, True, 0.0, INTERVAL, DEAD_AFTER, True)
    rm = R.RoleMachine(cfg, now=0.0)
    rm.peer_seen("node-a", Role.MASTER, 200, R.FLAG_HOLDS_LEASE, 0.001)
    rm.peer_lost("node-a", "agent link closed (EOF)", 0.005, proven_dead=True)
    assert rm.role == M
    acts = drain(rm)
    assert R.AcquireVips() in acts and R.Announce() in acts
    assert "proven dead" in rm.reason
    rm.handle_timer(rm.get_timer())
    assert R.RequestLease() in drain(rm)  # asks at once, as master
    rm.lease_denied("node-a", 0.006)  # the dead holder's grant still runs: not a demotion
    assert rm.role == M and "dead node-a" in rm.reason
    rm.lease_granted(0.036 + LEASE, 0.036)
    assert rm.role == M and rm.flags_for_heartbeat() & R.FLAG_HOLDS_LEASE


def test_proven_dead_master_without_a_lease_in_time_steps_down() -> None:
    cfg = R.RoleConfig("node-b", 100, True, 0.0, INTERVAL, DEAD_AFTER, True)
    rm = R.RoleMachine(cfg, now=0.0)
    rm.peer_seen("node-a", Role.MASTER, 200, R.FLAG_HOLDS_LEASE, 0.001)
    rm.peer_lost("node-a", "agent link closed (EOF)", 0.005, proven_dead=True)
    assert rm.role == M
    t = 0.005
    while rm.role == M and t < 5.0:  # the witness never answers
        t = rm.get_timer()
        rm.handle_timer(t)
    assert rm.role == B and t <= 0.005 + LEASE + max(2 * INTERVAL, PROOF_GRACE) + INTERVAL
    assert t >= 0.005 + LEASE + PROOF_GRACE  # not in the middle of the takeover's CPU burst
    assert R.ReleaseVips() in drain(rm)


def test_silence_alone_is_no_proof_of_death() -> None:
    cfg = R.RoleConfig("node-b", 100, True, 0.0, INTERVAL, DEAD_AFTER, True)
    rm = R.RoleMachine(cfg, now=0.0)
    rm.peer_seen("node-a", Role.MASTER, 200, R.FLAG_HOLDS_LEASE, 0.001)
    rm.peer_lost("node-a", "no heartbeat on lan, hb for 30 ms", 0.031)
    assert rm.role == B and R.RequestLease() in drain(rm)


def test_late_grant_after_master_came_back_is_released() -> None:
    cfg = R.RoleConfig("node-b", 100, True, 0.0, INTERVAL, DEAD_AFTER, True)
    rm = R.RoleMachine(cfg, now=0.0)
    rm.peer_seen("node-a", Role.MASTER, 200, 0, 0.001)
    rm.peer_lost("node-a", "silence", 0.040)
    drain(rm)
    rm.peer_seen("node-a", Role.MASTER, 200, 0, 0.042)
    rm.lease_granted(0.07, 0.043)
    # never acted on: the witness may put the term back for node-a (what it parked stays true)
    assert rm.role == B and R.ReleaseLease(served=False) in drain(rm)


def test_a_grant_given_back_unused_keeps_the_old_masters_term() -> None:
    """The master stalls; the backup finds it silent and asks for the lease, but hears the
    master again before the grant (a new term) arrives, and gives it back unused. The witness
    puts the term back, so the master's request after its stall is granted under its own term
    and rule 9 lets it carry on. Given back as served, the term would have moved and it would
    step down (2026-11-21's demo lost its streams that way: the old master dropped what it
    had parked, though nobody had served them)."""
    lease = (DEAD_AFTER - 0.5) * INTERVAL
    w = WitnessCore(KEY, lease, 0.0, grace=0.0, run=9)
    ms, cl = {}, {}
    for n, prio in (("node-a", 200), ("node-b", 100)):
        ms[n] = R.RoleMachine(R.RoleConfig(n, prio, False, 0.0, INTERVAL, DEAD_AFTER, True,
                                           lease=lease), now=0.0)  # fmt: skip
        cl[n] = WitnessClient(KEY, 1, n, 1, lease=lease, margin=0.001)

    def ask(n: str, now: float, data: bytes) -> None:
        for _, reply in w.receive(data, n, now):
            got = cl[n].receive(reply, now)
            if isinstance(got, LeaseGranted):
                ms[n].lease_granted(got.until, now, got.term)

    def flush(n: str, now: float) -> list[R.Action]:
        out = drain(ms[n])
        for a in out:
            if isinstance(a, R.RequestLease | R.ReleaseLease):
                served = a.served if isinstance(a, R.ReleaseLease) else True
                ask(n, now, cl[n].request(now, isinstance(a, R.RequestLease), served=served))
        return out

    a, b = ms["node-a"], ms["node-b"]
    a.handle_timer(0.030)  # listened: node-a asks and becomes master
    flush("node-a", 0.030)
    b.peer_seen("node-a", Role.MASTER, 200, 0, 0.031)
    assert a.role == M and b.role == B
    term = w.status(0.031)["groups"][1]["term"]
    # node-a stalls; node-b finds it silent at 0.070 and asks, its request in flight
    b.peer_lost("node-a", "no heartbeat on lan, hb for 30 ms", 0.070)
    assert R.RequestLease() in drain(b)
    in_flight = cl["node-b"].request(0.070)
    b.peer_seen("node-a", Role.MASTER, 200, 0, 0.071)  # node-a heard again first
    ask("node-b", 0.072, in_flight)  # granted (node-a's lease ran out): a new term, unused
    acts = flush("node-b", 0.072)
    assert R.ReleaseLease(served=False) in acts and b.role == B
    assert w.status(0.072)["groups"][1]["term"] == term
    a.fenced("the agent stalled for 45 ms (fence timeout 20 ms)", 0.075)
    flush("node-a", 0.075)
    assert a.role == M and a.reason.startswith("master again"), a.reason


# ---- partitions ------------------------------------------------------------------------------


def test_master_loses_peer_but_keeps_lease_stays_master() -> None:
    c = Cluster({"node-a": 200, "node-b": 100})
    c.run(0.05)
    c.partition("node-a", "node-b")
    c.run(0.3)
    assert c.roles() == {"node-a": M, "node-b": B}
    assert c.vip == {"node-a": True, "node-b": False}
    assert not c.overlap


def test_master_hearing_peer_keeps_vip_without_witness() -> None:
    c = Cluster({"node-a": 200, "node-b": 100})
    c.run(0.05)
    c.cut_witness.update({"node-a", "node-b"})
    c.run(0.3)
    assert c.roles() == {"node-a": M, "node-b": B}
    assert not c.m["node-a"].flags_for_heartbeat() & R.FLAG_HOLDS_LEASE


def test_master_loses_peer_and_witness_steps_down_before_backup_promotes() -> None:
    c = Cluster({"node-a": 200, "node-b": 100})
    c.run(0.05)
    c.partition("node-a", "node-b")
    c.cut_witness.add("node-a")
    c.until(lambda: c.m["node-b"].role == M)
    c.until(lambda: c.m["node-a"].role == B)  # rule 9's wait, its VIPs down, may end after it
    # rule 9 first: the VIPs go down at the lapse, the node waits for the witness, then gives up
    down = next(t for t, n, w in c.log if n == "node-a" and w == "release")
    up = [t for t, n, w in c.log if n == "node-b" and w == "acquire"][-1]
    assert down < up  # never two holders
    assert not c.overlap
    assert "demoted: no peer is heard and the witness lease expired" in c.reasons("node-a")[-1]
    assert "the witness did not answer within 50 ms" in c.reasons("node-a")[-1]


def test_without_witness_partition_gives_two_masters_then_heals() -> None:
    c = Cluster({"node-a": 200, "node-b": 100}, witness=False)
    c.run(0.05)
    c.partition("node-a", "node-b")
    c.run(0.1)
    assert c.roles() == {"node-a": M, "node-b": M}  # like VRRP: nothing can tell them apart
    before = c.announces["node-a"]
    c.heal("node-a", "node-b")
    c.run(0.002)
    assert c.roles() == {"node-a": M, "node-b": B}
    assert c.announces["node-a"] == before + 1  # the winner re-announced, once
    assert "is also master and wins" in c.reasons("node-b")[-1]
    c.run(0.05)
    assert c.announces["node-a"] == before + 1


# ---- preemption ------------------------------------------------------------------------------


@pytest.mark.parametrize("witness", [False, True])
def test_preempt_hands_over_without_overlap(witness: bool) -> None:
    c = Cluster({"node-a": 200, "node-b": 100}, witness=witness, start={"node-a": 0.1})
    c.run(0.099)  # node-a boots at 0.1
    assert c.roles() == {"node-b": M}
    c.until(lambda: "node-a" in c.m and c.m["node-a"].role == M, limit=0.2)
    assert c.m["node-b"].role == B
    log = [(n, w) for _, n, w in c.log]
    assert log[-2:] == [("node-b", "release"), ("node-a", "acquire")]
    assert c.max_holders == 1
    assert c.reasons("node-b")[-1].startswith("handed over: node-a (priority 200 > 100)")


def test_preempt_off_never_takes_over() -> None:
    c = Cluster({"node-a": 200, "node-b": 100}, start={"node-a": 0.1}, preempt=False)
    c.run(0.5)
    assert c.roles() == {"node-a": B, "node-b": M}
    assert not c.m["node-a"].flags_for_heartbeat() & R.FLAG_HANDOVER_REQUEST


def test_preempt_delay() -> None:
    c = Cluster({"node-a": 200, "node-b": 100}, start={"node-a": 0.1}, preempt_delay=0.2)
    c.run(0.25)
    assert c.roles() == {"node-a": B, "node-b": M}
    t = c.until(lambda: c.m["node-a"].role == M)
    assert 0.3 <= t <= 0.33


# ---- fenced, local fault, stop ---------------------------------------------------------------


def test_fenced_master_becomes_backup_and_holds_off() -> None:
    c = Cluster({"node-a": 200, "node-b": 100}, witness=False)
    c.run(0.05)
    c.m["node-a"].fenced("no FEED for 20 ms", c.now)
    t_fenced = c.now
    c.pump()
    assert c.m["node-a"].role == B and not c.vip["node-a"]
    assert c.reasons("node-a")[-1] == "fenced: no FEED for 20 ms"
    # b waits for a (better candidate); a holds off for dead_after intervals, then promotes again
    t = c.until(lambda: c.m["node-a"].role == M)
    assert t - t_fenced >= INTERVAL * DEAD_AFTER
    assert c.m["node-b"].role == B


def freeze(c: Cluster, nodes: list[str], seconds: float) -> None:
    """The host of ``nodes`` stops for ``seconds``: they neither send nor run a timer. Each
    one's own view of its peers' silence skips the freeze (Membership.stalled), as does the
    ``heard`` bookkeeping that stands in for it here."""
    c.dead |= set(nodes)
    t0 = c.now
    c.run(seconds)
    c.dead -= set(nodes)
    for (rx, tx), t in list(c.heard.items()):
        if rx in nodes:
            c.heard[(rx, tx)] = t + (c.now - t0)
    for n in nodes:
        c.next_hb[n] = c.now


def test_a_master_frozen_with_its_whole_host_rides_it_out() -> None:
    """Rule 9: every node and the witness froze together (a paused VM holding a lab). The master
    wakes fenced and its lease lapsed; the witness grants it again under the same term, so no
    other node held the lease: its VIPs come back, and no role changes anywhere."""
    c = Cluster({"node-a": 200, "node-b": 100})
    c.run(0.05)
    assert c.roles() == {"node-a": M, "node-b": B}
    before = len(c.events)
    freeze(c, ["node-a", "node-b"], 0.2)
    c.m["node-a"].fenced("the agent stalled for 200 ms (fence timeout 20 ms)", c.now)
    c.pump()
    assert c.m["node-a"].role == M and c.vip["node-a"]
    assert c.m["node-a"].reason.startswith("master again: the agent stalled for 200 ms")
    assert "same term" in c.m["node-a"].reason
    assert [w for t, n, w in c.log if n == "node-a"][-2:] == ["release", "acquire"]
    c.run(0.2)
    assert c.roles() == {"node-a": M, "node-b": B}
    assert len(c.events) == before  # not one role change
    assert c.max_holders == 1 and not c.overlap


def test_a_master_frozen_alone_steps_down_when_another_took_the_lease() -> None:
    """Rule 9 saves nothing when the master froze alone: the backup found it silent, got the
    lease (a new term) and promoted; the woken master's request is denied and it steps down."""
    c = Cluster({"node-a": 200, "node-b": 100}, preempt=False)
    c.run(0.05)
    c.dead.add("node-a")  # frozen, holding its VIPs (its guard wakes with it)
    c.until(lambda: c.m["node-b"].role == M)
    c.dead.discard("node-a")
    c.m["node-a"].fenced("the agent stalled for 100 ms (fence timeout 20 ms)", c.now)
    c.pump()
    assert c.m["node-a"].role == B and not c.vip["node-a"]
    assert c.reasons("node-a")[-1] == "demoted: the witness gave the lease to node-b"
    c.run(0.1)
    assert c.roles() == {"node-a": B, "node-b": M}


def test_a_frozen_master_the_witness_does_not_answer_steps_down_and_holds_off() -> None:
    c = Cluster({"node-a": 200, "node-b": 100})
    c.run(0.05)
    c.cut_witness.add("node-a")
    c.m["node-a"].fenced("no FEED from the agent for 20 ms", c.now)
    t0 = c.now
    c.pump()
    assert c.m["node-a"].role == M and not c.vip["node-a"]  # waiting, VIPs down
    assert c.m["node-a"].reason.startswith("frozen: no FEED from the agent for 20 ms")
    t = c.until(lambda: c.m["node-a"].role != M)
    assert t - t0 == pytest.approx(FREEZE_WAIT, abs=2 * STEP)
    assert c.reasons("node-a")[-1] == (
        "fenced: no FEED from the agent for 20 ms; the witness did not answer within 50 ms"
    )
    t_gave_up = c.now
    c.cut_witness.discard("node-a")
    t = c.until(lambda: c.m["node-a"].role == M)  # after holding off, as rule 6 says
    assert t - t_gave_up >= INTERVAL * DEAD_AFTER
    assert not c.overlap


def test_a_grant_that_ran_out_before_it_arrived_does_not_end_the_freeze() -> None:
    """The answer to a renewal sent before the freeze comes in after it: under the same term,
    but already run out. It says nothing of now: the VIPs stay down until the answer to the
    request sent since, which is live."""
    lease = (DEAD_AFTER - 0.5) * INTERVAL
    cfg = R.RoleConfig("node-a", 200, True, 0.0, INTERVAL, DEAD_AFTER, True, lease=lease)
    rm = R.RoleMachine(cfg, now=0.0)
    rm.handle_timer(0.030)  # listened: asks the witness
    rm.lease_granted(0.030 + lease, 0.031, (7, 1))
    assert rm.role == M
    drain(rm)
    rm.fenced("the agent stalled for 200 ms (fence timeout 20 ms)", 0.240)
    assert R.SuspendVips("the agent stalled for 200 ms (fence timeout 20 ms)") in drain(rm)
    rm.lease_granted(0.035 + lease, 0.241, (7, 1))  # the renewal sent at 35 ms: ran out
    assert rm.role == M and rm.reason.startswith("frozen:")
    assert not [a for a in drain(rm) if isinstance(a, R.ResumeVips)]
    rm.lease_granted(0.240 + lease, 0.242, (7, 1))  # the request sent at the fence: live
    acts = drain(rm)
    assert [a for a in acts if isinstance(a, R.ResumeVips)], acts
    assert not [a for a in acts if isinstance(a, R.SuspendVips)], acts  # no lapse right after
    rm.handle_timer(0.243)
    assert rm.role == M and not [a for a in drain(rm) if isinstance(a, R.SuspendVips)]


def test_a_freeze_during_the_wait_for_the_witness_is_not_counted() -> None:
    """The witness shares the frozen host: its answer comes after the freeze, so the wait
    moves on by the time this node did not run (``stalled``), as the peers' deadlines do."""
    c = Cluster({"node-a": 200, "node-b": 100})
    c.run(0.05)
    c.cut_witness.add("node-a")
    m = c.m["node-a"]
    m.fenced("no FEED from the agent for 20 ms", c.now)
    c.pump()
    m.stalled(0.2)
    c.now = round(c.now + FREEZE_WAIT + 0.01, 9)  # past the unmoved wait, inside the moved one
    m.handle_timer(c.now)
    assert m.role == M


def test_a_frozen_master_that_hears_another_master_steps_down() -> None:
    c = Cluster({"node-a": 200, "node-b": 100})
    c.run(0.05)
    c.cut_witness.add("node-a")
    c.m["node-a"].fenced("no FEED from the agent for 20 ms", c.now)
    c.pump()
    c.m["node-a"].peer_seen("node-b", M, 100, 0, c.now)
    c.pump()
    assert c.m["node-a"].role == B
    assert c.reasons("node-a")[-1].endswith("; node-b is master")


def test_local_fault_and_recovery() -> None:
    c = Cluster({"node-a": 200, "node-b": 100})
    c.run(0.05)
    c.m["node-a"].local_fault("lan is down", c.now)
    c.pump()
    assert c.m["node-a"].role == Role.FAULT and not c.vip["node-a"]
    c.until(lambda: c.m["node-b"].role == M)  # a released the lease: granted at once
    c.m["node-a"].local_fault("lan is still down", c.now)  # repeated: no transition
    c.run(0.05)
    assert c.m["node-a"].role == Role.FAULT
    c.m["node-a"].local_ok(c.now)
    c.pump()
    c.until(lambda: c.m["node-a"].role == M)  # back as backup, then preempts
    assert c.m["node-b"].role == B
    assert not c.overlap


def test_graceful_stop_hands_over_at_once() -> None:
    c = Cluster({"node-a": 200, "node-b": 100})
    c.run(0.05)
    c.m["node-a"].stop(c.now)
    t_stop = c.now
    c.pump()
    assert c.m["node-a"].role == Role.STOPPING and not c.vip["node-a"]
    t = c.until(lambda: c.m["node-b"].role == M)
    assert t - t_stop <= STEP  # lease released, STOPPING heard: no detection delay
    c.m["node-a"].stop(c.now)  # a second stop is harmless


# ---- the table -------------------------------------------------------------------------------


def drain(rm: R.RoleMachine) -> list[R.Action]:
    out = []
    while (a := rm.next_action()) is not None:
        out.append(a)
    return out


def test_table_covers_every_pair_except_documented_ones() -> None:
    missing = {(r, k) for r in Role for k in R.INPUT_KINDS} - set(R.TRANSITIONS)
    assert missing == {
        (Role.INIT, R.LEASE_GRANTED),
        (Role.INIT, R.LEASE_DENIED),
        (Role.INIT, R.LEASE_LOST),
        (Role.INIT, R.FENCED),
    }


def test_pair_outside_table_raises_local_error() -> None:
    rm = R.RoleMachine(R.RoleConfig("node-a", 100), now=0.0)
    with pytest.raises(LocalProtocolError):
        rm.lease_granted(1.0, 0.0)
    with pytest.raises(LocalProtocolError):
        rm.fenced("x", 0.0)
    with pytest.raises(LocalProtocolError):
        rm.peer_seen("node-a", Role.MASTER, 1, 0, 0.0)  # our own id
    with pytest.raises(LocalProtocolError):
        rm.handle_timer(-1.0)  # time went backwards


def test_denied_backup_asks_again_when_the_holders_lease_runs_out() -> None:
    cfg = R.RoleConfig("node-b", 100, True, 0.0, INTERVAL, DEAD_AFTER, True)
    rm = R.RoleMachine(cfg, now=0.0)
    rm.peer_seen("node-a", Role.MASTER, 200, R.FLAG_HOLDS_LEASE, 0.001)
    rm.peer_lost("node-a", "no heartbeat on lan, hb for 30 ms", 0.040)
    assert R.RequestLease() in drain(rm)
    rm.lease_denied("node-a", 0.041, 0.002)  # a's lease ends in 2 ms at the witness
    assert rm.get_timer() == pytest.approx(0.0435)  # not the next tick at 0.050
    rm.handle_timer(rm.get_timer())
    assert R.RequestLease() in drain(rm)
