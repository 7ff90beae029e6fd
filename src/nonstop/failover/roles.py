"""The role machine: who holds the VIPs. Sans-IO: inputs and ``now`` in, actions and events out.

Rules (every transition lives in ``TRANSITIONS`` below; a (role, input) pair missing from that
table is a bug in the caller and raises LocalProtocolError; the decision cycle that applies rules
1-5, 8 and 9 after each input is nonstop.failover.cycle.DecisionCycle):

1. A node starts in INIT and listens for ``dead_after * interval``. It decides at once when it sees
   a live MASTER (-> BACKUP). At the deadline: if it is the best live candidate, the highest
   (priority, node_id) among itself and the live peers in INIT or BACKUP, it becomes MASTER
   (with a witness: BACKUP first, then MASTER once the witness granted the lease); else BACKUP.
2. A BACKUP promotes when no live peer is MASTER and it is the best live candidate. Without a
   witness that happens at once; with a witness it sends RequestLease and waits for
   lease_granted. lease_denied keeps it BACKUP; the request is repeated every interval while the
   conditions hold. A grant that arrives when it is no longer wanted is released at once.
3. A MASTER with a witness renews the lease every half interval (``RoleConfig.renew_every``:
   a late renewal still lands inside the lease). Its lease ends, by its own clock, at
   send time of the granted request + lease - margin (the witness counts from receipt, so the
   master's view ends first). It steps down (ReleaseVips) only when it has no live peer AND the
   lease expired: a master that still hears a peer keeps the VIP without the witness. If the
   witness says another node holds the lease it steps down at once (that node is promoting).
4. Two masters (a healed partition): the lower (priority, node_id) steps down at once; the winner
   re-announces the VIPs (Announce) whenever a peer (re)appears or newly shows up as MASTER
   (the loser may have stepped down before we heard it as MASTER, its GARPs still in caches).
5. Preemption: a BACKUP whose priority is strictly higher than the live MASTER's, with
   preempt=True, sets FLAG_HANDOVER_REQUEST in its heartbeats once the condition held for
   preempt_delay. The MASTER, seeing a higher-priority BACKUP with that flag, releases the VIPs
   (and the lease) and becomes BACKUP; the requester then sees no master and promotes by rule 2.
   No moment has two masters. preempt=False never takes over from a live master.
6. fenced(): the guard already dropped the VIPs; MASTER -> BACKUP at once (but see rule 9), and
   no promotion for ``dead_after * interval`` (our view of the peers was stale while we hung).
   local_fault(): INIT/BACKUP/MASTER -> FAULT (a MASTER releases VIPs and lease);
   local_ok(): FAULT -> BACKUP (then rule 2 applies). Repeated reports are no-ops.
7. stop(): any role -> STOPPING (a MASTER releases VIPs and lease first). STOPPING ignores
   everything after, except that a late lease grant is released.
8. Entering MASTER queues AcquireVips, Announce, SendHeartbeatNow; leaving it queues
   ReleaseVips, ReleaseLease (with a witness), SendHeartbeatNow. Every RoleChanged carries a
   one-sentence reason, also kept in ``reason``.
9. Riding out a freeze: a MASTER fenced (its agent stalled past the fence timeout: the host
   froze, or the agent got no CPU) or alone with its lease lapsed does not step down at once when
   a witness reports lease terms. It queues SuspendVips (the VIPs go down, the connections and
   the service stay) and asks the witness. A grant under the term of its last grant means no
   other node held the lease meanwhile, so none can have served: ResumeVips, and it carries on.
   A grant under another term, a denial naming another holder, a master heard, or no answer
   within max(2 intervals, FREEZE_WAIT): it steps down as rule 6 says. Without a witness, or
   one that reports no terms, rule 6 applies at once.

Pairs outside the table: lease_* and fenced while INIT (no lease was ever requested and no VIP
held in INIT, so such an input means the caller wired something wrong). lease_* inputs to a
machine configured without a witness raise the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from nonstop.common import LocalProtocolError, Role
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
from nonstop.failover.cycle import DecisionCycle
from nonstop.membership.wire import FLAG_HANDOVER_REQUEST, FLAG_WITNESS_LEASE

__all__ = [
    "FLAG_HANDOVER_REQUEST",
    "FLAG_HOLDS_LEASE",
    "INPUT_KINDS",
    "TRANSITIONS",
    "AcquireVips",
    "Action",
    "Announce",
    "ReleaseLease",
    "ReleaseVips",
    "RequestLease",
    "ResumeVips",
    "RoleChanged",
    "RoleConfig",
    "RoleMachine",
    "SendHeartbeatNow",
    "SuspendVips",
]

# Flag bits of our heartbeats; the wire format owns them.
FLAG_HOLDS_LEASE = FLAG_WITNESS_LEASE

# Input kinds (the second half of a TRANSITIONS key).
PEER_SEEN = "peer_seen"
PEER_LOST = "peer_lost"
PEER_LEFT = "peer_left"
LEASE_GRANTED = "lease_granted"
LEASE_DENIED = "lease_denied"
LEASE_LOST = "lease_lost"
FENCED = "fenced"
LOCAL_FAULT = "local_fault"
LOCAL_OK = "local_ok"
STOP = "stop"
TIMER = "timer"
_LEASE_INPUTS = frozenset({"lease_granted", "lease_denied", "lease_lost"})
INPUT_KINDS = (
    PEER_SEEN, PEER_LOST, PEER_LEFT, LEASE_GRANTED, LEASE_DENIED, LEASE_LOST,
    FENCED, LOCAL_FAULT, LOCAL_OK, STOP, TIMER,
)  # fmt: skip


class RoleMachine(DecisionCycle):
    """Inputs in (each dispatched through ``TRANSITIONS``), actions and events out."""

    # ---- public inputs ----------------------------------------------------------------------

    def peer_seen(self, peer: str, role: Role, priority: int, flags: int, now: float) -> None:
        self._dispatch(PEER_SEEN, now, peer, Role(role), priority, flags)

    def peer_lost(self, peer: str, reason: str, now: float, *, proven_dead: bool = False) -> None:
        """``proven_dead``: the peer's agent process is known to be gone (its agent link ended
        with EOF/RST), so its fence guard has dropped its VIPs and it cannot act as master."""
        self._dispatch(PEER_LOST, now, peer, reason, proven_dead)

    def peer_left(self, peer: str, now: float) -> None:
        self._dispatch(PEER_LEFT, now, peer)

    def lease_granted(self, until: float, now: float, term: tuple[int, int] = (0, 0)) -> None:
        """``term``: the witness's (run, term) of this grant ((0, 0): it does not say); equal
        terms mean no other node held the lease in between (rule 9)."""
        self._dispatch(LEASE_GRANTED, now, until, term)

    def lease_denied(self, holder: str, now: float, retry_in: float = 0.0) -> None:
        """``retry_in``: the holder's lease runs out in that long (the witness says); a backup
        asks again right then instead of on its next tick."""
        self._dispatch(LEASE_DENIED, now, holder, retry_in)

    def lease_lost(self, reason: str, now: float) -> None:
        self._dispatch(LEASE_LOST, now, reason)

    def fenced(self, reason: str, now: float) -> None:
        self._dispatch(FENCED, now, reason)

    def local_fault(self, reason: str, now: float) -> None:
        self._dispatch(LOCAL_FAULT, now, reason)

    def local_ok(self, now: float, reason: str = "") -> None:
        """The local fault is over; ``reason`` (what ended it) goes into the RoleChanged."""
        self._dispatch(LOCAL_OK, now, reason)

    def stop(self, now: float) -> None:
        self._dispatch(STOP, now)

    def handle_timer(self, now: float) -> None:
        self._dispatch(TIMER, now)

    # ---- public outputs ---------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The next time handle_timer() has something to do, or None."""
        cands: list[float] = []
        if self.role == Role.INIT:
            cands.append(self._init_deadline)
        if self.role in (Role.BACKUP, Role.MASTER):
            if self._next_request is not None:
                cands.append(self._next_request)
            if self._lease_until is not None:
                cands.append(self._lease_until)
            if self._frozen_until is not None:
                cands.append(self._frozen_until)
        if self.role == Role.BACKUP:
            if self._preempt_since is not None and not self._handover:
                cands.append(self._preempt_since + self.config.preempt_delay)
            if self._hold_until is not None:
                cands.append(self._hold_until)
        return min(cands) if cands else None

    def next_action(self) -> Action | None:
        return self._actions.popleft() if self._actions else None

    def next_event(self) -> RoleChanged | None:
        return self._events.popleft() if self._events else None

    def flags_for_heartbeat(self) -> int:
        flags = 0
        if self.role == Role.MASTER and self._lease_until is not None:
            flags |= FLAG_HOLDS_LEASE
        if self._handover:
            flags |= FLAG_HANDOVER_REQUEST
        return flags

    @property
    def lease_until(self) -> float | None:
        return self._lease_until

    # ---- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, kind: str, now: float, *args: object) -> None:
        handler = TRANSITIONS.get((self.role, kind))
        if handler is None:
            raise LocalProtocolError(f"{kind} is not a valid input while {self.role}")
        if now < self._now:
            raise LocalProtocolError(f"time went backwards: {now} < {self._now}")
        if kind in _LEASE_INPUTS and not self.config.witness:
            raise LocalProtocolError(f"{kind} without a witness configured")
        self._now = now
        handler(self, now, *args)

    # ---- knowledge updates (shared by several handlers) -------------------------------------

    def _update_peer(self, now: float, peer: str, role: Role, priority: int, flags: int) -> bool:
        """Record a peer's state; return True if it (re)appears, or newly shows up as MASTER:
        either way it may have announced the VIPs while we could not hear it."""
        if peer == self.config.node_id:
            raise LocalProtocolError("peer_seen with our own node id")
        old = self.peers.get(peer)
        if old is not None and old.role == Role.MASTER and role != Role.MASTER:
            self._cause = f"master {peer} became {role}"
        self._dead.discard(peer)
        self.peers[peer] = PeerView(role, priority, flags, now)
        return old is None or (role == Role.MASTER and old.role != Role.MASTER)

    def _forget_peer(self, peer: str, why: str) -> None:
        old = self.peers.pop(peer, None)
        if old is not None and old.role == Role.MASTER:
            self._cause = f"master {peer} {why}"
        elif old is not None:
            self._cause = f"{peer} {why}"

    # ---- handlers (the values of TRANSITIONS) -----------------------------------------------

    def _on_peer_seen(self, now: float, peer: str, role: Role, prio: int, flags: int) -> None:
        appeared = self._update_peer(now, peer, role, prio, flags)
        was_master = self.role == Role.MASTER
        self._evaluate(now)
        if was_master and self.role == Role.MASTER and appeared:
            self.reason = (
                f"stayed master as {peer} ({role}, priority {prio}) appeared; re-announced"
            )
            self._actions.append(Announce())
            self._actions.append(SendHeartbeatNow())

    def _on_peer_lost(self, now: float, peer: str, reason: str, proven_dead: bool) -> None:
        old = self.peers.get(peer)
        if proven_dead:
            self._dead.add(peer)
            if old is not None and old.role == Role.MASTER:
                self._proven_master_lost = True
        self._forget_peer(peer, f"lost ({reason})")
        self._evaluate(now)

    def _on_peer_left(self, now: float, peer: str) -> None:
        self._forget_peer(peer, "left")
        self._evaluate(now)

    def _ignore(self, now: float, *args: object) -> None:
        pass

    def _give_back_lease(self, now: float, until: float, term: tuple[int, int]) -> None:
        self._actions.append(ReleaseLease(served=False))  # a late grant: never acted on

    def _backup_lease_granted(self, now: float, until: float, term: tuple[int, int]) -> None:
        if self._want_lease and until > now:
            self._term = term
            self._lease_until = until
            self._note_grant(now)
            self._evaluate_backup(now)
        else:
            self._actions.append(ReleaseLease(served=False))  # not wanted any more: unused

    def _master_lease_granted(self, now: float, until: float, term: tuple[int, int]) -> None:
        if self._frozen is not None and not self._unfreeze(now, until, term):
            return
        self._term = term
        if self._lease_until is None or until > self._lease_until:
            self._lease_until = until
        self._note_grant(now)
        self._evaluate_master(now)

    def _backup_lease_denied(self, now: float, holder: str, retry_in: float = 0.0) -> None:
        if self._want_lease and retry_in > 0 and self._next_request is not None:
            # half a millisecond past the expiry: our request must arrive after it
            self._next_request = min(self._next_request, now + retry_in + 0.0005)
        who = holder or "nobody yet (the witness is in its start-up grace period)"
        self.reason = f"{self._cause}; the witness denied the lease ({who} holds it), retrying"

    def _master_lease_denied(self, now: float, holder: str, retry_in: float = 0.0) -> None:
        if holder in self._dead and self._proof_until is not None:
            self.reason = f"master; waiting for dead {holder}'s lease to run out at the witness"
            return
        if holder and holder != self.config.node_id:
            self._lease_until = None
            self._change(Role.BACKUP, f"demoted: the witness gave the lease to {holder}", now)
            self._evaluate_backup(now)
        else:
            self._master_lease_lost(now, "the witness cannot grant it yet")

    def _master_lease_lost(self, now: float, reason: str) -> None:
        self._lease_until = None
        self._evaluate_master(now)
        if self.role == Role.MASTER:
            heard = ", ".join(sorted(self.peers))
            self.reason = (
                f"kept the VIP: the witness lease was lost ({reason}) but {heard} is heard"
            )

    def _backup_lease_lost(self, now: float, reason: str) -> None:
        self._lease_until = None
        self._evaluate_backup(now)

    def _master_fenced(self, now: float, reason: str) -> None:
        if self._frozen is not None or self._freeze(now, reason):  # rule 9
            return
        self._change(Role.BACKUP, f"fenced: {reason}", now)
        self._hold_until = now + self.config.dead_after * self.config.interval
        self._evaluate_backup(now)

    def _to_fault(self, now: float, reason: str) -> None:
        self._hold_until = None
        self._change(Role.FAULT, f"fault: {reason}", now)

    def _fault_again(self, now: float, reason: str) -> None:
        self.reason = f"fault: {reason}"

    def _fault_ok(self, now: float, reason: str = "") -> None:
        why = f"recovered from the local fault: {reason}" if reason else ""
        self._change(Role.BACKUP, why or "recovered from the local fault", now)
        self._evaluate_backup(now)

    def _to_stopping(self, now: float) -> None:
        self._hold_until = None
        self._change(Role.STOPPING, "stopping: graceful shutdown requested", now)

    def _on_timer(self, now: float) -> None:
        if self._lease_until is not None and now >= self._lease_until and self.role != Role.MASTER:
            self._lease_until = None
        self._evaluate(now)
        if (
            self.role == Role.MASTER
            and self._lease_until is not None
            and not self._lease_valid(now)
        ):
            self._lease_until = None  # expired while peers are heard: kept the VIP (rule 3)


