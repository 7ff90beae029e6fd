"""Actions and events of the role machine (nonstop.failover.roles), and its config.

Actions are what the adapter must do; RoleChanged is what happened and why. Frozen, slotted,
checked when built.
"""

from __future__ import annotations

from dataclasses import dataclass

from nonstop.common import Role

# ---- actions (what the adapter must do) and events ------------------------------------------


@dataclass(frozen=True, slots=True)
class AcquireVips:
    """Add every VIP to its interface."""


@dataclass(frozen=True, slots=True)
class ReleaseVips:
    """Remove every VIP."""


@dataclass(frozen=True, slots=True)
class Announce:
    """Send the gratuitous ARP / unsolicited NA burst for every VIP."""


@dataclass(frozen=True, slots=True)
class RequestLease:
    """Send a lease request (want=True) to the witness."""


@dataclass(frozen=True, slots=True)
class ReleaseLease:
    """Send a lease release (want=False) to the witness. ``served=False``: this node never
    became master under the grant it gives back (a late grant, a vote no longer needed), so
    the witness may put the term back (nonstop.failover.witness)."""

    served: bool = True


@dataclass(frozen=True, slots=True)
class SendHeartbeatNow:
    """Our role or flags changed: send a heartbeat now instead of waiting for the next tick."""


@dataclass(frozen=True, slots=True)
class SuspendVips:
    """Rule 9: the VIPs go down (the guard may have dropped them already) while the role stays
    MASTER: the connections and the service stay as they are until the witness answers."""

    reason: str


@dataclass(frozen=True, slots=True)
class ResumeVips:
    """Rule 9: the witness says no other node held the lease meanwhile: add the VIPs back, arm
    the guard again and announce them."""

    reason: str


Action = (
    AcquireVips | ReleaseVips | Announce | RequestLease | ReleaseLease | SendHeartbeatNow
    | SuspendVips | ResumeVips
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RoleChanged:
    old: Role
    new: Role
    reason: str
    at: float

    def __post_init__(self) -> None:
        if self.old == self.new:
            raise ValueError(f"RoleChanged from {self.old} to itself")
        if not self.reason:
            raise ValueError("RoleChanged needs a reason")


@dataclass(frozen=True, slots=True)
class RoleConfig:
    node_id: str
    priority: int
    preempt: bool = True
    preempt_delay: float = 0.0
    interval: float = 0.1
    dead_after: int = 3
    witness: bool = False
    lease: float = 0.0  # the witness lease we ask for (0: dead_after * interval)

    @property
    def lease_length(self) -> float:
        return self.lease or self.dead_after * self.interval

    @property
    def renew_every(self) -> float:
        """How often a master renews its witness lease: half an interval, so that a late
        renewal (a stalled loop, a busy machine) still lands inside the lease."""
        return self.interval / 2

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must not be empty")
        if self.interval <= 0 or self.dead_after < 1 or self.preempt_delay < 0:
            raise ValueError("interval > 0, dead_after >= 1 and preempt_delay >= 0 are required")


@dataclass(slots=True)
class PeerView:
    role: Role
    priority: int
    flags: int
    seen_at: float
