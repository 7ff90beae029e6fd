"""The store abstraction (Patroni's ``AbstractDCS`` is the model) and the plain data it returns.

A store keeps, for one cluster: a *session* per node (a lease that lives while the node renews
it), one *master key* per group (the node that holds it; it dies with that node's session), one
*member key* per node (also on its session: present means alive), and an optional *switchover*
request per group. Calls fall in three kinds, and every backend documents them the same way:

- timing-critical (``keepalive``): runs on the master's hot path with a hard deadline; a late
  answer is a failed one (the caller fences itself before its lease can expire).
- compare-and-set (``acquire``, ``release``, ``clear_switchover``): takes effect only if the
  key is in the state the caller saw (free; or held by me at revision R), never blindly.
- plain (``open_session``, ``register_member``, ``read``, ``watch``, ``request_switchover``).

Every call raises :class:`StoreUnavailable` when the store cannot answer in time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nonstop.common import NonstopError


class StoreUnavailable(NonstopError):
    """The store did not answer in time (no quorum, unreachable, partitioned)."""


class SessionLost(StoreUnavailable):
    """The store answered: our session (lease) no longer exists. Open a new one."""


@dataclass(frozen=True, slots=True)
class GroupRecord:
    group: str
    holder: str  # node id
    lease: int  # the holder's session id
    revision: int  # the key's mod revision: what release() compares against
    ttl_left: float | None = None  # seconds, when the backend can tell


@dataclass(frozen=True, slots=True)
class Switchover:
    group: str
    target: str
    revision: int


@dataclass(frozen=True, slots=True)
class ClusterView:
    """One consistent read of the store (everything at ``revision``)."""

    revision: int
    groups: dict[str, GroupRecord] = field(default_factory=dict)
    members: dict[str, int] = field(default_factory=dict)  # node -> its session id (alive)
    switchovers: dict[str, Switchover] = field(default_factory=dict)


class AbstractStore(ABC):
    """One node's handle on the store. ``node`` is this node's id."""

    node: str
    session: int | None = None

    # -- plain --------------------------------------------------------------------------
    @abstractmethod
    async def open_session(self, ttl: float) -> int:
        """Start a new session of ``ttl`` seconds (etcd: LeaseGrant); return its id."""

    @abstractmethod
    async def register_member(self) -> None:
        """Put this node's member key on its session (alive while the session is)."""

    @abstractmethod
    async def read(self) -> ClusterView:
        """A linearizable read of the whole cluster (never a minority member's stale view)."""

    @abstractmethod
    def watch(self) -> AsyncIterator[int]:
        """Yield a revision each time something under the cluster changes; ends on error."""

    @abstractmethod
    async def request_switchover(self, group: str, target: str) -> None:
        """Ask the master of ``group`` to hand it to ``target``."""

    # -- timing-critical ----------------------------------------------------------------
    @abstractmethod
    async def keepalive(self, deadline: float) -> float:
        """Renew the session; return the TTL granted (seconds). ``deadline`` is a
        ``time.monotonic()`` instant: no answer by then raises StoreUnavailable; SessionLost
        when the store says the session is gone."""

    # -- compare-and-set ----------------------------------------------------------------
    @abstractmethod
    async def acquire(self, group: str) -> int | None:
        """Take ``group``'s master key on our session only if it is free; return its revision,
        or None if someone holds it."""

    @abstractmethod
    async def release(self, group: str, revision: int) -> bool:
        """Delete ``group``'s master key only if it is still ours at ``revision``."""

    @abstractmethod
    async def clear_switchover(self, group: str, revision: int) -> bool:
        """Delete the switchover request only if it is still the one at ``revision``."""

    async def close(self) -> None:  # noqa: B027 - optional for backends with nothing to close
        """Revoke the session if possible (a clean stop frees our groups at once), close."""
