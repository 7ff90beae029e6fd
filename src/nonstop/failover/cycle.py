"""The role machine's state and its decision cycle: rules 1-5 and 8 of nonstop.failover.roles.

``DecisionCycle`` holds what the machine knows (its role, the peers it hears, the lease, the
timers) and decides on it: one ``_evaluate(now)`` per input for the current role (Patroni's
``_run_cycle``, much shorter), ``_change`` to move the role, queue its actions (AcquireVips,
Announce, ReleaseVips, ReleaseLease, SendHeartbeatNow) and its RoleChanged with the one-sentence
reason. Which input runs what, and the rules themselves, are in nonstop.failover.roles
(``RoleMachine`` subclasses this and adds the inputs, the outputs and ``TRANSITIONS``).

Known limit: a BACKUP waits for a better live candidate to promote; if that one cannot get the
lease (it cannot reach the witness) nobody promotes until it is lost.
"""

from __future__ import annotations

from collections import deque

from nonstop.common import Role
from nonstop.failover.actions import (
    AcquireVips,
    Action,
    Announce,
    PeerView,
    ReleaseLease,
    ReleaseVips,
    RequestLease,
    ResumeVips,
    RoleChanged,
    RoleConfig,
    SendHeartbeatNow,
    SuspendVips,
)
from nonstop.membership.wire import FLAG_HANDOVER_REQUEST

# A master promoted on proof (the old master's agent dead, its guard fenced) waits this long past
# the dead holder's lease for the witness's grant before it steps down again. It was 2 intervals
# (20 ms at 10 ms heartbeats): the grant then had to come back in the middle of the takeover's
# CPU burst (the restore thread real-time, the witness not), and a bench run of 256 connections
# stepped down 50 ms after promoting and up again 900 ms later, losing every connection. A live
# rival is not let through by the wait: a denial that names a live holder demotes at once.
PROOF_GRACE = 1.0
# Rule 9: how long a master that was frozen waits for the witness's answer, with its VIPs down,
# before it steps down after all (at least two heartbeat intervals).
FREEZE_WAIT = 0.05

__all__ = ["DecisionCycle"]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


