"""The role machine's transition table, walked exhaustively and with Hypothesis (h2 style)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nonstop.common import LocalProtocolError, Role
from nonstop.failover import roles as R

INTERVAL = 0.01
PEERS = ("node-b", "node-c")


def fire(rm: R.RoleMachine, kind: str, now: float, data: st.DataObject | None = None) -> None:
    """Apply one input of ``kind`` with plausible (or drawn) arguments."""

    def d(strategy, default):
        return data.draw(strategy) if data is not None else default

    peer = d(st.sampled_from(PEERS), "node-b")
    if kind == R.PEER_SEEN:
        rm.peer_seen(
            peer,
            d(st.sampled_from(list(Role)), Role.MASTER),
            d(st.sampled_from([50, 100, 200, 250]), 100),
            d(st.integers(0, 3), 0),
            now,
        )
    elif kind == R.PEER_LOST:
        rm.peer_lost(peer, "no heartbeat on lan for 30 ms", now)
    elif kind == R.PEER_LEFT:
        rm.peer_left(peer, now)
    elif kind == R.LEASE_GRANTED:
        rm.lease_granted(now + d(st.sampled_from([-0.01, 0.0, 0.005, 0.03]), 0.03), now)
    elif kind == R.LEASE_DENIED:
        rm.lease_denied(d(st.sampled_from(["", *PEERS, "node-a"]), "node-b"), now)
    elif kind == R.LEASE_LOST:
        rm.lease_lost("the witness is unreachable", now)
    elif kind == R.FENCED:
        rm.fenced("no FEED for 20 ms", now)
    elif kind == R.LOCAL_FAULT:
        rm.local_fault("lan is down", now)
    elif kind == R.LOCAL_OK:
        rm.local_ok(now)
    elif kind == R.STOP:
        rm.stop(now)
    elif kind == R.TIMER:
        rm.handle_timer(now)
    else:  # pragma: no cover
        raise AssertionError(kind)


def machine(witness: bool = False, priority: int = 200, preempt: bool = True) -> R.RoleMachine:
    return R.RoleMachine(
        R.RoleConfig("node-a", priority, preempt, 0.0, INTERVAL, 3, witness), now=0.0
    )


def _init(rm: R.RoleMachine) -> None:
    pass


def _backup(rm: R.RoleMachine) -> None:
    rm.peer_seen("node-b", Role.MASTER, 250, 0, 0.001)


def _master(rm: R.RoleMachine) -> None:
    rm.handle_timer(0.05)  # best candidate: asks the witness
    rm.lease_granted(0.08, 0.05)


def _fault(rm: R.RoleMachine) -> None:
    rm.local_fault("lan is down", 0.001)


def _stopping(rm: R.RoleMachine) -> None:
    rm.stop(0.001)


REACH: dict[Role, Callable[[R.RoleMachine], None]] = {
    Role.INIT: _init,
    Role.BACKUP: _backup,
    Role.MASTER: _master,
    Role.FAULT: _fault,
    Role.STOPPING: _stopping,
}


@pytest.mark.parametrize("kind", R.INPUT_KINDS)
@pytest.mark.parametrize("role", list(Role))
def test_every_pair(role: Role, kind: str) -> None:
    rm = machine(witness=True)
    REACH[role](rm)
    assert rm.role == role
    while rm.next_action() or rm.next_event():
        pass
    if (role, kind) in R.TRANSITIONS:
        fire(rm, kind, 0.1)
    else:
        with pytest.raises(LocalProtocolError):
            fire(rm, kind, 0.1)
        assert rm.role == role and rm.next_action() is None and rm.next_event() is None


class Checker:
    """Invariants over the action/event stream of one machine."""

    def __init__(self, rm: R.RoleMachine) -> None:
        self.rm = rm
        self.held = False
        self.role = rm.role

    def after_step(self, now: float) -> None:
        rm = self.rm
        actions = []
        while (a := rm.next_action()) is not None:
            actions.append(a)
        events = []
        while (e := rm.next_event()) is not None:
            events.append(e)
        for e in events:
            assert e.old == self.role, "events form a chain"
            assert e.reason and e.at == now
            self.role = e.new
        assert self.role == rm.role
        became_master = any(e.new == Role.MASTER for e in events)
        left_master = any(e.old == Role.MASTER for e in events)
        if any(isinstance(a, R.AcquireVips) for a in actions):
            assert became_master, "AcquireVips only when becoming MASTER"
        if left_master:
            assert R.ReleaseVips() in actions, "ReleaseVips whenever leaving MASTER"
        for a in actions:
            if isinstance(a, R.AcquireVips):
                self.held = True
            elif isinstance(a, R.ReleaseVips):
                self.held = False
            elif isinstance(a, R.Announce):
                assert self.held, "Announce only while holding the VIPs"
        assert self.held == (rm.role == Role.MASTER)
        if not rm.config.witness:
            assert not any(isinstance(a, R.RequestLease | R.ReleaseLease) for a in actions)
        if rm.role != Role.MASTER:
            assert not rm.flags_for_heartbeat() & R.FLAG_HOLDS_LEASE
        if rm.role == Role.STOPPING:
            assert rm.get_timer() is None


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    witness=st.booleans(),
    priority=st.sampled_from([50, 100, 200, 250]),
    preempt=st.booleans(),
    steps=st.integers(1, 40),
)
def test_random_walks_keep_invariants(
    data: st.DataObject, witness: bool, priority: int, preempt: bool, steps: int
) -> None:
    rm = machine(witness, priority, preempt)
    check = Checker(rm)
    now = 0.0
    was_stopping = False
    for _ in range(steps):
        now += data.draw(st.sampled_from([0.0, 0.001, 0.004, 0.01, 0.031, 0.2]))
        kind = data.draw(st.sampled_from(R.INPUT_KINDS))
        role = rm.role
        lease_input = kind in (R.LEASE_GRANTED, R.LEASE_DENIED, R.LEASE_LOST)
        if (role, kind) in R.TRANSITIONS and (witness or not lease_input):
            fire(rm, kind, now, data)
        else:
            with pytest.raises(LocalProtocolError):
                fire(rm, kind, now, data)
            assert rm.role == role
        check.after_step(now)
        # the timer never stays in the past (the agent would spin)
        t = rm.get_timer()
        if t is not None and t <= now:
            rm.handle_timer(now)
            check.after_step(now)
            t2 = rm.get_timer()
            assert t2 is None or t2 > now, (rm.role, rm.reason, t2, now)
        if was_stopping:
            assert rm.role == Role.STOPPING, "STOPPING is terminal"
        was_stopping = rm.role == Role.STOPPING