_Handler = Callable[..., None]
_M = RoleMachine

TRANSITIONS: dict[tuple[Role, str], _Handler] = {
    # INIT: listening; no lease requested, no VIP held yet.
    (Role.INIT, PEER_SEEN): _M._on_peer_seen,
    (Role.INIT, PEER_LOST): _M._on_peer_lost,
    (Role.INIT, PEER_LEFT): _M._on_peer_left,
    (Role.INIT, LOCAL_FAULT): _M._to_fault,
    (Role.INIT, LOCAL_OK): _M._ignore,
    (Role.INIT, STOP): _M._to_stopping,
    (Role.INIT, TIMER): _M._on_timer,
    # BACKUP
    (Role.BACKUP, PEER_SEEN): _M._on_peer_seen,
    (Role.BACKUP, PEER_LOST): _M._on_peer_lost,
    (Role.BACKUP, PEER_LEFT): _M._on_peer_left,
    (Role.BACKUP, LEASE_GRANTED): _M._backup_lease_granted,
    (Role.BACKUP, LEASE_DENIED): _M._backup_lease_denied,
    (Role.BACKUP, LEASE_LOST): _M._backup_lease_lost,
    (Role.BACKUP, FENCED): _M._ignore,  # the guard raced a DISARM: nothing held to fence
    (Role.BACKUP, LOCAL_FAULT): _M._to_fault,
    (Role.BACKUP, LOCAL_OK): _M._ignore,
    (Role.BACKUP, STOP): _M._to_stopping,
    (Role.BACKUP, TIMER): _M._on_timer,
    # MASTER
    (Role.MASTER, PEER_SEEN): _M._on_peer_seen,
    (Role.MASTER, PEER_LOST): _M._on_peer_lost,
    (Role.MASTER, PEER_LEFT): _M._on_peer_left,
    (Role.MASTER, LEASE_GRANTED): _M._master_lease_granted,
    (Role.MASTER, LEASE_DENIED): _M._master_lease_denied,
    (Role.MASTER, LEASE_LOST): _M._master_lease_lost,
    (Role.MASTER, FENCED): _M._master_fenced,
    (Role.MASTER, LOCAL_FAULT): _M._to_fault,
    (Role.MASTER, LOCAL_OK): _M._ignore,
    (Role.MASTER, STOP): _M._to_stopping,
    (Role.MASTER, TIMER): _M._on_timer,
    # FAULT: peers are still tracked so the decision after local_ok is informed.
    (Role.FAULT, PEER_SEEN): _M._on_peer_seen,
    (Role.FAULT, PEER_LOST): _M._on_peer_lost,
    (Role.FAULT, PEER_LEFT): _M._on_peer_left,
    (Role.FAULT, LEASE_GRANTED): _M._give_back_lease,  # late grant: give it back
    (Role.FAULT, LEASE_DENIED): _M._ignore,
    (Role.FAULT, LEASE_LOST): _M._ignore,
    (Role.FAULT, FENCED): _M._ignore,
    (Role.FAULT, LOCAL_FAULT): _M._fault_again,
    (Role.FAULT, LOCAL_OK): _M._fault_ok,
    (Role.FAULT, STOP): _M._to_stopping,
    (Role.FAULT, TIMER): _M._on_timer,
    # STOPPING: terminal; late inputs change nothing.
    (Role.STOPPING, PEER_SEEN): _M._ignore,
    (Role.STOPPING, PEER_LOST): _M._ignore,
    (Role.STOPPING, PEER_LEFT): _M._ignore,
    (Role.STOPPING, LEASE_GRANTED): _M._give_back_lease,
    (Role.STOPPING, LEASE_DENIED): _M._ignore,
    (Role.STOPPING, LEASE_LOST): _M._ignore,
    (Role.STOPPING, FENCED): _M._ignore,
    (Role.STOPPING, LOCAL_FAULT): _M._ignore,
    (Role.STOPPING, LOCAL_OK): _M._ignore,
    (Role.STOPPING, STOP): _M._ignore,
    (Role.STOPPING, TIMER): _M._ignore,
}