class DecisionCycle:
    """What the role machine knows (its role, the peers, the lease) and the decision cycle that
    acts on it: ``_evaluate(now)`` runs after every input, ``_change`` moves the role and queues
    its actions and event. ``RoleMachine`` adds the inputs, the outputs and the table."""

    def __init__(self, config: RoleConfig, *, now: float) -> None:
        self.config = config
        self.role = Role.INIT
        self.reason = f"listening for {_ms(config.dead_after * config.interval)} before deciding"
        self.peers: dict[str, PeerView] = {}
        self._now = now
        self._init_deadline = now + config.dead_after * config.interval
        self._actions: deque[Action] = deque()
        self._events: deque[RoleChanged] = deque()
        self._cause = "no master"  # why the last master went away (for the promotion sentence)
        self._lease_until: float | None = None
        self._want_lease = False  # a BACKUP asking for the lease in order to promote
        self._next_request: float | None = None
        # what the demotion on a lapsed lease reports: when the last grant came and how many
        # requests went out since (unanswered ones point at the witness or the path to it)
        self._granted_at: float | None = None
        self._asked_since_grant = 0
        self._preempt_since: float | None = None
        self._handover = False
        # set by the adapter: False while a planned handover would lose state the backup does
        # not hold yet (the session sync of a rejoined backup is still under way)
        self.handover_ready = True
        self._hold_until: float | None = None
        # Peers whose agent is proven dead, and, after promoting on such a proof, how long a
        # master may wait for the lease the dead master's grant still blocks.
        self._dead: set[str] = set()
        self._proof_until: float | None = None
        self._proven_master_lost = False
        # the witness's (run, term) of our last grant ((0, 0): unknown, so rule 9 cannot apply)
        self._term: tuple[int, int] = (0, 0)
        # rule 9, riding out a freeze: why the VIPs are down ("fenced" or "demoted", the reason),
        # and until when the witness may answer
        self._frozen: tuple[str, str] | None = None
        self._frozen_until: float | None = None

    def stalled(self, span: float) -> None:
        """This node did not run for ``span`` seconds (the adapter saw its loop wake that
        late). Waits that measure other nodes' answers move on by it, as the membership core's
        deadlines do: rule 9's wait for the witness (the witness froze too, when it shares the
        host) and the start-up listening. The lease does not: it runs by the witness's clock."""
        if span <= 0:
            return
        if self._frozen_until is not None:
            self._frozen_until += span
        if self.role == Role.INIT:
            self._init_deadline += span

    # ---- what the cycle reads ---------------------------------------------------------------

    def _masters(self) -> list[tuple[int, str]]:
        return sorted(
            ((p.priority, n) for n, p in self.peers.items() if p.role == Role.MASTER),
            reverse=True,
        )

    def _best_candidate(self) -> tuple[int, str]:
        me = (self.config.priority, self.config.node_id)
        others = [
            (p.priority, n) for n, p in self.peers.items() if p.role in (Role.INIT, Role.BACKUP)
        ]
        return max([me, *others])

    def _lease_valid(self, now: float) -> bool:
        return self._lease_until is not None and now < self._lease_until

    def _request_lease(self) -> None:
        self._asked_since_grant += 1
        self._actions.append(RequestLease())

    def _note_grant(self, now: float) -> None:
        self._granted_at, self._asked_since_grant = now, 0

    def _lease_story(self, now: float) -> str:
        if self._granted_at is None:
            return f"never granted; {self._asked_since_grant} requests sent"
        return (
            f"last granted {_ms(now - self._granted_at)} ago; "
            f"{self._asked_since_grant} requests since"
        )

    # ---- transitions ------------------------------------------------------------------------

    def _change(self, new: Role, reason: str, now: float) -> None:
        old = self.role
        if old == Role.MASTER:
            self._actions.append(ReleaseVips())
            if self.config.witness:
                self._actions.append(ReleaseLease())
            self._lease_until = None
            self._next_request = None
        self.role, self.reason = new, reason
        self._want_lease = False
        self._proven_master_lost = False
        self._frozen = self._frozen_until = None
        if new != Role.MASTER:
            self._proof_until = None
        self._preempt_since, self._handover = None, False
        if new == Role.MASTER:
            self._actions.append(AcquireVips())
            self._actions.append(Announce())
            # renew on the master's schedule from here (rule 3): a backup asked every interval
            if self.config.witness:
                renew = now + self.config.renew_every
                self._next_request = min(self._next_request or renew, renew)
        else:
            self._next_request = None
        self._actions.append(SendHeartbeatNow())
        self._events.append(RoleChanged(old, new, reason, now))

    def _evaluate(self, now: float) -> None:
        """One decision cycle for the current role (Patroni's _run_cycle, much shorter)."""
        if self.role == Role.INIT:
            self._evaluate_init(now)
        elif self.role == Role.BACKUP:
            self._evaluate_backup(now)
        elif self.role == Role.MASTER:
            self._evaluate_master(now)

    def _evaluate_init(self, now: float) -> None:
        masters = self._masters()
        if masters:
            m = masters[0][1]
            self._change(Role.BACKUP, f"joined as backup: {m} is master", now)
            self._evaluate_backup(now)
            return
        if now < self._init_deadline:
            return
        listened = _ms(self.config.dead_after * self.config.interval)
        best = self._best_candidate()
        if best[1] != self.config.node_id:
            self._change(
                Role.BACKUP,
                f"decided backup: no master after {listened}; {best[1]} (priority {best[0]}) "
                "is the best candidate",
                now,
            )
        elif self.config.witness:
            self._cause = f"no master seen in {listened} of listening"
            self._change(
                Role.BACKUP,
                f"decided: no master after {listened}; {self.config.node_id} is the best "
                "candidate and asks the witness for the lease",
                now,
            )
        else:
            self._change(
                Role.MASTER,
                f"promoted: no master seen in {listened} of listening and "
                f"{self.config.node_id} is the best live candidate",
                now,
            )
            return
        self._evaluate_backup(now)

    def _evaluate_backup(self, now: float) -> None:
        cfg = self.config
        if self._hold_until is not None and now >= self._hold_until:
            self._hold_until = None
        masters = self._masters()
        if masters:
            self._proven_master_lost = False
            if self._want_lease:
                self._want_lease, self._next_request = False, None
            if self._lease_until is not None:  # a vote we no longer need, never acted on
                self._lease_until = None
                self._actions.append(ReleaseLease(served=False))
            prio, m = masters[0]
            if cfg.preempt and cfg.priority > prio:
                if self._preempt_since is None:
                    self._preempt_since = now
                if not self._handover and now >= self._preempt_since + cfg.preempt_delay:
                    self._handover = True
                    self._actions.append(SendHeartbeatNow())
                    self.reason = (
                        f"requested handover from master {m} (priority {prio} < {cfg.priority})"
                    )
            else:
                self._preempt_since = None
                if self._handover:
                    self._handover = False
                    self._actions.append(SendHeartbeatNow())
                self.reason = f"following master {m}"
            return
        if self._handover:
            self._handover = False
            self._actions.append(SendHeartbeatNow())
        self._preempt_since = None
        if self._hold_until is not None:
            self.reason = f"fenced: holding off promotion for {_ms(self._hold_until - now)}"
            return
        best = self._best_candidate()
        if best[1] != cfg.node_id:
            self._want_lease, self._next_request = False, None
            self.reason = f"waiting: {best[1]} (priority {best[0]}) is next in line"
            return
        if not cfg.witness:
            self._change(
                Role.MASTER,
                f"promoted: {self._cause}; {cfg.node_id} is the best live candidate",
                now,
            )
        elif self._lease_valid(now):
            self._change(
                Role.MASTER, f"promoted: {self._cause} and the witness granted the lease", now
            )
        elif self._proven_master_lost:
            # The witness guards against a master that is alive but unheard. This one's agent
            # is proven dead and its guard fenced its VIPs on that same EOF: promote now and
            # take the lease over as master once the dead holder's grant runs out.
            self._proof_until = now + self.config.lease_length + max(2 * cfg.interval, PROOF_GRACE)
            self._change(
                Role.MASTER,
                f"promoted: {self._cause}; its agent is proven dead, so the lease is taken "
                "over after promoting",
                now,
            )
            self._next_request = now
        elif not self._want_lease or (self._next_request is not None and now >= self._next_request):
            self._want_lease = True
            self._next_request = now + cfg.interval
            self._request_lease()
            self.reason = f"{self._cause}; asking the witness for the lease"

    @property
    def _freeze_wait(self) -> float:
        """Rule 9: how long the witness may take to answer (at least two intervals)."""
        return max(2 * self.config.interval, FREEZE_WAIT)

    def _freeze(self, now: float, reason: str, kind: str = "fenced") -> bool:
        """Rule 9: instead of stepping down (``kind``: "fenced", rule 6, or "demoted", rule 3),
        take the VIPs down and ask the witness whether another node held the lease meanwhile.
        False (step down as before) without a witness that reports terms, with a master heard,
        or while promoted on proof."""
        cfg = self.config
        if not cfg.witness or self._term == (0, 0) or self._masters():
            return False
        if self._proof_until is not None:
            return False
        if self._frozen is None:
            self._frozen = (kind, reason)
            self._frozen_until = now + self._freeze_wait
            self._actions.append(SuspendVips(reason))
        self._lease_until = None
        self._next_request = now + cfg.renew_every
        self._request_lease()
        self.reason = (
            f"frozen: {reason}; the VIPs are down until the witness says whether another node "
            "held the lease meanwhile"
        )
        return True

    def _unfreeze(self, now: float, until: float, term: tuple[int, int]) -> bool:
        """Rule 9, the witness granted the lease: True if under the term we held (nobody else
        held it meanwhile: the VIPs come back); else the node steps down after all. A grant
        that ran out already (``until``: it answers a renewal sent before the freeze) says
        nothing of now: False, and the wait goes on for the answer to a request sent since.
        Taken as an answer, it brought the VIPs back for the instant before the lapse rule
        took them down again, over and over (CI, 2026-11-22: a lone master, ~1 ms apart)."""
        assert self._frozen is not None
        reason = self._frozen[1]
        if term != self._term:
            self._give_up(now, f"the witness term moved from {self._term} to {term}: another "
                          "node held the lease meanwhile")  # fmt: skip
            return False
        if until <= now:
            return False
        self._frozen = self._frozen_until = None
        self.reason = (
            f"master again: {reason}, but the witness granted the lease under the same term "
            f"{term}, so no other node can have served meanwhile"
        )
        self._actions.append(ResumeVips(self.reason))
        self._actions.append(SendHeartbeatNow())
        return True

    def _give_up(self, now: float, why: str) -> None:
        """Rule 9 does not save this one: step down as rule 6 (fenced) or 3 (lapsed) says."""
        assert self._frozen is not None
        kind, reason = self._frozen
        self._change(Role.BACKUP, f"{kind}: {reason}; {why}", now)
        if kind == "fenced":
            self._hold_until = now + self.config.dead_after * self.config.interval
        self._evaluate_backup(now)

    def _evaluate_master(self, now: float) -> None:
        cfg = self.config
        me = (cfg.priority, cfg.node_id)
        if self._frozen is not None:  # rule 9: nothing else until the witness answers
            masters = self._masters()
            if masters:
                self._give_up(now, f"{masters[0][1]} is master")
            elif self._frozen_until is not None and now >= self._frozen_until:
                self._give_up(now, f"the witness did not answer within {_ms(self._freeze_wait)}")
            elif self._next_request is not None and now >= self._next_request:
                self._next_request = now + cfg.renew_every
                self._request_lease()
            return
        for prio, m in self._masters():
            if (prio, m) > me:
                if cfg.witness and self._lease_valid(now):
                    # the witness grants one lease at a time and ours runs: the other's claim is
                    # stale, a stalled master's heartbeat sent before it saw its own stall (a
                    # SIGSTOP in the middle of a send: the rest goes out at SIGCONT, before any
                    # check can run). It steps down on its fence or when its renewal is denied;
                    # yielding to it cost a second takeover (CI: a backup promoted on the lease
                    # demoted 1 ms after the woken master's last heartbeat as master)
                    continue
                self._change(
                    Role.BACKUP,
                    f"demoted: {m} is also master and wins (priority {prio}, ours {cfg.priority})",
                    now,
                )
                self._evaluate_backup(now)
                return
        for n, p in sorted(self.peers.items()):
            if (
                p.role == Role.BACKUP
                and p.flags & FLAG_HANDOVER_REQUEST
                and p.priority > cfg.priority
                and self.handover_ready
            ):
                self._change(
                    Role.BACKUP,
                    f"handed over: {n} (priority {p.priority} > {cfg.priority}) requested it",
                    now,
                )
                self._evaluate_backup(now)
                return
        if self._proof_until is not None and (self._lease_valid(now) or now >= self._proof_until):
            self._proof_until = None
        if (
            cfg.witness
            and not self._lease_valid(now)
            and not self.peers
            and self._proof_until is None
        ):
            lapse = f"no peer is heard and the witness lease expired ({self._lease_story(now)})"
            if self._freeze(now, lapse, "demoted"):
                return
            self._change(
                Role.BACKUP,
                "demoted: no peer is heard and the witness lease expired "
                f"({self._lease_story(now)}), so a backup may already be master",
                now,
            )
            self._evaluate_backup(now)
            return
        if cfg.witness and self._next_request is not None and now >= self._next_request:
            self._next_request = now + cfg.renew_every
            self._request_lease()
