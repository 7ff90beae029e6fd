"""Events of the membership core, drained with :meth:`Membership.next_event`.

Frozen, slotted, named in the past tense, checked when built (they are only built by the core).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nonstop.common import Role


@dataclass(frozen=True, slots=True)
class PeerJoined:
    """First valid heartbeat from a peer, or the first one after it was lost or left."""

    peer: str
    channel: str  # where it was heard first
    incarnation: int
    role: Role
    priority: int
    flags: int


@dataclass(frozen=True, slots=True)
class PeerStateChanged:
    """An alive peer announced a new role, priority or flags (same incarnation or a restart)."""

    peer: str
    role: Role
    priority: int
    flags: int
    old_role: Role
    old_priority: int
    old_flags: int


@dataclass(frozen=True, slots=True)
class ChannelFaulted:
    """One channel to an alive peer went silent: a channel fault, the peer is still there."""

    peer: str
    channel: str
    reason: str


@dataclass(frozen=True, slots=True)
class ChannelRecovered:
    """A channel that had faulted carries the peer's heartbeats again."""

    peer: str
    channel: str


@dataclass(frozen=True, slots=True)
class PeerLost:
    """Every channel to the peer is silent, its agent's link closed, or it left ("left")."""

    peer: str
    reason: str
    # True when the peer's agent link ended (EOF/RST): its agent process is proven dead, not
    # merely unheard, so its fence guard has dropped its VIPs.
    proven_dead: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not self.reason:
            raise ValueError("PeerLost needs a reason")


@dataclass(frozen=True, slots=True)
class PeerLeft:
    """The peer sent LEAVE (graceful stop). Always followed by PeerLost(peer, "left")."""

    peer: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class PeerRestarted:
    """The peer's incarnation went up: its agent restarted since we last heard it."""

    peer: str
    old_incarnation: int
    new_incarnation: int

    def __post_init__(self) -> None:
        if self.new_incarnation <= self.old_incarnation:
            raise ValueError("PeerRestarted needs a higher incarnation")


Event = (
    PeerJoined
    | PeerStateChanged
    | ChannelFaulted
    | ChannelRecovered
    | PeerLost
    | PeerLeft
    | PeerRestarted
)
